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
|                       | and appends (seq, id, model) to the `deletions` log, one entry per version that held the id; |
|                       | `log_drop(model, upto)` appends (seq, -upto, model): the version's partition went (`matcher.tail`) |
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

from crossview.kernel.wire import Sighting
from crossview.matcher.sqldb import sqlite_file
from crossview.matcher.storecommon import COLUMNS, SqlStore, by_model, chunks, ints

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


class Store(SqlStore):
    """See the module docstring; the lookups, retention queries and migration selections are `SqlStore`'s."""

    Error = sqlite3.Error  # what a failed store operation raises (PgStore's is psycopg's)
    # what it raises for a row it will never take (a constraint, a value out of range), as opposed to a store that
    # cannot write now (locked, disk full, server gone), after which the same row may be taken
    RowRefused = (sqlite3.IntegrityError, sqlite3.DataError, OverflowError)

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
        with sqlite_file(self.path):
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

    def _stream(self, sql: str, args: tuple) -> Iterator[list[tuple]]:
        with self._read() as db:  # one statement: one consistent read of the store
            yield from chunks(db.execute(sql, args))

    @staticmethod
    def _list(values: Iterable) -> str:
        return json.dumps(list(values))

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

    def track_ends(self, since: float) -> list[tuple[str, str, int, str, int, float]]:
        """(node, camera, track, model, track_id, last ts) of every edge track seen since `since`: its latest stretch."""
        # SQLite takes a bare column (track_id) from the row holding the MAX().
        return self._all("SELECT node, camera, track, model, track_id, MAX(ts) FROM sightings WHERE ts >= ? "
                         "GROUP BY node, camera, track, model", (since,))

    # -- deletions and retention ---------------------------------------------------------------

    def delete(self, ids: Iterable[int]) -> tuple[dict[str, list[int]], int]:
        """Delete sightings with their embeddings (of every version) and thumbnails; log each. Returns ({model: ids
        deleted}, log position): a re-embedded sighting is listed under each version that held it."""
        ids_json = self._list(ints(ids))

        def work(db: sqlite3.Connection) -> tuple[dict[str, list[int]], int]:
            found = db.execute("SELECT id, model FROM sightings WHERE id IN (SELECT value FROM json_each(?))",
                               (ids_json,)).fetchall()
            present = self._list(i for i, _ in found)
            found += db.execute("SELECT id, model FROM reembedded WHERE id IN (SELECT value FROM json_each(?))",
                                (present,)).fetchall()
            for table in ("sightings", "vectors", "thumbnails", "reembedded"):
                db.execute(f"DELETE FROM {table} WHERE id IN (SELECT value FROM json_each(?))", (present,))
            return by_model(found), self._log_deletions(db, found)

        result = self._transaction(work)
        self._purge = True
        return result

    def _log_deletions(self, db: sqlite3.Connection, found: list[tuple[int, str]]) -> int:
        """Append (id, model) entries to the deletion log; its position after them."""
        db.executemany("INSERT INTO deletions (id, model) VALUES (?, ?)", found)
        return self._last_deletion(db)

    @staticmethod
    def _last_deletion(db: sqlite3.Connection) -> int:
        return (db.execute("SELECT seq FROM sqlite_sequence WHERE name = 'deletions'").fetchone() or (0,))[0]

    def last_deletion(self) -> int:
        with self._read() as db:
            return self._last_deletion(db)

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
