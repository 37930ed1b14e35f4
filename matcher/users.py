"""Who may use the matcher's API: per-user tokens with a role, kept in `users.db` in the data directory, or with
`store.kind: postgres` in that database (`matcher.sqldb`), shared by every matcher on it.

| role     | may                                                                                   |
|----------|---------------------------------------------------------------------------------------|
| `viewer` | search, see sightings, thumbnails, edges, stats and alerts                             |
| `admin`  | also manage the watchlist, the model registry, and read the audit log                  |
| `edge`   | only what an edge needs: read the production model, upload its harvest (`http.edge_token_file`) |

`crossview users add NAME --role viewer` prints a new token once; only its SHA-256 is kept, so a copy of
the database gives no one a token. `revoke` ends a user's access at their next request (every lookup
reads the database, as the CLI changes it beside a running matcher). The configured `http.token` stays the
one-user default: it acts as the user `admin` with the admin role.

    users = Users(data_dir, cfg.store)
    token = users.add("alice", "viewer")
    users.lookup(token)        # User(name='alice', role='viewer')
"""

from __future__ import annotations

import hashlib
import re
import secrets
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from crossview.kernel.config import StoreConfig
from crossview.matcher.sqldb import open_db

ROLES = ("viewer", "admin", "edge")
RANK = {"edge": 0, "viewer": 1, "admin": 2}  # edge is not below viewer in what it may do: checked apart
NAME = re.compile(r"^[A-Za-z0-9_.@-]{1,64}$")
SCHEMA = """
CREATE TABLE IF NOT EXISTS users (
    name TEXT PRIMARY KEY,
    role TEXT NOT NULL,
    token_sha256 TEXT NOT NULL UNIQUE,
    created REAL NOT NULL,
    revoked REAL
);
"""
MIGRATIONS = [SCHEMA]  # never edit a step: add one


@dataclass(frozen=True)
class User:
    name: str
    role: str

    def may(self, role: str) -> bool:
        """Whether this user holds `role` or one above it (admin > viewer); `edge` only itself."""
        if "edge" in (role, self.role):
            return role == self.role
        return RANK[self.role] >= RANK[role]


def _digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


class Users:
    """Opened at the first call (a `users list` of an empty data directory creates nothing)."""

    def __init__(self, data_dir: Path, store: StoreConfig | None = None):
        self.path, self.store = Path(data_dir) / "users.db", store
        self._db, self._lock = None, threading.Lock()

    def _connect(self):
        with self._lock:
            if self._db is None:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                self._db = open_db("users", self.path, self.store, MIGRATIONS)
            return self._db

    def check(self) -> None:
        """Open it now where there is one: a damaged file stops the matcher at its start, not at a request."""
        if self._exists():
            self._connect()

    def _exists(self) -> bool:
        return self._db is not None or (self.store is not None and self.store.kind == "postgres") or self.path.exists()

    def close(self) -> None:
        if self._db is not None:
            self._db.close()

    def add(self, name: str, role: str) -> str:
        """A new user; returns their token (shown once). A name in use, even revoked, is a `ValueError`."""
        if not NAME.match(name):
            raise ValueError(f"user name {name!r}: 1 to 64 of letters, digits and _ . @ -")
        if role not in ROLES:
            raise ValueError(f"role {role!r}: one of {', '.join(ROLES)}")
        token = secrets.token_urlsafe(32)
        db = self._connect()
        try:
            db.run("INSERT INTO users VALUES (?, ?, ?, ?, NULL)", (name, role, _digest(token), time.time()))
        except db.IntegrityError:
            raise ValueError(f"user {name!r} exists already (crossview users list); pick another name") from None
        return token

    def revoke(self, name: str) -> None:
        if not self._connect().run("UPDATE users SET revoked = ? WHERE name = ? AND revoked IS NULL", (time.time(), name)):
            raise LookupError(f"no active user {name!r} (crossview users list)")

    def list(self) -> list[dict]:
        if not self._exists():
            return []
        rows = self._connect().all("SELECT name, role, created, revoked FROM users ORDER BY created")
        return [{"name": n, "role": r, "created": c, "revoked": v} for n, r, c, v in rows]

    def lookup(self, token: str) -> User | None:
        """The active user holding `token`, or None."""
        if not token or not self._exists():
            return None
        row = self._connect().one("SELECT name, role FROM users WHERE token_sha256 = ? AND revoked IS NULL", (_digest(token),))
        return None if row is None else User(*row)
