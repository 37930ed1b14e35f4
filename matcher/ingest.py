"""Ingest: edge sightings from ZeroMQ to the store and the index, one `Pipeline` of four steps.

| step      | thread  | what happens                                                                           |
|-----------|---------|----------------------------------------------------------------------------------------|
| receive   | receive | `Receiver`: whatever is queued (≤ batch_max), decoded as a batch against the wire schema; |
|           |         | malformed messages are counted per reason, logged (rate-limited) with the sender, dropped |
| check     | receive | the checks the schema cannot make (a model version keeps the dimension of its first      |
|           |         | sighting; no zero embeddings), grouped by model version once: a `Batch` of `Rows`, each  |
|           |         | the model's sightings and their float32 unit vectors, row for row                        |
| commit    | commit  | group commit: queued batches (a lone sighting waits ≤ batch_wait_ms) into one SQLite      |
|           |         | transaction of ≤ batch_max, with ids and track ids (`matcher.tracks`) decided before it  |
| index     | index   | each model's (ids, vectors) added to its partition, then counted as accepted; beside the  |
|           |         | next commit, as SQLite and FAISS both run without the GIL                                 |

Bounded queues between the threads push back on ZeroMQ, which buffers up to `rcvhwm` messages.
A sighting counts as accepted only once it is committed (WAL, `synchronous=FULL`) and indexed, so
`kill -9` never loses an accepted sighting and a counted one is findable. Inside `quiet()` no commit
runs and every committed batch is indexed: deletions run there, so no later add revives what they delete.

    pipeline = Pipeline(cfg.ingest, store, index, Tracks(store, cfg.query.track_gap_s), metrics)
    pipeline.start()                    # binds cfg.ingest.endpoint
    pipeline.accepted, pipeline.rejected
    pipeline.stop()                     # what was received is still committed and indexed

    rx = Receiver("tcp://127.0.0.1:5555", security=cfg.ingest.security)   # on its own: CURVE + allow-list
    rx.receive_batch(0.1, 1000)         # what is queued (≤ 1000), decoded as one batch
"""

from __future__ import annotations

import logging
import queue
import sqlite3
import threading
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import zmq

from crossview.kernel.config import CurveConfig, IngestConfig
from crossview.kernel.runtime import listening
from crossview.kernel.transport import secure_server
from crossview.kernel.wire import MAX_MESSAGE_BYTES, Sighting, WireError, decode_many
from crossview.matcher.index import Index
from crossview.matcher.metrics import MatcherMetrics
from crossview.matcher.store import Store
from crossview.matcher.tracks import Tracks

log = logging.getLogger(__name__)
PLAIN = CurveConfig(mode="plain")
_LOGGED_REJECTS = 10  # first few rejects of a reason are logged, then every 1000th
_QUEUED_BATCHES = 4  # batches waiting between two steps; beyond, ZeroMQ buffers


@dataclass
class Rows:
    """One model version's share of a batch: its sightings and their embeddings as float32 unit vectors, row for row."""

    sightings: list[Sighting]
    vecs: np.ndarray  # (n, dim) float32


Batch = dict[str, Rows]  # model version -> its rows


def _size(batch: Batch) -> int:
    return sum(len(rows.sightings) for rows in batch.values())


def _merged(batches: list[Batch]) -> Batch:
    """Several batches as one, still one `Rows` per model version."""
    if len(batches) == 1:
        return batches[0]
    parts: dict[str, list[Rows]] = {}
    for batch in batches:
        for model, rows in batch.items():
            parts.setdefault(model, []).append(rows)
    return {model: Rows([s for r in rs for s in r.sightings], np.concatenate([r.vecs for r in rs])) for model, rs in parts.items()}


