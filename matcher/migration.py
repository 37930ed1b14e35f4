"""Re-embedding the gallery: when a model version becomes production, the stored thumbnails are embedded again by
it, so a query made after the switch still finds the people seen before it.

| what      | how                                                                                        |
|-----------|--------------------------------------------------------------------------------------------|
| trigger   | the registry's production version, checked every `migration.poll_s` (promote, a canary that  |
|           | passed, rollback, by the CLI or the API alike); its ONNX file comes from the registry        |
| work      | thumbnailed sightings within retention that lack a vector of that version, newest first,     |
|           | `batch` at a time, embedded by ONNX Runtime on `threads` (1) in a thread at a lower CPU      |
|           | priority (`index.lower_priority`, as rebuilds): ingest and queries never wait for it         |
| result    | the store's `reembedded` rows (model, id) and the version's partition, under the same ids    |
| passes    | one down the store by time, then what arrived meanwhile (edges still on the old version) by id, |
|           | until a pass finds nothing: done. Then every poll looks at what arrived since              |
| resume    | from the store alone: after a restart or `kill -9` a pass finds what still lacks a vector    |
| progress  | `progress()` (stats, metrics, page); `coverage()` in every query's answer while it runs; log |
|           | lines at the start, every `log_every_pct`, and when done, with the rate                    |
| drop      | once done, a version's partition, snapshot and vectors go when no edge's last heartbeat      |
|           | reports it (edges may still send it during a canary); sightings without a thumbnail had no   |
|           | other vector, so they are no longer searchable (counted beforehand, and said)              |
| deletions | `lock`: the service deletes under it, so a batch is stored and indexed whole before a        |
|           | deletion looks for its vectors                                                             |
| replicas  | the thread works while `held()` (the service's lease, `matcher.lease`): one replica migrates, |
|           | resuming from the store where another stopped; the others index its vectors from the store |
|           | (`matcher.tail`), and drop a replaced partition as it does: it logs the drop in the store's |
|           | deletion log (`log_drop`), which their tails follow (Milvus: the collection is shared)     |

    migration = Migration(cfg.migration, store, index, registry, edges=lambda: edges.report()["edges"],
                          quiet=pipeline.quiet, max_age_s=3600 * 24)
    migration.start()        # a thread; stop() ends it between two batches
    migration.progress()     # {"model": "site-2", "state": "migrating", "migrated": 1200, "total": 5000, ...}
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from pathlib import Path

import numpy as np

from crossview.kernel.config import MigrationConfig
from crossview.kernel.embedder import Embedder, ModelError
from crossview.kernel.wire import MAX_THUMBNAIL_PIXELS
from crossview.matcher.index import Index, lower_priority
from crossview.matcher.limits import decode_image
from crossview.matcher.registry import Registry
from crossview.matcher.store import Store

log = logging.getLogger(__name__)
_DROP_CHUNK = 5000  # sightings whose vectors one transaction deletes when a partition goes, so ingest never waits long


class Migration:
    """See the module docstring. `step()` is one unit of work, for tests and the bench; `start()` runs it in a thread."""

    def __init__(self, cfg: MigrationConfig, store: Store, index: Index, registry: Registry,
                 edges: Callable[[], list[dict]], quiet: Callable[[], AbstractContextManager],
                 max_age_s: float | None = None, on_model: Callable[[Path], None] | None = None,
                 on_dropped: Callable[[str], None] | None = None, held: Callable[[], bool] = lambda: True):
        self.cfg, self.store, self.index, self.registry = cfg, store, index, registry
        self.edges, self.quiet, self.max_age_s = edges, quiet, max_age_s
        self.on_model = on_model  # a new target's ONNX file: image queries and calibration by it
        self.on_dropped = on_dropped  # a version is gone from the store: ingest stops counting it
        self.held = held  # whether this replica holds the migration's lease (`matcher.lease`): it alone works
        self.lock = threading.Lock()  # a batch's store commit and index add; deletions take it too
        self.target: str | None = None  # the production version being migrated to (or done)
        self._embedder: Embedder | None = None
        self._refused: str | None = None  # a production version whose file did not load: not retried until it changes
        self._kept: dict[str, list[str]] = {}  # partitions kept because edges still report them
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._reset()

    def _reset(self) -> None:
        self.done = False
        self.migrated = self.total = self.without_thumbnail = self.unreadable = 0
        self.oldest_ts: float | None = None
        self._cursor: tuple[float, int] | None = None  # where the current pass goes on: (ts, id) of its last row
        self._after: int | None = None  # None: the pass down the store by time; else only ids above this
        self._top = self._found = 0  # the store's highest id when the pass began; rows the pass found
        self._session = (0, time.monotonic())  # (migrated, when) as this run began: its rate
        self._done_rate = 0.0  # the rate when it was done
        self._next_log = self.cfg.log_every_pct

    # -- the thread ----------------------------------------------------------------------------

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="matcher-migration", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    def _run(self) -> None:
        lower_priority()
        while not self._stop.is_set():
            try:
                busy = self.held() and self.step()
            except Exception:  # a bug or a broken file must not end re-embedding: the next poll tries again
                log.exception("gallery migration: step failed, retried in %g s", self.cfg.poll_s)
                busy = False
            if not busy:
                self._stop.wait(self.cfg.poll_s)

    # -- one step ------------------------------------------------------------------------------

    def step(self) -> bool:
        """Re-embed one batch, or finish a pass, or drop what is replaced; False when there was nothing to do."""
        entry = self.registry.production()
        if entry is None or entry.version == self._refused:
            return False
        if entry.version != self.target and not self._switch(entry.version):
            return False
        rows = self.store.to_migrate(self.target, self._since(), self.cfg.batch, self._cursor, self._after)
        if rows:
            self._cursor, self._found = (rows[-1][1], rows[-1][0]), self._found + len(rows)
            if self.done:  # more sightings of an older version arrived after it was done: a run of their own
                self.done, self.total, self._session = False, self.total + len(rows), (self.migrated, time.monotonic())
            self._migrate(rows)
            return True
        finished = self._found == 0
        self._after, self._cursor, self._found, self._top = self._top, None, 0, self.store.next_id() - 1
        if not finished:
            return True  # the next pass looks at what arrived during this one
        if not self.done:
            self._finish()
        self._drop_replaced()
        return False

    def _since(self) -> float:
        return time.time() - self.max_age_s if self.max_age_s else -math.inf

    def _switch(self, version: str) -> bool:
        path = self.registry.file_of(version)
        try:
            embedder = Embedder(path, batch_size=self.cfg.batch, device="cpu", threads=self.cfg.threads, key="registry")
        except ModelError as e:
            self._refused = version
            log.error("gallery migration to %s not started: %s", version, e)
            return False
        self.target, self._embedder, self._refused, self._kept = version, embedder, None, {}
        self._reset()
        self._top = self.store.next_id() - 1
        counts = self.store.migration_counts(version, self._since())
        self._count(counts)
        self._session = (self.migrated, time.monotonic())
        if self.on_model:
            self.on_model(path)
        log.info("gallery migration to %s: %d thumbnails to re-embed, newest first (%d done before)%s", version,
                 counts["remaining"], counts["reembedded"], self._bare_note())
        return True

    def _count(self, counts: dict[str, int]) -> None:
        self.migrated, self.without_thumbnail = counts["reembedded"], counts["without_thumbnail"]
        self.total = counts["reembedded"] + counts["remaining"]

    def _bare_note(self) -> str:
        return (f"; {self.without_thumbnail} sightings have no thumbnail and cannot be re-embedded: once the old "
                "partition goes, they are no longer searchable") if self.without_thumbnail else ""

    def _migrate(self, rows: list[tuple[int, float, bytes]]) -> None:
        ids, crops, oldest = [], [], None
        for i, ts, jpeg in rows:
            try:  # bounded as the wire bounds thumbnails now: one stored before it did may declare any size
                crop = decode_image(jpeg, f"thumbnail of sighting {i}", MAX_THUMBNAIL_PIXELS)
            except ValueError as e:
                crop = None
                log.warning("gallery migration: %s: skipped", e)
            if crop is None or min(crop.shape[:2]) < 2:
                self.unreadable += 1
                continue
            ids.append(i)
            crops.append(crop)
            oldest = ts if oldest is None else min(oldest, ts)
        if not ids:
            return
        vecs = self._embedder.embed(crops)  # outside the lock: the slow part
        with self.lock:
            added, seq = self.store.add_reembedded(self.target, ids, vecs)
            keep = np.isin(np.asarray(ids), added)  # in the order given, which is the order of their seqs
            if keep.any():
                self.index.add(self.target, np.asarray(ids, np.int64)[keep], vecs[keep], seq)
        self.migrated += len(added)
        if self._after is None:  # the pass by time: everything newer is covered
            self.oldest_ts = oldest if self.oldest_ts is None else min(self.oldest_ts, oldest)
        self._log_progress()

    def _log_progress(self) -> None:
        pct = 100 * self.migrated / max(self.total, 1)
        if pct >= self._next_log and self.migrated < self.total:
            log.info("gallery migration to %s: %d of %d re-embedded (%.0f%%), %.1f thumbnails/s", self.target,
                     self.migrated, self.total, pct, self.rate())
            self._next_log = (pct // self.cfg.log_every_pct + 1) * self.cfg.log_every_pct

    def rate(self) -> float:
        """Thumbnails re-embedded per second since this run began."""
        if self.done:
            return self._done_rate
        n, t0 = self._session
        return (self.migrated - n) / max(time.monotonic() - t0, 1e-9)

    def _finish(self) -> None:
        n, seconds, self._done_rate = self.migrated - self._session[0], time.monotonic() - self._session[1], self.rate()
        self._count(self.store.migration_counts(self.target, self._since()))  # the counts kept meanwhile drift with retention
        self.done = True
        self.index.production(self.target)
        log.info("gallery migration to %s done: %d re-embedded in %.1f s (%.1f thumbnails/s), %d of %d in all%s%s",
                 self.target, n, seconds, self._done_rate, self.migrated, self.total, f", {self.unreadable} unreadable thumbnails" if self.unreadable else "",
                 self._bare_note())

    # -- dropping replaced partitions ----------------------------------------------------------

    def _drop_replaced(self) -> None:
        running: dict[str, list[str]] = {}
        for e in self.edges():
            running.setdefault(e["model"], []).append(e["node"])
        for model in [m for m in list(self.index.partitions) if m != self.target]:
            if model in running:
                if self._kept.get(model) != running[model]:
                    log.info("partition %s kept: edges %s still report it", model, ", ".join(running[model]))
                    self._kept[model] = running[model]
            elif not self._stop.is_set():
                self._drop(model)

    def _drop(self, model: str) -> None:
        """The partition first, then its vectors in chunks (what arrives meanwhile has higher ids and stays), then the
        version itself once nothing of it is left. A restart part way drops it again."""
        with self.quiet():  # no batch of it half indexed
            self.index.drop(model)
            upto = self.store.next_id() - 1
            self.store.log_drop(model, upto)  # the other replicas' indexes drop it at their next poll (`matcher.tail`)
        deleted, after = 0, 0
        while after is not None:
            if self._stop.is_set():
                log.info("partition %s: dropping stopped part way (%d vectors deleted); the next start goes on", model, deleted)
                return
            n, after = self.store.drop_vectors(model, after, upto, _DROP_CHUNK)
            deleted += n
        with self.quiet():
            forgotten = self.store.forget_model(model)
        if forgotten and self.on_dropped:
            self.on_dropped(model)
        self._kept.pop(model, None)
        log.info("partition %s dropped (%d vectors deleted): its sightings are searched by %s now, and no edge reports %s",
                 model, deleted, self.target, model)

    # -- what stats, metrics and queries show ----------------------------------------------------

    def progress(self) -> dict | None:
        if self.target is None:
            return None
        return {"model": self.target, "state": "done" if self.done else "migrating", "migrated": self.migrated,
                "total": self.total, "without_thumbnail": self.without_thumbnail, "unreadable": self.unreadable,
                "oldest_ts_covered": self.oldest_ts, "per_second": round(self.rate(), 2),
                "kept": {m: list(nodes) for m, nodes in self._kept.items()}}

    def coverage(self) -> dict | None:
        """How much of the history a search by the production version covers, while its migration runs; else None."""
        if self.target is None or self.done:
            return None
        return {"model": self.target, "migrated": self.migrated, "total": self.total, "oldest_ts_covered": self.oldest_ts,
                "without_thumbnail": self.without_thumbnail}
