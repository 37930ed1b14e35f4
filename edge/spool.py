"""The edge's spool: every sighting not yet acknowledged by the matcher, on disk, oldest dropped first.

| what              | how                                                                          |
|-------------------|------------------------------------------------------------------------------|
| format            | one SQLite file (`<spool_dir>/spool.db`), WAL journal: an append is one small |
|                   | transaction, an acknowledgement deletes rows; what a `kill -9` interrupts is |
|                   | rolled back whole, never a torn message (an append-only segment file would need |
|                   | its own framing, checksums and compaction for the same)                      |
| durability        | `synchronous=NORMAL`: a committed append survives `kill -9` of the edge; a power |
|                   | cut may lose the last ones (FULL would cost an fsync per sighting)           |
| sequence numbers  | `seq`, the wire's per-node number, is the row id: AUTOINCREMENT never reuses one, |
|                   | even once acknowledged and deleted; a new spool starts at the clock in µs, so a |
|                   | wiped spool still numbers above what the matcher has seen                    |
| bound             | `max_bytes`: beyond it the oldest rows are dropped, counted in `dropped`      |
| unreadable file   | moved aside (`spool.db.unreadable-<time>`, logged) and a new spool started: the node |
|                   | keeps delivering what it sees from then on                                    |
| unusable folder   | not a folder this user can write (a file, no permission), or no room to start one: an |
|                   | `OSError` naming it, and the node does not start                              |
| resend            | `after(seq, n)`: the oldest rows after `seq`, for a resend pass               |

    spool = Spool(Path("var/spool"), max_bytes=500 << 20)
    seq = spool.next_seq(); spool.add(seq, ts, message)
    spool.after(0, 100)                 # [(seq, message), ...] oldest first
    spool.ack([seq])                    # acknowledged: gone
"""

from __future__ import annotations

import json
import logging
import sqlite3
import threading
import time
from collections.abc import Iterable
from pathlib import Path

