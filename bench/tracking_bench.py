"""The edge tracker's identity errors on real footage: ByteTrack, BoT-SORT by boxes, and BoT-SORT with appearance
(`tracker.appearance`, the edge's own re-ID vectors), scored against the MOT ground truth.

The edge node (HOG + the tracker, as a site runs it) goes over TUD-Stadtmitte and TUD-Campus (25 fps videos) at
each `--fps` (25: every frame; 5: the edge's default camera rate) and keeps every tracked box (harvest `every_k` 1). Each box gets the ground-truth person it overlaps (IoU >= 0.4,
`site_harvest.edge_identities`; boxes matching nobody are left out of the scores):

- ID switches: for each person, the times their box's track differs from the one before (MOT's IDSW);
- purity: the share of matched boxes whose track's most common person is their own (1.0: no track mixes people);
- mixed: tracks holding at least 4 boxes of each of two people (the swaps TCAP's pseudo labels inherit);
- tracks per person: how many tracks each person is split into (fragmentation).

    python bench/tracking_bench.py --out docs/benchmarks.md
    python bench/tracking_bench.py --model runs/bench/vtest/tcap-pku-dsbn/site-tcap-pku-dsbn.onnx   # a site model
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
from docsection import publish, table_head
from site_harvest import REPO, edge_harvest, edge_identities
from swap_cuts import MIN_IOU, mixed, purity

WORK = REPO / "runs" / "bench" / "tracking"
DATA = REPO.parent / "shared" / "data"
SECTION = "## Tracker identity errors on real footage (bench/tracking_bench.py)"
TRACKERS = {
    "bytetrack": {"kind": "bytetrack"},
    "botsort": {"kind": "botsort"},
    "botsort-appearance": {"kind": "botsort", "appearance": True},
}


def tracked_boxes(seq: str, name: str, model: Path, fps: float) -> tuple[np.ndarray, np.ndarray, np.ndarray, float]:
    """(tracks, frames, gt person or -1) of every box the edge tracked in `seq` at `fps` with tracker `name`, and
    the node's seconds (0 when the run was reused)."""
    from crossview.kernel.harvest import read_sidecar

    work = WORK / model.stem / f"{fps:g}fps" / name / seq
    t0 = time.perf_counter()
    fresh = not (work / "edge-harvest").is_dir()
    crops = sorted(edge_harvest(work, model, DATA / seq, TRACKERS[name], every_k=1, fps=fps).rglob("*.jpg"))
    seconds = time.perf_counter() - t0 if fresh else 0.0
    gt = edge_identities(crops, MIN_IOU, DATA / seq)
    sidecars = [read_sidecar(c) for c in crops]
    return (np.array([s.track for s in sidecars]), np.array([s.frame for s in sidecars]),
            np.array([gt.get(c, -1) for c in crops]), seconds)


def id_switches(tracks: np.ndarray, frames: np.ndarray, gt: np.ndarray) -> int:
    n = 0
    for pid in np.unique(gt[gt >= 0]):
        sel = np.flatnonzero(gt == pid)
        t = tracks[sel[np.argsort(frames[sel], kind="stable")]]
        n += int((t[1:] != t[:-1]).sum())
    return n


def score(tracks: np.ndarray, frames: np.ndarray, gt: np.ndarray) -> dict:
    segments = [np.flatnonzero(tracks == t) for t in np.unique(tracks)]
    people = np.unique(gt[gt >= 0])
    per_person = [len(np.unique(tracks[gt == pid])) for pid in people]
    return {"boxes": len(tracks), "matched": int((gt >= 0).sum()), "tracks": len(segments),
            "switches": id_switches(tracks, frames, gt), "purity": purity(segments, gt),
            "mixed": mixed(segments, gt), "per_person": float(np.mean(per_person)) if per_person else float("nan")}


def row(seq: str, fps: float, name: str, model: Path) -> str:
    *boxes, seconds = tracked_boxes(seq, name, model, fps)
    r = score(*boxes)
    return (f"| {seq} | {fps:g} | `{name}` | {r['boxes']} ({r['matched']}) | {r['tracks']} | {r['switches']} | "
            f"{r['purity']:.3f} | {r['mixed']} | {r['per_person']:.1f} | {f'{seconds:.0f}' if seconds else 'reused'} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, help="the edge's ONNX embedder (default: the ImageNet MobileNetV2)")
    ap.add_argument("--sequences", nargs="+", default=["TUD-Stadtmitte", "TUD-Campus"])
    ap.add_argument("--fps", nargs="+", type=float, default=[25.0, 5.0], help="camera rates to track at")
    ap.add_argument("--trackers", nargs="+", default=list(TRACKERS), choices=list(TRACKERS))
    ap.add_argument("--out", type=Path, help="markdown file whose section is replaced (default: print only)")
    args = ap.parse_args()
    from crossview.kernel.runtime import offline_env, passive_threads
    from crossview.trainer.export import build_default_embedder

    offline_env()
    passive_threads()
    model = args.model and args.model.resolve()  # the edge config lies elsewhere: relative paths resolve there
    if model is None:
        model = WORK / "mobilenetv2-imagenet.onnx"
        if not model.is_file():
            WORK.mkdir(parents=True, exist_ok=True)
            build_default_embedder(model)
    lines = table_head(SECTION, ["sequence", "fps", "tracker", "boxes (matched)", "tracks", "ID switches", "purity",
                                 "mixed tracks", "tracks per person", "node seconds"],
                       f"Embedder `{model.name}`; HOG at upscale 1.0.")
    for seq in args.sequences:
        for fps in args.fps:
            for name in args.trackers:
                lines.append(row(seq, fps, name, model))
    publish(args.out, SECTION, lines)


if __name__ == "__main__":
    main()
