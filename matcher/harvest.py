"""The matcher's harvest store: the person crops edges upload (`edge.uploader`), kept for the adapt job.
The folder `harvest/` in the data directory is this module's: `index.db` (SQLite, one row per crop) and `crops/`,
the JPEGs in the `kernel.harvest` layout (`crops/<camera>/<node>_<camera>_t<track>_f<frame>.jpg`). With
`store.kind: postgres` the rows are in that database (`matcher.sqldb`) and the JPEGs beside them (`crop_jpegs`,
at most `harvest.max_crop_bytes` each, deleted with their row), so every matcher on it serves every crop; nothing
is written under `harvest/`.

| what        | how                                                                                        |
|-------------|--------------------------------------------------------------------------------------------|
| receive     | `receive([(sidecar, jpeg, filename), ...])`: each crop checked (sidecar by `kernel.harvest.decode`, |
|             | JPEG bytes, then width x height from its header before it is decoded) and answered: `stored`, |
|             | `duplicate`, `expired` or `refused` with the reason; the good ones are committed together    |
| idempotent  | one row per `CropName` (node, camera, track, frame): a crop sent again is `duplicate`,       |
|             | acknowledged and stored once                                                               |
| quota       | `harvest.quota_mb`: beyond it the oldest crops (capture time) are deleted, counted and logged |
| retention   | `expire(before)`, from the matcher's retention pass (`retention.max_age_hours`); a crop past it |
|             | when it arrives is `expired`: acknowledged (the edge deletes it), never stored              |
| reading     | `list(after, since, until, limit)` by id, the cursor (ids only grow); `jpeg(id)`; `stats()`  |
| deletion    | the row, then the file; `secure_delete` on the index. At open, files without a row and rows  |
|             | without a file are removed, so what a crash interrupts leaves no image the index does not know. |
|             | PostgreSQL: row and JPEG in one statement, then VACUUM (what it leaves: `matcher.pgstore`)   |
| replicas    | PostgreSQL: `count` and `bytes` are read again before each quota check, as another matcher  |
|             | may have stored or deleted crops                                                             |

These are images of people: they are kept no longer than the sightings' thumbnails, and read only with the main
API token (the edges' token may upload, never list or download).

    store = HarvestStore(data_dir, cfg.harvest, max_age_s=None, store=cfg.store)
    [answer] = store.receive([(sidecar_json, jpeg, "gate/edge-1_gate_t7_f12.jpg")])
    answer.status, answer.id        # ('stored', 1)
    store.list(after=0, limit=100)  # [StoredCrop, ...] oldest id first
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path

from crossview.kernel.config import HarvestStoreConfig, StoreConfig
from crossview.kernel.harvest import CropName, HarvestError, Sidecar, decode, encode
from crossview.kernel.images import image_size
from crossview.matcher.limits import decode_image
from crossview.matcher.sqldb import open_db, pg_ddl

log = logging.getLogger(__name__)
STATUSES = ("stored", "duplicate", "expired", "refused")
MAX_LABEL = 128  # of an upload's file name, as answers and logs repeat it
_CHUNK = 500  # crops deleted per transaction by the quota and retention

SCHEMA = """
CREATE TABLE IF NOT EXISTS crops (
    id INTEGER PRIMARY KEY AUTOINCREMENT,   -- never reused: a reader's cursor
    node TEXT NOT NULL,
    camera TEXT NOT NULL,
    track INTEGER NOT NULL,
    frame INTEGER NOT NULL,
    ts REAL NOT NULL,                       -- capture time, Unix seconds: retention and the quota go by it
    x1 REAL NOT NULL, y1 REAL NOT NULL, x2 REAL NOT NULL, y2 REAL NOT NULL,
    score REAL NOT NULL,
    model TEXT NOT NULL,
    bytes INTEGER NOT NULL,                 -- of the JPEG
    received REAL NOT NULL,
    UNIQUE (node, camera, track, frame)
);
CREATE INDEX IF NOT EXISTS crops_ts ON crops (ts);
"""
_PG_JPEGS = """
CREATE TABLE crop_jpegs (id bigint PRIMARY KEY REFERENCES crops ON DELETE CASCADE, jpeg bytea NOT NULL);
ALTER TABLE crop_jpegs ALTER jpeg SET STORAGE EXTERNAL;  -- JPEGs do not compress
"""
MIGRATIONS = [{"sqlite": SCHEMA, "postgres": pg_ddl(SCHEMA) + _PG_JPEGS}]  # never edit a step: add one
_COLUMNS = "id, node, camera, track, frame, ts, x1, y1, x2, y2, score, model, bytes, received"
_TOTALS = "SELECT COUNT(*), COALESCE(SUM(bytes), 0) FROM crops"


@dataclass(frozen=True)
class Answer:
    """What the matcher says of one uploaded crop; `stored`, `duplicate` and `expired` acknowledge it."""

    status: str
    path: str | None = None  # in the layout, e.g. gate/edge-1_gate_t7_f12.jpg; None when the sidecar was unreadable
    reason: str | None = None
    id: int | None = None

    def to_dict(self) -> dict:
        return {"status": self.status, "path": self.path, "reason": self.reason, "id": self.id}


@dataclass(frozen=True)
class StoredCrop:
    id: int
    sidecar: Sidecar
    bytes: int
    received: float

    def to_dict(self) -> dict:
        s = self.sidecar
        return {"id": self.id, "path": layout_path(s.name), "node": s.node, "camera": s.camera, "track": s.track,
                "frame": s.frame, "ts": s.ts, "box": list(s.box), "score": s.score, "model": s.model,
                "bytes": self.bytes, "received": self.received, "sidecar": json.loads(encode(s))}


def layout_path(name: CropName) -> str:
    """The crop's path relative to a harvest root: what a reader writes it as."""
    return name.path(".").as_posix().removeprefix("./")


