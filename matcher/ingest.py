"""Ingest: edge sightings from ZeroMQ to the store and the index, one `Pipeline` of four steps.

| step      | thread  | what happens                                                                           |
|-----------|---------|----------------------------------------------------------------------------------------|
| receive   | receive | `Receiver`: whatever is queued (≤ batch_max), decoded as a batch against the wire schema; |
|           |         | malformed or oversized messages are counted per reason, logged with the sender, dropped  |
| check     | receive | the checks the schema cannot make (no zero embeddings; a model version keeps the dimension |
|           |         | of its first sighting passing that; at most index.max_models versions), grouped by model version |
|           |         | once: a `Batch` of `Rows`, each the model's sightings and their float32 unit vectors     |
| commit    | commit  | group commit: queued batches (a lone sighting waits ≤ batch_wait_ms) into one store       |
|           |         | transaction of ≤ batch_max: ids from the store (`insert_new`), track ids (`matcher.tracks`); |
|           |         | a batch with a row the store refuses (`RowRefused`) is committed one by one: only the    |
|           |         | refused sightings are lost, and they are acknowledged as refused; a store that cannot write |
|           |         | now (down, locked, full) gets nothing acknowledged, so the edges resend                  |
| index     | index   | each model's (ids, vectors) added to its partition, then counted as accepted; beside the  |
|           |         | next commit, as SQLite and FAISS both run without the GIL. With replicas on one PostgreSQL |
|           |         | and FAISS, `tail.poll()` instead: the store's new rows, every replica's (`matcher.tail`)  |
| watch     | index   | each model's indexed rows go to `on_indexed` (`matcher.watchlist`): alerts          |
| heartbeat | receive | an edge's state (`kernel.wire.Heartbeat`) goes to `on_heartbeat` (`matcher.edges`), no further |
| ack       | receive | once a batch is committed, its `seq`s go back to the edges (ROUTER → DEALER, `kernel.wire`); |
|           |         | a resent (node, seq) stored already is not stored again, only acknowledged again, as are   |
|           |         | sightings the checks or the store refuse for good, flagged as refused                    |

Bounded queues between the threads push back on ZeroMQ, which buffers up to `rcvhwm` messages.
Rejections are counted by reason (`wire.REASONS`, a fixed set) in `Rejections`; their details go to the log, one
line per reason per 10 s at most.
A sighting counts as accepted only once it is committed (WAL, `synchronous=FULL`) and indexed, so
`kill -9` never loses an accepted sighting and a counted one is findable. Inside `quiet()` no commit
runs and every committed batch is indexed: deletions run there, so no later add revives what they delete.

    pipeline = Pipeline(cfg.ingest, store, index, Tracks(store, cfg.query.track_gap_s), metrics)
    pipeline.start()                    # binds cfg.ingest.endpoint
    pipeline.accepted, pipeline.rejected
    pipeline.stop()                     # what was received is still committed and indexed

    rx = Receiver("tcp://127.0.0.1:5555", security=cfg.ingest.security)   # on its own: CURVE + allow-list
    rx.receive_batch(0.1, 1000)         # what is queued (≤ 1000), decoded as one batch; acknowledged at once
"""

from __future__ import annotations

import logging
import math
import queue
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import zmq

from crossview.kernel.config import CurveConfig, IngestConfig
from crossview.kernel.runtime import listening
from crossview.kernel.transport import secure_server
from crossview.kernel.wire import MAX_MESSAGE_BYTES, Heartbeat, Reason, Sighting, WireError, decode_many, encode_ack
from crossview.matcher.index import Index
from crossview.matcher.metrics import MatcherMetrics
from crossview.matcher.store import Store
from crossview.matcher.tail import StoreTail
from crossview.matcher.tracks import Tracks

log = logging.getLogger(__name__)
PLAIN = CurveConfig(mode="plain")
_LOG_EVERY_S = 10.0  # one log line per rejection reason at most this often
_QUEUED_BATCHES = 4  # batches waiting between two steps; beyond, ZeroMQ buffers
_STORE_DOWN_PAUSE_S = 1.0  # after a batch the store could not take at all: one try a second while it is down
_MAX_PEERS = 4096  # nodes whose connection is remembered for acknowledgements
# ZeroMQ cuts the connection of a sender over this, losing what it sent after: so well above the schema's limit,
# for a slightly oversized message to be counted and logged as one, with the connection kept.
_SOCKET_MAX_BYTES = 4 * MAX_MESSAGE_BYTES


