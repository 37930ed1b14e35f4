"""FAISS partitions, one per embedding-model version, so vectors of different versions are never compared.

| what            | how                                                                                  |
|-----------------|--------------------------------------------------------------------------------------|
| metric          | inner product on L2-normalised vectors (cosine similarity); FAISS ids = store ids    |
| small partition | exact: `IDMap2,Flat`                                                                 |
| past exact_max  | `IVF{nlist},Flat` trained on the partition's own data (nlist ≈ 4·√N, ≤ nlist_max, ≥ 39 points a list), |
|                 | or `IDMap2,HNSW{M}` with `kind: hnsw`                                                |
| rebuild         | background thread: reads the store up to the partition's highest id, trains, then swaps under the |
|                 | partition lock and applies what arrived or was removed meanwhile; ingest and queries never wait for it, |
|                 | and on Linux it runs at a lower CPU priority (nice +10), so they do not wait for the CPU either |
| removal         | `remove_ids` (flat, IVF); HNSW cannot remove, so its ids are tombstoned, filtered from searches |
|                 | by an `IDSelector`, and purged by a rebuild once they are 10% of the graph            |
| snapshots       | `save()`: per partition `<key>-<n>.faiss` (temp file + fsync + os.replace) and a `<key>.json` sidecar |
|                 | naming that file, the highest sighting id in it and the deletion-log position         |
| recovery        | `recover()`: load snapshots, add the store's sightings above each snapshot's highest id, |
|                 | apply deletions logged after its position; a model without a usable snapshot is rebuilt from the store |
| re-embedded     | `add(model, ids, vecs, seq=)`: older sightings re-embedded by this version (`matcher.migration`) come |
|                 | in any id order, so a partition counts them apart, by the store's `reembedded` seq (`mseq`)   |
| drop            | `drop(model)`: a version's partition and its snapshot files go (the store's vectors are the caller's) |

    index = Index(cfg.index, store, data_dir / "index")
    index.recover()
    index.add("osnet-3", ids, vecs)          # (n,) int64 store ids, (n, dim) float32 unit rows, once committed
    scores, ids = index.search("osnet-3", query_vec, k=80)
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import faiss
import numpy as np

from crossview.kernel.config import IndexConfig
from crossview.matcher.store import Store

log = logging.getLogger(__name__)

_IP = faiss.METRIC_INNER_PRODUCT
_MIN_POINTS_PER_LIST = 39  # FAISS warns below this many training points per IVF list
_IVF_GROWTH = 4  # an IVF partition this many times its training size gets more lists
_TOMBSTONE_SHARE = 0.1
_REBUILD_NICE = 10  # added to a rebuild thread's nice value
SNAPSHOT_FORMAT = 1


class _Closed(Exception):
    """The index was closed before a rebuild could read the store."""


def nlist_for(n: int, cap: int) -> int:
    return max(1, min(cap, int(4 * math.sqrt(n)), n // _MIN_POINTS_PER_LIST))


def build_index(kind: str, dim: int, ids: np.ndarray, vecs: np.ndarray, cfg: IndexConfig) -> faiss.Index:
    """A new index of `kind` holding `vecs` under `ids`; IVF is trained on them first."""
    if kind == "flat":
        index = faiss.index_factory(dim, "IDMap2,Flat", _IP)
    elif kind == "hnsw":
        index = faiss.index_factory(dim, f"IDMap2,HNSW{cfg.hnsw_m}", _IP)
        faiss.downcast_index(index.index).hnsw.efSearch = cfg.hnsw_ef_search
    elif kind == "ivf":
        index = faiss.index_factory(dim, f"IVF{nlist_for(len(ids), cfg.nlist_max)},Flat", _IP)
        index.cp.niter = 10  # k-means on unit vectors settles fast; training runs on ingest's cores
        index.cp.max_points_per_centroid = 64
        index.train(vecs)
        index.nprobe = cfg.nprobe
    else:
        raise ValueError(f"unknown index kind {kind!r}")
    if len(ids):
        index.add_with_ids(vecs, ids)
    return index


class Partition:
    """One model version's vectors. Every use of `index` holds `lock`; a rebuild swaps it under the lock."""

    def __init__(self, model: str, dim: int, index: faiss.Index, kind: str, max_id: int = 0, built_n: int = 0,
                 tombstones: set[int] | None = None, mseq: int = 0):
        self.model, self.dim, self.index, self.kind = model, dim, index, kind
        self.max_id = max_id  # highest sighting id added: the store holds nothing newer that is not here too
        self.mseq = mseq  # the same for vectors re-embedded by this version, by their seq in the store
        self.built_n = built_n  # vectors the current index was built (trained) on
        self.tombstones = tombstones or set()
        self.lock = threading.Lock()
        self.version = 0  # bumped by every change, so an unchanged partition is not written again
        self.pending: list[tuple[str, np.ndarray, np.ndarray | None]] | None = None  # changes during a rebuild
        self.saved: dict | None = None  # sidecar of the snapshot on disk
        self._selector: tuple | None = None  # HNSW: (IDSelectorBatch, IDSelectorNot) of the tombstones, kept alive here

    @property
    def size(self) -> int:
        return self.index.ntotal - len(self.tombstones)

    def add(self, ids: np.ndarray, vecs: np.ndarray, seq: int | None = None) -> None:
        """Add sightings of this version, or (`seq`: the last store seq among them) ones re-embedded by it."""
        with self.lock:
            self.index.add_with_ids(vecs, ids)
            if seq is None:
                self.max_id = max(self.max_id, int(ids.max()))
            else:
                self.mseq = max(self.mseq, seq)
            self.version += 1
            if self.pending is not None:
                self.pending.append(("add", ids, vecs))

    def remove(self, ids: np.ndarray) -> None:
        """Remove ids that are in the index (ids not in it would skew an HNSW partition's tombstone count)."""
        with self.lock:
            self._drop(ids)
            self.version += 1
            if self.pending is not None:
                self.pending.append(("remove", ids, None))

    def holds(self, ids: np.ndarray) -> np.ndarray:
        """Which of `ids` are searchable here. IVF answers all: its `remove_ids` passes over ids it does not hold."""
        if not isinstance(self.index, faiss.IndexIDMap2):
            return np.ones(len(ids), bool)
        return np.isin(ids, faiss.vector_to_array(self.index.id_map)) & ~np.isin(ids, list(self.tombstones))

    def _drop(self, ids: np.ndarray) -> None:
        if self.kind == "hnsw":
            self.tombstones.update(ids.tolist())
            self._selector = None
        else:
            self.index.remove_ids(ids)

    def search(self, vec: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(scores, ids), best first; fewer than k when the partition (or the probed lists) hold fewer."""
        with self.lock:
            k = min(k, self.index.ntotal)
            if k <= 0:
                return np.zeros(0, np.float32), np.zeros(0, np.int64)
            scores, ids = self.index.search(vec.reshape(1, -1), k, params=self._search_params(k))
        keep = ids[0] >= 0
        return scores[0][keep], ids[0][keep]

    def _search_params(self, k: int) -> faiss.SearchParameters | None:
        if self.kind != "hnsw":
            return None
        params = faiss.SearchParametersHNSW(efSearch=max(faiss.downcast_index(self.index.index).hnsw.efSearch, k))
        if self.tombstones:
            if self._selector is None:  # SWIG keeps only C pointers: the Python objects must outlive the searches
                batch = faiss.IDSelectorBatch(np.fromiter(self.tombstones, np.int64, len(self.tombstones)))
                self._selector = (batch, faiss.IDSelectorNot(batch))
            params.sel = self._selector[1]
        return params

    def swap(self, index: faiss.Index, kind: str, built_ids: np.ndarray) -> int:
        """Install a rebuilt index and replay onto it what changed since the rebuild began; returns that count."""
        pending, self.pending = self.pending or [], None
        self.index, self.kind, self.built_n = index, kind, len(built_ids)
        self.tombstones, self._selector = set(), None
        added = [built_ids]
        for op, ids, vecs in pending:
            if op == "add":
                index.add_with_ids(vecs, ids)
                added.append(ids)
            else:  # a removal may name ids the rebuild already left out: drop only what is there
                self._drop(ids[np.isin(ids, np.concatenate(added))])
        self.version += 1
        return len(pending)

    def stats(self) -> dict:
        return {"size": self.size, "kind": self.kind, "dim": self.dim, "rebuilding": self.pending is not None}


def lower_priority() -> None:
    """Lower the calling thread's CPU priority (rebuilds, re-embedding): a rebuild only makes searches faster later, while ingest that falls
    behind makes edges buffer and drop (bench, 100,000 -> 1,000,000 sightings on 2 cores, one busy elsewhere: 14,700
    -> 22,200 sightings/s). Training takes longer only while the cores are busy. Linux only, where nice is per
    thread; with `index.threads` 1 (the default) FAISS trains on this thread."""
    if sys.platform != "linux":
        return
    # From the main thread's nice, not this thread's: a rebuild may start the next one from its own thread.
    nice = min(19, os.getpriority(os.PRIO_PROCESS, os.getpid()) + _REBUILD_NICE)
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), nice)
    except OSError as e:
        log.debug("rebuild thread keeps its CPU priority: %s", e)


def _key(model: str, unsafe: str = r"[^A-Za-z0-9_.-]", sep: str = "-") -> str:
    """A file (or collection) name for a model version: readable, and unique through a hash of the exact name;
    characters matching `unsafe` become `_`."""
    return f"{re.sub(unsafe, '_', model)[:60]}{sep}{hashlib.sha1(model.encode()).hexdigest()[:8]}"


def _write_atomic(path: Path, data: bytes | memoryview) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class VectorIndex:
    """What every engine's index shares (this module's FAISS `Index`, `matcher.milvus_index.MilvusIndex`): partitions
    by model version, each with `model`, `dim`, `size` and `stats()`; the checks a query vector passes; the store's
    vectors of a version."""

    def __init__(self, cfg: IndexConfig, store: Store, read_only: bool):
        self.cfg, self.store, self.read_only = cfg, store, read_only
        self.partitions: dict = {}
        self.del_pos = 0  # deletion-log position applied to every partition

    def partition(self, model: str):
        p = self.partitions.get(model)
        if p is None:
            known = ", ".join(sorted(self.partitions)) or "none"
            raise LookupError(f"no sightings of embedding model version {model!r} (indexed versions: {known})")
        return p

    def query_vector(self, model: str, vec: np.ndarray) -> np.ndarray:
        """`vec` as float32 for this model's partition, or LookupError / ValueError saying what does not fit."""
        dim = self.partition(model).dim
        vec = np.asarray(vec, np.float32).reshape(-1)
        if vec.shape[0] != dim:
            raise ValueError(f"query embedding has {vec.shape[0]} dimensions, model version {model!r} has {dim}")
        return vec

    def stats(self) -> dict[str, dict]:
        return {m: p.stats() for m, p in sorted(self.partitions.items())}

    def production(self, model: str) -> None:
        """`model` became production and its migration covers the history. The matcher's queries name their version,
        so this index needs nothing; Milvus points an alias at it for other readers."""

    def stored_chunks(self, model: str, upto: int | None = None,
                      upto_seq: int | None = None) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """(ids, vectors) chunks of one model version in the store: its own sightings' with ids up to `upto`, then
        those it re-embedded up to seq `upto_seq`."""
        yield from (c for c in self.store.vectors(model, 0, upto) if len(c[0]))
        yield from (c[:2] for c in self.store.reembedded_vectors(model, 0, upto_seq) if len(c[0]))

    def stored_vectors(self, model: str, upto: int | None = None, upto_seq: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """`stored_chunks` in one piece: what a rebuild trains on."""
        chunks = list(self.stored_chunks(model, upto, upto_seq))
        if not chunks:
            dim = self.store.models()[model]
            return np.zeros(0, np.int64), np.zeros((0, dim), np.float32)
        return np.concatenate([c[0] for c in chunks]), np.concatenate([c[1] for c in chunks])


class Index(VectorIndex):
    def __init__(self, cfg: IndexConfig, store: Store, snapshot_dir: Path, read_only: bool = False):
        super().__init__(cfg, store, read_only)
        self.dir = Path(snapshot_dir)
        self.partitions: dict[str, Partition] = {}
        self._lock = threading.Lock()
        self._rebuilds: dict[str, threading.Thread] = {}
        self._reading = threading.Lock()  # held by a rebuild reading the store
        self._saving = threading.Lock()  # snapshots are written, or a dropped partition's deleted, one at a time
        self._closed = False
        self.recovered_upto = 0  # the store's highest id when `recover()` began: all of it is indexed
        self._faiss_threads()
        if not read_only:
            self.dir.mkdir(parents=True, exist_ok=True)

    def _faiss_threads(self) -> None:
        """Apply `cfg.threads` to the calling thread: OpenMP's thread count is a per-thread setting, so one call at
        start left the ingest, rebuild and query threads at all cores (and OpenMP's spin-waiting on busy cores)."""
        if self.cfg.threads:
            faiss.omp_set_num_threads(self.cfg.threads)

    # -- changes -------------------------------------------------------------------------------

    def add(self, model: str, ids: np.ndarray, vecs: np.ndarray, seq: int | None = None) -> None:
        """Committed sightings of `model`, or with `seq` older ones re-embedded by it (see `Partition.add`)."""
        self._faiss_threads()
        with self._lock:
            p = self.partitions.get(model)
            if p is None:
                p = self.partitions[model] = self._empty(model, vecs.shape[1])
        p.add(ids, vecs, seq)
        self.maybe_rebuild(p)

    def _empty(self, model: str, dim: int) -> Partition:
        return Partition(model, dim, build_index("flat", dim, np.zeros(0, np.int64), np.zeros((0, dim), np.float32), self.cfg),
                         "flat")

    def drop(self, model: str) -> bool:
        """Forget a version's partition and its snapshot files (a rebuild under way finishes into nothing); False if
        there was none. Its vectors stay in the store: `Store.drop_vectors` is the caller's, after this."""
        with self._lock:
            p = self.partitions.pop(model, None)
        if p is None:
            return False
        with self._saving:  # not while a snapshot of it is being written
            for name in ([p.saved["file"]] if p.saved else []) + [f"{_key(model)}.json"]:
                (self.dir / name).unlink(missing_ok=True)
            _fsync_dir(self.dir)
        return True

    def remove(self, by_model: dict[str, list[int]], del_pos: int) -> None:
        """Apply deletions the store committed up to log position `del_pos`."""
        self._faiss_threads()
        for model, ids in by_model.items():
            if (p := self.partitions.get(model)) is not None:
                p.remove(np.asarray(ids, np.int64))
                self.maybe_rebuild(p)
        self.del_pos = max(self.del_pos, del_pos)  # only now: a snapshot may claim this position

    # -- queries -------------------------------------------------------------------------------

    def search(self, model: str, vec: np.ndarray, k: int, cameras: list[str] | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(scores, ids) best first. `cameras` is a hint FAISS does not use (its ids carry no camera); the caller
        filters the sightings it gets anyway (`query.Filters.admits`)."""
        self._faiss_threads()
        return self.partition(model).search(self.query_vector(model, vec), k)

    # -- background rebuild --------------------------------------------------------------------

    def _wanted_kind(self, p: Partition) -> str | None:
        n, cfg = p.size, self.cfg
        if p.kind == "flat":
            return cfg.kind if n > cfg.exact_max else None
        if n <= cfg.exact_max // 2:
            return "flat"  # shrunk by retention: exact search is cheap again
        if p.kind != cfg.kind:
            return cfg.kind  # the configuration changed since this index was built
        if p.kind == "ivf" and n >= _IVF_GROWTH * p.built_n and nlist_for(n, cfg.nlist_max) > faiss.extract_index_ivf(p.index).nlist:
            return "ivf"  # grown: train more lists
        if p.kind == "hnsw" and len(p.tombstones) > _TOMBSTONE_SHARE * p.index.ntotal:
            return "hnsw"
        return None

    def rebuilding(self, model: str) -> bool:
        t = self._rebuilds.get(model)  # a rebuild that is finishing may start the next one: it does not count
        return t is not None and t.is_alive() and t is not threading.current_thread()

    def maybe_rebuild(self, p: Partition) -> None:
        with self._lock:  # ingest and removals both call this: one rebuild per partition at a time
            if self.read_only or self._closed or self.rebuilding(p.model) or self.partitions.get(p.model) is not p:
                return  # (a dropped partition is rebuilt no more)
            kind = self._wanted_kind(p)
            if kind is None:
                return
            with p.lock:
                upto, p.pending = (p.max_id, p.mseq), []  # from here on, changes are also recorded for the new index
            t = threading.Thread(target=self._rebuild, args=(p, kind, upto), name=f"rebuild-{p.model}", daemon=True)
            self._rebuilds[p.model] = t
            t.start()

    def _rebuild(self, p: Partition, kind: str, upto: tuple[int, int]) -> None:
        self._faiss_threads()
        lower_priority()
        t0 = time.monotonic()
        try:
            with self._reading:  # close() waits for this: the store is never closed under the read
                if self._closed:
                    raise _Closed
                ids, vecs = self.stored_vectors(p.model, *upto)
            log.info("partition %s: rebuilding as %s from %d stored vectors", p.model, kind, len(ids))
            index = build_index(kind, p.dim, ids, vecs, self.cfg)
        except _Closed:
            with p.lock:
                p.pending = None
            return
        except Exception:
            log.exception("partition %s: rebuild as %s failed; the current %s index stays", p.model, kind, p.kind)
            with p.lock:
                p.pending = None
            return
        with p.lock:
            if self._closed:
                p.pending = None
                return
            replayed = p.swap(index, kind, ids)
        log.info("partition %s: now %s, %d vectors, rebuilt in %.1f s (%d changes replayed)",
                 p.model, kind, p.size, time.monotonic() - t0, replayed)
        self.maybe_rebuild(p)  # it may have outgrown this one meanwhile (ingest runs on during a rebuild)

    def wait_rebuilds(self, timeout: float | None = None) -> bool:
        """True when no rebuild is running (the running ones, and those they started, finished within `timeout`)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while running := [t for t in list(self._rebuilds.values()) if t.is_alive()]:
            if deadline is not None and time.monotonic() >= deadline:
                return False
            for t in running:
                t.join(None if deadline is None else max(0.0, deadline - time.monotonic()))
        return True

    def close(self, timeout: float = 30.0) -> None:
        """Stop rebuilding; afterwards no rebuild reads the store, so it can be closed."""
        if not self.wait_rebuilds(timeout):
            log.warning("a partition rebuild is still running; its result is dropped and redone at the next start")
        with self._reading:
            self._closed = True

    # -- snapshots -----------------------------------------------------------------------------

    def save(self) -> int:
        """Write a snapshot of every partition changed since its last one; returns how many were written."""
        written = 0
        with self._saving:
            for p in list(self.partitions.values()):
                try:
                    written += self._save(p)
                except OSError as e:
                    log.error("partition %s: snapshot not written (%s); the previous one stays", p.model, e)
        return written

    def _save(self, p: Partition) -> bool:
        del_pos = self.del_pos  # read before the lock: every deletion up to here is already applied to p
        with p.lock:
            if p.saved and p.saved["version"] == p.version and p.saved["del_pos"] == del_pos:
                return False
            meta = {"format": SNAPSHOT_FORMAT, "model": p.model, "dim": p.dim, "kind": p.kind, "ntotal": p.index.ntotal,
                    "max_id": p.max_id, "mseq": p.mseq, "del_pos": del_pos, "built_n": p.built_n, "version": p.version,
                    "tombstones": sorted(p.tombstones)}
            same_index = p.saved is not None and p.saved["version"] == p.version
            blob = None if same_index else faiss.serialize_index(p.index)  # a copy, written outside the lock
        key = _key(p.model)
        if same_index:  # only the deletion-log position moved: the index file stays
            meta["file"] = p.saved["file"]
        else:
            meta["file"] = f"{key}-{time.time_ns()}.faiss"
            _write_atomic(self.dir / meta["file"], memoryview(blob))
        _write_atomic(self.dir / f"{key}.json", json.dumps(meta).encode())
        _fsync_dir(self.dir)
        if p.saved and p.saved["file"] != meta["file"]:
            (self.dir / p.saved["file"]).unlink(missing_ok=True)
        p.saved = meta
        return True

    def snapshot_deletion_pos(self) -> int:
        """The deletion-log position every snapshot on disk includes: the log up to here can be pruned."""
        saved = [p.saved["del_pos"] for p in self.partitions.values() if p.saved]
        return min(saved, default=self.del_pos)

    def _load_snapshots(self) -> dict[str, Partition]:
        out: dict[str, Partition] = {}
        for sidecar in sorted(self.dir.glob("*.json")):
            try:
                meta = json.loads(sidecar.read_text())
                index = faiss.read_index(str(self.dir / meta["file"]))
                if meta.get("format") != SNAPSHOT_FORMAT or index.ntotal != meta["ntotal"] or index.d != meta["dim"]:
                    raise ValueError(f"{meta['file']} does not match its sidecar")
            except Exception as e:  # any defect: the store holds everything needed to rebuild
                log.warning("snapshot %s unusable (%s: %s); that partition is rebuilt from the store", sidecar, type(e).__name__, e)
                continue
            p = Partition(meta["model"], meta["dim"], index, meta["kind"], meta["max_id"], meta["built_n"], set(meta["tombstones"]),
                          meta.get("mseq", 0))  # none in snapshots from before re-embedding
            p.saved, p.version = meta, meta["version"]
            out[p.model] = p
        if not self.read_only:
            keep = {p.saved["file"] for p in out.values()} | {f"{_key(m)}.json" for m in out}
            for f in self.dir.iterdir():
                if f.name not in keep:  # left by a crash between writing an index file and its sidecar
                    f.unlink()
        return out

    # -- recovery ------------------------------------------------------------------------------

    def recover(self) -> None:
        """Load snapshots and bring them up to date with the store; build from the store what has none."""
        t0 = time.monotonic()
        self.recovered_upto = self.store.next_id() - 1  # first: every sighting up to it is committed, so read below
        snapshots = self._load_snapshots() if self.dir.is_dir() else {}
        stored = self.store.models()
        pruned = self.store.pruned_upto()
        for model, p in list(snapshots.items()):
            if p.dim != stored.get(model, p.dim) or p.saved["del_pos"] < pruned:
                log.warning("snapshot of %s does not fit the store (%d-d, deletion log at %d, pruned to %d): "
                            "rebuilt from the store", model, p.dim, p.saved["del_pos"], pruned)
                del snapshots[model]
        oldest = min((p.saved["del_pos"] for p in snapshots.values()), default=0)
        deletions = self.store.deletions_after(oldest)
        for model, dim in stored.items():
            self.partitions[model] = self._replay(model, dim, snapshots.get(model), deletions)
        self.del_pos = self.store.last_deletion()
        summary = ", ".join(f"{m} {p.size} {p.kind}" for m, p in sorted(self.partitions.items())) or "empty"
        log.info("index recovered in %.1f s: %s", time.monotonic() - t0, summary)
        for p in self.partitions.values():
            self.maybe_rebuild(p)

    def _replay(self, model: str, dim: int, p: Partition | None, deletions: list[tuple[int, int, str]]) -> Partition:
        """A snapshot (or, without one, an empty partition) plus what the store holds beyond its watermarks, less
        what was deleted since it was written."""
        fresh = p is None
        if fresh:
            p = self._empty(model, dim)
        added = 0
        for ids, vecs in self.store.vectors(model, after_id=p.max_id):
            p.add(ids, vecs)
            added += len(ids)
        for ids, vecs, seq in self.store.reembedded_vectors(model, after_seq=p.mseq):
            p.add(ids, vecs, seq)
            added += len(ids)
        if fresh:
            log.info("partition %s: built exact from %d stored vectors", model, added)
            return p
        # What was added just now was read from the store as it is now, so its deletions are already reflected.
        gone = np.array([i for seq, i, m in deletions if seq > p.saved["del_pos"] and m == model and i > 0],  # not drops
                        np.int64)
        gone = gone[p.holds(gone)]
        if len(gone):
            p.remove(gone)
        log.info("partition %s: snapshot of %d (%s) + %d replayed, %d deletions replayed", model, p.saved["ntotal"], p.kind,
                 added, len(gone))
        return p
