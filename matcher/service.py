"""The matcher service: `Matcher` runs the ingest pipeline and the maintenance beside it, and holds the queries.

| part           | what                                                                                   |
|----------------|----------------------------------------------------------------------------------------|
| `ingest`       | `matcher.ingest.Pipeline`: receive → check → commit → index threads; accepted/rejected counts |
| `queries`      | `matcher.query.QueryEngine`: search by embedding, stored sighting, edge track or image   |
| `store`        | by `store.kind`: `matcher.store.Store` (SQLite, data_dir/sightings.db) or `matcher.pgstore.PgStore` |
|                | (PostgreSQL); lookups (`record`, `thumbnail`, `recent`, `cameras`). The registry, watchlist, |
|                | webhooks, harvest index, users, audit log and edges' heartbeats follow it (`matcher.sqldb`: |
|                | files in data_dir, or that PostgreSQL database, shared by replicas); index snapshots stay |
|                | in data_dir either way                                                                   |
| `index`        | `matcher.index.Index`: FAISS partitions; rebuilds start there when one outgrows exact search |
|                | (`index.engine: milvus`: `matcher.milvus_index.MilvusIndex`, collections in Milvus, no snapshots) |
| checkpoint     | thread: every second, copy the SQLite WAL into the database file, off the commit path     |
|                | (PostgreSQL: VACUUM after a deletion)                                                    |
| snapshots      | thread: every `index.snapshot_interval_s`, write changed partitions, prune the deletion log |
| retention      | thread: every `retention.check_interval_s`, delete sightings past max age / per-camera count |
| registry       | `matcher.registry`: the model versions, which is production (edges fetch it)             |
| migration      | thread: `matcher.migration` re-embeds the stored thumbnails with each new production version |
|                | (lower CPU priority), then drops the partition it replaced once no edge reports that version |
| harvest        | `matcher.harvest`: the crops edges upload, within `harvest.quota_mb` and retention's max age |
| watchlist      | `matcher.watchlist`: every indexed batch checked against it; alerts to `matcher.webhooks` |
| status         | thread: every `metrics.log_interval_s`, log the counts, partitions and edges; save the   |
|                | edges' last heartbeats (`matcher.edges`)                                                 |
| replicas       | `store.kind: postgres`, any number of matchers on the database: the watchlist check and the |
|                | migration run on the replica holding their lease (`matcher.lease`); thread: every second, |
|                | FAISS indexes what the others stored and drops the partitions the migration dropped     |
|                | (`matcher.tail`, also after each own commit; Milvus: the collections another replica made |
|                | or dropped are opened or forgotten, `open_stored`) and the lease holder checks the store's |
|                | new sightings against the watchlist; the deletion log is                                 |
|                | kept until every replica's tail has applied it (`PgStore.report_position`)              |

At start the index loads its snapshots and replays the store, so what was accepted before a `kill -9` is
searchable again. A deletion runs inside `ingest.quiet()`: every committed batch is indexed first and no
commit runs meanwhile, then it deletes from store and index, so the index never holds a deleted id.

    m = Matcher(load_matcher_config("configs/matcher.yaml"))   # opens data_dir, recovers the index
    m.start()                                                 # binds ingest.endpoint
    m.queries.search_track("edge-1", "gate", 17, None, Filters(top_k=5)).ranked()
    m.stop()                                                  # final snapshot
    $ crossview matcher --config configs/matcher.yaml
"""

from __future__ import annotations

import logging
import socket
import sqlite3
import threading
import time
from pathlib import Path

from crossview.kernel.config import IndexConfig, MatcherConfig, QueryConfig, StoreConfig
from crossview.kernel.runtime import listening
from crossview.matcher.audit import AuditLog
from crossview.matcher.edges import Edges
from crossview.matcher.harvest import HarvestStore
from crossview.matcher.index import Index, VectorIndex
from crossview.matcher.ingest import Pipeline
from crossview.matcher.lease import Lease
from crossview.matcher.metrics import MatcherMetrics
from crossview.matcher.migration import Migration
from crossview.matcher.query import QueryEngine, load_embedders
from crossview.matcher.registry import Registry
from crossview.matcher.store import Store
from crossview.matcher.tail import StoreTail
from crossview.matcher.tracks import Tracks
from crossview.matcher.users import Users
from crossview.matcher.watchlist import Watchlist
from crossview.matcher.webhooks import Webhooks

