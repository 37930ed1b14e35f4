"""Few-step training runs on real crops for the method tests: a tiny config, a crash mid-run, the export's parity.

| helper             | what                                                                                 |
|--------------------|--------------------------------------------------------------------------------------|
| `tiny_config`      | TUD-Stadtmitte (every 15th frame, labelled) → TUD-Campus (every 6th), MobileNetV2 at 64x32 |
| `crash_after`      | run until an epoch is logged, then die as a kill would (its checkpoint is already on disk) |
| `resume`           | `Trainer(cfg, resume=True).run()`: what `crossview train --resume` does              |
| `export_parity`    | the edge `Embedder` on real crops vs the checkpoint's PyTorch embedder: max abs difference |
"""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
import yaml
from helpers import shared_data

from crossview.kernel import checkpoint
from crossview.kernel.embedder import Embedder
from crossview.trainer.config import TrainConfig, load_train_config, overlay
from crossview.trainer.engine import Trainer
from crossview.trainer.methods import METHODS


def tiny_config(tmp_path: Path, method: str, **over) -> Path:
    cfg = {
        "method": method, "name": f"tiny-{method}", "output_dir": str(tmp_path / "run"),
        "cache_dir": str(tmp_path / "cache"), "device": "cpu", "workers": 0,
        "source": {"kind": "mot", "root": str(shared_data("TUD-Stadtmitte")), "frame_step": 15},
        "target": {"kind": "mot", "root": str(shared_data("TUD-Campus")), "frame_step": 6},
        "input": {"height": 64, "width": 32},
        "model": {"backbone": "mobilenet_v2", "pretrained": "imagenet"},
        "sampler": {"p": 4, "k": 4},
    }
    path = tmp_path / "train.yaml"
    path.write_text(yaml.safe_dump(overlay(cfg, over)))
    return path


def records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def epochs(run: Path) -> list[tuple[str, int, int]]:
    return [(r["stage"], r["iteration"], r["epoch"]) for r in records(run) if r["event"] == "epoch"]


class Killed(Exception):
    """Stands for kill -9 right after an epoch's log line (the checkpoint is written before it)."""


def crash_after(path: Path, stage: str, epoch: int) -> None:
    logged = Trainer.log

    def log(self, event, **fields):
        logged(self, event, **fields)
        if event == "epoch" and (self.state.stage, self.state.epoch) == (stage, epoch):
            raise Killed

    with pytest.MonkeyPatch.context() as mp, pytest.raises(Killed):
        mp.setattr(Trainer, "log", log)
        Trainer(load_train_config(path)).run()


def resume(path: Path) -> Path:
    return Trainer(load_train_config(path), resume=True).run()


def export_parity(onnx_path: Path, ckpt_path: Path, crops_dir: Path, n: int = 8) -> tuple[float, int]:
    """(max |ORT - torch| over unit embeddings of `n` real crops, embedding width)."""
    ckpt = checkpoint.load(ckpt_path)
    cfg = TrainConfig.model_validate(ckpt.config)
    method = METHODS[cfg.method](cfg)
    net = method.build(ckpt.num_source_ids, pretrained="none")
    method.load_state_dict(ckpt.method, net)
    net.load_state_dict(ckpt.deployed())  # what the export wrote: the mean teacher where the run kept one
    crops = [cv2.imread(str(p)) for p in sorted(crops_dir.rglob("*.jpg"))[:n]]
    assert len(crops) == n
    edge = Embedder(onnx_path)
    got = edge.embed(crops)
    with torch.no_grad():
        want = net.embedder().eval()(torch.from_numpy(edge.preprocess(crops))).numpy()
    want /= np.linalg.norm(want, axis=1, keepdims=True)
    return float(np.abs(got - want).max()), edge.dim
