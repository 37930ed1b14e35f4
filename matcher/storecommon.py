"""What the matcher's two store backends share: rows to records, vector chunks, argument shaping.

| helper                    | what                                                                         |
|---------------------------|------------------------------------------------------------------------------|
| `COLUMNS`, `record(row)`  | a `SightingRecord` as both stores select it                                  |
| `id_vectors(rows)`        | (ids, (n, dim) float32) from (id, float32 bytes) rows                        |
| `chunks(cursor)`          | a cursor's rows in chunks of `VECTOR_CHUNK`, closing it when done or dropped |
| `ints(values)`            | ids as Python ints (NumPy integers come from the index)                      |
| `by_model(found)`         | {model: [ids]} from (id, model) rows of a deletion                           |
| `oldest_over(...)`        | `over_quota`'s walk over the cameras above their quota                       |
| `migrate_window(...)`     | `to_migrate`'s pass window: newest first below (ts, id), or an id range      |
| `SqlStore`                | the methods whose SQL both engines run as written: lookups, retention queries, |
|                           | the migration's selections, dropping a version's vectors and logging the drop; |
|                           | `insert_new` for one writer                                                  |

`matcher.store.Store` (SQLite) and `matcher.pgstore.PgStore` (PostgreSQL) have the same public methods and
semantics. `SqlStore`'s SQL is written with SQLite's placeholders (`?`, `:name`); a backend's `_sql()` turns them
into its own, and its `_IN` / `_list()` say how an id or camera list is passed (a JSON array, an SQL array).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, Sequence

import numpy as np

from crossview.kernel.wire import MAX_INT, Sighting
from crossview.matcher.results import SightingRecord

# (the sightings stored, their ids, {edge track key: (track id, last ts)} the store knows) -> each one's track id
Assign = Callable[[list[Sighting], list[int], dict[tuple[str, str, int, str], tuple[int, float]]], list[int]]
COLUMNS = "id, node, camera, ts, frame, track, track_id, x1, y1, x2, y2, score, model, has_thumb"
VECTOR_CHUNK = 20000


def record(r: tuple) -> SightingRecord:
    return SightingRecord(r[0], r[1], r[2], r[3], r[4], r[5], r[6], (r[7], r[8], r[9], r[10]), r[11], r[12], bool(r[13]))


def id_vectors(rows: list[tuple]) -> tuple[np.ndarray, np.ndarray]:
    """(ids, (n, dim) float32) from (id, float32 blob, ...) rows; (0, 0) vectors for no rows."""
    ids = np.fromiter((r[0] for r in rows), np.int64, len(rows))
    if not rows:
        return ids, np.zeros((0, 0), np.float32)
    return ids, np.frombuffer(b"".join(r[1] for r in rows), np.float32).reshape(len(rows), -1)


def chunks(cur) -> Iterator[list[tuple]]:
    try:
        while rows := cur.fetchmany(VECTOR_CHUNK):
            yield rows
    finally:
        cur.close()


def ints(values: Iterable) -> list[int]:
    return [int(v) for v in values]


def by_model(found: list[tuple[int, str]]) -> dict[str, list[int]]:
    out: dict[str, list[int]] = {}
    for i, model in found:
        out.setdefault(model, []).append(i)
    return out


def oldest_over(over: list[tuple[str, int]], max_per_camera: int, limit: int,
                oldest: Callable[[str, int], list[int]]) -> list[int]:
    """Ids of the `count - max_per_camera` oldest of each (camera, count) in `over`, `limit` in all;
    `oldest(camera, n)` gives a camera's n oldest."""
    out: list[int] = []
    for camera, count in over:
        n = min(count - max_per_camera, limit - len(out))
        if n <= 0:
            break
        out += oldest(camera, n)
    return out


def migrate_window(before: tuple[float, int] | None, after_id: int | None) -> tuple[bool, dict]:
    """(by time?, args): a pass newest first below `before` (ts, id), or with `after_id` the ids between it and
    `before`'s, highest first. Args: ts and last, or after and last."""
    if after_id is None:
        ts, last = before or (math.inf, MAX_INT)  # inf: times stored before the wire bounded them
        return True, {"ts": ts, "last": last}
    return False, {"after": int(after_id), "last": before[1] if before else MAX_INT}