def _row_crop(r: tuple) -> StoredCrop:
    return StoredCrop(r[0], Sidecar(r[1], r[2], r[5], r[4], r[3], tuple(r[6:10]), r[10], r[11]), r[12], r[13])


class HarvestStore:
    """Thread-safe (the API answers uploads from a thread pool): one connection, used under one lock."""

    def __init__(self, data_dir: Path, cfg: HarvestStoreConfig, max_age_s: float | None = None,
                 store: StoreConfig | None = None):
        self.cfg, self.max_age_s = cfg, max_age_s
        self.dir = Path(data_dir) / "harvest"
        self.crops = self.dir / "crops"
        self.quota = int(cfg.quota_mb * 2**20)
        self.counts = dict.fromkeys((*STATUSES, "dropped"), 0)  # since start; dropped: by the quota
        self._lock = threading.Lock()
        self.dir.mkdir(parents=True, exist_ok=True)
        # secure_delete: a deleted row's bytes are overwritten, not just unlinked
        self._db = open_db("harvest", self.dir / "index.db", store, MIGRATIONS, pragmas=("PRAGMA secure_delete=ON",))
        self._files = not self._db.postgres  # the JPEGs: files under crops/, or rows beside the index's
        self._totals()
        if self._files:
            self.crops.mkdir(exist_ok=True)
            self._reconcile()
        with self._lock:
            self._enforce_quota()  # the quota may have been lowered since the last run

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def _path(self, name: CropName) -> Path:
        return name.path(self.crops)

    def _totals(self) -> None:
        count, size = self._db.one(_TOTALS)
        self.count, self.bytes = int(count), int(size)  # PostgreSQL's SUM of bigints is a numeric

    # -- receiving -----------------------------------------------------------------------------

    def check(self, sidecar: bytes, jpeg: bytes, label: str) -> Sidecar:
        """The crop's sidecar if both halves are fit to store; `HarvestError` / `ValueError` saying what is wrong."""
        s = decode(sidecar, f"{label}: sidecar")
        if len(jpeg) > self.cfg.max_crop_bytes:
            raise ValueError(f"{label}: a JPEG of {len(jpeg):,} bytes; the limit is {self.cfg.max_crop_bytes:,} "
                             "(harvest.max_crop_bytes)")
        kind, width, height = image_size(jpeg)  # from the header: nothing is decoded yet
        if kind != "JPEG":
            raise ValueError(f"{label}: a {kind}, not a JPEG")
        if width * height > self.cfg.max_crop_pixels:
            raise ValueError(f"{label}: a {width} x {height} JPEG; the limit is {self.cfg.max_crop_pixels:,} pixels "
                             "(harvest.max_crop_pixels)")
        decode_image(jpeg, label, self.cfg.max_crop_pixels)  # a truncated or corrupt JPEG fails here
        return s

    def receive(self, items: list[tuple[bytes, bytes, str]], now: float | None = None) -> list[Answer]:
        """Check and store a batch of (sidecar JSON, JPEG, file name) crops; one answer each, in order."""
        now = time.time() if now is None else now
        cutoff = now - self.max_age_s if self.max_age_s else None
        answers: list[Answer | None] = [None] * len(items)
        good = []
        for i, (sidecar, jpeg, name) in enumerate(items):
            label = repr(name[:MAX_LABEL])
            try:
                s = self.check(sidecar, jpeg, label)
            except (HarvestError, ValueError) as e:
                answers[i] = Answer("refused", reason=str(e))
                continue
            if cutoff is not None and s.ts < cutoff:
                answers[i] = Answer("expired", layout_path(s.name), f"captured {(now - s.ts) / 3600:.1f} h ago, past "
                                    f"retention.max_age_hours ({self.max_age_s / 3600:g}): not stored")
            else:
                good.append((i, s, jpeg))
        with self._lock:
            for i, answer in self._insert(good, now):
                answers[i] = answer
            self._enforce_quota()
            for a in answers:
                self.counts[a.status] += 1
        refused = [a.reason for a in answers if a.status == "refused"]
        if refused:
            log.warning("harvest upload: %d of %d crop(s) refused, e.g. %s", len(refused), len(items), refused[0])
        return answers

    def _insert(self, good: list[tuple[int, Sidecar, bytes]], now: float) -> list[tuple[int, Answer]]:
        """Rows and files of one batch in one transaction: a failure (disk full) stores none of it, and raises."""
        out, written, size = [], [], 0
        try:
            with self._db.transaction() as db:
                for i, s, jpeg in good:
                    row = db.one("INSERT INTO crops (node, camera, track, frame, ts, x1, y1, x2, y2, score, model, bytes, "
                                 "received) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT DO NOTHING "
                                 "RETURNING id", (s.node, s.camera, s.track, s.frame, s.ts, *s.box, s.score, s.model,
                                                  len(jpeg), now))
                    if row is None:
                        (old,) = db.one("SELECT id FROM crops WHERE node = ? AND camera = ? AND track = ? AND frame = ?",
                                        (s.node, s.camera, s.track, s.frame))
                        out.append((i, Answer("duplicate", layout_path(s.name), "stored before: kept once", old)))
                        continue
                    if self._files:
                        _write(self._path(s.name), jpeg)
                        written.append(self._path(s.name))
                    else:
                        db.run("INSERT INTO crop_jpegs (id, jpeg) VALUES (?, ?)", (row[0], jpeg))
                    size += len(jpeg)
                    out.append((i, Answer("stored", layout_path(s.name), None, row[0])))
        except BaseException:
            for path in written:
                path.unlink(missing_ok=True)
            raise
        self.count += sum(a.status == "stored" for _, a in out)
        self.bytes += size
        return out

    # -- deleting ------------------------------------------------------------------------------

    def _delete(self, rows: list[tuple]) -> None:
        """Rows of `_COLUMNS` (at most `_CHUNK`): gone from the index, then from the disk (PostgreSQL: with their JPEGs)."""
        self._db.run(f"DELETE FROM crops WHERE id IN ({', '.join('?' * len(rows))})", [r[0] for r in rows])
        for r in rows if self._files else []:
            self._path(_row_crop(r).sidecar.name).unlink(missing_ok=True)
        self._db.purge("crops", "crop_jpegs")
        self.count -= len(rows)
        self.bytes -= sum(r[12] for r in rows)

    def _enforce_quota(self) -> None:
        dropped = 0
        if not self._files:
            self._totals()  # another matcher's uploads count too
        while self.bytes > self.quota:
            over, rows = self.bytes - self.quota, []
            for r in self._db.all(f"SELECT {_COLUMNS} FROM crops ORDER BY ts, id LIMIT ?", (_CHUNK,)):
                rows.append(r)
                over -= r[12]
                if over <= 0:
                    break
            self._delete(rows)
            dropped += len(rows)
        if dropped:
            self.counts["dropped"] += dropped
            log.warning("harvest store over its quota of %g MB (harvest.quota_mb): deleted the %d oldest crop(s), "
                        "%d since start", self.cfg.quota_mb, dropped, self.counts["dropped"])

    def expire(self, before: float) -> int:
        """Delete every crop captured before `before` (Unix seconds); how many."""
        total = 0
        while True:
            with self._lock:
                rows = self._db.all(f"SELECT {_COLUMNS} FROM crops WHERE ts < ? ORDER BY ts LIMIT ?", (before, _CHUNK))
                if rows:
                    self._delete(rows)
            total += len(rows)
            if len(rows) < _CHUNK:
                break
        if total:
            log.info("retention: deleted %d harvested crop(s)", total)
        return total

    def _reconcile(self) -> None:
        """What a crash between a row and its file left: files nobody indexed (a batch rolled back, a deletion cut
        short, a temporary file) are deleted, and rows whose file is gone."""
        rows = self._db.all(f"SELECT {_COLUMNS} FROM crops")
        known = {self._path(_row_crop(r).sidecar.name): r for r in rows}
        strays = [p for p in self.crops.glob("*/*") if p not in known and not p.is_dir()]
        for p in strays:
            p.unlink(missing_ok=True)
        lost = [r for path, r in known.items() if not path.is_file()]
        if lost:
            self._delete(lost)
        if strays or lost:
            log.warning("harvest store %s: removed %d file(s) without a row and %d row(s) without a file (an "
                        "interrupted write or deletion)", self.dir, len(strays), len(lost))

    # -- reading -------------------------------------------------------------------------------

    def list(self, after: int = 0, since: float | None = None, until: float | None = None,
             limit: int = 100) -> list[StoredCrop]:
        """Crops with an id above `after`, captured within [since, until], lowest id first."""
        with self._lock:
            rows = self._db.all(f"SELECT {_COLUMNS} FROM crops WHERE id > ? AND ts >= ? AND ts <= ? ORDER BY id LIMIT ?",
                                (after, -1.0 if since is None else since, float("inf") if until is None else until, limit))
        return [_row_crop(r) for r in rows]

    def jpeg(self, crop_id: int) -> bytes | None:
        if not self._files:
            row = self._db.one("SELECT jpeg FROM crop_jpegs WHERE id = ?", (crop_id,))
            return None if row is None else bytes(row[0])
        with self._lock:
            row = self._db.one(f"SELECT {_COLUMNS} FROM crops WHERE id = ?", (crop_id,))
        if row is None:
            return None
        try:
            return self._path(_row_crop(row).sidecar.name).read_bytes()
        except FileNotFoundError:  # deleted meanwhile by retention or the quota
            return None

    def stats(self) -> dict:
        return {"crops": self.count, "bytes": self.bytes, "quota_bytes": self.quota, **self.counts}


def _write(path: Path, data: bytes) -> None:
    """Whole or not at all: a reader never finds half a JPEG under the crop's name."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    finally:
        with suppress(FileNotFoundError):
            tmp.unlink()
