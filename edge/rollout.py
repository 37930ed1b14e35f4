"""Model rollout on the edge: keep `embedder.model` at the registry's production version.

Every `embedder.registry.poll_s` a thread asks the matcher which version this node should run
(`GET /api/v1/models/production?node=...`, with the read-only edge token: a canary edge gets the version
on trial). A version other than the one running is downloaded beside the model file, its
SHA-256 checked against the registry's, and loaded once as the edge would; only then is it renamed over
`embedder.model`, and the embedder's own hot reload swaps sessions between batches. A failed download,
a checksum mismatch or a model that does not load is logged, counted and deleted: the running model stays,
and the same version is tried again at the next poll.

    rollout = Rollout(cfg.embedder.registry, cfg.embedder.model, lambda: embedder.version, cfg.node_id)
    rollout.start(); ...; rollout.stop()
    rollout.check()     # one poll now: the version installed, or None
"""

from __future__ import annotations

import json
import logging
import os
import threading
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from pathlib import Path

from crossview.kernel.config import RegistryConfig, read_secret
from crossview.kernel.embedder import Embedder, ModelError
from crossview.kernel.integrity import copy_verified

log = logging.getLogger(__name__)
MAX_MODEL_BYTES = 2 << 30  # a re-ID model is megabytes; a larger answer is not one
_VERSION_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_.+-")


class RolloutError(RuntimeError):
    pass


class Rollout:
    def __init__(self, cfg: RegistryConfig, model: Path, running: Callable[[], str], node: str):
        self.cfg, self.model, self.running, self.node = cfg, Path(model), running, node
        self.token = read_secret(cfg.token_file, "embedder.registry.token_file", "token")
        self.installed = self.failed = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="edge-rollout", daemon=True)

    def start(self) -> None:
        self._thread.start()
        log.info("model rollout: following the production version of %s every %g s", self.cfg.url, self.cfg.poll_s)

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=self.cfg.timeout_s)

    def _run(self) -> None:
        while not self._stop.wait(self.cfg.poll_s):
            self.check()

    def check(self) -> str | None:
        """One poll: the version installed, or None (up to date, no production version, or a failure, logged)."""
        try:
            production = self._get_json(f"/api/v1/models/production?node={urllib.parse.quote(self.node)}")
            if production is None or production["version"] == self.running():
                return None
            self._install(production)
        except (RolloutError, OSError, ValueError, KeyError, TypeError) as e:
            self.failed += 1
            log.error("model rollout failed, keeping %s: %s", self.running(), e)
            return None
        self.installed += 1
        return production["version"]

    def _get(self, path: str) -> urllib.request.Request:
        return urllib.request.Request(self.cfg.url.rstrip("/") + path, headers={"Authorization": f"Bearer {self.token}"})

    def _get_json(self, path: str) -> dict | None:
        try:
            with urllib.request.urlopen(self._get(path), timeout=30) as res:
                return json.loads(res.read(1 << 20))
        except urllib.error.HTTPError as e:
            if e.code == 404:
                return None  # no production version yet
            raise RolloutError(f"{self.cfg.url}{path}: HTTP {e.code} {e.reason}") from None

    def _install(self, production: dict) -> None:
        version, sha, size = production["version"], production["sha256"], int(production["bytes"])
        if not set(version) <= _VERSION_CHARS or not 0 < size <= MAX_MODEL_BYTES:
            raise RolloutError(f"the registry's answer is not a model: version {version!r}, {size} bytes")
        tmp = self.model.with_name(f".{self.model.name}.{self.node}.{version}.download")  # edges may share a folder
        try:
            self._download(f"/api/v1/models/{urllib.parse.quote(version)}/onnx", tmp, size, sha)
            loaded = Embedder(tmp, device="cpu").version  # as the node will load it: a broken file fails here
            if loaded != version:
                raise RolloutError(f"the file of {version} says it is version {loaded}")
            os.replace(tmp, self.model)  # the embedder notices the new file at its next reload check
        except ModelError as e:
            raise RolloutError(str(e)) from None
        finally:
            tmp.unlink(missing_ok=True)
        log.info("model rollout: %s downloaded and verified (sha256 %s); the embedder reloads it", version, sha[:12])

    def _download(self, path: str, out: Path, size: int, sha: str) -> None:
        with urllib.request.urlopen(self._get(path), timeout=self.cfg.timeout_s) as res:
            try:
                copy_verified(res, out, size, sha, path)
            except ValueError as e:
                raise RolloutError(f"{e}: not installed") from None
