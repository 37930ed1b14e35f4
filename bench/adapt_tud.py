"""Cross-domain re-ID on real data: TUD-Campus (labelled source) → TUD-Stadtmitte (unlabelled target).

Runs `crossview train` once per variant (the full DAAM model and the papers' ablation switches, plus
DAAL), each from `bench/train/tud-daam.yaml` with a few keys changed, and evaluates on
TUD-Stadtmitte's labels (each identity's track split in time into query and gallery). The ImageNet
baseline is the MobileNetV2 ImageNet trunk with GAP, exported and scored by `crossview eval` at the same
input size. Writes a markdown table (and the per-iteration history) to `--out`.

    python bench/adapt_tud.py --out docs/results.md            # ~1 h on 2 CPU cores
    python bench/adapt_tud.py --variants daam no-orth --out /tmp/r.md

With `--seeds` the variants run once per seed and the table gives mean ± std over the seeds, with the
papers' own figures beside each row, in its own section:

    python bench/adapt_tud.py --seeds 1 2 3 --variants arn arn-no-private arn-no-rec adfl-baseline adfl \
        --out docs/results.md

TCAP, DAAM and DAAL on the edge harvest (`*-site`), and ADFL as the pre-training of TCAP and DAAM (each `*-adfl*`
starts from the `adfl` run of its seed), in their own section:

    python bench/adapt_tud.py --seeds 1 2 3 --variants adfl tcap-adfl tcap daam-site daam-adfl-site daal-site \
        --out docs/results.md

TCAP and its ablations (`tcap*`) train on the edge node's harvest of TUD-Stadtmitte (made on first use), the other
rows on its ground-truth crops; all are scored on the same ground-truth time split:

    python bench/adapt_tud.py --seeds 1 2 3 --variants daam daal tcap tcap-no-tracklets tcap-no-split \
        tcap-no-cannot-link tcap-eps-profile tcap-eps-percentile tcap-avg tcap-no-neck tcap-no-memory tcap-no-proxies tcap-no-cooccur \
        --out docs/results.md

The issues' protocol (`*-pku-site`: sources TUD-Campus + PKU-Reid, target the edge harvest) for ARN and ADFL, with
ADFL as the pre-training of DAAM and of TCAP (list `adfl-pku-site` before the runs that start from it):

    python bench/adapt_tud.py --seeds 1 2 3 --variants adfl-baseline-pku-site adfl-pku-site daam-adfl-pku-site \
        tcap-pku-dsbn-adfl arn-pku-site arn-no-private-pku-site arn-no-rec-pku-site --out docs/results.md

The shipped method's ablations on that protocol (`tcap-pku-dsbn-<ablation>`: each `tcap-<ablation>` above laid over
`tcap-pku-dsbn`), in their own section; one variant a run keeps each run short, and the rows accumulate:

    python bench/adapt_tud.py --seeds 1 2 3 --variants tcap-pku-dsbn-no-memory --out docs/results.md

The shipped method (`tcap-pku-dsbn-256`) with each adaptation iteration at half the lr of the one before, in the
section of the shipped method's own row:

    python bench/adapt_tud.py --seeds 1 2 3 --variants tcap-pku-dsbn-256-decay --out docs/results.md

EDAAN and its comparison rows run from their own file, `bench/train/tud-edaan.yaml` (CPU-sized generators and
schedule), in their own seeds section:

    python bench/adapt_tud.py --seeds 1 2 3 --variants edaan edaan-triplet edaan-no-attention --out docs/results.md

and on the issues' protocol, one variant a run:

    python bench/adapt_tud.py --seeds 1 2 3 --variants edaan-pku-site --out docs/results.md
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import yaml
from docsection import machine, read_section, write_section
from site_harvest import SEQ, edge_harvest, labelled_edge_harvest

from crossview.trainer.config import overlay

REPO = Path(__file__).resolve().parents[1]
BASE = REPO / "bench" / "train" / "tud-daam.yaml"
RUNS = REPO / "runs" / "bench"
SECTION = "## TUD-Campus → TUD-Stadtmitte (bench/adapt_tud.py)"

# name → (what it is, config changes); the ablations follow DAAM Tables 3-4 and the switches.
VARIANTS: dict[str, tuple[str, dict]] = {
    "daam": ("DAAM full: DSH + DSP + DAAM + orth, L_DS one-class, weighted L_ReIDt", {}),
    "dsh": ("DSH only (no attention, no DSP branch)", {"model": {"attention": "none", "dsp": False}}),
    "dsh-dsp": ("DSH + DSP, no attention", {"model": {"attention": "none"}}),
    "ia": ("DSH + DSP + independent attention (IA)", {"model": {"attention": "ia"}}),
    "no-orth": ("DAAM without orthogonality", {"loss": {"orth": 0.0}}),
    "grl": ("DAAM with GRL instead of the one-class L_DS", {"model": {"domain_loss": "grl"}}),
    "no-weights": ("DAAM, L_ReIDt without weights", {"loss": {"target": "hard"}}),
    "daal": ("DAAL: DBSCAN on k-reciprocal distance + soft labels, DAAL attention, GAP head",
             {"method": "daal", "model": {"attention": "daal", "head": "gap", "domain_loss": "none"},
              "loss": {"ds": 0.0, "orth": 0.0, "target": "soft"},
              "clustering": {"method": "dbscan", "p": 0.02, "min_samples": 4}}),
}
# ARN: the same 6 source epochs first (its losses on the source alone), then 6 epochs on source + raw target.
ARN = {"method": "arn", "model": {"embedding_dim": 256},
       "adapt": {"iterations": 1, "epochs": 6, "lr": 0.005, "milestones": [4], "backbone_lr_mult": 0.1}}
# ADFL: source only, as many epochs as DAAM trains in all (6 + 3 x 2), Adam with the paper's rate and shape.
ADFL = {"method": "adfl", "optim": {"kind": "adam"}, "adfl": {"af_dim": 256},
        "pretrain": {"epochs": 12, "lr": 3.5e-4, "warmup_epochs": 2, "freeze_backbone_epochs": 1, "milestones": [8]},
        "adapt": {"iterations": 0, "epochs": 0, "lr": 3.5e-4}}
VARIANTS |= {
    "arn": ("ARN: E_C + private E_S / E_T + D_C, L_cls + 0.01 L_ctrs + 2 L_rec + 1500 L_diff", ARN),
    "arn-no-private": ("ARN without the private encoders E_S, E_T", overlay(ARN, {"arn": {"private": False}})),
    "arn-no-rec": ("ARN without L_rec", overlay(ARN, {"arn": {"rec": 0.0}})),
    "adfl-baseline": ("ADFL's baseline, direct transfer: GMP, BN neck, softmax + triplet, no attention",
                      overlay(ADFL, {"model": {"attn3": "none"}})),
    "adfl": ("ADFL direct transfer: AF3-cat-256-attn3-1sum, GMP, BN neck, softmax + triplet", ADFL),
    "daam-adfl": ("DAAM pre-trained by ADFL (its attn3-1sum trunk from the ADFL run of the same seed and sources)",
                  {"model": {"attn3": "1sum"}}),
}
# TCAP trains on TUD-Stadtmitte as a site harvests it (the edge node's HOG + tracker crops and sidecars, made by
# `site_harvest.edge_harvest` on first use) and is scored on the same time split of its ground truth as every row.
# The same 6 source epochs first, then 3 re-clusterings of 2 epochs, Adam at Cluster Contrast's rate.
SITE = RUNS / "site"
SITE_TARGET = {"target": {"kind": "harvest", "root": str(SITE / "edge-harvest"),
                          "evaluate_on": {"kind": "mot", "root": str(SEQ)}}}
TCAP = {"method": "tcap", "model": {"attention": "none"}, "optim": {"kind": "adam"}, "clustering": {"p": 0.02},
        **SITE_TARGET,
        "pretrain": {"epochs": 6, "lr": 3.5e-4, "milestones": [], "warmup_epochs": 1},
        "adapt": {"iterations": 3, "epochs": 2, "lr": 3.5e-4, "milestones": [], "nmi_stop": 0.98}}
TCAP_ABLATIONS = {
    "tcap-no-tracklets": ("crops clustered alone (no tracklets)", {"tracklets": False}),
    "tcap-no-split": ("tracklets never split at appearance jumps", {"split": False}),
    "tcap-no-cannot-link": ("co-occurring tracklets may merge", {"cannot_link": False}),
    "tcap-eps-profile": ("eps from Otsu on the k-NN profile instead of the tracklets' halves", {"eps": "profile"}),
    "tcap-eps-percentile": ("DAAL's fixed eps share p 0.02 instead of the tracklets' halves", {"eps": "percentile"}),
    "tcap-avg": ("average pooling instead of GeM", {"pool": "avg"}),
    "tcap-no-neck": ("no BN neck", {"neck": False}),
    "tcap-no-memory": ("no cluster-memory InfoNCE", {"memory": 0.0}),
    "tcap-no-proxies": ("no camera-aware proxies", {"proxy_intra": 0.0, "proxy_inter": 0.0}),
    "tcap-no-cooccur": ("no co-occurrence margin", {"cooccur": 0.0}),
}
# The second source: PKU-Reid's 74 identities from two outdoor cameras, beside TUD-Campus's 8.
PKU = {"source": {"also": [{"kind": "folders", "root": str(REPO.parent / "shared" / "data" / "PKU-Reid-subset"),
                            "camera_folders": True}]}}
VARIANTS |= {"tcap-pku": ("TCAP, sources TUD-Campus + PKU-Reid", overlay(TCAP, PKU)),
             "daam-pku": ("DAAM full, sources TUD-Campus + PKU-Reid", PKU)}
VARIANTS |= {"tcap": ("TCAP: tracklet pseudo labels + cluster memory + camera proxies + co-occurrence margin, GeM, "
                      "BN neck, on the edge harvest", TCAP)}
VARIANTS |= {name: (f"TCAP, {what}", overlay(TCAP, {"tcap": change}))
             for name, (what, change) in TCAP_ABLATIONS.items()}
# The labels' ceiling: the same crops with every track replaced by the ground-truth person it overlaps.
LABELLED = SITE / "labelled-edge-harvest"
VARIANTS |= {"tcap-labelled": ("TCAP on the edge harvest with ground-truth identities as tracks (a perfect tracker)",
                               overlay(TCAP, {"target": {"root": str(LABELLED)}}))}
# EDAAN: the whole of bench/train/tud-edaan.yaml laid over the base (its roots are relative to the same folder).
EDAAN = {k: v for k, v in yaml.safe_load((BASE.parent / "tud-edaan.yaml").read_text()).items()
         if k not in ("name", "output_dir")}
VARIANTS |= {
    "edaan": ("EDAAN: attention-guided translation of the source into the target's style + re-ID, quartet loss",
              EDAAN),
    "edaan-triplet": ("EDAAN with the triplet loss instead of the quartet loss",
                      overlay(EDAAN, {"edaan": {"loss": "triplet"}})),
    "edaan-no-attention": ("EDAAN without attention (plain CycleGAN translation), quartet loss",
                           overlay(EDAAN, {"edaan": {"attention": False}})),
}
VARIANTS |= {"tcap-adfl": ("TCAP pre-trained by ADFL (its attn3-1sum trunk from the `adfl` run of the same seed)",
                           overlay(TCAP, {"model": {"attn3": "1sum"}}))}
# DAAM, DAAL and DAAM from ADFL on the same edge harvest as TCAP (the crops' sidecars unused): the issues' protocol.
VARIANTS |= {f"{name}-site": (f"{VARIANTS[name][0]}, on the edge harvest", overlay(VARIANTS[name][1], SITE_TARGET))
             for name in ("daam", "daal", "daam-adfl")}
# BatchNorm per domain (`adapt.domain_bn`), with TUD-Campus alone and with PKU-Reid beside it.
DSBN = {"adapt": {"domain_bn": True}}
VARIANTS |= {"tcap-dsbn": ("TCAP, BatchNorm per domain (source and target rows normalised apart, the site's running "
                           "statistics)", overlay(TCAP, DSBN)),
             "tcap-pku-dsbn": ("TCAP, sources TUD-Campus + PKU-Reid, BatchNorm per domain", overlay(overlay(TCAP, PKU), DSBN))}
# A mean teacher (`adapt.ema`) over that: momentum 0.98 averages about one iteration's steps (~50) on this harvest.
VARIANTS |= {"tcap-pku-dsbn-ema": ("TCAP, sources TUD-Campus + PKU-Reid, BatchNorm per domain, mean teacher 0.98",
                                   overlay(VARIANTS["tcap-pku-dsbn"][1], {"adapt": {"ema": 0.98}}))}
# The teacher's pseudo labels change slowly, so the NMI rule (0.98) stopped that run after one iteration: all three.
VARIANTS |= {"tcap-pku-dsbn-ema-all": ("TCAP, sources TUD-Campus + PKU-Reid, BatchNorm per domain, mean teacher 0.98, "
                                       "all 3 iterations (no NMI stop)",
                                       overlay(VARIANTS["tcap-pku-dsbn-ema"][1], {"adapt": {"nmi_stop": 1.0}}))}
# The input size the edge's default embedder runs at (256x128; every other row here is 128x64): on TUD-Stadtmitte
# the ImageNet trunk alone scores about 6 mAP points more at it (crossview eval of the default embedder).
VARIANTS |= {"tcap-pku-dsbn-256": ("TCAP, sources TUD-Campus + PKU-Reid, BatchNorm per domain, 256x128 input",
                                   overlay(VARIANTS["tcap-pku-dsbn"][1], {"input": {"height": 256, "width": 128}}))}
# Each adaptation iteration at half the lr of the one before (`adapt.iteration_lr_decay`): the 3 seeds of
# tcap-pku-dsbn-256 swung by up to 11 mAP points between the last two iterations, each restarting at the full lr.
VARIANTS |= {"tcap-pku-dsbn-256-decay": ("TCAP, sources TUD-Campus + PKU-Reid, BatchNorm per domain, 256x128 input, "
                                         "each iteration at half the lr of the one before",
                                         overlay(VARIANTS["tcap-pku-dsbn-256"][1],
                                                 {"adapt": {"iteration_lr_decay": 0.5}}))}
# Every method on the issues' protocol: sources TUD-Campus + PKU-Reid, target the edge harvest of TUD-Stadtmitte.
PROTOCOL = ("daam", "daal", "adfl-baseline", "adfl", "arn", "arn-no-private", "arn-no-rec", "edaan", "edaan-triplet",
            "edaan-no-attention", "daam-adfl")
VARIANTS |= {f"{name}-pku-site": (f"{VARIANTS[name][0]}, sources TUD-Campus + PKU-Reid, on the edge harvest",
                                  overlay(overlay(VARIANTS[name][1], SITE_TARGET), PKU)) for name in PROTOCOL}
# EDAAN's epochs there are passes over the harvest (396 crops), as TCAP's: over the larger side they would be passes
# over the two sources (TUD-Campus's 359 boxes and PKU-Reid's images), several times as long for 12 GAN epochs.
for name in ("edaan", "edaan-triplet", "edaan-no-attention"):
    what, changes = VARIANTS[f"{name}-pku-site"]
    VARIANTS[f"{name}-pku-site"] = (f"{what}, an epoch one pass over the harvest",
                                    overlay(changes, {"adapt": {"epoch_of": "target"}}))
# ADFL as the pre-training of the shipped method on the same protocol.
VARIANTS |= {"tcap-pku-dsbn-adfl": ("TCAP, sources TUD-Campus + PKU-Reid, BatchNorm per domain, pre-trained by ADFL "
                                    "(its attn3-1sum trunk from the ADFL run of the same seed and sources)",
                                    overlay(VARIANTS["tcap-pku-dsbn"][1], {"model": {"attn3": "1sum"}}))}
# The shipped method's ablations on the issues' protocol: tcap-pku-dsbn with one part switched off each.
SHIPPED_ABLATIONS = {f"tcap-pku-dsbn-{name.removeprefix('tcap-')}": (
    f"TCAP, sources TUD-Campus + PKU-Reid, BatchNorm per domain, {what}",
    overlay(VARIANTS["tcap-pku-dsbn"][1], {"tcap": change})) for name, (what, change) in TCAP_ABLATIONS.items()}
VARIANTS |= SHIPPED_ABLATIONS
# variant → the variant whose trunk it starts from (run first)
INIT_FROM = {"daam-adfl": "adfl", "tcap-adfl": "adfl", "daam-adfl-site": "adfl",
             "daam-adfl-pku-site": "adfl-pku-site", "tcap-pku-dsbn-adfl": "adfl-pku-site"}
# The papers' own figures (mAP / rank-1, %), Market-1501 <-> DukeMTMC-reID, for beside our rows.
PAPER = {
    "daam": "not in this issue's sources",
    "arn": "ARN Table 2: D→M 39.4 / 70.3, M→D 33.4 / 60.2",
    "arn-no-private": "ARN Table 2 (w/o E_S, E_T): D→M 28.7 / 60.5, M→D 26.8 / 48.4",
    "arn-no-rec": "not in the paper",
    "adfl-baseline": "ADFL Table V baseline: M→D 30.8 / 48.9, D→M 29.1 / 59.4",
    "adfl": "ADFL Table V (AF3-cat-1024-attn3-1sum): M→D 37.4 / 56.8, D→M 36.3 / 67.2",
    **{name: "not in the papers" for name in ("daam-adfl", "tcap-adfl", "daam-adfl-site")},
    "daam-site": "not in this issue's sources",
    "daal-site": "not in this issue's sources",
    **{name: "not in the papers" for name in ("tcap", "tcap-pku", "daam-pku", "tcap-labelled", "tcap-dsbn", "tcap-pku-dsbn",
                                              "tcap-pku-dsbn-ema", "tcap-pku-dsbn-ema-all", "tcap-pku-dsbn-256",
                                              "tcap-pku-dsbn-256-decay",
                                              "tcap-pku-dsbn-adfl",
                                              *TCAP_ABLATIONS, *SHIPPED_ABLATIONS)},
    "edaan": "EDAAN Table I (quartet): M→D 39.6 / 57.8, D→M 35.4 / 64.5",
    "edaan-triplet": "EDAAN Table I (triplet): M→D 33.5 / 55.2, D→M 32.7 / 62.3",
    "edaan-no-attention": "EDAAN Table V (w/o attention): M→D 26.8 / 48.5, D→M 23.7 / 55.4",
}
PAPER |= {f"{name}-pku-site": PAPER.get(name, PAPER["daam"]) for name in PROTOCOL}
SEEDS_SECTION = "## ARN and ADFL beside DAAM, mean ± std over seeds (bench/adapt_tud.py --seeds)"
# Runs with TCAP rows get their own section, so they never replace the ARN / ADFL table.
TCAP_SECTION = "## TCAP and its ablations beside DAAM and DAAL, mean ± std over seeds (bench/adapt_tud.py --seeds)"
EDAAN_SECTION = "## EDAAN and its comparison rows, mean ± std over seeds (bench/adapt_tud.py --seeds)"
# ADFL as the pre-training of the adapting methods, beside the same methods without it, in one run.
PRETRAIN_SECTION = ("## On the edge harvest: TCAP, DAAM, DAAL, and ADFL as pre-training, mean ± std over seeds "
                    "(bench/adapt_tud.py --seeds)")

# The second source, and BatchNorm per domain, beside TCAP alone.
DSBN_SECTION = ("## Two sources and BatchNorm per domain: TCAP on the edge harvest, mean ± std over seeds "
                "(bench/adapt_tud.py --seeds)")
# The same two sources for the papers' methods and for TCAP's mean teacher.
PKU_SECTION = ("## From TUD-Campus + PKU-Reid on the edge harvest: DAAM, DAAL and TCAP's mean teacher, mean ± std "
               "over seeds (bench/adapt_tud.py --seeds)")
PKU_SEEDS_SECTION = ("## ARN and ADFL from TUD-Campus + PKU-Reid on the edge harvest, mean ± std over seeds "
                     "(bench/adapt_tud.py --seeds)")
ABLATION_SECTION = ("## TCAP's ablations from TUD-Campus + PKU-Reid on the edge harvest, mean ± std over seeds "
                    "(bench/adapt_tud.py --seeds)")


def seeds_section(names) -> str:
    if any(name.startswith("edaan") for name in names):
        return EDAAN_SECTION
    if any(name in SHIPPED_ABLATIONS for name in names):
        return ABLATION_SECTION
    if any(name in ("tcap-pku", "tcap-dsbn", "tcap-pku-dsbn") for name in names):
        return DSBN_SECTION
    if any(name.startswith(("arn", "adfl")) and "pku" in name for name in names):
        return PKU_SEEDS_SECTION
    if any("pku" in name for name in names):
        return PKU_SECTION
    if any(name in INIT_FROM or name.endswith("-site") for name in names):
        return PRETRAIN_SECTION
    return TCAP_SECTION if any(name.startswith("tcap") for name in names) else SEEDS_SECTION


def run_dir(name: str, seed: int | None) -> Path:
    return RUNS / (f"tud-{name}" if seed is None else f"tud-{name}-s{seed}")


def run_variant(name: str, changes: dict, base: dict, seed: int | None = None, reuse: bool = False) -> list[dict]:
    """Train one variant in its own process (with `seed`, or the base file's); return its evaluation history.
    With `reuse`, a run that already finished (its model exported) is read instead of trained again."""
    out = run_dir(name, seed)
    if reuse and (out / f"{out.name}.onnx").is_file():
        return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    cfg = overlay(base, {**changes, "name": out.name, "output_dir": str(out), "cache_dir": str(RUNS.parent / "cache"),
                         **({"seed": seed} if seed is not None else {})})
    if name in INIT_FROM:
        cfg["model"]["init_from"] = str(run_dir(INIT_FROM[name], seed) / "last.pt")
    for section in ("source", "target"):  # the base file's relative roots, made absolute for the temp config
        cfg[section]["root"] = str((BASE.parent / cfg[section]["root"]).resolve())
    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.jsonl").unlink(missing_ok=True)
    (out / "last.pt").unlink(missing_ok=True)
    path = out / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "crossview.cli", "train", "--config", str(path)], cwd=REPO, check=True)
    print(f"{name}: {time.perf_counter() - t0:.0f} s", flush=True)
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def imagenet_baseline(base: dict) -> dict:
    """The ImageNet MobileNetV2 trunk + GAP at the runs' input size, scored like a deployed model."""
    from crossview.trainer.eval_onnx import evaluate_onnx
    from crossview.trainer.export import build_default_embedder

    path = RUNS / "imagenet.onnx"
    RUNS.mkdir(parents=True, exist_ok=True)
    build_default_embedder(path, (base["input"]["height"], base["input"]["width"]))
    target = (BASE.parent / base["target"]["root"]).resolve()
    return evaluate_onnx(path, "mot", target, cache_dir=RUNS.parent / "cache")


def site_harvest() -> Path:
    """The edge node's harvest of TUD-Stadtmitte (HOG + tracker; the crops do not depend on the embedder), made once."""
    from crossview.trainer.export import build_default_embedder

    model = SITE / "mobilenetv2-imagenet.onnx"
    if not model.is_file():
        SITE.mkdir(parents=True, exist_ok=True)
        build_default_embedder(model)
    return edge_harvest(SITE, model)


def pct(x: float) -> str:
    return f"{100 * x:.1f}"


def versions() -> tuple[str, ...]:
    import sklearn
    import torch
    import torchvision

    return f"torch {torch.__version__}", f"torchvision {torchvision.__version__}", f"scikit-learn {sklearn.__version__}"


def report(base: dict, imagenet: dict, results: dict[str, list[dict]], load: tuple[str, str], command: str) -> str:
    lines = [
        SECTION,
        "",
        f"`{command}`, {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC, {machine(*versions())}, trained on the CPU; "
        f"load average {load[0]} before, {load[1]} after (the machine is shared).",
        "",
        f"Source TUD-Campus (8 identities, labelled), target TUD-Stadtmitte (10 identities) used as unlabelled crops; "
        f"evaluation on TUD-Stadtmitte's labels, each identity's track split in time (first half query, second half "
        f"gallery, as two pseudo-cameras). Backbone {base['model']['backbone']} (offline ImageNet weights), input "
        f"{base['input']['height']}x{base['input']['width']}, pre-training {base['pretrain']['epochs']} epochs, "
        f"{base['adapt']['iterations']} iterations x {base['adapt']['epochs']} epochs, k-means K "
        f"{base['clustering']['k']}. Config: `bench/train/tud-daam.yaml` plus each row's changes (see the script).",
        "",
        "| model | mAP | rank-1 | rank-5 | rank-10 | vs direct transfer (mAP) |",
        "|---|---|---|---|---|---|",
        f"| ImageNet features only (MobileNetV2 + GAP) | {pct(imagenet['mAP'])} | {pct(imagenet['rank1'])} | "
        f"{pct(imagenet['rank5'])} | {pct(imagenet['rank10'])} | |",
    ]
    direct = None
    for name, history in results.items():
        evals = [r for r in history if r["event"] == "eval"]
        if direct is None:
            direct = evals[0]
            lines.append(f"| direct transfer (source-trained, {name} model before adaptation) | {pct(direct['mAP'])} | "
                         f"{pct(direct['rank1'])} | {pct(direct['rank5'])} | {pct(direct['rank10'])} | |")
        last = evals[-1]
        delta = 100 * (last["mAP"] - evals[0]["mAP"])
        lines.append(f"| {VARIANTS[name][0]} (`{name}`) | {pct(last['mAP'])} | {pct(last['rank1'])} | "
                     f"{pct(last['rank5'])} | {pct(last['rank10'])} | {delta:+.1f} (own direct transfer "
                     f"{pct(evals[0]['mAP'])}) |")
    lines += ["", "Per iteration (mAP / rank-1, %), with the clustering of the target before each iteration:", ""]
    for name, history in results.items():
        steps = []
        for r in history:
            if r["event"] == "cluster":
                steps.append(f"clusters {r['clusters']}, outliers {pct(r['outlier_share'])}%"
                             + (f", NMI {r['nmi']:.2f}" if "nmi" in r else ""))
            if r["event"] == "eval":
                steps.append(f"**{r['label']}** {pct(r['mAP'])} / {pct(r['rank1'])}")
        lines.append(f"- `{name}`: " + " → ".join(steps))
    return "\n".join(lines) + "\n"


def mean_std(values: list[float]) -> str:
    """"m ± s" in %, s the sample standard deviation over the seeds."""
    pcts = [100 * v for v in values]
    spread = statistics.stdev(pcts) if len(pcts) > 1 else 0.0
    return f"{statistics.mean(pcts):.1f} ± {spread:.1f}"


def seeds_report(base: dict, results: dict[str, dict[int, list[dict]]], load: tuple[str, str], command: str,
                 imagenet: dict | None = None) -> str:
    """One row per variant: the last evaluation's mAP / rank-1 as mean ± std over seeds, and its direct transfer;
    first the ImageNet trunk's row when given (no training, so no spread)."""
    seeds = sorted(next(iter(results.values())))
    lines = [
        seeds_section(results),
        "",
        f"`{command}`, {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC, {machine(*versions())}, trained on the CPU; "
        f"load average {load[0]} before, {load[1]} after (the machine is shared). Seeds {', '.join(map(str, seeds))}.",
        "",
        "Same data, protocol and base config as the section above (`bench/train/tud-daam.yaml`); each variant's "
        "changes are in the script. ADFL rows never see the target: their figure is direct transfer. TCAP and "
        "`*-site` rows train on the edge node's harvest of TUD-Stadtmitte (HOG + tracker crops and sidecars), the "
        "others on its ground-truth crops; all are scored on the same ground-truth split. The papers' "
        "figures are Market-1501 ↔ DukeMTMC-reID with ResNet-50 on a GPU, not comparable in scale: they stand beside "
        "our rows for the direction of each change, not its size.",
        "",
        "| model | mAP | rank-1 | direct transfer mAP | training seconds (first to last record) | paper (mAP / rank-1) |",
        "|---|---|---|---|---|---|",
    ]
    if imagenet is not None:
        lines.append(f"| ImageNet features only (MobileNetV2 + GAP, no training) | {pct(imagenet['mAP'])} | "
                     f"{pct(imagenet['rank1'])} | | | |")
    for name, by_seed in results.items():
        evals = [[r for r in h if r["event"] == "eval"] for h in by_seed.values()]
        secs = [h[-1]["time"] - h[0]["time"] for h in by_seed.values()]
        lines.append(f"| {VARIANTS[name][0]} (`{name}`) | {mean_std([e[-1]['mAP'] for e in evals])} | "
                     f"{mean_std([e[-1]['rank1'] for e in evals])} | {mean_std([e[0]['mAP'] for e in evals])} | "
                     f"{statistics.mean(secs):.0f} | {PAPER.get(name, '')} |")
    return "\n".join(lines) + "\n"


ROW_NAME = re.compile(r"^\| .*\(`([\w.-]+)`\) \|")
KEPT_HEAD = "Rows from earlier runs of the script, kept when a later run wrote this section:"
KEPT_LINE = re.compile(r"^- ((?:`[\w.-]+`(?:, )?)+): (.+)$")


def keep_earlier_rows(old: str, new: str) -> str:
    """`new` (a seeds section) with the rows of `old` (the section it replaces) for variants it did not run, each
    with the run line it came from: rows accumulate over runs that each train a few variants (the runs themselves
    live in runs/, which a fresh checkout lacks, so --reuse cannot bring them back)."""
    ran = {m[1] for line in new.splitlines() if (m := ROW_NAME.match(line))}
    old_lines = old.splitlines()
    run_line = next((line for line in old_lines if line.startswith("`python bench/adapt_tud.py")), "")
    origin = {name: m[2] for line in old_lines if (m := KEPT_LINE.match(line)) for name in re.findall(r"`([\w.-]+)`", m[1])}
    kept = [(m[1], line) for line in old_lines if (m := ROW_NAME.match(line)) and m[1] not in ran]
    if not kept:
        return new
    lines = new.rstrip("\n").splitlines()
    end = max(i for i, line in enumerate(lines) if line.startswith("|")) + 1
    lines[end:end] = [line for _, line in kept]
    by_origin: dict[str, list[str]] = {}
    for name, _ in kept:
        by_origin.setdefault(origin.get(name, run_line), []).append(name)
    lines += ["", KEPT_HEAD, "", *(f"- {', '.join(f'`{n}`' for n in names)}: {run}" for run, names in by_origin.items())]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    ap.add_argument("--seeds", nargs="+", type=int, help="run every variant once per seed; report mean ± std")
    ap.add_argument("--reuse", action="store_true", help="--seeds: read runs that already finished instead of training")
    ap.add_argument("--out", type=Path, help="markdown file to write (default: print)")
    args = ap.parse_args()
    for name in args.variants:
        if name in INIT_FROM and INIT_FROM[name] not in args.variants[: args.variants.index(name)]:
            ap.error(f"variant {name} starts from {INIT_FROM[name]}'s run: list {INIT_FROM[name]} before it")
    base = yaml.safe_load(BASE.read_text())
    if any(VARIANTS[name][1].get("target", {}).get("kind") == "harvest" for name in args.variants):
        site_harvest()
    if "tcap-labelled" in args.variants:
        labelled_edge_harvest(SITE)
    before = os.getloadavg()
    command = " ".join(["python bench/adapt_tud.py", *sys.argv[1:]])
    if args.seeds:
        results = {name: {} for name in args.variants}
        for seed in args.seeds:
            for name in args.variants:
                results[name][seed] = run_variant(name, VARIANTS[name][1], base, seed, args.reuse)
        after = os.getloadavg()
        section = seeds_section(results)
        imagenet = None if section in (SEEDS_SECTION, EDAAN_SECTION) else imagenet_baseline(base)
        text = seeds_report(base, results, (f"{before[0]:.1f}", f"{after[0]:.1f}"), command, imagenet)
        if args.out and (old := read_section(args.out, section)):
            text = keep_earlier_rows(old, text)
    else:
        imagenet = imagenet_baseline(base)
        results = {name: run_variant(name, VARIANTS[name][1], base) for name in args.variants}
        after = os.getloadavg()
        section, text = SECTION, report(base, imagenet, results, (f"{before[0]:.1f}", f"{after[0]:.1f}"), command)
    if args.out:
        write_section(args.out, section, text)
    print(text)


if __name__ == "__main__":
    main()