@dataclass
class Rows:
    """One model version's share of a batch: its sightings and their embeddings as float32 unit vectors, row for row."""

    sightings: list[Sighting]
    vecs: np.ndarray  # (n, dim) float32


Batch = dict[str, Rows]  # model version -> its rows


def _size(batch: Batch) -> int:
    return sum(len(rows.sightings) for rows in batch.values())


def _sightings(batch: Batch) -> list[Sighting]:
    """A batch's sightings in batch order (model by model): the order of its ids."""
    return [s for rows in batch.values() for s in rows.sightings]


def _merged(batches: list[Batch]) -> Batch:
    """Several batches as one, still one `Rows` per model version."""
    if len(batches) == 1:
        return batches[0]
    parts: dict[str, list[Rows]] = {}
    for batch in batches:
        for model, rows in batch.items():
            parts.setdefault(model, []).append(rows)
    return {model: Rows([s for r in rs for s in r.sightings], np.concatenate([r.vecs for r in rs])) for model, rs in parts.items()}


class Rejections:
    """Refused messages counted by reason; each reason's first is logged at once, later ones at most once per
    _LOG_EVERY_S with the number left unlogged meanwhile, so a flood of junk cannot flood the log."""

    def __init__(self) -> None:
        self._counts: Counter[str] = Counter()
        self._logged_at: dict[str, float] = {}
        self._unlogged: Counter[str] = Counter()
        self._lock = threading.Lock()  # the receive and commit threads both count

    def add(self, reason: str, what: str, n: int = 1) -> None:
        """Count `n` refused for `reason`; `what` (escaped detail and sender) is logged if a line is due."""
        with self._lock:
            self._counts[reason] += n
            now = time.monotonic()
            if now - self._logged_at.get(reason, -math.inf) < _LOG_EVERY_S:
                self._unlogged[reason] += n
                return
            self._logged_at[reason] = now
            total, unlogged = self._counts[reason], self._unlogged.pop(reason, 0)
        log.warning("dropped %s [%s: %d so far%s]", what, reason, total,
                    f", {unlogged} not logged since the last line" if unlogged else "")

    def counts(self) -> Counter[str]:
        with self._lock:
            return Counter(self._counts)


