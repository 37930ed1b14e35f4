"""The matcher's durable store: sightings, their embeddings and thumbnails in one SQLite file.

| what                  | how                                                                        |
|-----------------------|----------------------------------------------------------------------------|
| durability            | WAL journal, `synchronous=FULL`: a committed batch survives `kill -9` and power loss |
| pages                 | 16 KiB in a new file (thumbnails fit in a page); an existing file keeps its own size |
| WAL checkpoints       | by SQLite on the committing thread, or with `checkpoint_in_background()` by the caller's |
|                       | own thread calling `checkpoint()`, off the commit path                       |
| ingest                | `insert(ids, sightings, track_ids, vecs)`: one transaction per batch, rows as given; |
|                       | the caller decides ids (from `next_id()` on; they are the FAISS ids) and track ids (`matcher.tracks`) |
| ids                   | `AUTOINCREMENT`, so an id is never reused after a deletion (snapshot replay relies on it) |
| old files             | a store written before the detector score was named `score` (as on the wire) has a |
|                       | `det_score` column: renamed at a writable open, read under its old name when read-only; |
|                       | one from before re-embedding gains `reembedded` at a writable open (an empty stand-in when read-only) |
| lookups               | `records(ids)`, `vector(id[, model])`, `thumbnail(id)`, `latest_in_track(...)`, `recent()`, |
|                       | `cameras()`, `track_ends(since)` (what a restarted matcher's tracks continue) |
| re-embedded           | a sighting's vector by another model version (`matcher.migration`), in `reembedded` keyed by |
|                       | (model, id), numbered by `seq` as added: `add_reembedded`, `reembedded_vectors(model, after_seq)`, |
|                       | `to_migrate` (newest first), `migration_counts`; `drop_vectors` when a version's partition goes |
| deletions             | `delete(ids)` removes rows, embeddings of every version and thumbnails (`secure_delete`: their |
|                       | bytes are overwritten in the file; the next `checkpoint()` truncates the WAL, which held copies) |
|                       | and appends (seq, id, model) to the `deletions` log, one entry per version that held the id |
| retention             | `older_than(ts)`, `over_quota(n)`: ids to delete                             |
| readers               | pooled connections, one per concurrent reader; `read_only=True` opens the file `mode=ro` |
|                       | (safe beside a running service)                                             |

    store = Store(Path("var/matcher/sightings.db"))
    first = store.next_id()
    store.insert(ids, sightings, track_ids, vecs)     # on disk when this returns; ids = first, first + 1, ...
    store.records(ids)[first].camera                  # 'gate'

Camera ids are site-wide: two nodes reporting the same camera id are one camera.
"""

from __future__ import annotations

import json
import sqlite3
import threading
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from crossview.kernel.wire import MAX_INT, Sighting
from crossview.matcher.results import SightingRecord
from crossview.matcher.storecommon import COLUMNS, by_model, chunks, id_vectors, migrate_window, oldest_over, record

SCHEMA = """
CREATE TABLE IF NOT EXISTS models (
    model TEXT PRIMARY KEY,
    dim INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS sightings (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    node TEXT NOT NULL,
    camera TEXT NOT NULL,
    ts REAL NOT NULL,
    frame INTEGER NOT NULL,
    track INTEGER NOT NULL,
    track_id INTEGER NOT NULL,
    x1 REAL NOT NULL, y1 REAL NOT NULL, x2 REAL NOT NULL, y2 REAL NOT NULL,
    score REAL NOT NULL,
    model TEXT NOT NULL,
    has_thumb INTEGER NOT NULL,
    seq INTEGER  -- the edge's sequence number (wire v2), NULL for v1: (node, seq) is stored once
);
CREATE INDEX IF NOT EXISTS sightings_camera_ts ON sightings (camera, ts);
CREATE INDEX IF NOT EXISTS sightings_ts ON sightings (ts);
CREATE INDEX IF NOT EXISTS sightings_edge_track ON sightings (node, camera, track, model, ts);
CREATE INDEX IF NOT EXISTS sightings_track_id ON sightings (track_id, ts);
-- Embeddings and thumbnails in tables of their own keep the sightings rows small for scans.
CREATE TABLE IF NOT EXISTS vectors (id INTEGER PRIMARY KEY, vec BLOB NOT NULL);  -- by the sighting's own model
-- Sightings re-embedded from their thumbnails by another model version (`matcher.migration`): one row per (model,
-- id). seq orders them as the migration added them, what an index snapshot counts them by (ids come in any order).
CREATE TABLE IF NOT EXISTS reembedded (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id INTEGER NOT NULL,
    model TEXT NOT NULL,
    vec BLOB NOT NULL
);
CREATE UNIQUE INDEX IF NOT EXISTS reembedded_model_id ON reembedded (model, id);
CREATE INDEX IF NOT EXISTS reembedded_id ON reembedded (id);
CREATE TABLE IF NOT EXISTS thumbnails (id INTEGER PRIMARY KEY, jpeg BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS deletions (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id INTEGER NOT NULL,
    model TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS pruned (upto INTEGER NOT NULL);  -- one row: deletion log forgotten up to here
"""
_OLD_SCORE = "det_score"  # the score column's name in stores written before it was named as on the wire
_PAGE_SIZE = 16384


