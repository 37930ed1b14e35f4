"""TUD-Stadtmitte (or TUD-Campus) as a site would harvest it, for the calibration, int8, adaptation and swap-cut
benchmarks.

| function       | what                                                                                   |
|----------------|----------------------------------------------------------------------------------------|
| `edge_harvest` | the edge node (HOG + tracker, harvesting on) over a sequence's video (TUD-Stadtmitte by default): crops + sidecars |
| `gt_harvest`   | the sequence's ground-truth boxes in the same format (`trainer.data.mot_harvest`), with ids |
| `labelled_edge_harvest` | the edge harvest with each crop's track replaced by the ground-truth identity it overlaps: the tracker made perfect, for the labels' ceiling |
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
SEQ = REPO.parent / "shared" / "data" / "TUD-Stadtmitte"
log = logging.getLogger("bench")


def edge_harvest(work: Path, model: Path, seq: Path = SEQ, tracker: dict | None = None, every_k: int = 2,
                 fps: float = 25) -> Path:
    """Run the edge node over `seq` at `fps` (25: every frame) with harvesting on (every `every_k`-th crop of a
    track, the `tracker` section's settings); the harvest folder (reused if there)."""
    from crossview.edge.node import EdgeNode
    from crossview.kernel.config import load_edge_config

    out = work / "edge-harvest"
    if any(out.rglob("*.jpg")):
        return out
    cfg = {
        "node_id": "site-edge",
        "cameras": [{"id": seq.name.removeprefix("TUD-").lower(), "source": str(seq / f"{seq.name}.mp4"), "fps": fps}],
        "detector": {"kind": "hog", "hog": {"upscale": 1.0}},  # street-level people are large enough
        "embedder": {"model": str(model)},
        "publisher": {"endpoint": "tcp://127.0.0.1:5598", "security": {"mode": "plain"}},  # no matcher: spooled
        "harvest": {"enabled": True, "dir": str(out), "every_k": every_k, "min_height": 48, "min_score": 0.0},
        "tracker": tracker or {},
    }
    work.mkdir(parents=True, exist_ok=True)
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


def edge_identities(crops: list[Path], min_iou: float, seq: Path = SEQ) -> dict[Path, int]:
    """Each edge crop's gt identity: the gt box of its frame it overlaps most, by IoU >= `min_iou` (others are left
    out; HOG's boxes are looser than MOT's)."""
    from crossview.kernel.harvest import read_sidecar
    from crossview.trainer.data.mot import read_gt

    by_frame: dict[int, list] = {}
    for b in read_gt(seq / "gt" / "gt.txt"):
        by_frame.setdefault(b.frame, []).append(b)
    ids = {}
    for crop in crops:
        s = read_sidecar(crop)
        gts = by_frame.get(s.frame + 1, [])  # the edge counts frames from 0, MOT from 1
        ious = [_iou(s.box, (b.left, b.top, b.left + b.width, b.top + b.height)) for b in gts]
        if ious and max(ious) >= min_iou:
            ids[crop] = gts[ious.index(max(ious))].pid
    return ids


def labelled_edge_harvest(work: Path, min_iou: float = 0.4) -> Path:
    """A copy of `edge_harvest`'s crops whose sidecar track is the crop's `edge_identities`; crops that match nobody
    (false detections) are left out."""
    src, out = work / "edge-harvest", work / "labelled-edge-harvest"
    shutil.rmtree(out, ignore_errors=True)
    for crop, pid in edge_identities(sorted(src.rglob("*.jpg")), min_iou).items():
        dest = out / crop.relative_to(src)
        dest.parent.mkdir(parents=True, exist_ok=True)
        meta = json.loads(crop.with_suffix(".json").read_text())
        dest.with_suffix(".json").write_text(json.dumps({**meta, "track": pid}))
        shutil.copyfile(crop, dest)
    return out


def _iou(a, b) -> float:
    w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - w * h
    return w * h / union if union > 0 else 0.0
