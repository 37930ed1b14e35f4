"""Who may use the matcher's API: per-user tokens with a role, kept in `users.db` in the data directory.

| role     | may                                                                                   |
|----------|---------------------------------------------------------------------------------------|
| `viewer` | search, see sightings, thumbnails, edges, stats and alerts                             |
| `admin`  | also manage the watchlist, the model registry, and read the audit log                  |
| `edge`   | only what an edge needs: read the production model, upload its harvest (`http.edge_token_file`) |

`crossview users add NAME --role viewer` prints a new token once; only its SHA-256 is kept, so a copy of
the database gives no one a token. `revoke` ends a user's access at their next request (every lookup
reads the database, as the CLI changes it beside a running matcher). The configured `http.token` stays the
one-user default: it acts as the user `admin` with the admin role.

    users = Users(data_dir)
    token = users.add("alice", "viewer")
    users.lookup(token)        # User(name='alice', role='viewer')
"""

from __future__ import annotations

import hashlib
import re
import secrets
import sqlite3
import time
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path

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
    def __init__(self, data_dir: Path):
        self.path = Path(data_dir) / "users.db"

    def _connect(self) -> sqlite3.Connection:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        db = sqlite3.connect(self.path, isolation_level=None, timeout=10)
        db.executescript(SCHEMA)
        return db

    def add(self, name: str, role: str) -> str:
        """A new user; returns their token (shown once). A name in use, even revoked, is a `ValueError`."""
        if not NAME.match(name):
            raise ValueError(f"user name {name!r}: 1 to 64 of letters, digits and _ . @ -")
        if role not in ROLES:
            raise ValueError(f"role {role!r}: one of {', '.join(ROLES)}")
        token = secrets.token_urlsafe(32)
        try:
            with closing(self._connect()) as db:
                db.execute("INSERT INTO users VALUES (?, ?, ?, ?, NULL)", (name, role, _digest(token), time.time()))
        except sqlite3.IntegrityError:
            raise ValueError(f"user {name!r} exists already (crossview users list); pick another name") from None
        return token

    def revoke(self, name: str) -> None:
        with closing(self._connect()) as db:
            done = db.execute("UPDATE users SET revoked = ? WHERE name = ? AND revoked IS NULL", (time.time(), name))
        if not done.rowcount:
            raise LookupError(f"no active user {name!r} (crossview users list)")

    def list(self) -> list[dict]:
        if not self.path.exists():
            return []
        with closing(self._connect()) as db:
            rows = db.execute("SELECT name, role, created, revoked FROM users ORDER BY created").fetchall()
        return [{"name": n, "role": r, "created": c, "revoked": v} for n, r, c, v in rows]

    def lookup(self, token: str) -> User | None:
        """The active user holding `token`, or None."""
        if not token or not self.path.exists():
            return None
        with closing(self._connect()) as db:
            row = db.execute("SELECT name, role FROM users WHERE token_sha256 = ? AND revoked IS NULL",
                             (_digest(token),)).fetchone()
        return None if row is None else User(*row)
