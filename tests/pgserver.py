"""A throwaway PostgreSQL server for tests: Debian's `initdb` and `pg_ctl` in a temporary folder, on a free port.

| piece       | what                                                                                    |
|-------------|-----------------------------------------------------------------------------------------|
| binaries    | `initdb` on PATH, else the newest /usr/lib/postgresql/*/bin; absent: the test is skipped |
| user        | run as root (CI), the server runs as the `postgres` system user (`runuser`), which owns |
|             | the data folder; as anyone else, as that user                                           |
| auth        | scram-sha-256 over TCP on 127.0.0.1 only, the password in a file: `store.password_file` |
| backends    | `BACKENDS`, `backend_section(request)`: a fixture's `store` section per store backend param  |
| deployments | `DEPLOYMENTS`, `deployment_sections(request)`: the `store` and `index` sections per param:    |
|             | sqlite+faiss (one machine, the default) or postgres+milvus (production's pairing)          |
| databases   | `fresh_db()`: a new, empty database each call, for one test's store                     |
| inspection  | `connect(db)`, `dead_tuples(db, table)`: deleted row versions VACUUM has not pruned yet  |

    >>> with PgServer(tmp_path) as pg:
    ...     cfg = pg.store_config(pg.fresh_db())    # a StoreConfig section for matcher_config(store=...)
"""

from __future__ import annotations

import itertools
import os
import shutil
import subprocess
from pathlib import Path

import pytest
from helpers import free_port

PASSWORD = "test-pg-password-0123456789"
BACKENDS = ["sqlite", "postgres"]  # the matcher's store backends, for fixture params
# What the matcher's behaviour suites run on: one machine's defaults, and the production pairing of issue 15.
DEPLOYMENTS = ["sqlite+faiss", pytest.param("postgres+milvus", marks=pytest.mark.milvus_server)]


def backend_section(request) -> dict:
    """The matcher config's `store` section for the backend `request.param` names: {} (SQLite in data_dir, the
    default), or a fresh database on the session's server (the `pg_server` fixture)."""
    if request.param == "sqlite":
        return {}
    pg = request.getfixturevalue("pg_server")
    return pg.store_section(pg.fresh_db())


def deployment_sections(request) -> dict:
    """The matcher config's `store` and `index` sections for the deployment `request.param` names: {} and {} (SQLite
    and FAISS in data_dir, the defaults), or a fresh database on the session's PostgreSQL (`pg_server`) and
    collections of its own on the session's Milvus standalone server (`milvus_server`), prefixed with the database's
    name; Session consistency, the default, is what a single matcher needs."""
    if request.param == "sqlite+faiss":
        return {"store": {}, "index": {}}
    pg, uri = request.getfixturevalue("pg_server"), request.getfixturevalue("milvus_server")
    db = pg.fresh_db()
    return {"store": pg.store_section(db), "index": {"engine": "milvus", "milvus": {"uri": uri, "collection_prefix": db}}}


def pg_bin() -> Path | None:
    if found := shutil.which("initdb"):
        return Path(found).resolve().parent
    versions = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"), key=lambda p: int(p.parts[-3]))
    return versions[-1].parent if versions else None


class PgServer:
    def __init__(self, root: Path):
        self.bin = pg_bin()
        if self.bin is None:
            pytest.skip("PostgreSQL is not installed (no initdb; `make postgres` installs Debian's package)")
        self.root, self.port, self.user = Path(root), free_port(), "postgres"
        self.data, self.password_file = self.root / "pgdata", self.root / "password"
        self._names = itertools.count(1)

    def _run(self, *args: str) -> None:
        prefix = ["runuser", "-u", self.user, "--"] if os.geteuid() == 0 else []
        done = subprocess.run([*prefix, *args], capture_output=True, text=True, timeout=60)
        if done.returncode:
            raise RuntimeError(f"{' '.join(args)}: exit {done.returncode}: {done.stderr.strip() or done.stdout.strip()}")

    def start(self) -> "PgServer":
        self.root.mkdir(parents=True, exist_ok=True)
        self.password_file.write_text(PASSWORD)
        if os.geteuid() == 0:
            shutil.chown(self.root, self.user)
            shutil.chown(self.password_file, self.user)
        self._run(str(self.bin / "initdb"), "-D", str(self.data), "-U", self.user, f"--pwfile={self.password_file}",
                  "--auth-host=scram-sha-256", "--auth-local=trust", "-E", "UTF8", "--no-sync")
        return self.resume()

    def resume(self) -> "PgServer":
        """Start the server on its existing data folder (after `stop()`), on the same port."""
        # Sockets in the temporary folder, TCP on 127.0.0.1 only; WAL flushed at every commit, as in production.
        opts = f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1 -c max_connections=200"
        self._run(str(self.bin / "pg_ctl"), "-D", str(self.data), "-l", str(self.root / "server.log"), "-o", opts, "-w", "start")
        return self

    def stop(self) -> None:
        self._run(str(self.bin / "pg_ctl"), "-D", str(self.data), "-m", "fast", "-w", "stop")

    def store_section(self, dbname: str) -> dict:
        """The matcher config's `store` section for one database."""
        return {"kind": "postgres", "host": "127.0.0.1", "port": self.port, "dbname": dbname, "user": self.user,
                "password_file": str(self.password_file)}

    def connect(self, dbname: str = "postgres"):
        import psycopg

        return psycopg.connect(host="127.0.0.1", port=self.port, dbname=dbname, user=self.user, password=PASSWORD,
                               autocommit=True)

    def dead_tuples(self, dbname: str, table: str) -> int:
        """Row versions a DELETE left in `table`'s pages that VACUUM has not yet pruned (pageinspect)."""
        with self.connect(dbname) as db:
            db.execute("CREATE EXTENSION IF NOT EXISTS pageinspect")
            return db.execute("SELECT COUNT(*) FROM generate_series(0, pg_relation_size(%s) / 8192 - 1) AS b, "
                              "heap_page_items(get_raw_page(%s, b::int)) WHERE lp_flags = 3 OR (lp_flags = 1 AND t_xmax <> 0)",
                              (table, table)).fetchone()[0]

    def fresh_db(self) -> str:
        name = f"t{next(self._names)}"
        with self.connect() as db:
            db.execute(f"CREATE DATABASE {name}")
        return name

    def __enter__(self) -> "PgServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
