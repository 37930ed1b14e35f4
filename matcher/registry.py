"""The model registry: every embedding model version the site has had, its file, checksum, gate report and state.
The folder `registry/` in the data directory is this module's: `registry.db` and one `<version>.onnx` per version.

| state        | meaning                                                                                   |
|--------------|-------------------------------------------------------------------------------------------|
| `candidate`  | registered (by `crossview models register` or the adapt job), not yet running anywhere     |
| `canary`     | production for the named edges only; after `hold_s` with each of them online and running it, |
|              | it becomes production for all (`advance`, from the matcher's status loop)                 |
| `production` | the one version edges that poll the registry run; at most one                             |
| `retired`    | was production; `rollback` makes the one before the current production again              |

Edges poll `GET /api/v1/models/production` and download `GET /api/v1/models/{version}/onnx`
(`edge.rollout`), check its SHA-256 and hot-reload it; `crossview models status --url` shows which
edge runs which version (from their heartbeats). The CLI changes the registry on the matcher's own disk
(`--config` or `--data-dir`), as `crossview query` reads the store; a running matcher sees each change
at its next request, since every call reads the database.

With `store.kind: postgres` the tables are in that database (`matcher.sqldb`), shared by every matcher on it: a
version registered or promoted through one is production for all. The ONNX files go there too, in 1 MiB parts
(`model_files`, at most `http.max_model_bytes`: 512 MB by default, well within PostgreSQL's limits, and written
once per version), since a replica must serve an edge a version another one registered; `registry/<version>.onnx`
is then each matcher's cache, fetched from the database when missing and checked against the SHA-256.

    reg = Registry(data_dir)
    reg.register(Path("runs/train/site/site.onnx"), gate={"mAP": 0.71})   # -> ModelEntry, state candidate
    reg.promote("site-20261201")
    reg.production().sha256
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from crossview.kernel.config import StoreConfig
from crossview.kernel.integrity import sha256_of
from crossview.matcher.sqldb import WAL_FULL, open_db, pg_ddl

log = logging.getLogger(__name__)
STATES = ("candidate", "canary", "production", "retired")

SCHEMA = """
CREATE TABLE IF NOT EXISTS models (
    version TEXT PRIMARY KEY,
    sha256 TEXT NOT NULL,
    bytes INTEGER NOT NULL,
    meta TEXT NOT NULL,        -- JSON: name, input size, dimension, precision, calibrated
    gate TEXT,                 -- JSON gate report, NULL when registered without one
    state TEXT NOT NULL CHECK (state IN ('candidate', 'canary', 'production', 'retired')),
    registered REAL NOT NULL,
    changed REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS canary (      -- at most one row: the version on trial and where
    version TEXT NOT NULL,
    nodes TEXT NOT NULL,       -- JSON list of edge node ids
    since REAL NOT NULL,
    hold_s REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS promotions (   -- every production version in turn, for rollback and the record
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    version TEXT NOT NULL,
    ts REAL NOT NULL,
    why TEXT NOT NULL          -- promote or rollback
);
"""
_PG_FILES = """
CREATE TABLE model_files (version text NOT NULL, part integer NOT NULL, data bytea NOT NULL, PRIMARY KEY (version, part));
ALTER TABLE model_files ALTER data SET STORAGE EXTERNAL;  -- ONNX weights do not compress
"""
MIGRATIONS = [{"sqlite": SCHEMA, "postgres": pg_ddl(SCHEMA) + _PG_FILES}]  # never edit a step: add one
_PART = 1 << 20  # bytes of a model file per model_files row


@dataclass(frozen=True)
class ModelEntry:
    version: str
    sha256: str
    bytes: int
    meta: dict
    gate: dict | None
    state: str
    registered: float
    changed: float

    def to_dict(self) -> dict:
        return asdict(self)


def _summary(meta) -> dict:
    return {"name": meta.name, "input": [meta.input_h, meta.input_w], "dim": meta.embedding_dim,
            "precision": meta.precision, "calibrated": meta.calibration is not None}


class Registry:
    """`store`: where the tables are (`store.kind`; None: SQLite in `registry/`). Read-only, a registry not yet
    created reads as empty."""

    def __init__(self, data_dir: Path, read_only: bool = False, store: StoreConfig | None = None):
        self.dir = Path(data_dir) / "registry"
        if not read_only:
            self.dir.mkdir(parents=True, exist_ok=True)
        self._db = open_db("registry", self.dir / "registry.db", store, MIGRATIONS, read_only, WAL_FULL[:1])
        self._fetching = threading.Lock()

    def close(self) -> None:
        if self._db is not None:
            self._db.close()

    def _rows(self, where: str = "", args: tuple = ()) -> list[ModelEntry]:
        if self._db is None:
            return []
        rows = self._db.all("SELECT version, sha256, bytes, meta, gate, state, registered, changed FROM models "
                            f"{where} ORDER BY registered", args)
        return [ModelEntry(r[0], r[1], r[2], json.loads(r[3]), json.loads(r[4]) if r[4] else None, *r[5:]) for r in rows]

    def list(self) -> list[ModelEntry]:
        return self._rows()

    def get(self, version: str) -> ModelEntry | None:
        rows = self._rows("WHERE version = ?", (version,))
        return rows[0] if rows else None

    def production(self) -> ModelEntry | None:
        rows = self._rows("WHERE state = 'production'")
        return rows[0] if rows else None

    def file_of(self, version: str) -> Path:
        """The version's ONNX file (on PostgreSQL fetched into `registry/` when this matcher has no copy yet)."""
        path = self.dir / f"{version}.onnx"
        if self._db is not None and self._db.postgres and not path.exists():
            with self._fetching:  # edges downloading at once: one fetch
                if not path.exists():
                    self._fetch(version, path)
        return path

    def _fetch(self, version: str, path: Path) -> None:
        entry = self.get(version)
        if entry is None:
            return  # no such version: no file, as on SQLite
        tmp = self.dir / f".{version}.{os.getpid()}.fetch"
        try:
            with open(tmp, "wb") as f:
                for part in range(-(-entry.bytes // _PART)):  # part by part: a model is never all in memory
                    f.write(self._db.one("SELECT data FROM model_files WHERE version = ? AND part = ?", (version, part))[0])
            if sha256_of(tmp) != entry.sha256:
                raise ValueError(f"{version}: the model file in {self._db.shown} does not match its SHA-256")
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)

    def _store_file(self, version: str, path: Path) -> None:
        """The file's bytes into `model_files`, in the caller's transaction (PostgreSQL only)."""
        with open(path, "rb") as f:
            for part, data in enumerate(iter(lambda: f.read(_PART), b"")):
                self._db.run("INSERT INTO model_files (version, part, data) VALUES (?, ?, ?)", (version, part, data))

    def register(self, path: Path, gate: dict | None = None) -> ModelEntry:
        """Copy a model into the registry as a candidate; the same file again is a no-op, another file under a
        version already registered is a `ValueError`, as is a file the edge could not load (`ModelError`)."""
        from crossview.kernel.embedder import Embedder  # ONNX Runtime: only when registering

        meta = Embedder(Path(path), device="cpu").meta  # the same checks as an edge's: a wrong model fails here
        digest = sha256_of(path)
        old = self.get(meta.version)
        if old is not None:
            if old.sha256 != digest:
                raise ValueError(f"{path}: model version {meta.version!r} is registered already with another file "
                                 f"(sha256 {old.sha256[:12]}...): a new model needs a new version")
            return old
        tmp = self.dir / f".{meta.version}.{os.getpid()}.tmp"
        shutil.copyfile(path, tmp)
        os.replace(tmp, self.file_of(meta.version))
        now = time.time()
        with self._db.transaction() as db:
            db.run("INSERT INTO models VALUES (?, ?, ?, ?, ?, 'candidate', ?, ?)",
                   (meta.version, digest, Path(path).stat().st_size, json.dumps(_summary(meta)),
                    json.dumps(gate) if gate is not None else None, now, now))
            if db.postgres:
                self._store_file(meta.version, self.file_of(meta.version))
        log.info("registry: %s registered as a candidate (sha256 %s)", meta.version, digest[:12])
        return self.get(meta.version)

    def promote(self, version: str, why: str = "promote") -> ModelEntry:
        """Make `version` production; the one before is retired, a canary under way ends."""
        if self.get(version) is None:
            raise LookupError(f"model version {version!r} is not in the registry (crossview models list)")
        now = time.time()
        with self._db.transaction() as db:
            db.run("UPDATE models SET state = 'retired', changed = ? WHERE state IN ('production', 'canary') "
                   "AND version != ?", (now, version))
            db.run("DELETE FROM canary")
            db.run("UPDATE models SET state = 'production', changed = ? WHERE version = ?", (now, version))
            db.run("INSERT INTO promotions (version, ts, why) VALUES (?, ?, ?)", (version, now, why))
        log.info("registry: %s is production (%s)", version, why)
        return self.get(version)

    def start_canary(self, version: str, nodes: list[str], hold_s: float) -> ModelEntry:
        """`version` becomes production for `nodes` only; `advance` promotes it once they have run it `hold_s`."""
        entry = self.get(version)
        if entry is None:
            raise LookupError(f"model version {version!r} is not in the registry (crossview models list)")
        if entry.state == "production" or not nodes:
            raise ValueError(f"{version}: a canary needs a version that is not production and at least one edge")
        now = time.time()
        with self._db.transaction() as db:
            db.run("UPDATE models SET state = 'candidate', changed = ? WHERE state = 'canary'", (now,))
            db.run("DELETE FROM canary")
            db.run("INSERT INTO canary VALUES (?, ?, ?, ?)", (version, json.dumps(sorted(set(nodes))), now, hold_s))
            db.run("UPDATE models SET state = 'canary', changed = ? WHERE version = ?", (now, version))
        log.info("registry: %s on canary edges %s for %g s", version, ", ".join(sorted(set(nodes))), hold_s)
        return self.get(version)

    def canary(self) -> dict | None:
        """{"version", "nodes", "since", "hold_s"} of the version on trial, or None."""
        if self._db is None:
            return None
        row = self._db.one("SELECT version, nodes, since, hold_s FROM canary")
        return None if row is None else {"version": row[0], "nodes": json.loads(row[1]), "since": row[2], "hold_s": row[3]}

    def production_for(self, node: str | None) -> ModelEntry | None:
        """What edge `node` should run: the canary version on a canary edge, else production."""
        trial = self.canary()
        if trial is not None and node in trial["nodes"]:
            return self.get(trial["version"])
        return self.production()

    def advance(self, edges: list[dict], now: float | None = None) -> ModelEntry | None:
        """Promote the canary once its hold time is over with every canary edge online and running it (`edges`:
        `matcher.edges` report rows); the promoted entry, else None."""
        trial, now = self.canary(), time.time() if now is None else now
        if trial is None or now - trial["since"] < trial["hold_s"]:
            return None
        running = {e["node"]: e["model"] for e in edges if e["state"] == "online"}
        if any(running.get(node) != trial["version"] for node in trial["nodes"]):
            return None  # not all of them run it (yet, or any more): the operator looks at `models status`
        self._db.run("DELETE FROM canary")
        return self.promote(trial["version"], why="canary passed")

    def rollback(self) -> ModelEntry:
        """Stop a canary under way (its version retired: its edges go back to production); else make the
        production version before the current one production again."""
        trial = self.canary()
        if trial is not None:
            with self._db.transaction() as db:
                db.run("DELETE FROM canary")
                db.run("UPDATE models SET state = 'retired', changed = ? WHERE version = ?", (time.time(), trial["version"]))
            log.info("registry: canary of %s stopped", trial["version"])
            return self.get(trial["version"])
        history = [v for (v,) in self._db.all("SELECT version FROM promotions ORDER BY id")]
        current = self.production()
        earlier = [v for v in history if current is None or v != current.version]
        if not earlier:
            raise LookupError("nothing to roll back to: no earlier production version")
        return self.promote(earlier[-1], why="rollback")
