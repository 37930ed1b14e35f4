"""int8 vs fp32 embedder, one run: crops/s of the same model and mAP on TUD-Stadtmitte (fp16 alongside).

    python bench/int8_bench.py [--out docs/benchmarks.md]

| step        | what                                                                                       |
|-------------|--------------------------------------------------------------------------------------------|
| models      | the default ImageNet embedder (fp32); `crossview quantize` of it, calibrated on the site's   |
|             | edge harvest: as shipped (float stem searched) and all-int8 (`--float-stem 0`); an fp16     |
|             | conversion (onnxruntime.transformers.float16, float32 inputs and outputs kept); a trained  |
|             | checkpoint's export and its shipped int8, when `--checkpoint` exists                        |
| calibration | the edge node's harvest of TUD-Stadtmitte.mp4 (HOG + tracker), `bench/site_harvest.py`      |
| speed       | the edge `Embedder` (batch 32, CPU, the shipped session options) on the harvest's crops,     |
|             | preprocessing included; warmed up, 5 rounds interleaved, median                            |
| accuracy    | `crossview eval --kind mot` on TUD-Stadtmitte (time split, gt crops); cosine of each model's |
|             | vectors to fp32's on the same crops                                                         |
"""

from __future__ import annotations

import argparse
import datetime
import logging
import os
import statistics
import time
from dataclasses import replace
from pathlib import Path

import cv2
import numpy as np
import onnx
import onnxruntime
from docsection import machine, write_section
from onnxruntime.transformers.float16 import convert_float_to_float16
from site_harvest import REPO, SEQ, edge_harvest

from crossview.kernel.embedder import Embedder
from crossview.trainer.eval_onnx import evaluate_onnx
from crossview.trainer.export import build_default_embedder, export_checkpoint, set_props
from crossview.trainer.quantize import FLOAT_STEMS, MAX_CROPS, MIN_AGREEMENT, quantize_model

SECTION = "## int8 embedder (bench/int8_bench.py)"
WORK = REPO / "runs" / "bench" / "int8"
ROUNDS = 5
DAAM_CHECKPOINT = REPO / "runs" / "bench" / "tud-daam" / "last.pt"  # bench/adapt_tud.py's DAAM run
BATCH = 32
TARGET_SPEEDUP, TARGET_MAP_LOSS = 2.5, 0.01
log = logging.getLogger("bench")


def fp16(model: Path, out: Path) -> None:
    meta = Embedder(model, device="cpu").meta
    proto = convert_float_to_float16(onnx.load(model), keep_io_types=True)
    set_props(proto, replace(meta, version=f"{meta.version}-fp16", precision="fp16"))
    onnx.save(proto, out)


def build(model: Path, harvest: Path, checkpoint: Path | None) -> dict[str, tuple[Path, str]]:
    """{row name: (model file, the row name of its fp32 original)}."""
    models = {"ImageNet fp32": (model, "ImageNet fp32"),
              "ImageNet int8, shipped (float stem searched)": (WORK / "int8.onnx", "ImageNet fp32"),
              "ImageNet int8, every layer (--float-stem 0)": (WORK / "int8-all.onnx", "ImageNet fp32"),
              "ImageNet fp16": (WORK / "fp16.onnx", "ImageNet fp32")}
    quantize_model(model, harvest, models["ImageNet int8, shipped (float stem searched)"][0])
    quantize_model(model, harvest, models["ImageNet int8, every layer (--float-stem 0)"][0], float_stem=0)
    fp16(model, models["ImageNet fp16"][0])
    if checkpoint is not None:
        trained = export_checkpoint(checkpoint, WORK / "trained.onnx")
        name = f"{checkpoint.parent.name} fp32"
        models[name] = (trained, name)
        models[f"{checkpoint.parent.name} int8, shipped"] = (WORK / "trained-int8.onnx", name)
        quantize_model(trained, harvest, WORK / "trained-int8.onnx")
    return models


def speed(models: dict[str, Path], crops: list[np.ndarray]) -> dict[str, list[float]]:
    embedders = {name: Embedder(path, batch_size=BATCH, device="cpu") for name, path in models.items()}
    for e in embedders.values():
        e.embed(crops[:BATCH])  # warm-up
    rates: dict[str, list[float]] = {name: [] for name in models}
    for _ in range(ROUNDS):
        for name, e in embedders.items():  # interleaved: a burst of other load hits every model alike
            t0 = time.perf_counter()
            e.embed(crops)
            rates[name].append(len(crops) / (time.perf_counter() - t0))
    return rates


