"""Leases: work that runs once per site, not once per matcher replica (the watchlist check, the gallery migration).

| what          | how                                                                                     |
|---------------|-----------------------------------------------------------------------------------------|
| row           | `leases (name, holder, expires)` in the `lease` schema of the store's PostgreSQL database |
|               | (`matcher.sqldb`); `holder` names a matcher: host, pid and a random part                |
| acquire/renew | one statement, atomic on the server: `INSERT ... ON CONFLICT (name) DO UPDATE ... WHERE` |
|               | the row is ours or has expired, `RETURNING holder`: a row back means held for `ttl_s`    |
| expiry        | the server's clock (`clock_timestamp()`), so the replicas' clocks need not agree; a      |
|               | holder that crashes or hangs loses the lease `ttl_s` after its last renewal              |
| renewal       | `held()` renews when a third of `ttl_s` has passed since the last, and says False from   |
|               | the moment its own view of the lease has expired, before any other replica can take it  |
| SQLite        | one matcher per data dir: always held, no table                                         |

Not an advisory lock: a session's advisory lock lives and dies with one connection (`matcher.sqldb` replaces a
dropped one at the next call, silently losing it), says nothing about who holds it, and stays held by a process
that hangs with its connection open; a row with an expiry survives a reconnect, is visible, and runs out.
A lease is a hint of who does the work, not its guard: what must happen once (one alert per track, a sighting
checked once) is kept so by the work's own transaction, as two holders may briefly overlap around an expiry.

    lease = Lease("watchlist", cfg.store, ttl_s=10)
    if lease.held():        # acquired or renewed as needed
        watchlist.check_stored(store)
"""

from __future__ import annotations

import logging
import os
import secrets
import socket
import threading
import time

from crossview.kernel.config import StoreConfig
from crossview.matcher.sqldb import PG_NOW, open_db

log = logging.getLogger(__name__)

MIGRATIONS = ["CREATE TABLE IF NOT EXISTS leases (name TEXT PRIMARY KEY, holder TEXT NOT NULL, expires REAL NOT NULL)"]
_TAKE = (f"INSERT INTO leases (name, holder, expires) VALUES (?, ?, {PG_NOW} + ?) ON CONFLICT (name) DO UPDATE SET "
         f"holder = excluded.holder, expires = excluded.expires WHERE leases.holder = excluded.holder "
         f"OR leases.expires < {PG_NOW} RETURNING holder")


class Lease:
    def __init__(self, name: str, store: StoreConfig | None, ttl_s: float = 10.0, holder: str | None = None):
        self.name, self.ttl_s = name, ttl_s
        self.holder = holder or f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(4)}"  # unique per matcher
        self._db = open_db("lease", None, store, MIGRATIONS) if store is not None and store.kind == "postgres" else None
        self._until = float("inf") if self._db is None else 0.0  # monotonic time our hold runs out, as we count it
        self._renewed = float("-inf")
        self._lock = threading.Lock()

    def held(self) -> bool:
        """Whether this process holds the lease now, renewing (or trying to take) it when due."""
        with self._lock:
            now = time.monotonic()
            if self._db is not None and now - self._renewed >= self.ttl_s / 3:
                self._try(now)
            return now < self._until

    def _try(self, now: float) -> None:
        was = now < self._until
        try:
            got = self._db.one(_TAKE, (self.name, self.holder, self.ttl_s)) is not None
        except self._db.Error as e:  # the server is away: our hold runs out on its own count
            log.error("lease %s: not renewed (%s)", self.name, e)
            return
        self._renewed = now
        self._until = now + self.ttl_s if got else 0.0  # counted from before the call: never later than the server's
        if got != was:
            log.info("lease %s: %s (this matcher is %s)", self.name, "taken" if got else "held by another replica", self.holder)

    def release(self) -> None:
        """Give the lease up (a clean stop), so another replica takes it at once rather than after `ttl_s`."""
        with self._lock:
            if self._db is not None:
                try:
                    self._db.run("DELETE FROM leases WHERE name = ? AND holder = ?", (self.name, self.holder))
                except self._db.Error as e:
                    log.error("lease %s: not released, it runs out in %g s (%s)", self.name, self.ttl_s, e)
                self._db.close()
                self._db = None
            self._until = 0.0
