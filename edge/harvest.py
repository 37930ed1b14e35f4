"""Saves person crops from the site for the trainer's re-adaptation, within a disk quota.

| what      | how                                                                            |
|-----------|--------------------------------------------------------------------------------|
| sampling  | every k-th sighting of a track, only crops at least `min_height` px and `min_score` |
| format    | `crossview.kernel.harvest`: `<dir>/<camera>/<node>_<camera>_t<track>_f<frame>.jpg` + a `.json` sidecar |
| quota     | existing files count toward `quota_mb`; once reached, harvesting stops and says so |

    h = Harvester(HarvestConfig(enabled=True, dir=Path("harvest")), node_id="edge-1")
    if h.wants(track.sightings, box_height, score):
        h.save(camera, track_id, frame.index, frame.ts, crop, box, score, embedder.version)
"""

from __future__ import annotations

import logging
from pathlib import Path

import cv2
import numpy as np

from crossview.kernel.config import HarvestConfig
from crossview.kernel.harvest import Sidecar, encode, sidecar_path

log = logging.getLogger(__name__)


def _dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.exists() else 0


class Harvester:
    def __init__(self, cfg: HarvestConfig, node_id: str):
        self.cfg, self.node_id = cfg, node_id
        self.quota = int(cfg.quota_mb * 1024 * 1024)
        self.used = _dir_bytes(cfg.dir)
        self.saved = 0
        self.full = False
        log.info("harvesting crops into %s (%.1f of %.0f MB used)", cfg.dir, self.used / 2**20, cfg.quota_mb)

    def wants(self, sightings: int, height: float, score: float) -> bool:
        c = self.cfg
        return not self.full and sightings % c.every_k == 1 % c.every_k and height >= c.min_height and score >= c.min_score

    def save(self, camera: str, track: int, frame: int, ts: float, crop: np.ndarray, box, score: float, model: str) -> bool:
        ok, jpg = cv2.imencode(".jpg", crop, [cv2.IMWRITE_JPEG_QUALITY, self.cfg.jpeg_quality])
        if not ok:
            return False
        sidecar = Sidecar(self.node_id, camera, ts, frame, track, tuple(box), score, model)
        meta = encode(sidecar)
        if self.used + len(jpg) + len(meta) > self.quota:
            self.full = True
            log.warning("harvest quota of %.0f MB reached in %s: no more crops are saved", self.cfg.quota_mb, self.cfg.dir)
            return False
        path = sidecar.name.path(self.cfg.dir)
        path.parent.mkdir(parents=True, exist_ok=True)
        # Sidecar first: a reader that finds the image can rely on its metadata being there.
        sidecar_path(path).write_bytes(meta)
        path.write_bytes(jpg.tobytes())
        self.used += len(jpg) + len(meta)
        self.saved += 1
        return True