class Pipeline:
    """receive → check → commit → index; see the module docstring."""

    def __init__(self, cfg: IngestConfig, store: Store, index: Index, tracks: Tracks, metrics: MatcherMetrics,
                 on_heartbeat: Callable[[Heartbeat], None] | None = None,
                 on_indexed: Callable[[str, np.ndarray, Rows], None] | None = None):
        self.cfg, self.store, self.index, self.tracks, self.metrics = cfg, store, index, tracks, metrics
        self.on_heartbeat = on_heartbeat
        self.on_indexed = on_indexed  # each model's (ids, rows) once searchable: the watchlist checks them
        self.receiver: Receiver | None = None
        self.tail: StoreTail | None = None  # set by the service with replicas: it indexes, from the store
        self.accepted = 0  # committed and indexed since start
        self.accepted_by_camera: Counter[str] = Counter()
        self._rejections = Rejections()  # checks past the wire schema and the store's; the receiver counts its own
        self._dims = store.models()  # model version -> dimension, fixed by its first sighting
        self._write = threading.Lock()  # commits, and `quiet()`
        self._stop = threading.Event()
        self._received: queue.Queue[Batch | None] = queue.Queue(_QUEUED_BATCHES)  # None: end of stream
        # committed batches for the index step: (batch, their ids model by model, when their commit began)
        self._committed: queue.Queue[tuple[Batch, np.ndarray, float] | None] = queue.Queue(_QUEUED_BATCHES)
        self._threads: list[threading.Thread] = []

    def start(self) -> None:
        self.receiver = Receiver(self.cfg.endpoint, security=self.cfg.security, rcvhwm=self.cfg.rcvhwm, ack_on_receipt=False,
                                 on_heartbeat=self.on_heartbeat)
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
        return (self.receiver.rejected if self.receiver else Counter()) + self._rejections.counts()

    # -- receive and check ---------------------------------------------------------------------

    def _receive_loop(self) -> None:
        """Decoding and checks overlap the committer's disk writes; a full queue pushes back on ZeroMQ."""
        while not self._stop.is_set():
            sightings = self.receiver.receive_batch(0.1, self.cfg.batch_max)  # short, so stop() is noticed
            batch = self._checked(sightings)
            kept = {id(s) for s in _sightings(batch)}
            self.receiver.ack([s for s in sightings if id(s) not in kept], refused=True)  # never to be stored
            if batch:
                self._received.put(batch)
        self._received.put(None)

    def _checked(self, sightings: list[Sighting]) -> Batch:
        """The sightings passing the checks the wire schema cannot make, by model version. A new version's dimension
        and its index.max_models slot are taken only by a sighting passing every check: zero embeddings are refused
        first, so a refused one neither fixes the dimension nor uses up a slot."""
        groups: dict[tuple[str, int], list[Sighting]] = {}
        for s in sightings:
            groups.setdefault((s.model, len(s.embedding)), []).append(s)
        batch: Batch = {}
        for (model, dim), group in groups.items():  # in order of first sighting: the first one fixes the dimension
            if (rows := self._unit_rows(group)) is None:
                continue
            if not self._admits(model):
                reason, detail = Reason.UNKNOWN_MODEL, (f"new model version {model!r}: {self.index.cfg.max_models} "
                                                        "versions hold sightings already (index.max_models)")
            elif (known := self._dims.setdefault(model, dim)) != dim:
                reason, detail = Reason.DIMENSION, f"model version {model!r} has {known}-d embeddings, got {dim}"
            else:
                batch[model] = rows
                continue
            for s in rows.sightings:
                self._reject(s, reason, detail)
        return batch

    def _admits(self, model: str) -> bool:
        """A version known already, or a new one while fewer than index.max_models hold sightings: each makes a
        partition and a snapshot file. A version whose sightings all expired no longer counts (retraining makes new
        versions); one not yet indexed does."""
        if model in self._dims:
            return True
        parts = self.index.partitions
        held = sum(1 for m in self._dims if m not in parts or parts[m].size)
        return held < self.index.cfg.max_models

    def forget_model(self, model: str) -> None:
        """A version whose partition and vectors were dropped (`matcher.migration`) counts no more toward max_models;
        a sighting of it arriving later is a new version again."""
        self._dims.pop(model, None)

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
                self._reject(group[n], Reason.ZERO_EMBEDDING, "embedding has zero length")
            group, vecs = [s for s, z in zip(group, zero.tolist()) if not z], vecs[~zero]
        return Rows(group, vecs) if group else None

    def _reject(self, s: Sighting, reason: str, detail: str) -> None:
        self._rejections.add(reason, f"sighting from node {s.node} camera {s.camera}: {detail}")

    # -- commit --------------------------------------------------------------------------------

    def _commit_loop(self) -> None:
        carried, finished = None, False
        while not finished:
            batches, carried, finished = self._next_transaction(carried)
            if batches:
                batch = _merged(batches)
                try:
                    self._commit(batch)
                except (ConnectionError, self.store.Error) as e:  # the store is down: not acknowledged, so resent
                    log.warning("%d sightings not stored, the edges will resend them: %s", _size(batch), e)
                    time.sleep(_STORE_DOWN_PAUSE_S)
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
        refused: list[Sighting] = []
        with self._write:
            batch, repeats = self._unseen(batch)
            if batch:
                try:
                    batch, ids, more = self._insert(batch)
                except self.store.RowRefused as e:  # one row can refuse the whole transaction: find it, keep the others
                    log.warning("the store refused a batch of %d sightings (%s): committing them one by one", _size(batch), e)
                    batch, ids, more, refused = self._insert_each(batch)
                repeats += more
            if batch:  # under the lock, for quiet()
                self._committed.put((batch, ids, t0))
        self.receiver.ack(repeats + _sightings(batch))  # committed: on disk
        if refused:
            self.receiver.ack(refused, refused=True)  # the store will never take them: resending would not help

    def _unseen(self, batch: Batch) -> tuple[Batch, list[Sighting]]:
        """(the batch without resent sightings, the resent ones): a (node, seq) stored already or twice in the batch."""
        keys = [(s.node, s.seq) for s in _sightings(batch) if s.seq is not None]
        return _without(batch, self.store.stored(keys)) if keys else (batch, [])

    def _insert(self, batch: Batch) -> tuple[Batch, np.ndarray, list[Sighting]]:
        """Commit a batch in one transaction: (what was stored, its ids in batch order, the sightings another
        replica on the same store had stored meanwhile, skipped). The store gives the ids, consecutive."""
        found: dict = {}

        def assign(stored: list[Sighting], ids: list[int], ends: dict) -> list[int]:
            track_ids, seen = self.tracks.assign(stored, ids, ends)
            found.update(seen)
            return track_ids

        first, skipped = self.store.insert_new(_sightings(batch), [v for rows in batch.values() for v in rows.vecs], assign)
        self.tracks.remember(found)  # only once committed: a rolled-back track id must not be continued
        batch, repeats = _without(batch, skipped) if skipped else (batch, [])
        return batch, np.arange(first, first + _size(batch), dtype=np.int64), repeats

    def _insert_each(self, batch: Batch) -> tuple[Batch, np.ndarray, list[Sighting], list[Sighting]]:
        """`_insert`, sighting by sighting, and the sightings the store refused for good (counted, logged). If the
        store stops taking writes part way, what it took is kept and the rest is left unacknowledged: resent."""
        stored, ids, repeats, refused = [], [], [], []
        pending = [(model, rows, k) for model, rows in batch.items() for k in range(len(rows.sightings))]
        for n, (model, rows, k) in enumerate(pending):
            s = rows.sightings[k]
            try:
                one, one_id, again = self._insert({model: Rows([s], rows.vecs[k:k + 1])})
            except self.store.RowRefused as e:
                self._reject(s, Reason.STORE_REFUSED, f"{type(e).__name__}: {ascii(str(e))}")
                refused.append(s)
                continue
            except (ConnectionError, self.store.Error) as e:
                log.warning("the store stopped taking writes after %d of %d sightings (%s): the edges will resend the "
                            "other %d", n, len(pending), e, len(pending) - n)
                break
            if one:
                stored.append(one)
            ids.append(one_id)
            repeats += again
        return (_merged(stored) if stored else {}, np.concatenate(ids) if ids else np.zeros(0, np.int64), repeats,
                refused)

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
        parts = list(_by_model(batch, ids))
        if self.tail:  # replicas: the store's rows in id order, this batch's among them (`matcher.tail`)
            self.tail.poll()
        else:
            for model, model_ids, rows in parts:
                self.index.add(model, model_ids, rows.vecs)
        # On disk, so accepted; counted once searchable too, so a count seen means findable.
        self.accepted += len(ids)
        self.accepted_by_camera.update(s.camera for s in _sightings(batch))
        self.metrics.batch_seconds.observe(time.perf_counter() - t0)
        for model, model_ids, rows in parts if self.on_indexed else ():
            try:
                self.on_indexed(model, model_ids, rows)
            except Exception:  # the sightings are stored and searchable; only the check is lost
                log.exception("watchlist check of %d sightings failed", len(model_ids))


