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

`matcher.store.Store` (SQLite) and `matcher.pgstore.PgStore` (PostgreSQL) have the same public methods
and semantics; each writes its own SQL.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator

import numpy as np

from crossview.kernel.wire import MAX_INT
from crossview.matcher.results import SightingRecord

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
