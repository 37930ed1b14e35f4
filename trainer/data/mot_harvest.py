"""A labelled MOT sequence written as an edge harvest: ground-truth tracks as tracklets, for checks against labels.

A site's harvest has tracker ids; a MOT sequence's ground truth is the same thing without tracker
errors. Writing it in the harvest format (`crossview.kernel.harvest`) lets whatever reads harvests
(calibration, quantisation) run on it, and lets a benchmark score the result with the identities.

| what       | how                                                                                      |
|------------|------------------------------------------------------------------------------------------|
| crops      | `mot_crops` (the gt boxes kept by the re-ID loader), every `frame_step`-th frame          |
| sidecars   | node `node`, camera the sequence's name, track = MOT id, ts = `start + (frame - 1) / fps`; |
|            | box (0, 0, w, h): the crop's own extent, as the crop cache keeps no frame position       |
| returns    | `{crop path: MOT id}`                                                                     |

    ids = mot_harvest(Path("../shared/data/TUD-Stadtmitte"), Path("runs/cache"), Path("runs/gt-harvest"))
"""

from __future__ import annotations

import shutil
from pathlib import Path

import cv2

from crossview.kernel.harvest import Sidecar, encode, sidecar_path
from crossview.trainer.data.mot import frames_source, mot_crops

START_TS = 1_700_000_000.0  # any fixed Unix time: only differences between crops mean anything


def source_fps(seq_dir: Path) -> float:
    """The sequence's frame rate: its video's, or MOT's 25 fps default for image folders without one."""
    source = frames_source(seq_dir)
    if source.is_dir():
        return 25.0
    cap = cv2.VideoCapture(str(source))
    fps = cap.get(cv2.CAP_PROP_FPS)
    cap.release()
    return fps if fps > 0 else 25.0


def mot_harvest(seq_dir: Path, cache_dir: Path, out: Path, *, node: str = "gt", frame_step: int = 1) -> dict[Path, int]:
    """Write the sequence's gt crops under `out` in the harvest format (replacing `out`); {crop: MOT id}."""
    seq_dir = Path(seq_dir)
    fps, camera = source_fps(seq_dir), seq_dir.name
    shutil.rmtree(out, ignore_errors=True)
    ids = {}
    for s in mot_crops(seq_dir, cache_dir, frame_step=frame_step):
        h, w = cv2.imread(str(s.path)).shape[:2]
        sidecar = Sidecar(node, camera, START_TS + (s.frame - 1) / fps, s.frame, s.pid, (0.0, 0.0, w, h), 1.0, "gt")
        path = sidecar.name.path(out)
        path.parent.mkdir(parents=True, exist_ok=True)
        sidecar_path(path).write_bytes(encode(sidecar))
        shutil.copyfile(s.path, path)
        ids[path] = s.pid
    return ids