log = logging.getLogger(__name__)

_RETENTION_CHUNK = 5000  # sightings deleted per transaction, so ingest never waits long
_CHECKPOINT_INTERVAL_S = 1.0  # ~20 MB of WAL at 10,000 sightings/s
_REPLICAS_INTERVAL_S = 1.0  # another replica's sighting is searchable (FAISS) and checked this late at most, ~


def open_store(data_dir: Path, cfg: StoreConfig, read_only: bool = False) -> Store:
    """The sightings store `store.kind` names: data_dir/sightings.db, or the PostgreSQL database."""
    if cfg.kind == "sqlite":
        return Store(Path(data_dir) / "sightings.db", read_only)
    from crossview.matcher.pgstore import PgStore  # psycopg: the postgres extra

    return PgStore(cfg, read_only)


def open_index(data_dir: Path, cfg: IndexConfig, store: Store, read_only: bool = False,
               max_age_s: float | None = None) -> VectorIndex:
    """The index `index.engine` names: FAISS partitions with snapshots in data_dir/index, or Milvus collections (their
    TTL retention's `max_age_s`)."""
    if cfg.engine == "faiss":
        return Index(cfg, store, Path(data_dir) / "index", read_only)
    from crossview.matcher.milvus_index import MilvusIndex  # pymilvus: the milvus extra

    return MilvusIndex(cfg, store, read_only, max_age_s)


def open_data(data_dir: Path, index_cfg: IndexConfig, query_cfg: QueryConfig, models: list[Path],
              read_only: bool = False, store_cfg: StoreConfig | None = None, max_age_s: float | None = None) -> QueryEngine:
    """Store + recovered index + image embedders over `data_dir`; read-only beside a running service is fine."""
    store = open_store(data_dir, store_cfg or StoreConfig(), read_only)
    try:
        index = open_index(data_dir, index_cfg, store, read_only, max_age_s)
        index.recover()
        return QueryEngine(store, index, load_embedders(models), query_cfg)
    except BaseException:
        store.close()
        raise