def _without(batch: Batch, seen: set[tuple[str, int]]) -> tuple[Batch, list[Sighting]]:
    """(the batch without sightings whose (node, seq) is in `seen` or repeats an earlier one in it, those left out)."""
    seen, repeats, fresh = set(seen), [], {}
    for model, rows in batch.items():
        keep = []
        for k, s in enumerate(rows.sightings):
            key = (s.node, s.seq)
            if s.seq is not None and key in seen:
                repeats.append(s)
            else:
                keep.append(k)
                if s.seq is not None:
                    seen.add(key)
        if keep:
            fresh[model] = rows if len(keep) == len(rows.sightings) else Rows([rows.sightings[k] for k in keep], rows.vecs[keep])
    return fresh, repeats


def _by_model(batch: Batch, ids: np.ndarray) -> Iterator[tuple[str, np.ndarray, Rows]]:
    """(model, its ids, its rows): `ids` are the batch's, row for row in batch order."""
    start = 0
    for model, rows in batch.items():
        end = start + len(rows.sightings)
        yield model, ids[start:end], rows
        start = end


class Receiver:
    """A ROUTER socket for edge DEALERs. With `ack_on_receipt`, what `receive_batch` returns is acknowledged at once
    (a standalone receiver: tests, benchmarks); otherwise the caller acknowledges with `ack()` once it is committed."""

    def __init__(self, endpoint: str, security: CurveConfig = PLAIN, rcvhwm: int = 10000, ack_on_receipt: bool = True,
                 on_heartbeat: Callable[[Heartbeat], None] | None = None):
        # A context of its own: ZeroMQ allows one CURVE authenticator per context.
        self._ctx = zmq.Context()
        self.ack_on_receipt = ack_on_receipt
        self.on_heartbeat = on_heartbeat  # called on the receiving thread; heartbeats are dropped without it
        self._peers: dict[str, bytes] = {}  # node id -> the ROUTER identity of its latest connection
        # Only the receiving thread may use the ROUTER: other threads hand it acknowledgements over inproc sockets.
        self._acks_in = self._ctx.socket(zmq.PULL)
        self._acks_in.setsockopt(zmq.LINGER, 0)
        self._acks_in.bind(f"inproc://acks-{id(self)}")
        self._acks_out = threading.local()
        self._ack_socks: list[zmq.Socket] = []  # closed with the receiver, once the threads using them have ended
        self.sock = self._ctx.socket(zmq.ROUTER)
        self.guard = secure_server(self.sock, security)
        self.sock.setsockopt(zmq.RCVHWM, rcvhwm)
        self.sock.setsockopt(zmq.MAXMSGSIZE, _SOCKET_MAX_BYTES)
        self.sock.setsockopt(zmq.LINGER, 0)
        with listening("ingest.endpoint", endpoint):
            self.sock.bind(endpoint)
        self.endpoint = self.sock.getsockopt_string(zmq.LAST_ENDPOINT)
        self.accepted = 0
        self.rejections = Rejections()

    def receive(self, timeout: float) -> Sighting | None:
        """The next valid sighting, or None when nothing valid arrived within `timeout` seconds."""
        batch = self.receive_batch(timeout, 1)
        return batch[0] if batch else None

    def receive_batch(self, timeout: float, max_n: int) -> list[Sighting]:
        """Valid sightings, at most `max_n`: once one message is in, whatever else is already queued is taken
        without waiting and decoded as one batch. [] when nothing valid arrived within `timeout` seconds."""
        deadline = time.monotonic() + timeout
        poller = zmq.Poller()
        poller.register(self.sock, zmq.POLLIN)
        poller.register(self._acks_in, zmq.POLLIN)
        while ready := dict(poller.poll(max(0, int((deadline - time.monotonic()) * 1000)))):
            if self._acks_in in ready:
                self._forward_acks()
            if self.sock in ready and (valid := self._take(max_n)):
                self.accepted += len(valid)
                if self.ack_on_receipt:
                    self._send_acks(valid)
                return valid
        return []

    def _take(self, max_n: int) -> list[Sighting]:
        """The valid sightings among what is queued (≤ max_n messages), their senders remembered for the acks."""
        msgs: list[tuple[bytes, zmq.Frame]] = []
        while len(msgs) < max_n:
            try:  # two recv calls, not recv_multipart: a third of the per-message cost (bench)
                peer = self.sock.recv(zmq.NOBLOCK)  # the sender's identity, from the ROUTER
            except zmq.Again:
                break
            frame = self.sock.recv(copy=False)  # a message arrives whole, so its frames are all here
            if frame.more:
                self._reject(frame, WireError(Reason.MALFORMED, f"{1 + self._discard_rest()} frames, not one"))
            else:
                msgs.append((peer, frame))
        if self.guard:  # an edge whose key was removed is cut off, open connection or not (never acknowledged)
            msgs = [m for m in msgs if self.guard.allows(m[-1])]
        valid, refused = [], {}
        for (peer, frame), s in zip(msgs, decode_many([m[1].buffer for m in msgs])):
            if self.guard and not isinstance(s, WireError) and (why := self.guard.binding(frame, s.node)):
                s = WireError(Reason.NODE_KEY, why, getattr(s, "seq", None))
            if isinstance(s, WireError):
                self._reject(frame, s)
                if s.seq is not None:  # readable that far: the edge is told, or it would resend it forever
                    refused.setdefault(peer, []).append(s.seq)
            elif isinstance(s, Heartbeat):
                if self.on_heartbeat:
                    self.on_heartbeat(s)
            else:
                valid.append(s)
                if s.seq is not None:
                    self._remember(s.node, peer)
        for peer, seqs in refused.items():
            self._send_ack(peer, seqs, refused=True)
        return valid

    def _discard_rest(self) -> int:
        """Drop the remaining frames of a multi-frame message; how many there were."""
        n = 1
        while self.sock.recv(copy=False).more:
            n += 1
        return n

    def _remember(self, node: str, peer: bytes) -> None:
        if self._peers.get(node) != peer:
            self._peers.pop(node, None)  # newest last, so the bound forgets the longest-quiet node
            if len(self._peers) >= _MAX_PEERS:
                del self._peers[next(iter(self._peers))]
            self._peers[node] = peer

    def ack(self, sightings: list[Sighting], refused: bool = False) -> None:
        """Acknowledge these sightings to their edges (any thread; sent by the receiving one); `refused`: they are
        not stored and never will be, so the edge stops resending them."""
        by_node = _seqs_by_node(sightings)
        if by_node:
            out = getattr(self._acks_out, "sock", None)
            if out is None:
                out = self._acks_out.sock = self._ctx.socket(zmq.PUSH)
                out.setsockopt(zmq.LINGER, 0)
                out.connect(f"inproc://acks-{id(self)}")
                self._ack_socks.append(out)
            out.send_pyobj((by_node, refused))

    def _forward_acks(self) -> None:
        while True:
            try:
                by_node, refused = self._acks_in.recv_pyobj(zmq.NOBLOCK)  # from our own threads only: inproc
            except zmq.Again:
                return
            self._route(by_node, refused)

    def _send_acks(self, sightings: list[Sighting]) -> None:
        self._route(_seqs_by_node(sightings))

    def _route(self, by_node: dict[str, list[int]], refused: bool = False) -> None:
        for node, seqs in by_node.items():
            peer = self._peers.get(node)
            if peer is not None:
                self._send_ack(peer, seqs, refused)

    def _send_ack(self, peer: bytes, seqs: list[int], refused: bool) -> None:
        try:  # a peer gone meanwhile, or not reading: it resends, and the duplicate is acknowledged then
            self.sock.send_multipart([peer, encode_ack(seqs, refused)], zmq.NOBLOCK)
        except zmq.Again:
            pass

    def iter(self, timeout: float) -> Iterator[Sighting]:
        """Sightings until none arrives for `timeout` seconds."""
        while (s := self.receive(timeout)) is not None:
            yield s

    def _reject(self, frame: zmq.Frame, err: WireError) -> None:
        self.rejections.add(err.code, f"message from {_peer(frame)} ({len(frame.buffer)} bytes): {err.detail}")

    @property
    def rejected(self) -> Counter[str]:
        return self.rejections.counts()

    @property
    def denied(self) -> int:
        """Connections refused because the edge's key is not on the allow-list."""
        return self.guard.denied if self.guard else 0

    def close(self) -> None:
        self.sock.close()
        for sock in (self._acks_in, *self._ack_socks):
            sock.close()
        if self.guard:
            self.guard.stop()
        self._ctx.term()


def _seqs_by_node(sightings: list[Sighting]) -> dict[str, list[int]]:
    by_node: dict[str, list[int]] = {}
    for s in sightings:
        if s.seq is not None:
            by_node.setdefault(s.node, []).append(s.seq)
    return by_node


def _peer(frame: zmq.Frame) -> str:
    try:  # ZeroMQ knows the sender's address for TCP peers only
        return frame.get("Peer-Address")
    except zmq.ZMQError:
        return "unknown peer"
