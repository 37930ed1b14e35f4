"""The matcher service: the `Matcher` facade over ingest, store, index, retention and queries.

| thread      | job                                                                                       |
|-------------|-------------------------------------------------------------------------------------------|
| receive     | ZeroMQ `Receiver`: whatever is queued, decoded as a batch (wire schema) → dimension and   |
|             | length checks → bounded queue of batches                                                  |
| commit      | group commit: everything queued (a lone sighting waits ≤ batch_wait_ms) → SQLite          |
|             | transactions of ≤ batch_max → bounded queue of committed batches                          |
| index       | add each committed batch to its model's index partition → count as accepted; beside the   |
|             | next commit, as SQLite and FAISS both run without the GIL                                  |
| checkpoint  | every second: copy the SQLite WAL into the database file, off the commit path              |
| snapshots   | every `index.snapshot_interval_s`: write changed partitions, prune the deletion log          |
| retention   | every `retention.check_interval_s`: delete sightings past max age / per-camera count         |
|             | from store and index                                                                        |
| rebuild     | started by the index when a partition outgrows exact search (see `matcher.index`)          |

A sighting counts as accepted only once its batch is committed (WAL, `synchronous=FULL`) and indexed, so
`kill -9` never loses an accepted sighting and a counted one is findable; at start the index loads its
snapshots and replays the store. A deletion waits, under the commit lock, until every committed batch is
indexed, then deletes from store and index: the index never holds a deleted id.

    >>> m = Matcher(load_matcher_config("configs/matcher.yaml"))   # opens data_dir, recovers the index
    >>> m.start()                                                 # binds ingest.endpoint
    >>> m.search_track("edge-1", "gate", 17, None, Filters(top_k=5)).ranked()
    >>> m.stop()                                                  # final snapshot
    $ crossview matcher --config configs/matcher.yaml
"""

from __future__ import annotations

import logging
import queue
import sqlite3
import threading
import time
from collections import Counter
from pathlib import Path

import numpy as np

from crossview.kernel.config import IndexConfig, MatcherConfig, QueryConfig
from crossview.kernel.wire import Sighting
from crossview.matcher.index import Index
from crossview.matcher.ingest import Receiver
from crossview.matcher.metrics import MatcherMetrics
from crossview.matcher.query import Filters, QueryEngine, QueryResult, load_embedders
from crossview.matcher.store import SightingRecord, Store

log = logging.getLogger(__name__)

_RETENTION_CHUNK = 5000  # sightings deleted per transaction, so ingest never waits long
_LOGGED_REJECTS = 10  # first few rejects of a reason are logged, then every 1000th
_CHECKPOINT_INTERVAL_S = 1.0  # ~20 MB of WAL at 10,000 sightings/s
_QUEUED_BATCHES = 4  # received batches (≤ batch_max each) waiting for the committer; beyond, ZeroMQ buffers


def open_data(data_dir: Path, index_cfg: IndexConfig, query_cfg: QueryConfig, models: list[Path],
              read_only: bool = False) -> QueryEngine:
    """Store + recovered index + image embedders over `data_dir`; read-only beside a running service is fine."""
    store = Store(Path(data_dir) / "sightings.db", read_only, query_cfg.track_gap_s)
    try:
        index = Index(index_cfg, store, Path(data_dir) / "index", read_only)
        index.recover()
        return QueryEngine(store, index, load_embedders(models), query_cfg)
    except BaseException:
        store.close()
        raise


