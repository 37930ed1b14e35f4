"""The full site loop on real footage: the edge node harvests person crops from vtest.avi, the trainer adapts
(TCAP from TUD-Campus, TUD-Stadtmitte and PKU-Reid with BatchNorm per domain, or another method) from the
labelled sources onto them, and the exported model loads on the edge again.

vtest.avi has no labels, so the report is what the loop itself can tell: crops harvested, the target's
pseudo labels per iteration (tracklet segments, swap cuts, co-occurring pairs, the learnt radius, clusters,
outliers, cluster sizes, NMI between consecutive pseudo labels), and the time of each stage.

    python bench/adapt_vtest.py --out docs/results.md      # appends/replaces its section; ~40 min on 2 cores
    python bench/adapt_vtest.py --skip-harvest --variant arn --out docs/results.md   # ARN's row, its own section

`--variant` takes any `bench/adapt_tud.py` variant that starts from ImageNet weights (`tcap-pku-dsbn-256-decay` by
default, `tcap-pku-dsbn-256` without the lr decay, `tcap-pku-dsbn` at 128x64, `tcap`, `daam`, `daal`, `arn`, `edaan`, ...), its settings laid over the same base; methods without
pseudo labels report no clustering.
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
# The best 3-seed mean on TUD from the sources (docs/results.md): TCAP from TUD-Campus + PKU-Reid with
# BatchNorm per domain, at the 256x128 input the edge's default embedder runs at, each adaptation iteration at half
# the lr of the one before (ahead of the same without it on each of the 3 seeds).
DEFAULT = "tcap-pku-dsbn-256-decay"


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


def train(variant: str) -> tuple[Path, list[dict], float, str]:
    """`variant` as the TUD rows run it (`adapt_tud.VARIANTS`), sources TUD-Campus + TUD-Stadtmitte (+ whatever the
    variant's `source.also` adds: PKU-Reid for `*-pku*`), onto the harvest; returns the sources in words too."""
    from adapt_tud import VARIANTS

    from crossview.trainer.config import load_train_config, overlay
    from crossview.trainer.engine import Trainer

    base = yaml.safe_load((REPO / "bench" / "train" / "tud-daam.yaml").read_text())
    cfg = overlay(base, VARIANTS[variant][1])
    cfg.update(name=f"site-{variant}", output_dir=str(WORK / variant), cache_dir=str(REPO / "runs" / "cache"),
               target={"kind": "harvest", "root": str(WORK / "harvest")})
    cfg["source"] = {**cfg["source"], "root": str(SHARED)}  # both TUD sequences: 18 identities
    (WORK / variant / "metrics.jsonl").unlink(missing_ok=True)
    (WORK / variant / "last.pt").unlink(missing_ok=True)
    path = WORK / "train.yaml"
    path.write_text(yaml.safe_dump(cfg))
    t0 = time.perf_counter()
    trainer = Trainer(load_train_config(path))
    names = ["TUD-Campus", "TUD-Stadtmitte", *(Path(a["root"]).name for a in cfg["source"].get("also", []))]
    sources = f"{' + '.join(names)} (labelled, {trainer.data.num_source_ids} identities)"
    onnx_path = trainer.run()
    recs = [json.loads(line) for line in (WORK / variant / "metrics.jsonl").read_text().splitlines()]
    return onnx_path, recs, time.perf_counter() - t0, sources


def deployable(onnx_path: Path) -> tuple[str, int]:
    """The exported model as the edge loads it, embedding harvested crops."""
    from crossview.kernel.embedder import Embedder

    crops = [cv2.imread(str(p)) for p in sorted((WORK / "harvest").rglob("*.jpg"))[:64]]
    emb = Embedder(onnx_path)
    return emb.version, emb.embed(crops).shape[1]


def section(variant: str) -> str:
    return SECTION if variant == DEFAULT else (f"## Site loop with `{variant}`: vtest.avi harvested crops as the target "
                                              f"(bench/adapt_vtest.py --variant {variant})")


TCAP_COLUMNS = ("segments", "splits", "cannot_link_pairs", "eps")  # TCAP's tracklet records, beside every method's


def cluster_table(recs: list[dict]) -> list[str]:
    """The target's pseudo labels before each iteration; TCAP's tracklet columns where its records carry them."""
    clusters = [r for r in recs if r["event"] == "cluster"]
    if not clusters:
        return ["No pseudo labels: this method adapts without clustering the target."]
    tcap = all(k in clusters[0] for k in TCAP_COLUMNS)
    head = ["iteration", *(("segments", "swap cuts", "cannot-link pairs", "eps") if tcap else ()), "clusters", "outliers",
            "cluster size min / median / max", "NMI vs previous", "seconds"]
    lines = [("Pseudo labels before each iteration (segments: tracklets after the swap cuts, in halves; cannot-link: "
              "pairs of segments seen in one frame; eps: the radius learnt from them):" if tcap else
              "Pseudo labels before each iteration:"), "", "| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
    for r in clusters:
        sizes = f"{r['size_min']} / {r['size_median']:.0f} / {r['size_max']}" if "size_min" in r else "-"
        cells = [r["iteration"], *(r[k] for k in TCAP_COLUMNS if tcap), r["clusters"],
                 f"{100 * r['outlier_share']:.1f}%", sizes, r.get("nmi", "-"), r.get("seconds", "-")]
        lines.append("| " + " | ".join(map(str, cells)) + " |")
    return lines


def report(variant: str, frames: dict, harvest_s: float, crops: int, recs: list[dict], train_s: float, sources: str,
           version: str, dim: int) -> str:
    from adapt_tud import VARIANTS

    lines = [section(variant), "",
             f"`python bench/adapt_vtest.py {' '.join(sys.argv[1:])}`, {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC, "
             f"{os.cpu_count()} CPU cores, no GPU, load average {os.getloadavg()[0]:.1f} at the end.", "",
             (f"- Edge node over `vtest.avi` at 5 fps with the HOG people detector: {sum(frames.values())} frames in "
              f"{harvest_s:.0f} s, **{crops} crops harvested** (every 2nd frame of a track, at least 48 px high)."
              if frames else f"- The harvest of an earlier run reused (`--skip-harvest`): **{crops} crops**."),
             f"- Trainer: {VARIANTS[variant][0]} (`bench/adapt_tud.py`'s `{variant}` settings), sources {sources}, "
             f"target the harvested crops and their sidecars (no labels). "
             f"{train_s:.0f} s in all.",
             f"- Exported `{version}`, loaded by the edge embedder: {dim}-d embeddings of harvested crops.", "",
             *cluster_table(recs)]
    epochs = [r for r in recs if r["event"] == "epoch" and r["stage"] == "adapt"]
    if epochs:
        last = epochs[-1]
        terms = ", ".join(f"{k} {v:.3f}" for k, v in last.items() if k not in EPOCH_FIELDS and isinstance(v, float))
        lines += ["", f"Last adaptation epoch: loss {last['loss']:.3f} ({terms}), {last['images_per_s']} images/s."]
    return "\n".join(lines) + "\n"


EPOCH_FIELDS = {"time", "loss", "lr", "images", "images_per_s", "seconds"}  # an epoch record's bookkeeping, not a loss term


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, help="markdown file whose section is replaced (default: print only)")
    ap.add_argument("--skip-harvest", action="store_true", help="reuse runs/bench/vtest/harvest")
    ap.add_argument("--variant", default=DEFAULT, help="a bench/adapt_tud.py variant that starts from ImageNet weights")
    args = ap.parse_args()
    from adapt_tud import INIT_FROM, VARIANTS

    if args.variant not in VARIANTS or args.variant in INIT_FROM:
        ap.error(f"--variant {args.variant}: not one of adapt_tud's variants that start from ImageNet weights")
    from crossview.kernel.runtime import offline_env, passive_threads, setup_logging

    offline_env()
    passive_threads()
    setup_logging()
    frames, harvest_s = ({}, 0.0) if args.skip_harvest else harvest()
    crops = len(list((WORK / "harvest").rglob("*.jpg")))
    onnx_path, recs, train_s, sources = train(args.variant)
    text = report(args.variant, frames, harvest_s, crops, recs, train_s, sources, *deployable(onnx_path))
    if args.out:
        write_section(args.out, section(args.variant), text)
    print(text)


if __name__ == "__main__":
    main()