class Pipeline:
    """receive → check → commit → index; see the module docstring."""

    def __init__(self, cfg: IngestConfig, store: Store, index: Index, tracks: Tracks, metrics: MatcherMetrics):
        self.cfg, self.store, self.index, self.tracks, self.metrics = cfg, store, index, tracks, metrics
        self.receiver: Receiver | None = None
        self.accepted = 0  # committed and indexed since start
        self.accepted_by_camera: Counter[str] = Counter()
        self._rejected: Counter[str] = Counter()  # checks past the wire schema; the receiver counts its own
        self._dims = store.models()  # model version -> dimension, fixed by its first sighting
        self._write = threading.Lock()  # commits, and `quiet()`
        self._stop = threading.Event()
        self._received: queue.Queue[Batch | None] = queue.Queue(_QUEUED_BATCHES)  # None: end of stream
        # committed batches for the index step: (batch, their ids model by model, when their commit began)
        self._committed: queue.Queue[tuple[Batch, np.ndarray, float] | None] = queue.Queue(_QUEUED_BATCHES)
        self._threads: list[threading.Thread] = []

    def start(self) -> None:
        self.receiver = Receiver(self.cfg.endpoint, security=self.cfg.security, rcvhwm=self.cfg.rcvhwm)
        for name, target in (("receive", self._receive_loop), ("commit", self._commit_loop), ("index", self._index_loop)):
            thread = threading.Thread(target=target, name=f"matcher-{name}", daemon=True)
            thread.start()
            self._threads.append(thread)

    @property
    def endpoint(self) -> str | None:
        """The bound endpoint (with the real port when the config asked for `*`)."""
        return self.receiver.endpoint if self.receiver else None

    def stop(self) -> None:
        """Stop receiving; what was received is still committed and indexed."""
        self._stop.set()
        for thread in self._threads:  # receive first: its end-of-stream marker lets the committer, then the indexer, finish
            thread.join()
        if self.receiver:
            self.receiver.close()

    @contextmanager
    def quiet(self) -> Iterator[None]:
        """No commit in flight and every committed batch indexed until the block ends: a deletion inside it is
        never undone by an add of a batch committed before it."""
        with self._write:
            self._committed.join()
            yield

    @property
    def rejected(self) -> Counter[str]:
        # dict() copies in one step while the ingest threads keep counting
        return Counter(dict(self.receiver.rejected) if self.receiver else {}) + Counter(dict(self._rejected))

    # -- receive and check ---------------------------------------------------------------------

    def _receive_loop(self) -> None:
        """Decoding and checks overlap the committer's disk writes; a full queue pushes back on ZeroMQ."""
        while not self._stop.is_set():
            batch = self._checked(self.receiver.receive_batch(0.1, self.cfg.batch_max))  # short, so stop() is noticed
            if batch:
                self._received.put(batch)
        self._received.put(None)

    def _checked(self, sightings: list[Sighting]) -> Batch:
        """The sightings passing the checks the wire schema cannot make, by model version."""
        by_model: dict[str, list[Sighting]] = {}
        for s in sightings:
            dim = self._dims.setdefault(s.model, len(s.embedding))
            if len(s.embedding) == dim:
                by_model.setdefault(s.model, []).append(s)
            else:
                self._reject(s, "wrong dimension", f"model version {s.model!r} has {dim}-d embeddings, got {len(s.embedding)}")
        return {model: rows for model, group in by_model.items() if (rows := self._unit_rows(group))}

    def _unit_rows(self, group: list[Sighting]) -> Rows | None:
        """One model's sightings with their embeddings as float32 unit vectors, in one array: numpy calls cost per
        call, not per row. None when every embedding was zero."""
        # float64: squares of float32 extremes overflow float32. concatenate: np.stack is slow for many small rows
        wide = np.concatenate([s.embedding for s in group], dtype=np.float64).reshape(len(group), -1)
        norms = np.sqrt(np.einsum("ij,ij->i", wide, wide))
        vecs = (wide / np.maximum(norms, 1e-6)[:, None]).astype(np.float32)
        zero = norms < 1e-6
        if zero.any():
            for n in np.flatnonzero(zero).tolist():
                self._reject(group[n], "zero embedding", "embedding has zero length")
            group, vecs = [s for s, z in zip(group, zero.tolist()) if not z], vecs[~zero]
        return Rows(group, vecs) if group else None

    def _reject(self, s: Sighting, reason: str, detail: str) -> None:
        self._rejected[reason] += 1
        n = self._rejected[reason]
        if n <= _LOGGED_REJECTS or n % 1000 == 0:
            log.warning("dropped sighting from node %s camera %s: %s [%d %s so far]", s.node, s.camera, detail, n, reason)

    # -- commit --------------------------------------------------------------------------------

    def _commit_loop(self) -> None:
        carried, finished = None, False
        while not finished:
            batches, carried, finished = self._next_transaction(carried)
            if batches:
                batch = _merged(batches)
                try:
                    self._commit(batch)
                except Exception:  # a bug must not end ingest: log it, go on with the next batch
                    log.exception("%d sightings lost: ingest batch failed", _size(batch))
        self._committed.put(None)

    def _next_transaction(self, first: Batch | None) -> tuple[list[Batch], Batch | None, bool]:
        """(batches for one transaction, a batch received that did not fit it, end of stream seen). Batches are
        taken until batch_max is reached: under load, whatever arrived during the previous commit; a lone
        sighting waits at most batch_wait_ms for company."""
        if first is None:
            try:
                first = self._received.get(timeout=0.1)
            except queue.Empty:
                return [], None, False
            if first is None:
                return [], None, True
        batches, n = [first], _size(first)
        deadline = time.monotonic() + self.cfg.batch_wait_ms / 1000
        while n < self.cfg.batch_max:
            try:
                more = self._received.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                break
            if more is None:
                return batches, None, True
            if n + _size(more) > self.cfg.batch_max:
                return batches, more, False
            batches.append(more)
            n += _size(more)
        return batches, None, False

    def _commit(self, batch: Batch) -> None:
        t0 = time.perf_counter()
        sightings = [s for rows in batch.values() for s in rows.sightings]
        with self._write:
            try:
                first = self.store.next_id()  # the only writer, under this lock: no one takes these ids meanwhile
                ids = list(range(first, first + len(sightings)))
                track_ids, seen = self.tracks.assign(sightings, ids)
                self.store.insert(ids, sightings, track_ids, [v for rows in batch.values() for v in rows.vecs])
            except sqlite3.Error as e:
                log.error("%d sightings lost: the store refused the batch (%s)", len(sightings), e)
                self._rejected["store error"] += len(sightings)
                return
            self.tracks.remember(seen)  # only once committed: a rolled-back track id must not be continued
            self._committed.put((batch, np.arange(first, first + len(ids), dtype=np.int64), t0))  # under the lock, for quiet()

    # -- index ---------------------------------------------------------------------------------

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

    def _index(self, batch: Batch, ids: np.ndarray, t0: float) -> None:
        start = 0
        for model, rows in batch.items():  # the commit gave each model's rows consecutive ids, in this order
            end = start + len(rows.sightings)
            self.index.add(model, ids[start:end], rows.vecs)
            start = end
        # On disk, so accepted; counted once searchable too, so a count seen means findable.
        self.accepted += len(ids)
        self.accepted_by_camera.update(s.camera for rows in batch.values() for s in rows.sightings)
        self.metrics.batch_seconds.observe(time.perf_counter() - t0)


