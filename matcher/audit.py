"""The audit log: who looked for whom. Every search, thumbnail view, watchlist change and model change, appended
to `audit.db` in the data directory.

| what        | how                                                                                     |
|-------------|-----------------------------------------------------------------------------------------|
| an entry    | id, time, user, action (`ACTIONS`), what was asked (JSON: the subject and filters; an uploaded |
|             | image by its SHA-256 and name, an embedding by its model only), how many results        |
| append-only | the table refuses UPDATE (a trigger); rows go only by `prune`, the audit's own retention  |
|             | (`audit.max_age_days`), apart from the sightings'                                       |
| bounded     | what is asked is cut to `MAX_DETAIL` bytes of JSON: a hostile request cannot grow the log faster |
| read        | `entries(after, limit)` for `GET /api/v1/audit` (admins); `export(out, since)` as JSON lines |

    audit = AuditLog(data_dir)
    audit.record("alice", "search", {"sighting_id": 12, "top_k": 5}, results=3)
    audit.entries(after=0, limit=10)[0]["user"]      # 'alice'
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from collections.abc import Iterator
from pathlib import Path

ACTIONS = ("search", "thumbnail", "watchlist.add", "watchlist.remove", "model.register", "model.promote",
           "model.rollback", "harvest.read", "audit.read")
MAX_DETAIL = 4096
SCHEMA = """
CREATE TABLE IF NOT EXISTS audit (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    ts REAL NOT NULL,
    user TEXT NOT NULL,
    action TEXT NOT NULL,
    detail TEXT NOT NULL,
    results INTEGER
);
CREATE INDEX IF NOT EXISTS audit_ts ON audit (ts);
CREATE TRIGGER IF NOT EXISTS audit_append_only BEFORE UPDATE ON audit
BEGIN SELECT RAISE(ABORT, 'the audit log is append-only'); END;
"""


def _detail(asked: dict) -> str:
    text = json.dumps(asked, sort_keys=True, default=str, ensure_ascii=False)
    if len(text.encode()) <= MAX_DETAIL:
        return text
    return json.dumps({"truncated": text.encode()[:MAX_DETAIL - 64].decode(errors="ignore")})


class AuditLog:
    """`read_only=True` reads a running matcher's log from beside it (`crossview audit export`)."""

    def __init__(self, data_dir: Path, read_only: bool = False):
        self.path = Path(data_dir) / "audit.db"
        self._lock = threading.Lock()
        if read_only:
            if not self.path.exists():
                raise FileNotFoundError(f"{self.path}: no audit log (has this matcher answered any request?)")
            self._db = sqlite3.connect(f"file:{self.path}?mode=ro", uri=True, check_same_thread=False)
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(self.path, isolation_level=None, timeout=10, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")  # an answered search is on disk before it is answered
        self._db.executescript(SCHEMA)

    def record(self, user: str, action: str, asked: dict, results: int | None = None) -> None:
        if action not in ACTIONS:
            raise ValueError(f"audit action {action!r} unknown")
        with self._lock:
            self._db.execute("INSERT INTO audit (ts, user, action, detail, results) VALUES (?, ?, ?, ?, ?)",
                             (time.time(), user, action, _detail(asked), results))

    def entries(self, after: int = 0, limit: int = 100, since: float | None = None) -> list[dict]:
        """Entries with an id above `after` (and at or after `since`), oldest first."""
        with self._lock:
            rows = self._db.execute("SELECT id, ts, user, action, detail, results FROM audit WHERE id > ? AND ts >= ? "
                                    "ORDER BY id LIMIT ?", (after, since or 0.0, limit)).fetchall()
        return [{"id": i, "ts": ts, "user": u, "action": a, "asked": json.loads(d), "results": r}
                for i, ts, u, a, d, r in rows]

    def export(self, since: float | None = None) -> Iterator[str]:
        """Every entry from `since` on as JSON lines, in pages (an export does not hold the whole log in memory)."""
        after = 0
        while page := self.entries(after, 1000, since):
            yield from (json.dumps(e, ensure_ascii=False) for e in page)
            after = page[-1]["id"]

    def prune(self, max_age_days: float, now: float | None = None) -> int:
        """Delete entries older than the audit's own retention; the number deleted."""
        cutoff = (time.time() if now is None else now) - max_age_days * 86400
        with self._lock:
            return self._db.execute("DELETE FROM audit WHERE ts < ?", (cutoff,)).rowcount

    def close(self) -> None:
        with self._lock:
            self._db.close()

