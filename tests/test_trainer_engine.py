"""Algorithm 1 end to end on real crops: train, checkpoint, resume after kill -9, export, load on the edge."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import pytest
import yaml
from helpers import shared_data

from crossview.kernel.config import ConfigError
from crossview.kernel.embedder import Embedder
from crossview.kernel.modelmeta import ModelMeta
from crossview.trainer.config import load_train_config
from crossview.trainer.engine import Trainer
from crossview.trainer.export import export_checkpoint

REPO = Path(__file__).resolve().parents[1]


def _config(tmp_path: Path, file: str = "train.yaml", **over) -> Path:
    """A small but real run: TUD-Stadtmitte (every 6th frame) → TUD-Campus (every 3rd frame), 64x32 input."""
    cfg = {
        "name": "tiny-daam",
        "output_dir": str(tmp_path / "run"),
        "cache_dir": str(tmp_path / "cache"),
        "device": "cpu",
        "workers": 0,
        "source": {"kind": "mot", "root": str(shared_data("TUD-Stadtmitte")), "frame_step": 6},
        "target": {"kind": "mot", "root": str(shared_data("TUD-Campus")), "frame_step": 3},
        "input": {"height": 64, "width": 32},
        "model": {"backbone": "mobilenet_v2", "pretrained": "imagenet"},
        "clustering": {"method": "kmeans", "k": 8},
        "sampler": {"p": 4, "k": 4},
        "pretrain": {"epochs": 1, "lr": 0.01},
        "adapt": {"iterations": 2, "epochs": 1, "lr": 0.005, "nmi_stop": 0.999},
    }
    for key, value in over.items():
        cfg[key] = {**cfg[key], **value} if isinstance(value, dict) and isinstance(cfg.get(key), dict) else value
    path = tmp_path / file
    path.write_text(yaml.safe_dump(cfg))
    return path


def _records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[Path, Path]:
    """(output folder, exported ONNX) of one full run: pre-training and two Algorithm 1 iterations, the second at
    half the first's lr."""
    tmp = tmp_path_factory.mktemp("daam")
    return tmp / "run", Trainer(load_train_config(_config(tmp, adapt={"iteration_lr_decay": 0.5}))).run()


def test_full_loop_logs_checkpoints_and_exports_a_model_the_edge_loads(trained):
    run, onnx_path = trained
    recs = _records(run)
    epochs = [(r["stage"], r["iteration"], r["epoch"]) for r in recs if r["event"] == "epoch"]
    assert epochs == [("pretrain", 0, 1), ("adapt", 1, 1), ("adapt", 2, 1)]
    clusters = [r for r in recs if r["event"] == "cluster"]
    assert [c["clusters"] for c in clusters] == [8, 8] and 0 <= clusters[1]["nmi"] <= 1 and "nmi" not in clusters[0]
    evals = [r for r in recs if r["event"] == "eval"]
    assert [e["label"] for e in evals] == ["direct transfer", "iteration 1", "iteration 2"]
    assert all(0 < e["mAP"] <= 1 and e["valid_queries"] > 0 for e in evals)
    adapt = [r for r in recs if r["event"] == "epoch" and r["stage"] == "adapt"]
    assert {"reid_s", "reid_t", "ds", "dsp", "orth"} <= set(adapt[0])
    assert [r["lr"] for r in adapt] == pytest.approx([0.005, 0.0025])  # adapt.iteration_lr_decay
    assert (run / "last.pt").is_file()

    meta = ModelMeta.from_props({p.key: p.value for p in onnx.load(onnx_path).metadata_props}, str(onnx_path))
    assert (meta.input_h, meta.input_w, meta.embedding_dim) == (64, 32, 256)
    assert meta.extra["source"] == "mot:TUD-Stadtmitte" and meta.extra["target"] == "mot:TUD-Campus"
    assert (meta.extra["method"], meta.extra["attention"], meta.extra["attn3"]) == ("daam", "daam", "none")
    assert json.loads(meta.extra["metrics"])["label"] == "iteration 2"
    emb = Embedder(onnx_path).embed([np.zeros((120, 50, 3), np.uint8), np.full((90, 40, 3), 200, np.uint8)])
    assert emb.shape == (2, 256) and np.allclose(np.linalg.norm(emb, axis=1), 1, atol=1e-5)


