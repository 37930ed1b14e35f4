"""TUD-Stadtmitte as a site would harvest it, for the calibration and int8 benchmarks.

| function       | what                                                                                   |
|----------------|----------------------------------------------------------------------------------------|
| `edge_harvest` | the edge node (HOG + tracker, harvesting on) over `TUD-Stadtmitte.mp4`: crops + sidecars |
| `gt_harvest`   | the sequence's ground-truth boxes in the same format (`trainer.data.mot_harvest`), with ids |
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
SEQ = REPO.parent / "shared" / "data" / "TUD-Stadtmitte"
log = logging.getLogger("bench")


def edge_harvest(work: Path, model: Path) -> Path:
    """Run the edge node over every frame of the sequence with harvesting on; the harvest folder (reused if there)."""
    from crossview.edge.node import EdgeNode
    from crossview.kernel.config import load_edge_config

    out = work / "edge-harvest"
    if any(out.rglob("*.jpg")):
        return out
    cfg = {
        "node_id": "site-edge",
        "cameras": [{"id": "stadtmitte", "source": str(SEQ / "TUD-Stadtmitte.mp4"), "fps": 25}],
        "detector": {"kind": "hog", "hog": {"upscale": 1.0}},  # street-level people are large enough
        "embedder": {"model": str(model)},
        "publisher": {"endpoint": "tcp://127.0.0.1:5598", "security": {"mode": "plain"}},  # no matcher: spooled
        "harvest": {"enabled": True, "dir": str(out), "every_k": 2, "min_height": 48, "min_score": 0.0},
    }
    path = work / "edge.yaml"
    path.write_text(yaml.safe_dump(cfg))
    t0 = time.perf_counter()
    EdgeNode(load_edge_config(path)).run()
    log.info("edge harvest: %d crops in %.0f s", len(list(out.rglob("*.jpg"))), time.perf_counter() - t0)
    return out


def gt_harvest(work: Path) -> tuple[Path, dict[Path, int]]:
    from crossview.trainer.data.mot_harvest import mot_harvest

    out = work / "gt-harvest"
    return out, mot_harvest(SEQ, work / "cache", out)
