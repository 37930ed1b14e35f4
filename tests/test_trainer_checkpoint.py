"""The training checkpoint format (crossview.kernel.checkpoint): round trip, atomic write, versions, junk."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch

from crossview.kernel import checkpoint
from crossview.kernel.checkpoint import Checkpoint


def _ckpt() -> Checkpoint:
    return Checkpoint(config={"name": "t"}, num_source_ids=3, model={"w": torch.arange(4.0)},
                      state={"stage": "adapt", "epoch": 1}, method={"labels": np.array([0, 1, -1])},
                      optimizer={"state": {}})


def test_round_trip_leaves_no_temp_file(tmp_path):
    path = tmp_path / "last.pt"
    checkpoint.save(_ckpt(), path)
    checkpoint.save(_ckpt(), path)  # replacing an existing checkpoint
    back = checkpoint.load(path)
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]
    assert torch.equal(back.model["w"], torch.arange(4.0)) and back.method["labels"].tolist() == [0, 1, -1]
    assert (back.config, back.num_source_ids, back.state, back.scheduler) == ({"name": "t"}, 3, _ckpt().state, None)
    assert torch.load(path, weights_only=False)["version"] == checkpoint.VERSION


def test_a_v1_file_without_version_reads_its_labels_as_the_method_state(tmp_path):
    old = {"state": {}, "model": {}, "labels": {"centers": [[1.0]]}, "optimizer": None, "scheduler": None,
           "scaler": None, "config": {}, "num_source_ids": 2}
    torch.save(old, tmp_path / "v1.pt")
    assert checkpoint.load(tmp_path / "v1.pt").method == {"centers": [[1.0]]}


def test_a_v2_file_has_no_teacher_and_deploys_the_networks_weights(tmp_path):
    v2 = {"version": 2, "config": {}, "num_source_ids": 2, "model": {"w": torch.ones(2)}, "state": {}}
    torch.save(v2, tmp_path / "v2.pt")
    back = checkpoint.load(tmp_path / "v2.pt")
    assert back.ema is None and torch.equal(back.deployed()["w"], torch.ones(2))
    with_teacher = _ckpt()
    with_teacher.ema = {"w": torch.zeros(4)}
    checkpoint.save(with_teacher, tmp_path / "v3.pt")
    assert torch.equal(checkpoint.load(tmp_path / "v3.pt").deployed()["w"], torch.zeros(4))


def test_junk_another_version_and_missing_files_are_named(tmp_path):
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    torch.save([1, 2], tmp_path / "list.pt")
    torch.save({"version": 2, "model": {}}, tmp_path / "partial.pt")
    torch.save({"version": 7}, tmp_path / "future.pt")
    for name in ("junk", "list", "partial"):
        with pytest.raises(ValueError, match=rf"{name}.pt: not a crossview training checkpoint"):
            checkpoint.load(tmp_path / f"{name}.pt")
    with pytest.raises(ValueError, match="future.pt: checkpoint format version 7; this crossview reads versions 1 to 3"):
        checkpoint.load(tmp_path / "future.pt")
    with pytest.raises(FileNotFoundError, match="nope.pt"):
        checkpoint.load(tmp_path / "nope.pt")


def test_the_kernel_module_imports_without_torch():
    code = "import sys, crossview.kernel.checkpoint; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"