def test_daal_method_runs_dbscan_with_soft_labels(tmp_path):
    """`method: daal` brings DAAL's attention, GAP heads, losses and soft labels; only DBSCAN's p and M are set here."""
    path = _config(
        tmp_path,
        method="daal",
        name="tiny-daal",
        clustering={"method": "dbscan", "p": 0.05, "min_samples": 3},
        adapt={"iterations": 1, "epochs": 1, "lr": 0.005},
    )
    cfg = load_train_config(path)
    assert (cfg.model.attention, cfg.model.head, cfg.loss.target) == ("daal", "gap", "soft")
    onnx_path = Trainer(cfg).run()
    recs = _records(tmp_path / "run")
    (clu,) = [r for r in recs if r["event"] == "cluster"]
    assert clu["clusters"] >= 2 and 0 <= clu["outlier_share"] < 1
    adapt = [r for r in recs if r["event"] == "epoch" and r["stage"] == "adapt"]
    assert set(adapt[0]) >= {"reid_s", "reid_t", "dsp"} and "ds" not in adapt[0] and "orth" not in adapt[0]
    assert Embedder(onnx_path).dim == 1280  # DAAL's plain-GAP head: the backbone's channels


def test_kill_9_mid_training_then_resume_continues_at_the_next_epoch(tmp_path):
    path = _config(tmp_path, pretrain={"epochs": 2, "lr": 0.01}, adapt={"iterations": 1, "epochs": 1, "lr": 0.005})
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "crossview.cli", "train", "--config", str(path)]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and proc.poll() is None:
            if (run / "metrics.jsonl").is_file() and any(
                r["event"] == "epoch" and r["stage"] == "pretrain" and r["epoch"] == 1 for r in _records(run)
            ):
                break
            time.sleep(0.2)
        assert proc.poll() is None, "training ended before it could be interrupted"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    finally:
        if proc.poll() is None:
            proc.kill()
    done = subprocess.run(cmd + ["--resume"], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "resumed" in done.stderr
    epochs = [(r["stage"], r["epoch"]) for r in _records(run) if r["event"] == "epoch"]
    # Epoch 1 before the kill, then from the killed epoch 2 on: nothing trained twice, nothing skipped.
    assert epochs == [("pretrain", 1), ("pretrain", 2), ("adapt", 1)]
    assert (run / "tiny-daam.onnx").is_file()


def test_export_cli_reexports_a_checkpoint_and_the_edge_hot_reloads_it(trained, tmp_path):
    run, first = trained
    deployed = tmp_path / "deployed.onnx"
    deployed.write_bytes(first.read_bytes())
    embedder = Embedder(deployed, reload_check_s=0.0)
    old = embedder.version
    out = subprocess.run([sys.executable, "-m", "crossview.cli", "export", str(run / "last.pt"),
                          "--out", str(deployed)], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert embedder.maybe_reload() and embedder.version != old and embedder.version.startswith("tiny-daam-")


def test_two_process_distributed_training_under_torchrun(tmp_path):
    """The multi-GPU path (DDP, rank 0 clusters, evaluates and writes) run with Gloo on two CPU processes."""
    path = _config(tmp_path, pretrain={"epochs": 1, "lr": 0.01}, adapt={"iterations": 1, "epochs": 1, "lr": 0.005})
    torchrun = Path(sys.executable).with_name("torchrun")
    out = subprocess.run([str(torchrun), "--standalone", "--nproc_per_node", "2", "-m", "crossview.cli", "train",
                          "--config", str(path)], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    recs = _records(tmp_path / "run")
    epochs = [r for r in recs if r["event"] == "epoch"]
    assert [(r["stage"], r["epoch"]) for r in epochs] == [("pretrain", 1), ("adapt", 1)]  # one writer: rank 0
    single = math.ceil(193 / 16)  # source crops / (P x K): two ranks share an epoch's steps
    assert epochs[0]["images"] == 16 * math.ceil(single / 2)
    assert [r["label"] for r in recs if r["event"] == "eval"] == ["direct transfer", "iteration 1"]
    assert Embedder(tmp_path / "run" / "tiny-daam.onnx").dim == 256


def test_bad_configs_and_checkpoints_are_named(tmp_path):
    bad = _config(tmp_path, "bad.yaml", model={"backbone": "vgg16"})
    with pytest.raises(ConfigError, match="model.backbone"):
        load_train_config(bad)
    missing = _config(tmp_path, "missing.yaml", source={"kind": "market1501", "root": str(tmp_path / "nope")})
    with pytest.raises(FileNotFoundError, match="nope"):
        Trainer(load_train_config(missing))
    too_many = _config(tmp_path, "k.yaml", clustering={"method": "kmeans", "k": 5000})
    with pytest.raises(ValueError, match="clustering.k is 5000 but the target has only"):
        Trainer(load_train_config(too_many))
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="junk.pt: not a crossview training checkpoint"):
        export_checkpoint(junk)
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "last.pt").write_bytes(b"not a checkpoint either")
    with pytest.raises(ValueError, match="last.pt: not a crossview training checkpoint"):
        Trainer(load_train_config(_config(tmp_path, "resume.yaml")), resume=True)
    out = subprocess.run([sys.executable, "-m", "crossview.cli", "train", "--config", str(bad)], cwd=REPO,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and "model.backbone" in out.stderr


def test_eval_cli_scores_the_deployed_model_with_and_without_reranking(trained):
    _, onnx_path = trained
    target = shared_data("TUD-Campus")
    runs = {}
    for extra in ([], ["--rerank"]):
        out = subprocess.run([sys.executable, "-m", "crossview.cli", "eval", str(onnx_path), "--kind", "mot",
                              "--root", str(target), "--cache-dir", str(onnx_path.parent / "cache"), "--json", *extra],
                             cwd=REPO, capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, out.stderr[-2000:]
        runs[bool(extra)] = json.loads(out.stdout)
    plain, reranked = runs[False], runs[True]
    assert plain["model"].startswith("tiny-daam-") and plain["valid_queries"] > 0 and plain["gallery"] > 0
    assert 0 < plain["mAP"] <= 1 and plain["rank1"] <= plain["rank5"] <= plain["rank10"]
    assert reranked["valid_queries"] == plain["valid_queries"] and reranked["mAP"] != plain["mAP"]


@pytest.mark.parametrize("name", ["daam.yaml", "daal.yaml"])
def test_shipped_train_configs_load_with_the_papers_settings(name):
    cfg = load_train_config(REPO / "configs" / "train" / name)
    assert cfg.model.backbone == "resnet50" and cfg.model.last_stride == 1
    assert (cfg.input.height, cfg.input.width) == (384, 128)
    assert cfg.source.root.is_absolute() and cfg.target.kind == "harvest"
    if name == "daam.yaml":
        assert (cfg.clustering.method, cfg.clustering.k, cfg.adapt.iterations) == ("kmeans", 650, 7)
        assert cfg.adapt.milestones == [20, 120] and cfg.adapt.epochs == 200 and cfg.loss.target == "weighted"
    else:
        assert (cfg.clustering.method, cfg.loss.target, cfg.model.attention) == ("dbscan", "soft", "daal")
        assert cfg.loss.ds == 0 and cfg.loss.orth == 0 and cfg.adapt.epochs == 260