log = logging.getLogger(__name__)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS spool (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    ts REAL NOT NULL,       -- when it was spooled, Unix seconds
    size INTEGER NOT NULL,
    msg BLOB NOT NULL
);
"""
_ROW_OVERHEAD = 64  # bytes SQLite spends per row beside the message, roughly: counted against the bound


class Spool:
    """Thread-safe: the node's loop appends while the publisher's thread resends and acknowledges."""

    def __init__(self, folder: Path, max_bytes: int):
        """An `OSError` naming the folder when the spool cannot be kept there (not a writable folder, a full disk)."""
        self.path = folder / "spool.db"
        self.max_bytes = max_bytes
        self.dropped = 0  # oldest rows dropped to stay within max_bytes
        self._closed_oldest: float | None | bool = False  # once closed: the oldest row's time then
        self._lock = threading.Lock()
        try:
            folder.mkdir(parents=True, exist_ok=True)
            self._db = self._open_or_renew()
            if self._db.execute("SELECT COUNT(*) FROM sqlite_sequence WHERE name = 'spool'").fetchone()[0] == 0:
                self._db.execute("INSERT INTO sqlite_sequence (name, seq) VALUES ('spool', ?)", (int(time.time() * 1e6),))
            self._next = self._db.execute("SELECT seq FROM sqlite_sequence WHERE name = 'spool'").fetchone()[0] + 1
            self.count, self.bytes = self._db.execute("SELECT COUNT(*), COALESCE(SUM(size), 0) FROM spool").fetchone()
        except (OSError, sqlite3.Error) as e:  # SQLite's own words ("unable to open database file") name no path
            raise OSError(f"{folder}: cannot keep the spool there ({e}); it must be a folder this user can write") from None
        self.bytes += _ROW_OVERHEAD * self.count
        if self.count:
            log.info("spool %s: %d unacknowledged sightings from before (%.1f MB), resent first", self.path, self.count,
                     self.bytes / 1e6)

    def _open_or_renew(self) -> sqlite3.Connection:
        try:
            return self._open()
        except sqlite3.OperationalError:  # cannot open or write it (permissions, a full disk): not the file's fault
            raise
        except sqlite3.DatabaseError as e:  # its rows cannot be read back: kept for a look, the node spools afresh
            aside = self.path.with_name(f"{self.path.name}.unreadable-{int(time.time())}")
            for part in ("", "-wal", "-shm"):
                if (f := self.path.with_name(self.path.name + part)).exists():
                    f.rename(aside.with_name(aside.name + part))
            log.error("spool %s is not a readable SQLite database (%s): moved to %s, spooling into a new one",
                      self.path, e, aside.name)
            return self._open()

    def _open(self) -> sqlite3.Connection:
        db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        try:
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=NORMAL")
            db.executescript(_SCHEMA)
            db.execute("SELECT COUNT(*) FROM spool").fetchone()
        except sqlite3.DatabaseError:
            db.close()
            raise
        return db

    def next_seq(self) -> int:
        """The sequence number the next `add` must use: the caller puts it into the message first."""
        return self._next

    def add(self, seq: int, ts: float, msg: bytes) -> None:
        with self._lock:
            if seq != self._next:
                raise ValueError(f"spool: sequence {seq} out of turn (next is {self._next})")
            self._db.execute("INSERT INTO spool (seq, ts, size, msg) VALUES (?, ?, ?, ?)", (seq, ts, len(msg), msg))
            self._next += 1
            self.count += 1
            self.bytes += len(msg) + _ROW_OVERHEAD
            if self.bytes > self.max_bytes:
                self._drop_oldest()

    def _drop_oldest(self) -> None:
        """Delete the oldest rows until the spool is 5% under its bound, so drops come in chunks, not per append."""
        target, freed, n = self.bytes - int(0.95 * self.max_bytes), 0, 0
        for seq, size in self._db.execute("SELECT seq, size FROM spool ORDER BY seq"):
            freed, n = freed + size + _ROW_OVERHEAD, n + 1
            if freed >= target:
                break
        self._db.execute("DELETE FROM spool WHERE seq <= ?", (seq,))
        self.count, self.bytes, self.dropped = self.count - n, self.bytes - freed, self.dropped + n
        log.error("SPOOL FULL (%s, %.0f MB): dropped the %d oldest unacknowledged sightings, %d so far; the matcher "
                  "has been unreachable or too slow for too long", self.path, self.max_bytes / 1e6, n, self.dropped)

    def ack(self, seqs: Iterable[int]) -> int:
        """Forget acknowledged rows; how many of them were still here."""
        with self._lock:
            rows = self._db.execute("DELETE FROM spool WHERE seq IN (SELECT value FROM json_each(?)) RETURNING size",
                                    (json.dumps([int(s) for s in seqs]),)).fetchall()
            self.count -= len(rows)
            self.bytes -= sum(r[0] for r in rows) + _ROW_OVERHEAD * len(rows)
            return len(rows)

    def after(self, seq: int, n: int) -> list[tuple[int, bytes]]:
        """The oldest `n` rows numbered above `seq`."""
        with self._lock:
            return self._db.execute("SELECT seq, msg FROM spool WHERE seq > ? ORDER BY seq LIMIT ?", (seq, n)).fetchall()

    def oldest_ts(self) -> float | None:
        """When the oldest unacknowledged sighting was spooled."""
        with self._lock:
            if self._closed_oldest is not False:
                return self._closed_oldest
            return self._db.execute("SELECT ts FROM spool ORDER BY seq LIMIT 1").fetchone()[0] if self.count else None

    def close(self) -> None:
        """Closes the file; counts and the oldest time stay readable (metrics are scraped after a node stops too)."""
        oldest = self.oldest_ts()
        with self._lock:
            self._db.close()
            self._closed_oldest = oldest
