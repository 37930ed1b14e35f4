"""Saves person crops from the site for the trainer's re-adaptation, within a disk quota.

| what      | how                                                                            |
|-----------|--------------------------------------------------------------------------------|
| sampling  | every k-th sighting of a track, only crops at least `min_height` px and `min_score` |
| format    | `crossview.kernel.harvest`: `<dir>/<camera>/<node>_<camera>_t<track>_f<frame>.jpg` + a `.json` sidecar |
| quota     | existing files count toward `quota_mb`; once reached, harvesting pauses and says so, until |
|           | `release(bytes)` (the uploader, `edge.uploader`, once the matcher has crops) frees enough |
| failures  | a crop that cannot be written (folder unwritable or a file, disk full) is logged, counted in |
|           | `failed`, and harvesting pauses a minute before trying again: the node detects and publishes on |

    h = Harvester(HarvestConfig(enabled=True, dir=Path("harvest")), node_id="edge-1")
    if h.wants(track.sightings, box_height, score):
        h.save(camera, track_id, frame.index, frame.ts, crop, box, score, embedder.version)
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from pathlib import Path

import cv2
import numpy as np

from crossview.kernel.config import HarvestConfig
from crossview.kernel.harvest import Sidecar, encode, sidecar_path

log = logging.getLogger(__name__)

_PAUSE_S = 60.0  # after a failed write: also how often a lasting failure is logged


def _dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.exists() else 0


class Harvester:
    def __init__(self, cfg: HarvestConfig, node_id: str):
        self.cfg, self.node_id = cfg, node_id
        self.quota = int(cfg.quota_mb * 1024 * 1024)
        self.used = _dir_bytes(cfg.dir)
        self.saved = 0
        self.failed = 0  # crops that could not be written
        self.full = False
        self._paused_until = 0.0  # monotonic; after a failed write
        self._lock = threading.Lock()  # the uploader's thread releases what the node's loop uses
        log.info("harvesting crops into %s (%.1f of %.0f MB used)", cfg.dir, self.used / 2**20, cfg.quota_mb)

    def wants(self, sightings: int, height: float, score: float) -> bool:
        c = self.cfg
        return (not self.full and time.monotonic() >= self._paused_until and sightings % c.every_k == 1 % c.every_k
                and height >= c.min_height and score >= c.min_score)

    def save(self, camera: str, track: int, frame: int, ts: float, crop: np.ndarray, box, score: float, model: str) -> bool:
        ok, jpg = cv2.imencode(".jpg", crop, [cv2.IMWRITE_JPEG_QUALITY, self.cfg.jpeg_quality])
        if not ok:
            return False
        sidecar = Sidecar(self.node_id, camera, ts, frame, track, tuple(box), score, model)
        meta = encode(sidecar)
        with self._lock:
            if self.used + len(jpg) + len(meta) > self.quota:
                self.full = True
                log.warning("harvest quota of %.0f MB reached in %s: no crops are saved until space is freed",
                            self.cfg.quota_mb, self.cfg.dir)
                return False
            self.used += len(jpg) + len(meta)
        path = sidecar.name.path(self.cfg.dir)
        tmp = path.with_name(f".{path.name}.tmp")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            # Sidecar first, the image renamed into place whole: a reader (the uploader) that finds the image finds all
            # of it, and its metadata.
            sidecar_path(path).write_bytes(meta)
            tmp.write_bytes(jpg.tobytes())
            os.replace(tmp, path)
        except OSError as e:
            self._failed(e, len(jpg) + len(meta), (tmp, sidecar_path(path)))
            return False
        self.saved += 1
        return True

    def _failed(self, e: OSError, nbytes: int, written) -> None:
        """A crop not written: harvesting pauses, since the next would fail alike; the node goes on without it."""
        for p in written:  # a sidecar without its image, or half an image (a full disk)
            with contextlib.suppress(OSError):
                p.unlink(missing_ok=True)
        with self._lock:
            self.used -= nbytes
            self.failed += 1
        self._paused_until = time.monotonic() + _PAUSE_S
        log.error("harvest: cannot write crops into harvest.dir %s (%s); harvesting paused for %g s, detection and "
                  "publishing go on; %d crops failed so far", self.cfg.dir, e, _PAUSE_S, self.failed)

    def release(self, nbytes: int) -> None:
        """`nbytes` of the folder were deleted; harvesting resumes once a tenth of the quota is free again."""
        with self._lock:
            self.used = max(self.used - nbytes, 0)
            if self.full and self.used < 0.9 * self.quota:
                self.full = False
                log.info("harvest: %.1f of %.0f MB used in %s, saving crops again", self.used / 2**20, self.cfg.quota_mb,
                         self.cfg.dir)