def _ids_json(ids: Iterable[int]) -> str:
    """Id lists go to SQLite as one JSON parameter (`json_each`), so their length is unlimited."""
    return json.dumps([int(i) for i in ids])


class Store:
    Error = sqlite3.Error  # what a failed store operation raises (PgStore's is psycopg's)

    def __init__(self, path: Path, read_only: bool = False):
        self.path = Path(path)
        self.read_only = read_only
        if read_only and not self.path.is_file():
            raise FileNotFoundError(f"{self.path}: no matcher store here")
        self._idle: list[sqlite3.Connection] = []  # reader pool; list.pop/append are atomic
        self._conns: list[sqlite3.Connection] = []
        self._conns_lock = threading.Lock()
        self._write_lock = threading.Lock()
        self._checkpointer: sqlite3.Connection | None = None
        self._purge = False  # a deletion since the last WAL truncation: older WAL frames may still hold what it deleted
        if not read_only:
            self._writer = self._connect()
            # Only a new file takes it. 16 KiB, not 4: a 4 KB thumbnail fits in a page instead of spilling into an
            # overflow page, and a commit writes fewer WAL frames (bench: ingest with thumbnails ~1.8x faster).
            self._writer.execute(f"PRAGMA page_size={_PAGE_SIZE}")
            self._writer.execute("PRAGMA journal_mode=WAL")
            self._writer.executescript(SCHEMA)
            self._dedupe_key()
        self._record_sql = self._record_columns()

    def _dedupe_key(self) -> None:
        """The UNIQUE (node, seq) index that keeps a resent sighting from being stored twice; a store from before
        wire v2 gains the column first (NULLs never collide)."""
        if "seq" not in {r[1] for r in self._all("PRAGMA table_info(sightings)")}:
            self._writer.execute("ALTER TABLE sightings ADD COLUMN seq INTEGER")
        self._writer.execute("CREATE UNIQUE INDEX IF NOT EXISTS sightings_node_seq ON sightings (node, seq)")

    def _record_columns(self) -> str:
        """What a `SightingRecord` is selected as; an old store's score column is renamed first, when writable."""
        if _OLD_SCORE not in {r[1] for r in self._all("PRAGMA table_info(sightings)")}:
            return COLUMNS
        if self.read_only:
            return COLUMNS.replace("score", f"{_OLD_SCORE} AS score")
        self._writer.execute(f"ALTER TABLE sightings RENAME COLUMN {_OLD_SCORE} TO score")
        return COLUMNS

    # -- connections ---------------------------------------------------------------------------

    def _connect(self) -> sqlite3.Connection:
        if self.read_only:
            conn = sqlite3.connect(f"{self.path.resolve().as_uri()}?mode=ro", uri=True, check_same_thread=False,
                                   isolation_level=None)
        else:
            conn = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
            conn.execute("PRAGMA synchronous=FULL")  # a commit is on disk when it returns
            conn.execute("PRAGMA secure_delete=ON")  # deleted thumbnails and embeddings are overwritten, not just unlinked
        conn.execute("PRAGMA busy_timeout=10000")
        if self.read_only and not conn.execute("SELECT 1 FROM sqlite_master WHERE name = 'reembedded'").fetchone():
            conn.execute("CREATE TEMP TABLE reembedded (seq INTEGER PRIMARY KEY, id INTEGER, model TEXT, vec BLOB)")
        with self._conns_lock:
            self._conns.append(conn)
        return conn

    @contextmanager
    def _read(self) -> Iterator[sqlite3.Connection]:
        """A reader connection of its own for the caller: a connection must not serve two threads at once."""
        try:
            conn = self._idle.pop()
        except IndexError:
            conn = self._connect()
        try:
            yield conn
        finally:
            self._idle.append(conn)

    def _all(self, sql: str, args: tuple = ()) -> list[tuple]:
        with self._read() as db:
            return db.execute(sql, args).fetchall()

    def _one(self, sql: str, args: tuple = ()) -> tuple | None:
        with self._read() as db:
            return db.execute(sql, args).fetchone()

    def close(self) -> None:
        with self._conns_lock:
            for conn in self._conns:
                conn.close()
            self._conns.clear()
        self._idle.clear()

    def checkpoint_in_background(self) -> None:
        """Commits stop copying the WAL into the database file themselves (SQLite's default, every 1000 pages, on
        the committing thread); the caller then calls `checkpoint()` every so often from a thread of its own."""
        self._writer.execute("PRAGMA wal_autocheckpoint=0")

    def checkpoint(self) -> None:
        """Copy the WAL into the database file: the bulk beside ongoing commits, the rest between two, so the next
        commit starts the WAL afresh (one written without pause would otherwise never restart, and grow).
        After a deletion the WAL is truncated too: a restarted WAL is overwritten from its start, so frames past
        that still hold deleted thumbnails (secure_delete zeroes them in the database file only). Truncating needs
        no reader in the middle of a read; with one, the next call tries again, without waiting for it."""
        if self._checkpointer is None:
            self._checkpointer = self._connect()
            self._checkpointer.execute("PRAGMA busy_timeout=0")  # never hold up commits waiting for a reader
        self._checkpointer.execute("PRAGMA wal_checkpoint(PASSIVE)")
        with self._write_lock:
            purge = self._purge
            busy = self._checkpointer.execute(f"PRAGMA wal_checkpoint({'TRUNCATE' if purge else 'PASSIVE'})").fetchone()[0]
            self._purge = purge and bool(busy)

    def _transaction(self, work) -> object:
        if self.read_only:
            raise PermissionError(f"{self.path}: store opened read-only")
        with self._write_lock:
            self._writer.execute("BEGIN IMMEDIATE")
            try:
                result = work(self._writer)
            except BaseException:
                self._writer.execute("ROLLBACK")
                raise
            self._writer.execute("COMMIT")
            return result

    # -- ingest --------------------------------------------------------------------------------

    def next_id(self) -> int:
        """The id the next inserted sighting takes: ids are never reused, not even a deleted one's."""
        return (self._one("SELECT seq FROM sqlite_sequence WHERE name = 'sightings'") or (0,))[0] + 1

    def insert(self, ids: Sequence[int], sightings: Sequence[Sighting], track_ids: Sequence[int],
               vecs: Sequence[np.ndarray]) -> None:
        """Store a batch in one transaction, row for row: new ids (`next_id()` on), sightings, their track ids and
        their embeddings as float32 unit vectors (not the sightings' own, which may be float16 and unnormalised)."""

        def work(db: sqlite3.Connection) -> None:
            db.executemany(
                f"INSERT INTO sightings ({COLUMNS}, seq) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                [(i, s.node, s.camera, s.ts, s.frame, s.track, t, *s.box, s.score, s.model, s.thumbnail is not None, s.seq)
                 for i, s, t in zip(ids, sightings, track_ids)],
            )
            db.executemany("INSERT INTO vectors (id, vec) VALUES (?, ?)", [(i, v.tobytes()) for i, v in zip(ids, vecs)])
            db.executemany("INSERT INTO thumbnails (id, jpeg) VALUES (?, ?)",
                           [(i, s.thumbnail) for i, s in zip(ids, sightings) if s.thumbnail is not None])
            db.executemany("INSERT OR IGNORE INTO models (model, dim) VALUES (?, ?)",
                           {(s.model, len(v)) for s, v in zip(sightings, vecs)})

        if sightings:
            self._transaction(work)

    def stored(self, keys: Iterable[tuple[str, int]]) -> set[tuple[str, int]]:
        """Which of these (node, seq) are stored already."""
        rows = self._all("SELECT s.node, s.seq FROM json_each(?) AS j CROSS JOIN sightings AS s "  # CROSS: one index probe each
                         "ON s.node = j.value ->> 0 AND s.seq = j.value ->> 1", (json.dumps([[n, int(s)] for n, s in keys]),))
        return {(n, s) for n, s in rows}

    # -- lookups -------------------------------------------------------------------------------

    def records(self, ids: Iterable[int]) -> dict[int, SightingRecord]:
        rows = self._all(f"SELECT {self._record_sql} FROM sightings WHERE id IN (SELECT value FROM json_each(?))",
                         (_ids_json(ids),))
        return {r[0]: record(r) for r in rows}

    def record(self, sighting_id: int) -> SightingRecord | None:
        return self.records([sighting_id]).get(int(sighting_id))

    def vector(self, sighting_id: int, model: str | None = None) -> np.ndarray | None:
        """The sighting's embedding by its own model version, or by `model` (its own, or one it was re-embedded by)."""
        if model is None:
            row = self._one("SELECT vec FROM vectors WHERE id = ?", (int(sighting_id),))
        else:
            row = self._one("SELECT v.vec FROM vectors v JOIN sightings s ON s.id = v.id WHERE v.id = ? AND s.model = ? "
                            "UNION ALL SELECT vec FROM reembedded WHERE id = ? AND model = ?",
                            (int(sighting_id), model, int(sighting_id), model))
        return None if row is None else np.frombuffer(row[0], np.float32)

    def thumbnail(self, sighting_id: int) -> bytes | None:
        row = self._one("SELECT jpeg FROM thumbnails WHERE id = ?", (int(sighting_id),))
        return None if row is None else bytes(row[0])

    def latest_in_track(self, node: str, camera: str, track: int, model: str | None = None) -> SightingRecord | None:
        """The newest sighting of an edge track: it carries the track's best (longest running mean) embedding."""
        sql = f"SELECT {self._record_sql} FROM sightings WHERE node = ? AND camera = ? AND track = ?"
        args: tuple = (node, camera, int(track))
        if model is not None:
            sql, args = sql + " AND model = ?", (*args, model)
        row = self._one(sql + " ORDER BY ts DESC LIMIT 1", args)
        return None if row is None else record(row)

    def track_spans(self, track_ids: Iterable[int]) -> dict[int, tuple[float, float, int]]:
        """track_id -> (first ts, last ts, sightings stored)."""
        rows = self._all("SELECT track_id, MIN(ts), MAX(ts), COUNT(*) FROM sightings "
                         "WHERE track_id IN (SELECT value FROM json_each(?)) GROUP BY track_id", (_ids_json(track_ids),))
        return {r[0]: (r[1], r[2], r[3]) for r in rows}

    def recent(self, camera: str | None = None, limit: int = 50) -> list[SightingRecord]:
        where, args = ("WHERE camera = ?", (camera,)) if camera is not None else ("", ())
        rows = self._all(f"SELECT {self._record_sql} FROM sightings {where} ORDER BY ts DESC LIMIT ?", (*args, int(limit)))
        return [record(r) for r in rows]

    def cameras(self) -> list[dict]:
        rows = self._all("SELECT camera, GROUP_CONCAT(DISTINCT node), COUNT(*), COUNT(DISTINCT track_id), MIN(ts), MAX(ts) "
                         "FROM sightings GROUP BY camera ORDER BY camera")
        return [{"camera": r[0], "node": r[1], "sightings": r[2], "tracks": r[3], "first_ts": r[4], "last_ts": r[5]}
                for r in rows]

    def newest_by_node(self) -> dict[str, float]:
        """node -> its newest sighting's time."""
        return dict(self._all("SELECT node, MAX(ts) FROM sightings GROUP BY node"))

    def track_ends(self, since: float) -> list[tuple[str, str, int, str, int, float]]:
        """(node, camera, track, model, track_id, last ts) of every edge track seen since `since`: its latest stretch."""
        # SQLite takes a bare column (track_id) from the row holding the MAX().
        return self._all("SELECT node, camera, track, model, track_id, MAX(ts) FROM sightings WHERE ts >= ? "
                         "GROUP BY node, camera, track, model", (since,))

    def models(self) -> dict[str, int]:
        """Every model version ever stored, with its embedding dimension."""
        return dict(self._all("SELECT model, dim FROM models"))

    def vectors(self, model: str, after_id: int = 0, upto_id: int | None = None) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """(ids, (n, dim) float32) chunks of one model's stored embeddings with after_id < id <= upto_id, by id."""
        with self._read() as db:  # one statement: one consistent read of the store
            cur = db.execute(
                "SELECT s.id, v.vec FROM sightings s JOIN vectors v ON v.id = s.id WHERE s.model = ? AND s.id > ? AND s.id <= ? "
                "ORDER BY s.id", (model, int(after_id), int(upto_id) if upto_id is not None else MAX_INT))
            for rows in chunks(cur):
                yield id_vectors(rows)

    def reembedded_vectors(self, model: str, after_seq: int = 0,
                           upto_seq: int | None = None) -> Iterator[tuple[np.ndarray, np.ndarray, int]]:
        """(ids, (n, dim) float32, last seq) chunks of the vectors re-embedded by `model` with after_seq < seq <= upto_seq,
        in the order they were added."""
        with self._read() as db:
            cur = db.execute("SELECT id, vec, seq FROM reembedded WHERE model = ? AND seq > ? AND seq <= ? ORDER BY seq",
                             (model, int(after_seq), int(upto_seq) if upto_seq is not None else MAX_INT))
            for rows in chunks(cur):
                yield (*id_vectors(rows), rows[-1][2])

    @staticmethod
    def _where(model: str, cameras: list[str] | None, since: float | None, until: float | None,
               column: str = "s.model") -> tuple[str, tuple]:
        sql, args = f"{column} = ?", [model]
        if cameras:
            sql += " AND s.camera IN (SELECT value FROM json_each(?))"
            args.append(json.dumps(cameras))
        if since is not None:
            sql, args = sql + " AND s.ts >= ?", [*args, since]
        if until is not None:
            sql, args = sql + " AND s.ts <= ?", [*args, until]
        return sql, tuple(args)

    def count(self, model: str, cameras: list[str] | None, since: float | None, until: float | None, limit: int) -> int:
        """Sightings with a vector of a model version (their own or re-embedded) on these cameras (None: all) within
        [since, until], counted up to `limit` each way."""
        own, own_args = self._where(model, cameras, since, until)
        other, other_args = self._where(model, cameras, since, until, "r.model")
        return self._one(f"SELECT (SELECT COUNT(*) FROM (SELECT 1 FROM sightings s WHERE {own} LIMIT ?)) + "
                         f"(SELECT COUNT(*) FROM (SELECT 1 FROM reembedded r JOIN sightings s ON s.id = r.id WHERE {other} LIMIT ?))",
                         (*own_args, int(limit), *other_args, int(limit)))[0]

    def vectors_where(self, model: str, cameras: list[str] | None, since: float | None,
                      until: float | None) -> tuple[np.ndarray, np.ndarray]:
        """(ids, (n, dim) float32) of the sightings `count()` counts."""
        own, own_args = self._where(model, cameras, since, until)
        other, other_args = self._where(model, cameras, since, until, "r.model")
        return id_vectors(self._all(f"SELECT s.id, v.vec FROM sightings s JOIN vectors v ON v.id = s.id WHERE {own} UNION ALL "
                                     f"SELECT s.id, r.vec FROM reembedded r JOIN sightings s ON s.id = r.id WHERE {other}",
                                     (*own_args, *other_args)))

    # -- deletions and retention ---------------------------------------------------------------

    def delete(self, ids: Iterable[int]) -> tuple[dict[str, list[int]], int]:
        """Delete sightings with their embeddings (of every version) and thumbnails; log each. Returns ({model: ids
        deleted}, log position): a re-embedded sighting is listed under each version that held it."""
        ids_json = _ids_json(ids)

        def work(db: sqlite3.Connection) -> tuple[dict[str, list[int]], int]:
            found = db.execute("SELECT id, model FROM sightings WHERE id IN (SELECT value FROM json_each(?))",
                               (ids_json,)).fetchall()
            present = _ids_json(i for i, _ in found)
            found += db.execute("SELECT id, model FROM reembedded WHERE id IN (SELECT value FROM json_each(?))",
                                (present,)).fetchall()
            for table in ("sightings", "vectors", "thumbnails", "reembedded"):
                db.execute(f"DELETE FROM {table} WHERE id IN (SELECT value FROM json_each(?))", (present,))
            db.executemany("INSERT INTO deletions (id, model) VALUES (?, ?)", found)
            return by_model(found), self._last_deletion(db)

        result = self._transaction(work)
        self._purge = True
        return result

    @staticmethod
    def _last_deletion(db: sqlite3.Connection) -> int:
        return (db.execute("SELECT seq FROM sqlite_sequence WHERE name = 'deletions'").fetchone() or (0,))[0]

    def last_deletion(self) -> int:
        with self._read() as db:
            return self._last_deletion(db)

    def deletions_after(self, seq: int) -> list[tuple[int, int, str]]:
        """(seq, sighting id, model) logged after position `seq`."""
        return self._all("SELECT seq, id, model FROM deletions WHERE seq > ? ORDER BY seq", (int(seq),))

    def prune_deletions(self, upto_seq: int) -> None:
        """Forget log entries every index snapshot already includes."""
        if upto_seq <= self.pruned_upto():
            return

        def work(db: sqlite3.Connection) -> None:
            db.execute("DELETE FROM deletions WHERE seq <= ?", (int(upto_seq),))
            db.execute("DELETE FROM pruned")
            db.execute("INSERT INTO pruned (upto) VALUES (?)", (int(upto_seq),))

        self._transaction(work)

    def pruned_upto(self) -> int:
        """Deletion-log position forgotten up to: a snapshot older than this cannot be brought up to date."""
        row = self._one("SELECT upto FROM pruned")
        return row[0] if row else 0

    def older_than(self, ts: float, limit: int) -> list[int]:
        rows = self._all("SELECT id FROM sightings WHERE ts < ? ORDER BY ts LIMIT ?", (ts, int(limit)))
        return [r[0] for r in rows]

    def over_quota(self, max_per_camera: int, limit: int) -> list[int]:
        """Ids of the oldest sightings of every camera holding more than `max_per_camera`."""
        over = self._all("SELECT camera, COUNT(*) FROM sightings GROUP BY camera HAVING COUNT(*) > ?", (int(max_per_camera),))
        return oldest_over(over, max_per_camera, limit, lambda camera, n: [
            r[0] for r in self._all("SELECT id FROM sightings WHERE camera = ? ORDER BY ts, id LIMIT ?", (camera, n))])

    # -- re-embedding (matcher.migration) ------------------------------------------------------

    def add_reembedded(self, model: str, ids: Sequence[int], vecs: np.ndarray) -> tuple[list[int], int]:
        """Store `model`'s vectors of these sightings in one transaction, skipping any deleted meanwhile or re-embedded
        already. Returns (the ids stored, the last seq now taken: what an index snapshot counts re-embedded ones by)."""

        def work(db: sqlite3.Connection) -> tuple[list[int], int]:
            before = self._last_seq(db)
            db.execute("INSERT OR IGNORE INTO models (model, dim) VALUES (?, ?)", (model, vecs.shape[1]))
            db.executemany("INSERT OR IGNORE INTO reembedded (id, model, vec) SELECT ?, ?, ? "
                           "WHERE EXISTS (SELECT 1 FROM sightings WHERE id = ?)",
                           [(int(i), model, v.tobytes(), int(i)) for i, v in zip(ids, vecs)])
            added = [r[0] for r in db.execute("SELECT id FROM reembedded WHERE seq > ? ORDER BY seq", (before,))]
            return added, self._last_seq(db)

        return self._transaction(work)

    @staticmethod
    def _last_seq(db: sqlite3.Connection) -> int:
        return (db.execute("SELECT seq FROM sqlite_sequence WHERE name = 'reembedded'").fetchone() or (0,))[0]

    # A sighting lacks a vector of :model when it is neither its own version's (with that vector kept) nor re-embedded.
    _LACKS = ("NOT (s.model = :model AND EXISTS (SELECT 1 FROM vectors v WHERE v.id = s.id)) "
              "AND NOT EXISTS (SELECT 1 FROM reembedded r WHERE r.model = :model AND r.id = s.id)")

    def to_migrate(self, model: str, since: float, limit: int, before: tuple[float, int] | None = None,
                   after_id: int | None = None) -> list[tuple[int, float, bytes]]:
        """(id, ts, JPEG) of thumbnailed sightings at or after `since` that lack a `model` vector, in a pass over the
        store newest first and older than `before` (ts, id); or, with `after_id`, those with ids between it and
        `before`'s (what arrived since a pass began), highest id first."""
        by_time, window = migrate_window(before, after_id)
        args = {"model": model, "since": since, "n": int(limit), **window}
        if by_time:
            where, order = "(s.ts, s.id) < (:ts, :last)", "s.ts DESC, s.id DESC"  # the ts index, walked down
        else:
            where, order = "s.id > :after AND s.id < :last", "s.id DESC"
        rows = self._all(f"SELECT s.id, s.ts, t.jpeg FROM sightings s JOIN thumbnails t ON t.id = s.id WHERE s.ts >= :since "
                         f"AND {where} AND {self._LACKS} ORDER BY {order} LIMIT :n", args)
        return [(r[0], r[1], bytes(r[2])) for r in rows]

    def migration_counts(self, model: str, since: float) -> dict[str, int]:
        """Sightings at or after `since`: re-embedded by `model`, thumbnailed ones still lacking its vector, and ones
        lacking it without a thumbnail (which cannot be re-embedded)."""
        todo, bare = self._one(f"SELECT TOTAL(s.has_thumb), TOTAL(1 - s.has_thumb) FROM sightings s WHERE s.ts >= :since "
                               f"AND {self._LACKS}", {"model": model, "since": since})
        done = self._one("SELECT COUNT(*) FROM reembedded r JOIN sightings s ON s.id = r.id WHERE r.model = ? AND s.ts >= ?",
                         (model, since))[0]
        return {"reembedded": done, "remaining": int(todo), "without_thumbnail": int(bare)}

    def drop_vectors(self, model: str, after_id: int, upto_id: int, limit: int) -> tuple[int, int | None]:
        """Delete `model`'s vectors (own and re-embedded) of the next `limit` sightings by id in (after_id, upto_id]: its
        partition is gone. Returns (vectors deleted, the last id looked at, to go on from; None once past upto_id)."""

        def work(db: sqlite3.Connection) -> tuple[int, int | None]:
            span = db.execute("SELECT MIN(id), MAX(id) FROM (SELECT id FROM sightings WHERE id > ? AND id <= ? ORDER BY id "
                              "LIMIT ?)", (int(after_id), int(upto_id), int(limit))).fetchone()
            if span[0] is None:
                return 0, None
            n = db.execute("DELETE FROM vectors WHERE id IN (SELECT id FROM sightings WHERE id BETWEEN ? AND ? AND model = ?)",
                           (*span, model)).rowcount
            return n + db.execute("DELETE FROM reembedded WHERE model = ? AND id BETWEEN ? AND ?", (model, *span)).rowcount, span[1]

        n, last = self._transaction(work)
        self._purge = self._purge or n > 0
        return n, last

    def forget_model(self, model: str) -> bool:
        """Remove a version from `models()` once no vector of it is left (a restart builds no partition for it)."""

        def work(db: sqlite3.Connection) -> bool:
            if db.execute("SELECT 1 FROM sightings s JOIN vectors v ON v.id = s.id WHERE s.model = ? LIMIT 1", (model,)).fetchone() \
                    or db.execute("SELECT 1 FROM reembedded WHERE model = ? LIMIT 1", (model,)).fetchone():
                return False
            return db.execute("DELETE FROM models WHERE model = ?", (model,)).rowcount > 0

        return self._transaction(work)
