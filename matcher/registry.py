"""The model registry: every embedding model version the site has had, its file, checksum, gate report and state.
The folder `registry/` in the data directory is this module's: `registry.db` and one `<version>.onnx` per version.

| state        | meaning                                                                                   |
|--------------|-------------------------------------------------------------------------------------------|
| `candidate`  | registered (by `crossview models register` or the adapt job), not yet running anywhere     |
| `production` | the one version edges that poll the registry run; at most one                             |
| `retired`    | was production; `rollback` makes the one before the current production again              |

Edges poll `GET /api/v1/models/production` and download `GET /api/v1/models/{version}/onnx`
(`edge.rollout`), check its SHA-256 and hot-reload it; `crossview models status --url` shows which
edge runs which version (from their heartbeats). The CLI changes the registry on the matcher's own disk
(`--config` or `--data-dir`), as `crossview query` reads the store; a running matcher sees each change
at its next request, since every call reads the database.

    reg = Registry(data_dir)
    reg.register(Path("runs/train/site/site.onnx"), gate={"mAP": 0.71})   # -> ModelEntry, state candidate
    reg.promote("site-20261201")
    reg.production().sha256
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import sqlite3
import time
from contextlib import closing
from dataclasses import asdict, dataclass
from pathlib import Path

log = logging.getLogger(__name__)
STATES = ("candidate", "production", "retired")

SCHEMA = """
CREATE TABLE IF NOT EXISTS models (
    version TEXT PRIMARY KEY,
    sha256 TEXT NOT NULL,
    bytes INTEGER NOT NULL,
    meta TEXT NOT NULL,        -- JSON: name, input size, dimension, precision, calibrated
    gate TEXT,                 -- JSON gate report, NULL when registered without one
    state TEXT NOT NULL CHECK (state IN ('candidate', 'production', 'retired')),
    registered REAL NOT NULL,
    changed REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS promotions (   -- every production version in turn, for rollback and the record
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    version TEXT NOT NULL,
    ts REAL NOT NULL,
    why TEXT NOT NULL          -- promote or rollback
);
"""


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


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _summary(meta) -> dict:
    return {"name": meta.name, "input": [meta.input_h, meta.input_w], "dim": meta.embedding_dim,
            "precision": meta.precision, "calibrated": meta.calibration is not None}


class Registry:
    def __init__(self, data_dir: Path, read_only: bool = False):
        self.dir = Path(data_dir) / "registry"
        if not read_only:
            self.dir.mkdir(parents=True, exist_ok=True)
        self._path = self.dir / "registry.db"
        if not read_only:
            with closing(self._connect()) as db:
                db.executescript(SCHEMA)

    def _connect(self) -> sqlite3.Connection:
        db = sqlite3.connect(self._path, isolation_level=None, timeout=10)
        db.execute("PRAGMA journal_mode=WAL")
        return db

    def _rows(self, where: str = "", args: tuple = ()) -> list[ModelEntry]:
        if not self._path.exists():
            return []
        with closing(self._connect()) as db:
            rows = db.execute("SELECT version, sha256, bytes, meta, gate, state, registered, changed FROM models "
                              f"{where} ORDER BY registered", args).fetchall()
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
        return self.dir / f"{version}.onnx"

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
        with closing(self._connect()) as db:
            db.execute("INSERT INTO models VALUES (?, ?, ?, ?, ?, 'candidate', ?, ?)",
                       (meta.version, digest, Path(path).stat().st_size, json.dumps(_summary(meta)),
                        json.dumps(gate) if gate is not None else None, now, now))
        log.info("registry: %s registered as a candidate (sha256 %s)", meta.version, digest[:12])
        return self.get(meta.version)

    def promote(self, version: str, why: str = "promote") -> ModelEntry:
        """Make `version` production; the one before is retired."""
        if self.get(version) is None:
            raise LookupError(f"model version {version!r} is not in the registry (crossview models list)")
        now = time.time()
        with closing(self._connect()) as db:
            db.execute("BEGIN IMMEDIATE")
            db.execute("UPDATE models SET state = 'retired', changed = ? WHERE state = 'production' AND version != ?",
                       (now, version))
            db.execute("UPDATE models SET state = 'production', changed = ? WHERE version = ?", (now, version))
            db.execute("INSERT INTO promotions (version, ts, why) VALUES (?, ?, ?)", (version, now, why))
            db.execute("COMMIT")
        log.info("registry: %s is production (%s)", version, why)
        return self.get(version)

    def rollback(self) -> ModelEntry:
        """Make the production version before the current one production again."""
        with closing(self._connect()) as db:
            history = [v for (v,) in db.execute("SELECT version FROM promotions ORDER BY id")]
        current = self.production()
        earlier = [v for v in history if current is None or v != current.version]
        if not earlier:
            raise LookupError("nothing to roll back to: no earlier production version")
        return self.promote(earlier[-1], why="rollback")
