"""How well TCAP's swap cuts (`trainer.tracklets.split_at_swaps`) undo the tracker's swaps, on real edge harvests.

The edge node (HOG + tracker, as a site runs it) harvests TUD-Stadtmitte and TUD-Campus; each crop gets the
ground-truth person its box overlaps (IoU >= 0.4, `site_harvest.edge_identities`; unmatched crops are left out of
the scores). The crops are embedded by each `--models` ONNX file, and the tracklets are cut as TCAP cuts them.
Scores, before and after the cuts:

- purity: the share of matched crops whose segment's most common person is their own (1.0: no segment mixes people);
- mixed: segments holding at least `min_crops` crops of each of two people (a swap the clustering would inherit).

    python bench/swap_cuts.py --out docs/results.md
    python bench/swap_cuts.py --models runs/bench/tud-adfl-s1/tud-adfl-s1.onnx     # a trained model's features
"""

from __future__ import annotations

import argparse
from pathlib import Path

import cv2
import numpy as np
from docsection import publish, table_head
from site_harvest import REPO, edge_harvest, edge_identities

from crossview.trainer.kreciprocal import l2_normalise
from crossview.trainer.tracklets import cooccurring, split_at_swaps, swap_threshold, tracklets_of

WORK = REPO / "runs" / "bench" / "swap"
DATA = REPO.parent / "shared" / "data"
SECTION = "## Tracker swaps cut by TCAP on real edge harvests (bench/swap_cuts.py)"
MIN_IOU, MIN_CROPS = 0.4, 4  # TCAP's tcap.min_crops: the shortest piece a cut leaves


def harvest(seq: str) -> tuple[list[Path], np.ndarray, np.ndarray, np.ndarray]:
    """(crops, tracks, frames, gt person or -1) of the sequence's edge harvest, made once."""
    from crossview.kernel.harvest import read_sidecar
    from crossview.trainer.export import build_default_embedder

    work = WORK / seq
    model = work / "mobilenetv2-imagenet.onnx"  # the edge needs one to run; the crops do not depend on it
    if not model.is_file():
        work.mkdir(parents=True, exist_ok=True)
        build_default_embedder(model)
    crops = sorted(edge_harvest(work, model, DATA / seq).rglob("*.jpg"))
    gt = edge_identities(crops, MIN_IOU, DATA / seq)
    sidecars = [read_sidecar(c) for c in crops]
    return (crops, np.array([s.track for s in sidecars]), np.array([s.frame for s in sidecars]),
            np.array([gt.get(c, -1) for c in crops]))


def embed(model: Path, crops: list[Path]) -> np.ndarray:
    from crossview.kernel.embedder import Embedder

    emb = Embedder(model)
    out = [emb.embed([cv2.imread(str(c)) for c in crops[i:i + 64]]) for i in range(0, len(crops), 64)]
    return l2_normalise(np.concatenate(out).astype(np.float32))


def purity(segments: list[np.ndarray], gt: np.ndarray) -> float:
    own = total = 0
    for s in segments:
        people = gt[s][gt[s] >= 0]
        if len(people):
            own, total = own + np.bincount(people).max(), total + len(people)
    return own / total if total else float("nan")


def mixed(segments: list[np.ndarray], gt: np.ndarray) -> int:
    return sum(int((np.bincount(gt[s][gt[s] >= 0]) >= MIN_CROPS).sum() >= 2) for s in segments if (gt[s] >= 0).any())


def score(features: np.ndarray, tracks: np.ndarray, frames: np.ndarray, gt: np.ndarray) -> dict:
    cams = np.zeros(len(tracks), np.int64)
    tracklets = tracklets_of(cams, tracks, frames)
    pairs = cooccurring(cams, frames, tracklets)
    segments, cuts = split_at_swaps(features, tracklets, pairs, MIN_CROPS)
    return {"tracklets": len(tracklets), "pairs": len(pairs), "threshold": swap_threshold(features, tracklets, pairs, MIN_CROPS),
            "cuts": cuts, "purity": (purity(tracklets, gt), purity(segments, gt)),
            "mixed": (mixed(tracklets, gt), mixed(segments, gt))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", type=Path, help="ONNX embedders (default: the ImageNet MobileNetV2)")
    ap.add_argument("--sequences", nargs="+", default=["TUD-Stadtmitte", "TUD-Campus"])
    ap.add_argument("--out", type=Path, help="markdown file whose section is replaced (default: print only)")
    args = ap.parse_args()
    from crossview.kernel.runtime import offline_env, passive_threads

    offline_env()
    passive_threads()
    data = {seq: harvest(seq) for seq in args.sequences}
    models = args.models or [WORK / args.sequences[0] / "mobilenetv2-imagenet.onnx"]
    lines = table_head(SECTION, ["features", "sequence", "crops (matched)", "tracklets", "co-occurring pairs",
                                 "threshold", "cuts", "purity before → after", "mixed segments before → after"])
    for model in models:
        for seq, (crops, tracks, frames, gt) in data.items():
            r = score(embed(model, crops), tracks, frames, gt)
            threshold = "-" if r["threshold"] is None else f"{r['threshold']:.3f}"
            lines.append(f"| `{model.name}` | {seq} | {len(crops)} ({int((gt >= 0).sum())}) | {r['tracklets']} | "
                         f"{r['pairs']} | {threshold} | {r['cuts']} | {r['purity'][0]:.3f} → {r['purity'][1]:.3f} | "
                         f"{r['mixed'][0]} → {r['mixed'][1]} |")
    publish(args.out, SECTION, lines)


if __name__ == "__main__":
    main()