class SqlStore:
    """The store methods both backends share; see the module docstring for what a backend provides."""

    _IN = "IN (SELECT value FROM json_each(?))"  # `column {_IN}` with one parameter: `_list(values)`
    _NODES = "GROUP_CONCAT(DISTINCT node)"  # a camera's nodes, comma-separated
    _record_sql = COLUMNS
    _purge = False  # a deletion since the store last made deleted data unreachable in its files

    @staticmethod
    def _sql(sql: str) -> str:
        return sql

    @staticmethod
    def _list(values: Iterable) -> object:
        raise NotImplementedError

    def _all(self, sql: str, args: Sequence | dict = ()) -> list[tuple]:
        raise NotImplementedError

    def _one(self, sql: str, args: Sequence | dict = ()) -> tuple | None:
        raise NotImplementedError

    def _stream(self, sql: str, args: Sequence) -> Iterator[list[tuple]]:
        """A query's rows in chunks of `VECTOR_CHUNK`, from one consistent read."""
        raise NotImplementedError

    def _transaction(self, work: Callable) -> object:
        raise NotImplementedError

    # -- ingest --------------------------------------------------------------------------------

    def insert_new(self, sightings: Sequence[Sighting], vecs: Sequence[np.ndarray],
                   assign: Assign) -> tuple[int, set[tuple[str, int]]]:
        """Store a batch under the next ids, its track ids from `assign(sightings, ids, {})` (the caller's tracks are all
        there are: one writer). (The first id, the others following in batch order; the (node, seq) skipped as stored
        already: none here, the caller being the only writer, who checked.)"""
        first = self.next_id()
        ids = list(range(first, first + len(sightings)))
        self.insert(ids, sightings, assign(list(sightings), ids, {}), vecs)
        return first, set()

    # -- lookups -------------------------------------------------------------------------------

    def records(self, ids: Iterable[int]) -> dict[int, SightingRecord]:
        rows = self._all(f"SELECT {self._record_sql} FROM sightings WHERE id {self._IN}", (self._list(ints(ids)),))
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
        rows = self._all(f"SELECT track_id, MIN(ts), MAX(ts), COUNT(*) FROM sightings WHERE track_id {self._IN} "
                         "GROUP BY track_id", (self._list(ints(track_ids)),))
        return {r[0]: (r[1], r[2], r[3]) for r in rows}

    def recent(self, camera: str | None = None, limit: int = 50) -> list[SightingRecord]:
        where, args = ("WHERE camera = ?", (camera,)) if camera is not None else ("", ())
        rows = self._all(f"SELECT {self._record_sql} FROM sightings {where} ORDER BY ts DESC LIMIT ?", (*args, int(limit)))
        return [record(r) for r in rows]

    def cameras(self) -> list[dict]:
        rows = self._all(f"SELECT camera, {self._NODES}, COUNT(*), COUNT(DISTINCT track_id), MIN(ts), MAX(ts) "
                         "FROM sightings GROUP BY camera ORDER BY camera")
        return [{"camera": r[0], "node": r[1], "sightings": r[2], "tracks": r[3], "first_ts": r[4], "last_ts": r[5]}
                for r in rows]

    def newest_by_node(self) -> dict[str, float]:
        """node -> its newest sighting's time."""
        return dict(self._all("SELECT node, MAX(ts) FROM sightings GROUP BY node"))

    def models(self) -> dict[str, int]:
        """Every model version ever stored, with its embedding dimension."""
        return dict(self._all("SELECT model, dim FROM models"))

    def vectors(self, model: str, after_id: int = 0, upto_id: int | None = None) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """(ids, (n, dim) float32) chunks of one model's stored embeddings with after_id < id <= upto_id, by id."""
        for rows in self._stream("SELECT s.id, v.vec FROM sightings s JOIN vectors v ON v.id = s.id WHERE s.model = ? "
                                 "AND s.id > ? AND s.id <= ? ORDER BY s.id",
                                 (model, int(after_id), int(upto_id) if upto_id is not None else MAX_INT)):
            yield id_vectors(rows)

    def reembedded_vectors(self, model: str, after_seq: int = 0,
                           upto_seq: int | None = None) -> Iterator[tuple[np.ndarray, np.ndarray, int]]:
        """(ids, (n, dim) float32, last seq) chunks of the vectors re-embedded by `model` with after_seq < seq <= upto_seq,
        in the order they were added."""
        for rows in self._stream("SELECT id, vec, seq FROM reembedded WHERE model = ? AND seq > ? AND seq <= ? ORDER BY seq",
                                 (model, int(after_seq), int(upto_seq) if upto_seq is not None else MAX_INT)):
            yield (*id_vectors(rows), rows[-1][2])

    def _where(self, model: str, cameras: list[str] | None, since: float | None, until: float | None,
               column: str = "s.model") -> tuple[str, tuple]:
        sql, args = f"{column} = ?", [model]
        if cameras:
            sql, args = sql + f" AND s.camera {self._IN}", [*args, self._list(cameras)]
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
        return self._one(f"SELECT (SELECT COUNT(*) FROM (SELECT 1 FROM sightings s WHERE {own} LIMIT ?) a) + (SELECT COUNT(*) "
                         f"FROM (SELECT 1 FROM reembedded r JOIN sightings s ON s.id = r.id WHERE {other} LIMIT ?) b)",
                         (*own_args, int(limit), *other_args, int(limit)))[0]

    def vectors_where(self, model: str, cameras: list[str] | None, since: float | None,
                      until: float | None) -> tuple[np.ndarray, np.ndarray]:
        """(ids, (n, dim) float32) of the sightings `count()` counts."""
        own, own_args = self._where(model, cameras, since, until)
        other, other_args = self._where(model, cameras, since, until, "r.model")
        return id_vectors(self._all(f"SELECT s.id, v.vec FROM sightings s JOIN vectors v ON v.id = s.id WHERE {own} UNION ALL "
                                    f"SELECT s.id, r.vec FROM reembedded r JOIN sightings s ON s.id = r.id WHERE {other}",
                                    (*own_args, *other_args)))

    # -- retention -----------------------------------------------------------------------------

    def deletions_after(self, seq: int) -> list[tuple[int, int, str]]:
        """(seq, sighting id, model) logged after position `seq`; an id of -n is `log_drop`'s."""
        return self._all("SELECT seq, id, model FROM deletions WHERE seq > ? ORDER BY seq", (int(seq),))

    def _log_deletions(self, db, found: list[tuple[int, str]]) -> int:
        raise NotImplementedError

    def log_drop(self, model: str, upto: int) -> int:
        """Log that `model`'s partition went with what it held of the sightings up to id `upto`: (seq, -upto, model), an
        entry told from a deletion by its id (ids are positive), so the other replicas' indexes drop it too
        (`matcher.tail`). Returns the log position."""
        return self._transaction(lambda db: self._log_deletions(db, [(-int(upto), model)]))

    def older_than(self, ts: float, limit: int) -> list[int]:
        return [r[0] for r in self._all("SELECT id FROM sightings WHERE ts < ? ORDER BY ts LIMIT ?", (ts, int(limit)))]

    def over_quota(self, max_per_camera: int, limit: int) -> list[int]:
        """Ids of the oldest sightings of every camera holding more than `max_per_camera`."""
        over = self._all("SELECT camera, COUNT(*) FROM sightings GROUP BY camera HAVING COUNT(*) > ?", (int(max_per_camera),))
        return oldest_over(over, max_per_camera, limit, lambda camera, n: [
            r[0] for r in self._all("SELECT id FROM sightings WHERE camera = ? ORDER BY ts, id LIMIT ?", (camera, n))])

    # -- re-embedding (matcher.migration) ------------------------------------------------------

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
        todo, bare = self._one(f"SELECT COUNT(*) FILTER (WHERE s.has_thumb), COUNT(*) FILTER (WHERE NOT s.has_thumb) "
                               f"FROM sightings s WHERE s.ts >= :since AND {self._LACKS}", {"model": model, "since": since})
        done = self._one("SELECT COUNT(*) FROM reembedded r JOIN sightings s ON s.id = r.id WHERE r.model = ? AND s.ts >= ?",
                         (model, since))[0]
        return {"reembedded": done, "remaining": todo, "without_thumbnail": bare}

    def drop_vectors(self, model: str, after_id: int, upto_id: int, limit: int) -> tuple[int, int | None]:
        """Delete `model`'s vectors (own and re-embedded) of the next `limit` sightings by id in (after_id, upto_id]: its
        partition is gone. Returns (vectors deleted, the last id looked at, to go on from; None once past upto_id)."""
        q = self._sql

        def work(db) -> tuple[int, int | None]:
            span = db.execute(q("SELECT MIN(id), MAX(id) FROM (SELECT id FROM sightings WHERE id > ? AND id <= ? ORDER BY id "
                                "LIMIT ?) a"), (int(after_id), int(upto_id), int(limit))).fetchone()
            if span[0] is None:
                return 0, None
            n = db.execute(q("DELETE FROM vectors WHERE id IN (SELECT id FROM sightings WHERE id BETWEEN ? AND ? AND model = ?)"),
                           (*span, model)).rowcount
            return n + db.execute(q("DELETE FROM reembedded WHERE model = ? AND id BETWEEN ? AND ?"), (model, *span)).rowcount, span[1]

        n, last = self._transaction(work)
        self._purge = self._purge or n > 0
        return n, last

    def forget_model(self, model: str) -> bool:
        """Remove a version from `models()` once no vector of it is left (a restart builds no partition for it)."""
        q = self._sql

        def work(db) -> bool:
            if db.execute(q("SELECT 1 FROM sightings s JOIN vectors v ON v.id = s.id WHERE s.model = ? LIMIT 1"), (model,)).fetchone() \
                    or db.execute(q("SELECT 1 FROM reembedded WHERE model = ? LIMIT 1"), (model,)).fetchone():
                return False
            return db.execute(q("DELETE FROM models WHERE model = ?"), (model,)).rowcount > 0

        return self._transaction(work)