class Matcher:
    """The service and the facade the HTTP API uses; see the module docstring."""

    def __init__(self, cfg: MatcherConfig):
        self.cfg = cfg
        Path(cfg.data_dir).mkdir(parents=True, exist_ok=True)
        self.queries = open_data(cfg.data_dir, cfg.index, cfg.query, cfg.models)
        self.store, self.index = self.queries.store, self.queries.index
        self.metrics = MatcherMetrics(self.stats)
        self.receiver: Receiver | None = None
        self.accepted = 0  # committed since start
        self.accepted_by_camera: Counter[str] = Counter()
        self._rejected: Counter[str] = Counter()  # checks past the wire schema; the receiver counts its own
        self._dims = self.store.models()  # model version -> dimension, fixed by its first sighting
        self._write = threading.Lock()  # commits and deletions; a deletion also waits for the index thread
        self._stop = threading.Event()
        self._stopped = False
        self._queue: queue.Queue[list[Sighting] | None] = queue.Queue(_QUEUED_BATCHES)
        # committed batches for the index thread: (sightings, their ids, when their commit began)
        self._committed: queue.Queue[tuple[list[Sighting], list[int], float] | None] = queue.Queue(_QUEUED_BATCHES)
        self._threads: list[threading.Thread] = []

    # -- lifecycle -----------------------------------------------------------------------------

    def start(self) -> None:
        ing = self.cfg.ingest
        self.receiver = Receiver(ing.endpoint, security=ing.security, rcvhwm=ing.rcvhwm)
        self.store.checkpoint_in_background()
        loops = [("receive", self._receive_loop), ("commit", self._commit_loop), ("index", self._index_loop),
                 ("checkpoint", self._checkpoint_loop), ("snapshots", self._snapshot_loop)]
        if self.cfg.retention.max_age_hours or self.cfg.retention.max_per_camera:
            loops.append(("retention", self._retention_loop))
        for name, target in loops:
            t = threading.Thread(target=target, name=f"matcher-{name}", daemon=True)
            t.start()
            self._threads.append(t)
        if self.cfg.metrics.port:
            self.metrics.serve(self.cfg.metrics.port, self.cfg.metrics.host)
            log.info("metrics on http://%s:%d/metrics", self.cfg.metrics.host, self.cfg.metrics.port)
        log.info("matcher ingesting on %s (%s), data in %s", self.receiver.endpoint, ing.security.mode, self.cfg.data_dir)

    @property
    def endpoint(self) -> str | None:
        """The bound ingest endpoint (with the real port when the config asked for `*`)."""
        return self.receiver.endpoint if self.receiver else None

    def stop(self) -> None:
        """Stop ingest (what was received is still committed), write a final snapshot, close the store.
        The object is unusable afterwards."""
        if self._stopped:
            return
        self._stopped = True
        self._stop.set()
        for t in self._threads:  # receive first: its end-of-stream marker lets the committer, then the indexer, finish
            t.join()
        if self.receiver:
            self.receiver.close()
        self.index.close()
        self._snapshot()
        self.store.close()
        self._log_status()
        log.info("matcher stopped")

    # -- ingest --------------------------------------------------------------------------------

    def _receive_loop(self) -> None:
        """Decoding and checks overlap the committer's disk writes; a full queue pushes back on ZeroMQ."""
        while not self._stop.is_set():
            batch = self._checked(self.receiver.receive_batch(0.1, self.cfg.ingest.batch_max))  # short, so stop() is noticed
            if batch:
                self._queue.put(batch)
        self._queue.put(None)  # end of stream

    def _commit_loop(self) -> None:
        interval = self.cfg.metrics.log_interval_s
        next_log = time.monotonic() + interval
        finished = False
        while not finished:
            batch, finished = self._next_batch()
            for n in range(0, len(batch), self.cfg.ingest.batch_max):
                chunk = batch[n:n + self.cfg.ingest.batch_max]
                try:
                    self._commit(chunk)
                except Exception:  # a bug must not end ingest: log it, go on with the next batch
                    log.exception("%d sightings lost: ingest batch failed", len(chunk))
            if time.monotonic() >= next_log:
                self._log_status()
                next_log = time.monotonic() + interval
        self._committed.put(None)

    def _next_batch(self) -> tuple[list[Sighting], bool]:
        """(what is queued, end of stream seen): received batches until batch_max is reached (so < 2 x batch_max).
        Under load that is whatever arrived during the previous commit; a lone sighting waits at most batch_wait_ms
        for company."""
        try:
            batch = self._queue.get(timeout=0.1)
        except queue.Empty:
            return [], False
        if batch is None:
            return [], True
        deadline = time.monotonic() + self.cfg.ingest.batch_wait_ms / 1000
        while len(batch) < self.cfg.ingest.batch_max:
            try:
                more = self._queue.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                break
            if more is None:
                return batch, True
            batch += more
        return batch, False

    def _commit(self, valid: list[Sighting]) -> None:
        t0 = time.perf_counter()
        with self._write:
            try:
                ids = self.store.insert(valid)
            except sqlite3.Error as e:
                log.error("%d sightings lost: the store refused the batch (%s)", len(valid), e)
                self._rejected["store error"] += len(valid)
                return
            self._committed.put((valid, ids, t0))  # under the lock, so remove() finds it queued

    def _index_loop(self) -> None:
        while True:
            item = self._committed.get()
            try:
                if item is None:
                    return
                self._index(*item)
            except Exception:  # a bug must not end ingest; the store keeps them, the next rebuild indexes them
                log.exception("%d committed sightings not indexed", len(item[1]))
            finally:
                self._committed.task_done()

    def _index(self, valid: list[Sighting], ids: list[int], t0: float) -> None:
        for model, (model_ids, vecs) in _by_model(valid, ids).items():
            self.index.add(model, model_ids, vecs)
        # On disk, so accepted; counted once searchable too, so a count seen means findable.
        self.accepted += len(ids)
        self.accepted_by_camera.update(s.camera for s in valid)
        self.metrics.batch_seconds.observe(time.perf_counter() - t0)

    def _checked(self, batch: list[Sighting]) -> list[Sighting]:
        """The sightings passing the checks the wire schema cannot make, with their embeddings as float32 unit
        vectors: rows of one array per model version, as numpy calls cost per call, not per row."""
        by_model: dict[str, list[Sighting]] = {}
        dropped = set()
        for s in batch:
            dim = self._dims.setdefault(s.model, len(s.embedding))
            if len(s.embedding) == dim:
                by_model.setdefault(s.model, []).append(s)
            else:
                dropped.add(id(s))
                self._reject(s, "wrong dimension", f"model version {s.model!r} has {dim}-d embeddings, got {len(s.embedding)}")
        for group in by_model.values():
            # float64: squares of float32 extremes overflow float32. concatenate: np.stack is slow for many small rows
            wide = np.concatenate([s.embedding for s in group], dtype=np.float64).reshape(len(group), -1)
            norms = np.sqrt(np.einsum("ij,ij->i", wide, wide))
            vecs = (wide / np.maximum(norms, 1e-6)[:, None]).astype(np.float32)
            for s, vec, norm in zip(group, vecs, norms.tolist()):
                s.embedding = vec
                if norm < 1e-6:
                    dropped.add(id(s))
                    self._reject(s, "zero embedding", "embedding has zero length")
        return [s for s in batch if id(s) not in dropped]

    def _reject(self, s: Sighting, reason: str, detail: str) -> None:
        self._rejected[reason] += 1
        n = self._rejected[reason]
        if n <= _LOGGED_REJECTS or n % 1000 == 0:
            log.warning("dropped sighting from node %s camera %s: %s [%d %s so far]", s.node, s.camera, detail, n, reason)

    @property
    def rejected(self) -> Counter[str]:
        # dict() copies in one step while the ingest thread keeps counting
        return Counter(dict(self.receiver.rejected) if self.receiver else {}) + Counter(dict(self._rejected))

    # -- removal, retention, snapshots ---------------------------------------------------------

    def remove(self, ids: list[int]) -> int:
        """Delete sightings (with embeddings and thumbnails) from store and index; returns how many existed."""
        with self._write:
            self._committed.join()  # committed batches indexed first: an add after the removal would revive ids
            by_model, pos = self.store.delete(ids)
            self.index.remove(by_model, pos)
        return sum(len(v) for v in by_model.values())

    def enforce_retention(self, now: float | None = None) -> int:
        """Delete what the retention policy no longer allows; returns how many sightings were deleted."""
        r, now = self.cfg.retention, time.time() if now is None else now
        total = 0
        while not self._stop.is_set():
            ids = self.store.older_than(now - r.max_age_hours * 3600, _RETENTION_CHUNK) if r.max_age_hours else []
            if r.max_per_camera:
                ids += self.store.over_quota(r.max_per_camera, _RETENTION_CHUNK)
            removed = self.remove(ids) if ids else 0
            total += removed
            if not removed:
                break
        if total:
            log.info("retention: deleted %d sightings (max age %s h, max %s per camera)", total, r.max_age_hours, r.max_per_camera)
        return total

    def _retention_loop(self) -> None:
        while True:
            try:
                self.enforce_retention()
            except sqlite3.Error as e:
                log.error("retention pass failed, retried in %.0f s: %s", self.cfg.retention.check_interval_s, e)
            if self._stop.wait(self.cfg.retention.check_interval_s):
                return

    def _checkpoint_loop(self) -> None:
        while not self._stop.wait(_CHECKPOINT_INTERVAL_S):
            try:
                self.store.checkpoint()
            except sqlite3.Error as e:  # the WAL keeps everything meanwhile; the next pass copies it
                log.error("WAL checkpoint failed: %s", e)

    def _snapshot_loop(self) -> None:
        while not self._stop.wait(self.cfg.index.snapshot_interval_s):
            self._snapshot()

    def _snapshot(self) -> None:
        t0 = time.monotonic()
        try:
            written = self.index.save()
            self.store.prune_deletions(self.index.snapshot_deletion_pos())
        except (OSError, sqlite3.Error) as e:
            log.error("index snapshot failed (the previous one stays): %s", e)
            return
        if written:
            log.info("index snapshot: %d partition(s) written in %.2f s", written, time.monotonic() - t0)

    # -- status --------------------------------------------------------------------------------

    def stats(self) -> dict:
        return {"accepted": self.accepted, "rejected": dict(self.rejected), "partitions": self.index.stats(),
                "cameras": dict(self.accepted_by_camera)}

    def _log_status(self) -> None:
        s = self.stats()
        parts = ", ".join(f"{m} {p['size']} {p['kind']}{' (rebuilding)' if p['rebuilding'] else ''}"
                          for m, p in s["partitions"].items()) or "none"
        reasons = ", ".join(f"{r} {n}" for r, n in sorted(s["rejected"].items()))
        log.info("ingest: %d accepted, %d rejected%s; partitions: %s",
                 s["accepted"], sum(s["rejected"].values()), f" ({reasons})" if reasons else "", parts)

    # -- queries (see matcher.query) -----------------------------------------------------------

    def search_embedding(self, vec: np.ndarray, model: str, filters: Filters | None = None) -> QueryResult:
        return self.queries.search_embedding(vec, model, filters)

    def search_sighting(self, sighting_id: int, filters: Filters | None = None) -> QueryResult:
        return self.queries.search_sighting(sighting_id, filters)

    def search_track(self, node: str, camera: str, track: int, model: str | None = None,
                     filters: Filters | None = None) -> QueryResult:
        return self.queries.search_track(node, camera, track, model, filters)

    def search_image(self, image_bgr: np.ndarray, model: str, filters: Filters | None = None) -> QueryResult:
        return self.queries.search_image(image_bgr, model, filters)

    def sighting(self, sighting_id: int) -> SightingRecord | None:
        return self.store.record(sighting_id)

    def thumbnail(self, sighting_id: int) -> bytes | None:
        return self.store.thumbnail(sighting_id)

    def recent(self, camera: str | None = None, limit: int = 50) -> list[SightingRecord]:
        """Newest first, for a picker."""
        return self.store.recent(camera, limit)

    def cameras(self) -> list[dict]:
        """camera, node(s), sightings, tracks, first_ts, last_ts per camera in the store."""
        return self.store.cameras()


def _by_model(sightings: list[Sighting], ids: list[int]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    rows: dict[str, list[int]] = {}
    for n, s in enumerate(sightings):
        rows.setdefault(s.model, []).append(n)
    return {model: (np.array([ids[n] for n in ns], np.int64),
                    np.concatenate([sightings[n].embedding for n in ns]).reshape(len(ns), -1))  # faster than np.stack
            for model, ns in rows.items()}
