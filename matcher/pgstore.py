"""The matcher's durable store on PostgreSQL (`store.kind: postgres`): `matcher.store.Store`'s methods and semantics.

| what            | how                                                                                     |
|-----------------|-----------------------------------------------------------------------------------------|
| durability      | one transaction per batch on the writer connection, `synchronous_commit=on`: committed (WAL |
|                 | flushed) before `insert` returns, so before the edge is acknowledged                  |
| schema          | versioned: `schema_version` holds the last step of `MIGRATIONS` applied; each step runs in |
|                 | its own transaction under an advisory lock, so two matchers opening one database agree  |
| ids and seqs    | `positions` rows (sightings, reembedded, deletions, pruned) updated in the same transaction |
|                 | as the rows, like SQLite's `sqlite_sequence`: ids are never reused after a deletion, and a |
|                 | reader never sees a position before its rows (a SEQUENCE is not transactional: `next_id()` |
|                 | would count a batch still uncommitted, and out-of-order commits would break seq replay)  |
| (node, seq)     | UNIQUE: a resent sighting is stored once                                                 |
| readers         | a `psycopg_pool` pool, `store.pool_max` connections; `read_only=True` sets              |
|                 | `default_transaction_read_only` (safe beside a running service)                         |
| deletions       | rows of sightings, vectors (every version), thumbnails deleted in one transaction, logged |
|                 | as (seq, id, model) in `deletions`, one entry per version that held the id               |
| dead tuples     | a DELETE leaves the old row versions in the table files until VACUUM: `checkpoint()` runs |
|                 | VACUUM on the four tables after a deletion (the SQLite store truncates its WAL then), so |
|                 | no query or index scan can reach them and their space is reused. VACUUM does not zero the |
|                 | bytes: they stay in free space of the files, and in WAL segments until those are recycled, |
|                 | until overwritten; `VACUUM FULL` (an exclusive lock: a pause of ingest) rewrites the files |
| big values      | vectors and thumbnails are stored EXTERNAL (TOAST without compression: floats and JPEGs do |
|                 | not compress, and trying costs CPU on every insert)                                     |

    store = PgStore(StoreConfig(kind="postgres", dsn="host=db dbname=crossview user=matcher", password_file=...))
    store.insert(ids, sightings, track_ids, vecs)     # committed when this returns

Everything else (registry, watchlist, webhooks, harvest index, users, audit) stays in SQLite files this increment.
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
from crossview.kernel.wire import MAX_INT, Sighting
from crossview.matcher.results import SightingRecord
from crossview.matcher.storecommon import COLUMNS, by_model, chunks, id_vectors, ints, migrate_window, oldest_over, record

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
]
_PURGED = ("sightings", "vectors", "thumbnails", "reembedded")  # what a deletion leaves dead tuples in
_LOCK_KEY = 0x63726F7373  # the advisory lock schema steps run under ("cross")


class PgStore:
    """See the module docstring."""

    Error = psycopg.Error

    def __init__(self, cfg: StoreConfig, read_only: bool = False):
        self.shown, self.read_only = cfg.shown, read_only
        conninfo = cfg.conninfo()
        options = "-c default_transaction_read_only=on" if read_only else "-c synchronous_commit=on"
        try:
            self._writer = None if read_only else psycopg.connect(conninfo, autocommit=True, options=options)
            if self._writer is not None:
                self._migrate()
            self._pool = ConnectionPool(conninfo, min_size=1, max_size=cfg.pool_max, open=True, name="pgstore",
                                        kwargs={"autocommit": True, "options": options})
            self._pool.wait(30)
            if read_only and self._version() == 0:
                raise FileNotFoundError(f"{self.shown}: no matcher store here (no schema_version)")
        except (psycopg.Error, TimeoutError) as e:
            self.close()
            raise ConnectionError(f"store.dsn: {self.shown}: {str(e).strip() or type(e).__name__}") from None
        self._write_lock = threading.Lock()
        self._purge = False  # a deletion since the last VACUUM

    # -- schema --------------------------------------------------------------------------------

    def _version(self) -> int:
        row = self._one("SELECT to_regclass('schema_version') IS NOT NULL")
        return self._one("SELECT version FROM schema_version")[0] if row[0] else 0

    def _migrate(self) -> None:
        db = self._writer
        db.execute("CREATE TABLE IF NOT EXISTS schema_version (version integer NOT NULL)")
        with db.transaction():
            db.execute("SELECT pg_advisory_xact_lock(%s)", (_LOCK_KEY,))
            if db.execute("SELECT version FROM schema_version").fetchone() is None:
                db.execute("INSERT INTO schema_version VALUES (0)")
        version = db.execute("SELECT version FROM schema_version").fetchone()[0]
        if version > len(MIGRATIONS):
            raise psycopg.errors.FeatureNotSupported(f"schema version {version} is newer than this matcher's "
                                                     f"{len(MIGRATIONS)}: upgrade the matcher")
        for step in range(version + 1, len(MIGRATIONS) + 1):
            with db.transaction():
                db.execute("SELECT pg_advisory_xact_lock(%s)", (_LOCK_KEY,))
                if db.execute("SELECT version FROM schema_version").fetchone()[0] >= step:
                    continue  # another matcher applied it meanwhile
                db.execute(MIGRATIONS[step - 1])
                db.execute("UPDATE schema_version SET version = %s", (step,))
            log.info("store %s: schema step %d applied", self.shown, step)

    # -- connections ---------------------------------------------------------------------------

    @contextmanager
    def _read(self) -> Iterator[psycopg.Connection]:
        with self._pool.connection() as conn:
            yield conn

    def _all(self, sql: str, args: tuple | dict = ()) -> list[tuple]:
        with self._read() as db:
            return db.execute(sql, args).fetchall()

    def _one(self, sql: str, args: tuple | dict = ()) -> tuple | None:
        with self._read() as db:
            return db.execute(sql, args).fetchone()

    def close(self) -> None:
        if getattr(self, "_pool", None) is not None:
            self._pool.close()
        if getattr(self, "_writer", None) is not None:
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
        with self._write_lock, self._writer.transaction():
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

    def insert(self, ids: Sequence[int], sightings: Sequence[Sighting], track_ids: Sequence[int],
               vecs: Sequence[np.ndarray]) -> None:
        """Store a batch in one transaction, row for row (see `matcher.store.Store.insert`)."""
        ids = ints(ids)

        def work(db: psycopg.Connection) -> None:
            with db.cursor() as cur:
                with cur.copy(f"COPY sightings ({COLUMNS}, seq) FROM STDIN") as copy:
                    for i, s, t in zip(ids, sightings, track_ids):
                        copy.write_row((i, s.node, s.camera, s.ts, int(s.frame), int(s.track), int(t), *s.box, s.score,
                                        s.model, s.thumbnail is not None, s.seq))
                with cur.copy("COPY vectors (id, vec) FROM STDIN") as copy:
                    for i, v in zip(ids, vecs):
                        copy.write_row((i, np.asarray(v, np.float32).tobytes()))
                with cur.copy("COPY thumbnails (id, jpeg) FROM STDIN") as copy:
                    for i, s in zip(ids, sightings):
                        if s.thumbnail is not None:
                            copy.write_row((i, s.thumbnail))
            db.cursor().executemany("INSERT INTO models (model, dim) VALUES (%s, %s) ON CONFLICT DO NOTHING",
                                    sorted({(s.model, len(v)) for s, v in zip(sightings, vecs)}))
            db.execute("UPDATE positions SET value = GREATEST(value, %s) WHERE name = 'sightings'", (max(ids),))

        if sightings:
            self._transaction(work)

    def stored(self, keys: Iterable[tuple[str, int]]) -> set[tuple[str, int]]:
        """Which of these (node, seq) are stored already."""
        keys = list(keys)
        rows = self._all("SELECT s.node, s.seq FROM unnest(%s::text[], %s::bigint[]) AS k (node, seq) "
                         "JOIN sightings s ON s.node = k.node AND s.seq = k.seq", ([n for n, _ in keys], ints(s for _, s in keys)))
        return {(n, s) for n, s in rows}

    # -- lookups -------------------------------------------------------------------------------

    def records(self, ids: Iterable[int]) -> dict[int, SightingRecord]:
        rows = self._all(f"SELECT {COLUMNS} FROM sightings WHERE id = ANY(%s)", (ints(ids),))
        return {r[0]: record(r) for r in rows}

    def record(self, sighting_id: int) -> SightingRecord | None:
        return self.records([sighting_id]).get(int(sighting_id))

    def vector(self, sighting_id: int, model: str | None = None) -> np.ndarray | None:
        """The sighting's embedding by its own model version, or by `model` (its own, or one it was re-embedded by)."""
        if model is None:
            row = self._one("SELECT vec FROM vectors WHERE id = %s", (int(sighting_id),))
        else:
            row = self._one("SELECT v.vec FROM vectors v JOIN sightings s ON s.id = v.id WHERE v.id = %(id)s AND s.model = %(m)s "
                            "UNION ALL SELECT vec FROM reembedded WHERE id = %(id)s AND model = %(m)s",
                            {"id": int(sighting_id), "m": model})
        return None if row is None else np.frombuffer(row[0], np.float32)

    def thumbnail(self, sighting_id: int) -> bytes | None:
        row = self._one("SELECT jpeg FROM thumbnails WHERE id = %s", (int(sighting_id),))
        return None if row is None else bytes(row[0])

    def latest_in_track(self, node: str, camera: str, track: int, model: str | None = None) -> SightingRecord | None:
        """The newest sighting of an edge track: it carries the track's best (longest running mean) embedding."""
        row = self._one(f"SELECT {COLUMNS} FROM sightings WHERE node = %s AND camera = %s AND track = %s "
                        "AND (%s::text IS NULL OR model = %s) ORDER BY ts DESC LIMIT 1", (node, camera, int(track), model, model))
        return None if row is None else record(row)

    def track_spans(self, track_ids: Iterable[int]) -> dict[int, tuple[float, float, int]]:
        """track_id -> (first ts, last ts, sightings stored)."""
        rows = self._all("SELECT track_id, MIN(ts), MAX(ts), COUNT(*) FROM sightings WHERE track_id = ANY(%s) GROUP BY track_id",
                         (ints(track_ids),))
        return {r[0]: (r[1], r[2], r[3]) for r in rows}

    def recent(self, camera: str | None = None, limit: int = 50) -> list[SightingRecord]:
        rows = self._all(f"SELECT {COLUMNS} FROM sightings WHERE (%s::text IS NULL OR camera = %s) ORDER BY ts DESC LIMIT %s",
                         (camera, camera, int(limit)))
        return [record(r) for r in rows]

    def cameras(self) -> list[dict]:
        rows = self._all("SELECT camera, string_agg(DISTINCT node, ','), COUNT(*), COUNT(DISTINCT track_id), MIN(ts), MAX(ts) "
                         "FROM sightings GROUP BY camera ORDER BY camera")
        return [{"camera": r[0], "node": r[1], "sightings": r[2], "tracks": r[3], "first_ts": r[4], "last_ts": r[5]}
                for r in rows]

    def newest_by_node(self) -> dict[str, float]:
        """node -> its newest sighting's time."""
        return dict(self._all("SELECT node, MAX(ts) FROM sightings GROUP BY node"))

    def track_ends(self, since: float) -> list[tuple[str, str, int, str, int, float]]:
        """(node, camera, track, model, track_id, last ts) of every edge track seen since `since`: its latest stretch."""
        return self._all("SELECT DISTINCT ON (node, camera, track, model) node, camera, track, model, track_id, ts "
                         "FROM sightings WHERE ts >= %s ORDER BY node, camera, track, model, ts DESC", (since,))

    def models(self) -> dict[str, int]:
        """Every model version ever stored, with its embedding dimension."""
        return dict(self._all("SELECT model, dim FROM models"))

    def _stream(self, sql: str, args: tuple) -> Iterator[list[tuple]]:
        """A query's rows in chunks, through a server-side cursor: one consistent read, never all in memory."""
        with self._read() as db, db.transaction():
            yield from chunks(db.cursor(name="stream").execute(sql, args))

    def vectors(self, model: str, after_id: int = 0, upto_id: int | None = None) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """(ids, (n, dim) float32) chunks of one model's stored embeddings with after_id < id <= upto_id, by id."""
        for rows in self._stream("SELECT s.id, v.vec FROM sightings s JOIN vectors v ON v.id = s.id WHERE s.model = %s "
                                 "AND s.id > %s AND s.id <= %s ORDER BY s.id",
                                 (model, int(after_id), int(upto_id) if upto_id is not None else MAX_INT)):
            yield id_vectors(rows)

    def reembedded_vectors(self, model: str, after_seq: int = 0,
                           upto_seq: int | None = None) -> Iterator[tuple[np.ndarray, np.ndarray, int]]:
        """(ids, (n, dim) float32, last seq) chunks of the vectors re-embedded by `model` with after_seq < seq <= upto_seq,
        in the order they were added."""
        for rows in self._stream("SELECT id, vec, seq FROM reembedded WHERE model = %s AND seq > %s AND seq <= %s ORDER BY seq",
                                 (model, int(after_seq), int(upto_seq) if upto_seq is not None else MAX_INT)):
            yield (*id_vectors(rows), rows[-1][2])

    @staticmethod
    def _where(model: str, cameras: list[str] | None, since: float | None, until: float | None, column: str) -> tuple[str, tuple]:
        return (f"{column} = %s AND (%s::text[] IS NULL OR s.camera = ANY(%s)) AND s.ts >= %s AND s.ts <= %s",
                (model, cameras or None, cameras or None, -np.inf if since is None else since, np.inf if until is None else until))

    def count(self, model: str, cameras: list[str] | None, since: float | None, until: float | None, limit: int) -> int:
        """Sightings with a vector of a model version (their own or re-embedded) on these cameras (None: all) within
        [since, until], counted up to `limit` each way."""
        own, own_args = self._where(model, cameras, since, until, "s.model")
        other, other_args = self._where(model, cameras, since, until, "r.model")
        return self._one(f"SELECT (SELECT COUNT(*) FROM (SELECT 1 FROM sightings s WHERE {own} LIMIT %s) a) + "
                         f"(SELECT COUNT(*) FROM (SELECT 1 FROM reembedded r JOIN sightings s ON s.id = r.id WHERE {other} "
                         "LIMIT %s) b)", (*own_args, int(limit), *other_args, int(limit)))[0]

    def vectors_where(self, model: str, cameras: list[str] | None, since: float | None,
                      until: float | None) -> tuple[np.ndarray, np.ndarray]:
        """(ids, (n, dim) float32) of the sightings `count()` counts."""
        own, own_args = self._where(model, cameras, since, until, "s.model")
        other, other_args = self._where(model, cameras, since, until, "r.model")
        return id_vectors(self._all(f"SELECT s.id, v.vec FROM sightings s JOIN vectors v ON v.id = s.id WHERE {own} UNION ALL "
                                    f"SELECT s.id, r.vec FROM reembedded r JOIN sightings s ON s.id = r.id WHERE {other}",
                                    (*own_args, *other_args)))

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
            if found:
                first = self._take(db, "deletions", len(found))
                db.execute("INSERT INTO deletions (seq, id, model) SELECT %s + n - 1, id, model "
                           "FROM unnest(%s::bigint[], %s::text[]) WITH ORDINALITY AS d (id, model, n)",
                           (first, [i for i, _ in found], [m for _, m in found]))
            return by_model(found), self._position(db, "deletions")

        result = self._transaction(work)
        self._purge = True
        return result

    def last_deletion(self) -> int:
        with self._read() as db:
            return self._position(db, "deletions")

    def deletions_after(self, seq: int) -> list[tuple[int, int, str]]:
        """(seq, sighting id, model) logged after position `seq`."""
        return self._all("SELECT seq, id, model FROM deletions WHERE seq > %s ORDER BY seq", (int(seq),))

    def prune_deletions(self, upto_seq: int) -> None:
        """Forget log entries every index snapshot already includes."""
        if upto_seq <= self.pruned_upto():
            return

        def work(db: psycopg.Connection) -> None:
            db.execute("DELETE FROM deletions WHERE seq <= %s", (int(upto_seq),))
            db.execute("UPDATE positions SET value = %s WHERE name = 'pruned'", (int(upto_seq),))

        self._transaction(work)

    def pruned_upto(self) -> int:
        """Deletion-log position forgotten up to: a snapshot older than this cannot be brought up to date."""
        with self._read() as db:
            return self._position(db, "pruned")

    def older_than(self, ts: float, limit: int) -> list[int]:
        return [r[0] for r in self._all("SELECT id FROM sightings WHERE ts < %s ORDER BY ts LIMIT %s", (ts, int(limit)))]

    def over_quota(self, max_per_camera: int, limit: int) -> list[int]:
        """Ids of the oldest sightings of every camera holding more than `max_per_camera`."""
        over = self._all("SELECT camera, COUNT(*) FROM sightings GROUP BY camera HAVING COUNT(*) > %s", (int(max_per_camera),))
        return oldest_over(over, max_per_camera, limit, lambda camera, n: [
            r[0] for r in self._all("SELECT id FROM sightings WHERE camera = %s ORDER BY ts, id LIMIT %s", (camera, n))])

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
                with db.cursor().copy("COPY reembedded (seq, id, model, vec) FROM STDIN") as copy:
                    for k, i in enumerate(keep):
                        copy.write_row((first + k, i, model, np.asarray(wanted[i], np.float32).tobytes()))
            return keep, self._position(db, "reembedded")

        return self._transaction(work)

    # A sighting lacks a vector of %(model)s when it is neither its own version's (with that vector kept) nor re-embedded.
    _LACKS = ("NOT (s.model = %(model)s AND EXISTS (SELECT 1 FROM vectors v WHERE v.id = s.id)) "
              "AND NOT EXISTS (SELECT 1 FROM reembedded r WHERE r.model = %(model)s AND r.id = s.id)")

    def to_migrate(self, model: str, since: float, limit: int, before: tuple[float, int] | None = None,
                   after_id: int | None = None) -> list[tuple[int, float, bytes]]:
        """(id, ts, JPEG) of thumbnailed sightings at or after `since` that lack a `model` vector, in a pass over the
        store newest first and older than `before` (ts, id); or, with `after_id`, those with ids between it and
        `before`'s (what arrived since a pass began), highest id first."""
        by_time, window = migrate_window(before, after_id)
        if by_time:
            where, order = "(s.ts, s.id) < (%(ts)s, %(last)s)", "s.ts DESC, s.id DESC"  # the (ts, id) index, walked down
        else:
            where, order = "s.id > %(after)s AND s.id < %(last)s", "s.id DESC"
        rows = self._all(f"SELECT s.id, s.ts, t.jpeg FROM sightings s JOIN thumbnails t ON t.id = s.id WHERE s.ts >= %(since)s "
                         f"AND {where} AND {self._LACKS} ORDER BY {order} LIMIT %(n)s",
                         {"model": model, "since": since, "n": int(limit), **window})
        return [(r[0], r[1], bytes(r[2])) for r in rows]

    def migration_counts(self, model: str, since: float) -> dict[str, int]:
        """Sightings at or after `since`: re-embedded by `model`, thumbnailed ones still lacking its vector, and ones
        lacking it without a thumbnail (which cannot be re-embedded)."""
        todo, bare = self._one(f"SELECT COUNT(*) FILTER (WHERE s.has_thumb), COUNT(*) FILTER (WHERE NOT s.has_thumb) "
                               f"FROM sightings s WHERE s.ts >= %(since)s AND {self._LACKS}", {"model": model, "since": since})
        done = self._one("SELECT COUNT(*) FROM reembedded r JOIN sightings s ON s.id = r.id WHERE r.model = %s AND s.ts >= %s",
                         (model, since))[0]
        return {"reembedded": done, "remaining": todo, "without_thumbnail": bare}

    def drop_vectors(self, model: str, after_id: int, upto_id: int, limit: int) -> tuple[int, int | None]:
        """Delete `model`'s vectors (own and re-embedded) of the next `limit` sightings by id in (after_id, upto_id]: its
        partition is gone. Returns (vectors deleted, the last id looked at, to go on from; None once past upto_id)."""

        def work(db: psycopg.Connection) -> tuple[int, int | None]:
            lo, hi = db.execute("SELECT MIN(id), MAX(id) FROM (SELECT id FROM sightings WHERE id > %s AND id <= %s ORDER BY id "
                                "LIMIT %s) a", (int(after_id), int(upto_id), int(limit))).fetchone()
            if lo is None:
                return 0, None
            own = db.execute("DELETE FROM vectors v USING sightings s WHERE s.id = v.id AND s.id BETWEEN %s AND %s "
                             "AND s.model = %s", (lo, hi, model)).rowcount
            return own + db.execute("DELETE FROM reembedded WHERE model = %s AND id BETWEEN %s AND %s", (model, lo, hi)).rowcount, hi

        n, last = self._transaction(work)
        self._purge = self._purge or n > 0
        return n, last

    def forget_model(self, model: str) -> bool:
        """Remove a version from `models()` once no vector of it is left (a restart builds no partition for it)."""

        def work(db: psycopg.Connection) -> bool:
            if db.execute("SELECT EXISTS (SELECT 1 FROM sightings s JOIN vectors v ON v.id = s.id WHERE s.model = %(m)s) "
                          "OR EXISTS (SELECT 1 FROM reembedded WHERE model = %(m)s)", {"m": model}).fetchone()[0]:
                return False
            return db.execute("DELETE FROM models WHERE model = %s", (model,)).rowcount > 0

        return self._transaction(work)