def run(checkpoint: Path | None) -> tuple[dict, dict, dict, dict, int]:
    WORK.mkdir(parents=True, exist_ok=True)
    model = WORK / "mobilenetv2-imagenet.onnx"
    build_default_embedder(model)
    harvest = edge_harvest(WORK, model)
    models = build(model, harvest, checkpoint)
    crops = [cv2.imread(str(p)) for p in sorted(harvest.rglob("*.jpg"))]
    metas = {name: Embedder(path, device="cpu").meta for name, (path, _) in models.items()}
    rates = speed({name: path for name, (path, _) in models.items()}, crops)
    vectors = {name: Embedder(path, device="cpu").embed(crops) for name, (path, _) in models.items()}
    agree = {name: float(np.einsum("nd,nd->n", vectors[base], vectors[name]).mean()) for name, (_, base) in models.items()}
    accuracy = {name: evaluate_onnx(path, "mot", SEQ, cache_dir=WORK / "cache") for name, (path, _) in models.items()}
    bases = {name: base for name, (_, base) in models.items()}
    return {"rates": rates, "agree": agree, "accuracy": accuracy, "metas": metas, "bases": bases}, len(crops)


def report(r: dict, crops: int, started, seconds, load) -> str:
    median = {name: statistics.median(x) for name, x in r["rates"].items()}
    rows = ["| model | version | float stem | crops/s (median of 5) | runs | x its fp32 | mAP | rank-1 | mAP vs its fp32 | "
            "cosine to its fp32 |", "|---|---|---|---|---|---|---|---|---|---|"]
    verdicts = []
    for name, runs in r["rates"].items():
        base, a, meta = r["bases"][name], r["accuracy"][name], r["metas"][name]
        speedup, change = median[name] / median[base], a["mAP"] - r["accuracy"][base]["mAP"]
        rows.append(f"| {name} | `{meta.version}` | {meta.extra.get('float_stem', '-')} | **{median[name]:.0f}** | "
                    f"{' / '.join(f'{x:.0f}' for x in runs)} | {speedup:.2f} | {a['mAP']:.1%} | {a['rank1']:.1%} | "
                    f"{change * 100:+.1f} | {r['agree'][name]:.4f} |")
        if name != base:
            ok = speedup >= TARGET_SPEEDUP and -change <= TARGET_MAP_LOSS
            verdicts.append(f"{name}: {speedup:.2f}x, mAP {change * 100:+.1f} points — {'met' if ok else 'NOT met'}")
    q = r["accuracy"]["ImageNet fp32"]
    return "\n".join([
        SECTION, "",
        f"`python bench/int8_bench.py`, {started:%Y-%m-%d %H:%M} UTC, {seconds:.0f} s; {machine(f'onnxruntime {onnxruntime.__version__}')}; "
        f"load average at the start {load} (the 2 cores are shared with other work: compare rows as ratios).", "",
        f"- Calibration and speed crops: the edge node's harvest of `{SEQ.name}.mp4` (HOG + tracker), {crops} crops; "
        f"int8 ranges from 3 in 4 of at most {MAX_CROPS} of them, the 4th held out to choose the float stem "
        f"(the fewest of {FLOAT_STEMS} leading convolutions kept float for a mean cosine to fp32 >= {MIN_AGREEMENT}).",
        f"- mAP: `crossview eval --kind mot --root ../shared/data/{SEQ.name}` for every model ({q['valid_queries']} queries, "
        f"{q['gallery']} gallery crops). Speed: the edge `Embedder`, batch {BATCH}, CPU, preprocessing included; all rows "
        "interleaved in one loop.",
        "- ImageNet: the default embedder (`crossview build-embedder`); a trained row is `crossview export` of the "
        "checkpoint given (`--checkpoint`, default the DAAM run `bench/adapt_tud.py` leaves), quantised the same way.", "",
        *rows, "",
        f"Target >= {TARGET_SPEEDUP}x its fp32's crops/s with <= {TARGET_MAP_LOSS * 100:.0f} mAP point lost: " + "; ".join(verdicts) + ".", "",
    ])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=REPO / "docs" / "benchmarks.md")
    ap.add_argument("--checkpoint", type=Path, default=DAAM_CHECKPOINT, help="a trained model to quantise too, if present")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    started, t0 = datetime.datetime.now(datetime.timezone.utc), time.perf_counter()
    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    result = run(args.checkpoint if args.checkpoint.is_file() else None)
    text = report(*result, started, time.perf_counter() - t0, load)
    print(text)
    write_section(args.out, SECTION, text)


if __name__ == "__main__":
    main()
