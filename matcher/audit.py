"""The audit log: who looked for whom. Every search, thumbnail view, watchlist change and model change, appended
to `audit.db` in the data directory, or with `store.kind: postgres` to that database (`matcher.sqldb`), shared by
every matcher on it.

| what        | how                                                                                     |
|-------------|-----------------------------------------------------------------------------------------|
| an entry    | id, time, user, action (`ACTIONS`), what was asked (JSON: the subject and filters; an uploaded |
|             | image by its SHA-256 and name, an embedding by its model only), how many results        |
| append-only | triggers refuse UPDATE, and DELETE (PostgreSQL: TRUNCATE too) of any row newer than the cutoff |
|             | `prune` writes to `audit_prune` inside its own transaction: rows go only by that, the    |
|             | audit's own retention (`audit.max_age_days`), apart from the sightings'                  |
| bounded     | what is asked is cut to `MAX_DETAIL` bytes of JSON: a hostile request cannot grow the log faster |
| read        | `entries(after, limit)` for `GET /api/v1/audit` (admins); `export(out, since)` as JSON lines |

    audit = AuditLog(data_dir, store=cfg.store)
    audit.record("alice", "search", {"sighting_id": 12, "top_k": 5}, results=3)
    audit.entries(after=0, limit=10)[0]["user"]      # 'alice'
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path

from crossview.kernel.config import StoreConfig
from crossview.matcher.sqldb import WAL_FULL, open_db, pg_ddl

ACTIONS = ("search", "thumbnail", "watchlist.add", "watchlist.remove", "model.register", "model.promote",
           "model.rollback", "harvest.read", "audit.read")
MAX_DETAIL = 4096
_TABLE = """
CREATE TABLE IF NOT EXISTS audit (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    ts REAL NOT NULL,
    "user" TEXT NOT NULL,
    action TEXT NOT NULL,
    detail TEXT NOT NULL,
    results INTEGER
);
CREATE INDEX IF NOT EXISTS audit_ts ON audit (ts);
"""
_PRUNE = "CREATE TABLE audit_prune (before REAL NOT NULL);  -- a row only inside `prune`'s transaction: its cutoff\n"
MIGRATIONS = [  # never edit a step: add one
    {"sqlite": _TABLE + """
CREATE TRIGGER IF NOT EXISTS audit_append_only BEFORE UPDATE ON audit
BEGIN SELECT RAISE(ABORT, 'the audit log is append-only'); END;
""", "postgres": pg_ddl(_TABLE)},
    {"sqlite": _PRUNE + """
CREATE TRIGGER audit_deleted_by_retention_only BEFORE DELETE ON audit
WHEN NOT EXISTS (SELECT 1 FROM audit_prune WHERE OLD.ts < before)
BEGIN SELECT RAISE(ABORT, 'the audit log is append-only'); END;
""", "postgres": pg_ddl(_PRUNE) + """
CREATE FUNCTION audit_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'DELETE' THEN
        IF EXISTS (SELECT 1 FROM audit_prune WHERE OLD.ts < before) THEN
            RETURN OLD;
        END IF;
    END IF;
    RAISE EXCEPTION 'the audit log is append-only';
END $$;
CREATE TRIGGER audit_append_only BEFORE UPDATE OR DELETE ON audit FOR EACH ROW EXECUTE FUNCTION audit_append_only();
CREATE TRIGGER audit_no_truncate BEFORE TRUNCATE ON audit FOR EACH STATEMENT EXECUTE FUNCTION audit_append_only();
"""},
]


def _detail(asked: dict) -> str:
    text = json.dumps(asked, sort_keys=True, default=str, ensure_ascii=False)
    if len(text.encode()) <= MAX_DETAIL:
        return text
    return json.dumps({"truncated": text.encode()[:MAX_DETAIL - 64].decode(errors="ignore")})


class AuditLog:
    """`read_only=True` reads a running matcher's log from beside it (`crossview audit export`)."""

    def __init__(self, data_dir: Path, read_only: bool = False, store: StoreConfig | None = None):
        self.path = Path(data_dir) / "audit.db"
        self._lock = threading.Lock()
        if not read_only:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        # WAL_FULL: an answered search is on disk before it is answered
        self._db = open_db("audit", self.path, store, MIGRATIONS, read_only, WAL_FULL)
        if self._db is None:
            where = self.path if store is None or store.kind == "sqlite" else store.shown
            raise FileNotFoundError(f"{where}: no audit log (has this matcher answered any request?)")

    def record(self, user: str, action: str, asked: dict, results: int | None = None) -> None:
        if action not in ACTIONS:
            raise ValueError(f"audit action {action!r} unknown")
        with self._lock:
            self._db.run('INSERT INTO audit (ts, "user", action, detail, results) VALUES (?, ?, ?, ?, ?)',
                         (time.time(), user, action, _detail(asked), results))

    def entries(self, after: int = 0, limit: int = 100, since: float | None = None) -> list[dict]:
        """Entries with an id above `after` (and at or after `since`), oldest first."""
        with self._lock:
            rows = self._db.all('SELECT id, ts, "user", action, detail, results FROM audit WHERE id > ? AND ts >= ? '
                                "ORDER BY id LIMIT ?", (after, since or 0.0, limit))
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
            with self._db.transaction() as db:  # the cutoff the triggers let through, never committed
                db.run("INSERT INTO audit_prune (before) VALUES (?)", (cutoff,))
                n = db.run("DELETE FROM audit WHERE ts < ?", (cutoff,))
                db.run("DELETE FROM audit_prune")
            if n:
                self._db.purge("audit")
            return n

    def close(self) -> None:
        with self._lock:
            self._db.close()