class Receiver:
    def __init__(self, endpoint: str, security: CurveConfig = PLAIN, rcvhwm: int = 10000):
        # A context of its own: ZeroMQ allows one CURVE authenticator per context.
        self._ctx = zmq.Context()
        self.sock = self._ctx.socket(zmq.PULL)
        self.guard = secure_server(self.sock, security)
        self.sock.setsockopt(zmq.RCVHWM, rcvhwm)
        self.sock.setsockopt(zmq.MAXMSGSIZE, MAX_MESSAGE_BYTES)  # oversized frames are cut off by ZeroMQ itself
        self.sock.setsockopt(zmq.LINGER, 0)
        with listening("ingest.endpoint", endpoint):
            self.sock.bind(endpoint)
        self.endpoint = self.sock.getsockopt_string(zmq.LAST_ENDPOINT)
        self.accepted = 0
        self.rejected: Counter[str] = Counter()

    def receive(self, timeout: float) -> Sighting | None:
        """The next valid sighting, or None when nothing valid arrived within `timeout` seconds."""
        batch = self.receive_batch(timeout, 1)
        return batch[0] if batch else None

    def receive_batch(self, timeout: float, max_n: int) -> list[Sighting]:
        """Valid sightings, at most `max_n`: once one message is in, whatever else is already queued is taken
        without waiting and decoded as one batch. [] when nothing valid arrived within `timeout` seconds."""
        deadline = time.monotonic() + timeout
        while self.sock.poll(max(0, int((deadline - time.monotonic()) * 1000))):
            frames = [self.sock.recv(copy=False)]
            while len(frames) < max_n:
                try:
                    frames.append(self.sock.recv(zmq.NOBLOCK, copy=False))
                except zmq.Again:
                    break
            valid = []
            for frame, s in zip(frames, decode_many([f.buffer for f in frames])):
                if isinstance(s, WireError):
                    self._reject(frame, s)
                else:
                    valid.append(s)
            if valid:
                self.accepted += len(valid)
                return valid
        return []

    def iter(self, timeout: float) -> Iterator[Sighting]:
        """Sightings until none arrives for `timeout` seconds."""
        while (s := self.receive(timeout)) is not None:
            yield s

    def _reject(self, frame: zmq.Frame, err: WireError) -> None:
        reason = str(err).split(":")[0][:60]
        self.rejected[reason] += 1
        total = sum(self.rejected.values())
        if total <= 10 or total % 1000 == 0:
            sender = _peer(frame)
            log.warning("dropped malformed message from %s (%d bytes): %s [%d rejected so far]", sender, len(frame.buffer), err,
                        total)

    @property
    def denied(self) -> int:
        """Connections refused because the edge's key is not on the allow-list."""
        return self.guard.denied if self.guard else 0

    def close(self) -> None:
        self.sock.close()
        if self.guard:
            self.guard.stop()
        self._ctx.term()


def _peer(frame: zmq.Frame) -> str:
    try:  # ZeroMQ knows the sender's address for TCP peers only
        return frame.get("Peer-Address")
    except zmq.ZMQError:
        return "unknown peer"