class Matcher:
    """The service; see the module docstring."""

    def __init__(self, cfg: MatcherConfig):
        self.cfg = cfg
        Path(cfg.data_dir).mkdir(parents=True, exist_ok=True)
        max_age = cfg.retention.max_age_hours
        self.queries = open_data(cfg.data_dir, cfg.index, cfg.query, cfg.models, store_cfg=cfg.store,
                                 max_age_s=max_age * 3600 if max_age else None)
        self.store, self.index = self.queries.store, self.queries.index
        self.metrics = MatcherMetrics(self.stats)
        self.edges = Edges(Path(cfg.data_dir) / "edges.msgpack", cfg.store)
        self.registry = Registry(Path(cfg.data_dir), store=cfg.store)
        self.users, self.audit = Users(Path(cfg.data_dir), cfg.store), AuditLog(Path(cfg.data_dir), store=cfg.store)
        self.users.check()
        self.harvest = HarvestStore(Path(cfg.data_dir), cfg.harvest, max_age * 3600 if max_age else None, cfg.store)
        self.watchlist = Watchlist(Path(cfg.data_dir) / "watchlist.db", cfg.watchlist, self.queries.calibration_of, cfg.store)
        self.webhooks = Webhooks(Path(cfg.data_dir) / "webhooks.db", cfg.watchlist, cfg.store)
        self.watchlist.on_alerts(self.webhooks.enqueue)
        self.ingest = Pipeline(cfg.ingest, self.store, self.index, Tracks(self.store, cfg.query.track_gap_s), self.metrics,
                               self.edges.heard, self._watch)
        # Replicas on one PostgreSQL: the watchlist check and the migration run where the lease is held; with FAISS
        # each replica's index follows the store (every replica's sightings), so any replica answers alike.
        self.shared = cfg.store.kind == "postgres"
        self.leases = {name: Lease(name, cfg.store) for name in ("watchlist", "migration")}
        self.migration = Migration(cfg.migration, self.store, self.index, self.registry, lambda: self.edges.report()["edges"],
                                   self.ingest.quiet, max_age * 3600 if max_age else None, self._use_model,
                                   self.ingest.forget_model, self.leases["migration"].held)
        self.tail = (StoreTail(self.store, self.index, self.migration.lock, f"{socket.gethostname()}:{Path(cfg.data_dir).resolve()}",
                               self.ingest.forget_model) if self.shared and cfg.index.engine == "faiss" else None)
        self.ingest.tail = self.tail
        if self.tail is not None:
            self.tail.report()  # before a peer's next prune: the log after this index's position is kept
        if self.shared:
            self.watchlist.start_checks(self.store)
        self.queries.migration = self.migration
        self._stop = threading.Event()
        self._stopped = False
        self._threads: list[threading.Thread] = []

    # -- lifecycle -----------------------------------------------------------------------------

    def _watch(self, model: str, ids, rows) -> None:
        if not self.shared:
            self.watchlist.check(model, ids, rows.sightings, rows.vecs, self.store.records)
        elif self.leases["watchlist"].held():  # every replica's sightings, from the store (`Watchlist.check_stored`)
            self.watchlist.check_stored(self.store)

    def _replicas_loop(self) -> None:
        """What the other replicas stored: into this index (FAISS; Milvus: their new versions' collections opened), and
        to the watchlist where the lease is held."""
        while not self._stop.wait(_REPLICAS_INTERVAL_S):
            try:
                if self.tail is not None:
                    self.tail.poll()
                    self.tail.report()
                else:  # Milvus: the collections are shared; follow those another replica created or dropped
                    self.index.open_stored()
                if self.leases["watchlist"].held():
                    self.watchlist.check_stored(self.store)
            except (sqlite3.Error, self.store.Error) as e:  # the next pass reads from where this one stopped
                log.error("replicas: store tail or watchlist check failed, retried: %s", e)

    def _use_model(self, path: Path) -> None:
        """A new production version's file, for image queries and its calibration, unless `models` lists it."""
        if self.migration.target not in self.queries.embedders:
            self.queries.use_model(path)

    def start(self) -> None:
        self.ingest.start()
        self.webhooks.start()
        if self.cfg.migration.enabled:
            self.migration.start()
        self.store.checkpoint_in_background()
        loops = [("checkpoint", self._checkpoint_loop), ("snapshots", self._snapshot_loop), ("status", self._status_loop)]
        if self.shared:
            loops.append(("replicas", self._replicas_loop))
        if self.cfg.retention.max_age_hours or self.cfg.retention.max_per_camera:
            loops.append(("retention", self._retention_loop))
        for name, target in loops:
            t = threading.Thread(target=target, name=f"matcher-{name}", daemon=True)
            t.start()
            self._threads.append(t)
        if self.cfg.metrics.port:
            with listening("metrics.port", f"{self.cfg.metrics.host}:{self.cfg.metrics.port}"):
                self.metrics.serve(self.cfg.metrics.port, self.cfg.metrics.host)
            log.info("metrics on http://%s:%d/metrics", self.cfg.metrics.host, self.cfg.metrics.port)
        log.info("matcher ingesting on %s (%s), data in %s", self.ingest.endpoint, self.cfg.ingest.security.mode,
                 self.cfg.data_dir)

    def stop(self) -> None:
        """Stop ingest (what was received is still committed), write a final snapshot, close the store.
        The object is unusable afterwards, but for `registry`."""
        if self._stopped:
            return
        self._stopped = True
        self._stop.set()
        self.migration.stop()  # between two batches; it uses ingest's quiet()
        self.ingest.stop()
        for t in self._threads:
            t.join()
        self.webhooks.stop()
        for lease in self.leases.values():
            lease.release()
        self.index.close()
        self._snapshot()
        self._save_edges()
        self.store.close()
        self._log_status()
        self.watchlist.close()
        self.webhooks.close()
        self.harvest.close()
        self.audit.close()
        self.users.close()
        self.edges.close()
        log.info("matcher stopped")

    # -- removal, retention, snapshots ---------------------------------------------------------

    def remove(self, ids: list[int]) -> int:
        """Delete sightings (with embeddings and thumbnails) from store and index; returns how many existed."""
        # An add of a batch committed (or re-embedded) before would revive ids.
        with self.ingest.quiet(), self.migration.lock:
            by_model, pos = self.store.delete(ids)
            self.index.remove(by_model, pos)
        return len({i for v in by_model.values() for i in v})  # a re-embedded sighting is listed under both versions

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
        if r.max_age_hours:
            self.watchlist.expire(now - r.max_age_hours * 3600)
            self.harvest.expire(now - r.max_age_hours * 3600)
        if total:
            log.info("retention: deleted %d sightings (max age %s h, max %s per camera)", total, r.max_age_hours, r.max_per_camera)
        return total

    def _retention_loop(self) -> None:
        while True:
            try:
                self.enforce_retention()
            except self.store.Error as e:
                log.error("retention pass failed, retried in %.0f s: %s", self.cfg.retention.check_interval_s, e)
            if self._stop.wait(self.cfg.retention.check_interval_s):
                return

    def _checkpoint_loop(self) -> None:
        while not self._stop.wait(_CHECKPOINT_INTERVAL_S):
            try:
                self.store.checkpoint()
            except self.store.Error as e:  # the WAL keeps everything meanwhile; the next pass copies it
                log.error("WAL checkpoint failed: %s", e)

    def _snapshot_loop(self) -> None:
        while not self._stop.wait(self.cfg.index.snapshot_interval_s):
            self._snapshot()

    def _snapshot(self) -> None:
        t0 = time.monotonic()
        try:
            written = self.index.save()
            if self.tail is not None:  # the log is pruned no further than every replica's index has applied
                self.tail.report()
            self.store.prune_deletions(self.index.snapshot_deletion_pos())
        except (OSError, sqlite3.Error, self.store.Error) as e:
            log.error("index snapshot failed (the previous one stays): %s", e)
            return
        if written:
            log.info("index snapshot: %d partition(s) written in %.2f s", written, time.monotonic() - t0)

    # -- status --------------------------------------------------------------------------------

    def stats(self) -> dict:
        return {"accepted": self.ingest.accepted, "rejected": dict(self.ingest.rejected), "partitions": self.index.stats(),
                "cameras": dict(self.ingest.accepted_by_camera), "status": self.edges.report()["summary"],
                "migration": self.migration.progress(),
                "watchlist": {"entries": self.watchlist.size, "alerts": self.watchlist.alerted,
                              "webhooks": {"delivered": self.webhooks.delivered, "failed_tries": self.webhooks.failures,
                                           "given_up": self.webhooks.given_up, "pending": self.webhooks.pending}},
                "harvest": self.harvest.stats()}

    def _status_loop(self) -> None:
        while not self._stop.wait(self.cfg.metrics.log_interval_s):
            try:
                self._log_status()
            except (sqlite3.Error, self.store.Error) as e:  # a database away: the next interval tries again
                log.error("status not logged: %s", e)
            self._save_edges()
            self._advance_canary()
            self._prune_audit()

    def _prune_audit(self) -> None:
        try:
            if pruned := self.audit.prune(self.cfg.audit.max_age_days):
                log.info("audit log: %d entries older than %g days deleted", pruned, self.cfg.audit.max_age_days)
        except (sqlite3.Error, self.store.Error) as e:
            log.error("audit log: retention not applied, retried next time: %s", e)

    def _advance_canary(self) -> None:
        try:
            self.registry.advance(self.edges.report()["edges"])
        except (sqlite3.Error, self.store.Error) as e:  # the CLI changes it too: a busy or broken one is retried next time
            log.error("model registry: canary not checked: %s", e)

    def _save_edges(self) -> None:
        # The list in memory is whole; only a restart would start it empty. A database connection dropped since the
        # last save fails the first try and is replaced for the second (the save is an upsert: safe to repeat).
        for attempt in (1, 2):
            try:
                return self.edges.save()
            except (OSError, sqlite3.Error, self.store.Error) as e:
                if attempt == 2:
                    log.error("cannot save the edges' status to %s: %s", self.edges.path or self.store.shown, e)

    def _log_status(self) -> None:
        s = self.stats()
        parts = ", ".join(f"{m} {p['size']} {p['kind']}{' (rebuilding)' if p['rebuilding'] else ''}"
                          for m, p in s["partitions"].items()) or "none"
        reasons = ", ".join(f"{r} {n}" for r, n in sorted(s["rejected"].items()))
        status = "; ".join(f"{what} " + ", ".join(f"{n} {state}" for state, n in counts.items())
                           for what, counts in s["status"].items())
        log.info("ingest: %d accepted, %d rejected%s; partitions: %s; %s",
                 s["accepted"], sum(s["rejected"].values()), f" ({reasons})" if reasons else "", parts, status)
