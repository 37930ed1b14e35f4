"""The full site loop on real footage: the edge node harvests person crops from vtest.avi, the trainer adapts
(TCAP) from the labelled TUD sequences onto them, and the exported model loads on the edge again.

vtest.avi has no labels, so the report is what the loop itself can tell: crops harvested, the target's
pseudo labels per iteration (tracklet segments, swap cuts, co-occurring pairs, the learnt radius, clusters,
outliers, cluster sizes, NMI between consecutive pseudo labels), and the time of each stage.

    python bench/adapt_vtest.py --out docs/results.md      # appends/replaces its section; ~20 min on 2 cores
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import cv2
import yaml
from docsection import write_section

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"
WORK = REPO / "runs" / "bench" / "vtest"
SECTION = "## Site loop: vtest.avi harvested crops as the target (bench/adapt_vtest.py)"


def harvest() -> tuple[dict, float]:
    """Run the edge node (HOG people detector: no YOLO weights ship offline) over vtest.avi with harvesting on."""
    from crossview.edge.node import EdgeNode
    from crossview.kernel.config import load_edge_config
    from crossview.trainer.export import build_default_embedder

    WORK.mkdir(parents=True, exist_ok=True)
    model = WORK / "mobilenetv2-imagenet.onnx"
    build_default_embedder(model)
    cfg = {
        "node_id": "site-edge",
        "cameras": [{"id": "vtest", "source": str(SHARED / "vtest.avi"), "fps": 5}],
        "detector": {"kind": "hog"},
        "embedder": {"model": str(model)},
        "publisher": {"endpoint": "tcp://127.0.0.1:5597", "security": {"mode": "plain"}},  # no matcher: spooled
        "harvest": {"enabled": True, "dir": str(WORK / "harvest"), "every_k": 2, "min_height": 48, "min_score": 0.0},
    }
    path = WORK / "edge.yaml"
    path.write_text(yaml.safe_dump(cfg))
    t0 = time.perf_counter()
    stats = EdgeNode(load_edge_config(path)).run()
    return {cid: s.frames for cid, s in stats.items()}, time.perf_counter() - t0


def train() -> tuple[Path, list[dict], float]:
    """TCAP as the TUD rows run it (`adapt_tud.TCAP`), sources TUD-Campus + TUD-Stadtmitte, onto the harvest. PKU-Reid
    stays out: beside it TCAP's adaptation fell below direct transfer on TUD (docs/results.md)."""
    from adapt_tud import TCAP

    from crossview.trainer.config import load_train_config, overlay
    from crossview.trainer.engine import Trainer

    base = yaml.safe_load((REPO / "bench" / "train" / "tud-daam.yaml").read_text())
    cfg = overlay(base, TCAP)
    cfg.update(name="site-tcap", output_dir=str(WORK / "run"), cache_dir=str(REPO / "runs" / "cache"),
               target={"kind": "harvest", "root": str(WORK / "harvest")})
    cfg["source"] = {**cfg["source"], "root": str(SHARED)}  # both TUD sequences: 18 identities
    (WORK / "run" / "metrics.jsonl").unlink(missing_ok=True)
    path = WORK / "train.yaml"
    path.write_text(yaml.safe_dump(cfg))
    t0 = time.perf_counter()
    onnx_path = Trainer(load_train_config(path)).run()
    recs = [json.loads(line) for line in (WORK / "run" / "metrics.jsonl").read_text().splitlines()]
    return onnx_path, recs, time.perf_counter() - t0


def deployable(onnx_path: Path) -> tuple[str, int]:
    """The exported model as the edge loads it, embedding harvested crops."""
    from crossview.kernel.embedder import Embedder

    crops = [cv2.imread(str(p)) for p in sorted((WORK / "harvest").rglob("*.jpg"))[:64]]
    emb = Embedder(onnx_path)
    return emb.version, emb.embed(crops).shape[1]


def report(frames: dict, harvest_s: float, crops: int, recs: list[dict], train_s: float, version: str, dim: int) -> str:
    lines = [SECTION, "",
             f"`python bench/adapt_vtest.py {' '.join(sys.argv[1:])}`, {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC, "
             f"{os.cpu_count()} CPU cores, no GPU, load average {os.getloadavg()[0]:.1f} at the end.", "",
             (f"- Edge node over `vtest.avi` at 5 fps with the HOG people detector: {sum(frames.values())} frames in "
              f"{harvest_s:.0f} s, **{crops} crops harvested** (every 2nd frame of a track, at least 48 px high)."
              if frames else f"- The harvest of an earlier run reused (`--skip-harvest`): **{crops} crops**."),
             f"- Trainer: TCAP (`bench/adapt_tud.py`'s `tcap` settings), sources TUD-Campus + TUD-Stadtmitte "
             f"(labelled, 18 identities), target the harvested crops and their sidecars (no labels). {train_s:.0f} s "
             f"in all.",
             f"- Exported `{version}`, loaded by the edge embedder: {dim}-d embeddings of harvested crops.", "",
             "Pseudo labels before each iteration (segments: tracklets after the swap cuts, in halves; cannot-link: "
             "pairs of segments seen in one frame; eps: the radius learnt from them):", "",
             "| iteration | segments | swap cuts | cannot-link pairs | eps | clusters | outliers | cluster size min / "
             "median / max | NMI vs previous | seconds |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in (r for r in recs if r["event"] == "cluster"):
        lines.append(f"| {r['iteration']} | {r['segments']} | {r['splits']} | {r['cannot_link_pairs']} | {r['eps']} | "
                     f"{r['clusters']} | {100 * r['outlier_share']:.1f}% | {r['size_min']} / {r['size_median']:.0f} / "
                     f"{r['size_max']} | {r.get('nmi', '-')} | {r['seconds']} |")
    epochs = [r for r in recs if r["event"] == "epoch" and r["stage"] == "adapt"]
    if epochs:
        last = epochs[-1]
        terms = ", ".join(f"{k} {v:.3f}" for k, v in last.items() if k.startswith(("source_", "memory", "proxy_", "cooccur")))
        lines += ["", f"Last adaptation epoch: loss {last['loss']:.3f} ({terms}), {last['images_per_s']} images/s."]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, help="markdown file whose section is replaced (default: print only)")
    ap.add_argument("--skip-harvest", action="store_true", help="reuse runs/bench/vtest/harvest")
    args = ap.parse_args()
    from crossview.kernel.runtime import offline_env, passive_threads, setup_logging

    offline_env()
    passive_threads()
    setup_logging()
    frames, harvest_s = ({}, 0.0) if args.skip_harvest else harvest()
    crops = len(list((WORK / "harvest").rglob("*.jpg")))
    onnx_path, recs, train_s = train()
    text = report(frames, harvest_s, crops, recs, train_s, *deployable(onnx_path))
    if args.out:
        write_section(args.out, SECTION, text)
    print(text)


if __name__ == "__main__":
    main()
