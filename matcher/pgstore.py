"""The matcher's durable store on PostgreSQL (`store.kind: postgres`): `matcher.store.Store`'s methods and semantics.

| what            | how                                                                                     |
|-----------------|-----------------------------------------------------------------------------------------|
| durability      | one transaction per batch on the writer connection, `synchronous_commit=on`: committed (WAL |
|                 | flushed) before `insert` returns, so before the edge is acknowledged                  |
| reconnect       | a writer connection the server dropped (restart, failover) fails its transaction (not    |
|                 | acknowledged: the edge resends) and the next transaction opens a new one, or raises      |
|                 | `ConnectionError` while the server is down; the readers' pool checks a connection before |
|                 | lending it, and a reader waits at most 5 s for one                                       |
| ingest          | binary COPY of the batch's sightings, vectors and thumbnails (no text escaping of bytes) |
| schema          | versioned (`matcher.sqldb.migrate`): `schema_version` holds the last step of `MIGRATIONS` |
|                 | applied (module `store`); each step runs in its own transaction under an advisory lock, |
|                 | so two matchers opening one database agree                                              |
| ids and seqs    | `positions` rows (sightings, reembedded, deletions, pruned) updated in the same transaction |
|                 | as the rows, like SQLite's `sqlite_sequence`: ids are never reused after a deletion, and a |
|                 | reader never sees a position before its rows (a SEQUENCE is not transactional: `next_id()` |
|                 | would count a batch still uncommitted, and out-of-order commits would break seq replay)  |
| replicas        | `insert_new`: ids taken in the batch's transaction (the `sightings` position stays locked |
|                 | until commit), so several matchers on one database commit in id order; under that lock a  |
|                 | sighting another replica stored meanwhile is skipped, and the batch's track ids continue |
|                 | what the store holds of its edge tracks                                                  |
| (node, seq)     | UNIQUE: a resent sighting is stored once                                                 |
| deletion log    | pruned to what the index snapshots include and every replica heard from in the last     |
|                 | `REPLICA_SEEN_S` has applied (`replica_positions`, `report_position`)                    |
| readers         | a `psycopg_pool` pool, `store.pool_max` connections; `read_only=True` sets              |
|                 | `default_transaction_read_only` (safe beside a running service)                         |
| deletions       | rows of sightings, vectors (every version), thumbnails deleted in one transaction, logged |
|                 | as (seq, id, model) in `deletions`, one entry per version that held the id               |
| dead tuples     | a DELETE leaves the old row versions in the table files until VACUUM: `checkpoint()` runs |
|                 | VACUUM on the four tables after a deletion (the SQLite store truncates its WAL then), so |
|                 | no query or index scan can reach them and their space is reused. VACUUM does not zero the |
|                 | bytes: they stay in free space of the pages (43 of 60 deleted thumbnails were still there |
|                 | after VACUUM, read with pageinspect) and in WAL segments until those are recycled, until |
|                 | overwritten; `VACUUM FULL` (an exclusive lock: a pause of ingest) rewrites the files. Where |
|                 | that matters, keep the server's data directory on an encrypted volume                 |
| big values      | vectors and thumbnails are stored EXTERNAL (TOAST without compression: floats and JPEGs do |
|                 | not compress, and trying costs CPU on every insert)                                     |

    store = PgStore(StoreConfig(kind="postgres", dsn="host=db dbname=crossview user=matcher", password_file=...))
    store.insert(ids, sightings, track_ids, vecs)     # committed when this returns

The lookups, retention queries and migration selections are `matcher.storecommon.SqlStore`'s, shared with the
SQLite store; the schema runner, placeholders and connection options are `matcher.sqldb`'s, which puts the matcher's
other databases (registry, watchlist and alerts, webhook queue, users, audit log, harvest index, the edges' last
heartbeats) in this database too, each in a schema of its own. The FAISS index snapshots stay in data_dir.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager

import numpy as np
import psycopg
from psycopg_pool import ConnectionPool

from crossview.kernel.config import StoreConfig
from crossview.kernel.wire import Sighting
from crossview.matcher.sqldb import PG_NOW, Db, connect_pg, migrate, pg_options, pg_sql, schema_version
from crossview.matcher.storecommon import COLUMNS, Assign, SqlStore, by_model, chunks, ints

log = logging.getLogger(__name__)

# Numbered schema steps; a store at version n has had steps 1..n applied. Never edit a step: add one.
MIGRATIONS = [
    """
    CREATE TABLE models (model text PRIMARY KEY, dim integer NOT NULL);
    CREATE TABLE sightings (
        id bigint PRIMARY KEY,
        node text NOT NULL,
        camera text NOT NULL,
        ts double precision NOT NULL,
        frame bigint NOT NULL,
        track bigint NOT NULL,
        track_id bigint NOT NULL,
        x1 double precision NOT NULL, y1 double precision NOT NULL, x2 double precision NOT NULL, y2 double precision NOT NULL,
        score double precision NOT NULL,
        model text NOT NULL,
        has_thumb boolean NOT NULL,
        seq bigint,  -- the edge's sequence number (wire v2), NULL for v1: (node, seq) is stored once
        UNIQUE (node, seq)
    );
    CREATE INDEX sightings_camera_ts ON sightings (camera, ts);
    CREATE INDEX sightings_ts ON sightings (ts, id);
    CREATE INDEX sightings_edge_track ON sightings (node, camera, track, model, ts);
    CREATE INDEX sightings_track_id ON sightings (track_id, ts);
    CREATE TABLE vectors (id bigint PRIMARY KEY, vec bytea NOT NULL);
    CREATE TABLE reembedded (seq bigint PRIMARY KEY, id bigint NOT NULL, model text NOT NULL, vec bytea NOT NULL,
                             UNIQUE (model, id));
    CREATE INDEX reembedded_id ON reembedded (id);
    CREATE TABLE thumbnails (id bigint PRIMARY KEY, jpeg bytea NOT NULL);
    ALTER TABLE vectors ALTER vec SET STORAGE EXTERNAL;
    ALTER TABLE reembedded ALTER vec SET STORAGE EXTERNAL;
    ALTER TABLE thumbnails ALTER jpeg SET STORAGE EXTERNAL;
    CREATE TABLE deletions (seq bigint PRIMARY KEY, id bigint NOT NULL, model text NOT NULL);
    -- the highest sighting id and seqs taken, and the deletion log position forgotten up to
    CREATE TABLE positions (name text PRIMARY KEY, value bigint NOT NULL);
    INSERT INTO positions VALUES ('sightings', 0), ('reembedded', 0), ('deletions', 0), ('pruned', 0);
    """,
    # each replica's FAISS index: the deletion-log position it has applied, and when it said so (server clock)
    "CREATE TABLE replica_positions (replica text PRIMARY KEY, del_pos bigint NOT NULL, seen double precision NOT NULL);",
]
REPLICA_SEEN_S = 600.0  # a replica silent this long no longer holds the deletion log back (its restart rebuilds)
_PURGED = ("sightings", "vectors", "thumbnails", "reembedded")  # what a deletion leaves dead tuples in
_SIGHTING_TYPES = ("bigint", "text", "text", "double precision", "bigint", "bigint", "bigint", *["double precision"] * 5,
                   "text", "boolean", "bigint")  # COLUMNS and seq


def _copy(db: psycopg.Connection, table: str, types: Sequence[str], rows: Iterable[tuple]) -> None:
    """Rows into `table (columns)` of these types by binary COPY: no text escaping of the vectors' and JPEGs' bytes."""
    with db.cursor().copy(f"COPY {table} FROM STDIN (FORMAT BINARY)") as copy:
        copy.set_types(types)
        for row in rows:
            copy.write_row(row)


_READ_WAIT_S = 5.0  # a reader waits this long for a pooled connection: queries take ms; a server down answers 503 fast


class PgStore(SqlStore):
    """See the module docstring; the lookups, retention queries and migration selections are `SqlStore`'s."""

    Error = psycopg.Error
    RowRefused = (psycopg.IntegrityError, psycopg.DataError, OverflowError)
    _IN = "= ANY(?)"
    _NODES = "string_agg(DISTINCT node, ',' ORDER BY node)"

    def __init__(self, cfg: StoreConfig, read_only: bool = False):
        self.shown, self.read_only, self._cfg = cfg.shown, read_only, cfg
        self._writer = self._pool = None
        try:
            first = connect_pg(cfg, read_only)  # a wrong address or password fails here
            schema = Db(first, "postgres", "store", self.shown)
            if read_only:
                with first:
                    if schema_version(schema) is None:
                        raise FileNotFoundError(f"{self.shown}: no matcher store here (no schema_version row)")
            else:
                self._writer = first
                migrate(schema, [{"postgres": step} for step in MIGRATIONS])
            # Each connection checked as it is lent: one the server dropped is replaced, not handed to a query.
            self._pool = ConnectionPool(cfg.conninfo(), min_size=1, max_size=cfg.pool_max, open=True, name="pgstore",
                                        kwargs={"autocommit": True, "options": pg_options(read_only)},
                                        check=ConnectionPool.check_connection, timeout=_READ_WAIT_S)
        except psycopg.Error as e:
            self.close()
            raise ConnectionError(f"store: {self.shown}: {str(e).strip() or type(e).__name__}") from None
        except BaseException:
            self.close()
            raise
        self._write_lock = threading.Lock()
        self._purge = False  # a deletion since the last VACUUM

    # -- connections ---------------------------------------------------------------------------

    @contextmanager
    def _read(self) -> Iterator[psycopg.Connection]:
        with self._pool.connection() as conn:
            yield conn

    @staticmethod
    def _sql(sql: str) -> str:
        return pg_sql(sql)  # SQLite's placeholders (`SqlStore`'s SQL) as psycopg's

    @staticmethod
    def _list(values: Iterable) -> list:
        return list(values)

    def _all(self, sql: str, args: Sequence | dict = ()) -> list[tuple]:
        with self._read() as db:
            return db.execute(self._sql(sql), args).fetchall()

    def _one(self, sql: str, args: Sequence | dict = ()) -> tuple | None:
        with self._read() as db:
            return db.execute(self._sql(sql), args).fetchone()

    def close(self) -> None:
        if self._pool is not None:
            self._pool.close()
        if self._writer is not None:
            self._writer.close()

    def checkpoint_in_background(self) -> None:
        """Nothing to move off the commit path: PostgreSQL checkpoints its WAL itself."""

    def checkpoint(self) -> None:
        """After a deletion, VACUUM the tables it touched: the deleted rows' old versions (dead tuples) are pruned
        and their space made reusable (see the module docstring for what VACUUM does not do)."""
        if not self._purge:
            return
        self._purge = False
        with self._read() as db:
            db.execute(f"VACUUM {', '.join(_PURGED)}")

    def _transaction(self, work) -> object:
        if self.read_only:
            raise PermissionError(f"{self.shown}: store opened read-only")
        with self._write_lock:
            if self._writer.broken:  # its last use failed with the link: a new one, or ConnectionError while down
                self._writer = connect_pg(self._cfg)
            with self._writer.transaction():
                return work(self._writer)

    @staticmethod
    def _position(db: psycopg.Connection, name: str) -> int:
        return db.execute("SELECT value FROM positions WHERE name = %s", (name,)).fetchone()[0]

    @staticmethod
    def _take(db: psycopg.Connection, name: str, n: int) -> int:
        """Take n numbers of a position: the first one (the row stays locked until the transaction ends)."""
        return db.execute("UPDATE positions SET value = value + %s WHERE name = %s RETURNING value",
                          (n, name)).fetchone()[0] - n + 1

    # -- ingest --------------------------------------------------------------------------------

    def next_id(self) -> int:
        """The id the next inserted sighting takes: ids are never reused, not even a deleted one's."""
        with self._read() as db:
            return self._position(db, "sightings") + 1

    def insert_new(self, sightings: Sequence[Sighting], vecs: Sequence[np.ndarray],
                   assign: Assign) -> tuple[int, set[tuple[str, int]]]:
        """Store a batch under ids taken in its transaction: (the first id, the (node, seq) skipped as stored already).
        Replicas write one database: the transaction locks the `sightings` position first, until commit, so their
        batches commit one after another, in id order (a reader that sees an id has every lower one committed: what
        `matcher.index`'s tail relies on); under that lock, a sighting another replica stored since the caller
        looked (both were sent it) is skipped, not refused; the track ids come from `assign(stored, ids, ends)` with
        `ends` the latest stretch the store holds of each edge track, so a track whose sightings reach two replicas
        keeps one track id."""

        def work(db: psycopg.Connection) -> tuple[int, set[tuple[str, int]]]:
            first = db.execute("SELECT value FROM positions WHERE name = 'sightings' FOR UPDATE").fetchone()[0] + 1
            seen = self._stored(db, [(s.node, s.seq) for s in sightings if s.seq is not None])
            keep = [k for k, s in enumerate(sightings) if s.seq is None or (s.node, s.seq) not in seen]
            if keep:
                kept, ids = [sightings[k] for k in keep], list(range(first, first + len(keep)))
                self._rows(db, ids, kept, assign(kept, ids, self._ends(db, kept)), [vecs[k] for k in keep])
            return first, seen

        return self._transaction(work)

    @staticmethod
    def _ends(db: psycopg.Connection, sightings: Sequence[Sighting]) -> dict[tuple[str, str, int, str], tuple[int, float]]:
        """{(node, camera, track, model): (track id, ts)} of the newest stored sighting of each of these edge tracks."""
        keys = sorted({(s.node, s.camera, int(s.track), s.model) for s in sightings})
        rows = db.execute(
            "SELECT k.node, k.camera, k.track, k.model, e.track_id, e.ts FROM unnest(%s::text[], %s::text[], %s::bigint[], "
            "%s::text[]) AS k (node, camera, track, model) CROSS JOIN LATERAL (SELECT track_id, ts FROM sightings s WHERE "
            "s.node = k.node AND s.camera = k.camera AND s.track = k.track AND s.model = k.model ORDER BY ts DESC LIMIT 1) e",
            [list(col) for col in zip(*keys)]).fetchall()
        return {(n, c, t, m): (tid, ts) for n, c, t, m, tid, ts in rows}

    def insert(self, ids: Sequence[int], sightings: Sequence[Sighting], track_ids: Sequence[int],
               vecs: Sequence[np.ndarray]) -> None:
        """Store a batch in one transaction, row for row (see `matcher.store.Store.insert`)."""
        if sightings:
            self._transaction(lambda db: self._rows(db, ints(ids), sightings, track_ids, vecs))

    @staticmethod
    def _rows(db: psycopg.Connection, ids: list[int], sightings: Sequence[Sighting], track_ids: Sequence[int],
              vecs: Sequence[np.ndarray]) -> None:
        _copy(db, f"sightings ({COLUMNS}, seq)", _SIGHTING_TYPES, (
            (i, s.node, s.camera, s.ts, int(s.frame), int(s.track), int(t), *s.box, s.score, s.model, s.thumbnail is not None,
             s.seq) for i, s, t in zip(ids, sightings, track_ids)))
        _copy(db, "vectors (id, vec)", ("bigint", "bytea"), ((i, np.asarray(v, np.float32).tobytes()) for i, v in zip(ids, vecs)))
        _copy(db, "thumbnails (id, jpeg)", ("bigint", "bytea"),
              ((i, s.thumbnail) for i, s in zip(ids, sightings) if s.thumbnail is not None))
        db.cursor().executemany("INSERT INTO models (model, dim) VALUES (%s, %s) ON CONFLICT DO NOTHING",
                                sorted({(s.model, len(v)) for s, v in zip(sightings, vecs)}))
        db.execute("UPDATE positions SET value = GREATEST(value, %s) WHERE name = 'sightings'", (max(ids),))

    def stored(self, keys: Iterable[tuple[str, int]]) -> set[tuple[str, int]]:
        """Which of these (node, seq) are stored already."""
        with self._read() as db:
            return self._stored(db, list(keys))

    @staticmethod
    def _stored(db: psycopg.Connection, keys: list[tuple[str, int]]) -> set[tuple[str, int]]:
        if not keys:
            return set()
        rows = db.execute("SELECT s.node, s.seq FROM unnest(%s::text[], %s::bigint[]) AS k (node, seq) "
                          "JOIN sightings s ON s.node = k.node AND s.seq = k.seq", ([n for n, _ in keys], ints(s for _, s in keys)))
        return {(n, s) for n, s in rows}

    # -- lookups -------------------------------------------------------------------------------

    def track_ends(self, since: float) -> list[tuple[str, str, int, str, int, float]]:
        """(node, camera, track, model, track_id, last ts) of every edge track seen since `since`: its latest stretch."""
        return self._all("SELECT DISTINCT ON (node, camera, track, model) node, camera, track, model, track_id, ts "
                         "FROM sightings WHERE ts >= %s ORDER BY node, camera, track, model, ts DESC", (since,))

    def _stream(self, sql: str, args: Sequence) -> Iterator[list[tuple]]:
        """A query's rows in chunks, through a server-side cursor: one consistent read, never all in memory."""
        with self._read() as db, db.transaction():
            yield from chunks(db.cursor(name="stream").execute(self._sql(sql), args))

    # -- deletions and retention ---------------------------------------------------------------

    def delete(self, ids: Iterable[int]) -> tuple[dict[str, list[int]], int]:
        """Delete sightings with their embeddings (of every version) and thumbnails; log each. Returns ({model: ids
        deleted}, log position): a re-embedded sighting is listed under each version that held it."""
        ids = ints(ids)

        def work(db: psycopg.Connection) -> tuple[dict[str, list[int]], int]:
            found = db.execute("SELECT id, model FROM sightings WHERE id = ANY(%s)", (ids,)).fetchall()
            present = [i for i, _ in found]
            found += db.execute("SELECT id, model FROM reembedded WHERE id = ANY(%s)", (present,)).fetchall()
            for table in _PURGED:
                db.execute(f"DELETE FROM {table} WHERE id = ANY(%s)", (present,))
            return by_model(found), self._log_deletions(db, found)

        result = self._transaction(work)
        self._purge = True
        return result

    def _log_deletions(self, db: psycopg.Connection, found: list[tuple[int, str]]) -> int:
        """Append (id, model) entries to the deletion log; its position after them."""
        if found:
            first = self._take(db, "deletions", len(found))
            db.execute("INSERT INTO deletions (seq, id, model) SELECT %s + n - 1, id, model "
                       "FROM unnest(%s::bigint[], %s::text[]) WITH ORDINALITY AS d (id, model, n)",
                       (first, [i for i, _ in found], [m for _, m in found]))
        return self._position(db, "deletions")

    def last_deletion(self) -> int:
        with self._read() as db:
            return self._position(db, "deletions")

    def prune_deletions(self, upto_seq: int) -> None:
        """Forget log entries every index snapshot already includes, and every replica heard from within
        `REPLICA_SEEN_S` has applied (`report_position`): its index follows the log (`matcher.tail`)."""
        if upto_seq <= self.pruned_upto():
            return

        def work(db: psycopg.Connection) -> None:
            (applied,) = db.execute(f"SELECT MIN(del_pos) FROM replica_positions WHERE seen > {PG_NOW} - %s",
                                    (REPLICA_SEEN_S,)).fetchone()
            upto = int(upto_seq if applied is None else min(upto_seq, applied))
            if upto > self._position(db, "pruned"):
                db.execute("DELETE FROM deletions WHERE seq <= %s", (upto,))
                db.execute("UPDATE positions SET value = %s WHERE name = 'pruned'", (upto,))

        self._transaction(work)

    def report_position(self, replica: str, del_pos: int) -> None:
        """This replica's index has applied the deletion log up to `del_pos`: the log is kept for it until then."""
        self._transaction(lambda db: db.execute(
            f"INSERT INTO replica_positions VALUES (%s, %s, {PG_NOW}) ON CONFLICT (replica) DO UPDATE SET "
            "del_pos = excluded.del_pos, seen = excluded.seen", (replica, int(del_pos))))

    def pruned_upto(self) -> int:
        """Deletion-log position forgotten up to: a snapshot older than this cannot be brought up to date."""
        with self._read() as db:
            return self._position(db, "pruned")

    # -- re-embedding (matcher.migration) ------------------------------------------------------

    def add_reembedded(self, model: str, ids: Sequence[int], vecs: np.ndarray) -> tuple[list[int], int]:
        """Store `model`'s vectors of these sightings in one transaction, skipping any deleted meanwhile or re-embedded
        already. Returns (the ids stored, the last seq now taken: what an index snapshot counts re-embedded ones by)."""
        wanted = dict(zip(ints(ids), vecs))  # one vector per id: the last given

        def work(db: psycopg.Connection) -> tuple[list[int], int]:
            db.execute("INSERT INTO models (model, dim) VALUES (%s, %s) ON CONFLICT DO NOTHING", (model, vecs.shape[1]))
            keep = [r[0] for r in db.execute(
                "SELECT u.id FROM unnest(%s::bigint[]) WITH ORDINALITY AS u (id, n) WHERE EXISTS (SELECT 1 FROM sightings s "
                "WHERE s.id = u.id) AND NOT EXISTS (SELECT 1 FROM reembedded r WHERE r.model = %s AND r.id = u.id) ORDER BY n",
                (list(wanted), model))]
            if keep:
                first = self._take(db, "reembedded", len(keep))
                _copy(db, "reembedded (seq, id, model, vec)", ("bigint", "bigint", "text", "bytea"),
                      ((first + k, i, model, np.asarray(wanted[i], np.float32).tobytes()) for k, i in enumerate(keep)))
            return keep, self._position(db, "reembedded")

        return self._transaction(work)
