"""The edge embedder on real ONNX Runtime sessions: TUD-Campus crops, model validation, hot reload."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from helpers import TINY_META, filled_model, raw_export
from torch import nn

from crossview.kernel.embedder import Embedder
from crossview.kernel.ort import ModelError, select_providers
from crossview.trainer.modeling.backbones import GapEmbedder


def test_select_providers():
    assert select_providers("cpu") == ["CPUExecutionProvider"]
    assert select_providers("auto")[-1] == "CPUExecutionProvider"
    with pytest.raises(ValueError, match="device must be one of"):
        select_providers("gpu")
    if select_providers("auto")[0] == "CPUExecutionProvider":  # no usable GPU: asking for one is a config error
        with pytest.raises(ValueError, match="device 'cuda' requested .* set the device to auto"):
            select_providers("cuda")


def test_embeds_tud_crops(default_model, tud_crops):
    embedder = Embedder(default_model)
    assert (embedder.version, embedder.dim, embedder.meta.input_h) == ("mobilenetv2-imagenet-1", 1280, 256)
    crops = list(tud_crops(1).values())
    out = embedder.embed(crops)
    assert out.shape == (len(crops), 1280) and out.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, atol=1e-5)
    assert embedder.embed([]).shape == (0, 1280)


def test_same_identity_is_more_similar(default_model, tud_crops):
    """ImageNet features are no re-ID model: per frame pair the same person scores 0.03-0.11 higher on
    average (rank-1 is often wrong), so only the pooled averages are compared."""
    embedder = Embedder(default_model)
    same, different = [], []
    for a, b in [(1, 21), (5, 35), (10, 50), (20, 60), (30, 70)]:
        crops_a, crops_b = tud_crops(a), tud_crops(b)
        ids = sorted(crops_a.keys() & crops_b.keys())
        sim = embedder.embed([crops_a[i] for i in ids]) @ embedder.embed([crops_b[i] for i in ids]).T
        same += list(np.diag(sim))
        different += list(sim[~np.eye(len(ids), dtype=bool)])
    assert np.mean(same) > np.mean(different) + 0.02


def test_batch_size_does_not_change_embeddings(default_model, tud_crops):
    crops = list(tud_crops(1).values()) + list(tud_crops(40).values())
    one, seven = Embedder(default_model, batch_size=1), Embedder(default_model, batch_size=7)
    np.testing.assert_allclose(one.embed(crops), seven.embed(crops), atol=1e-5)


@pytest.mark.parametrize(
    "module, example, error",
    [
        (nn.Linear(16, 8), torch.zeros(1, 16), r"input must be \(batch, 3, H, W\) float, got \[1, 16\]"),
        (GapEmbedder(nn.Conv2d(1, 8, 3)), torch.zeros(1, 1, 32, 16), r"input must be .* got \[1, 1, 32, 16\]"),
        (GapEmbedder(nn.Conv2d(3, 8, 3)), torch.zeros(1, 3, 64, 32), "input H is 64 but metadata"),
        (GapEmbedder(nn.Conv2d(3, 4, 3)), torch.zeros(1, 3, 32, 16), r"output is \[1, 4\] for one crop, .* dim 8"),
    ],
)
def test_contract_breaking_model_is_rejected(tmp_path, module, example, error):
    path = tmp_path / "broken.onnx"
    raw_export(module, example, path, TINY_META)
    with pytest.raises(ModelError, match=f"broken.onnx: {error}"):
        Embedder(path)


@pytest.mark.parametrize("value, error", [
    (float("nan"), "test inference gives NaN or infinite values: its weights are broken"),
    (float("inf"), "test inference gives NaN or infinite values"),
    (0.0, "test inference gives an all-zero embedding"),
])
def test_a_model_with_broken_weights_is_rejected(tmp_path, value, error):
    """Full metadata, the right shapes: only its output tells, and the matcher would refuse every sighting of it."""
    with pytest.raises(ModelError, match=f"broken.onnx: {error}"):
        Embedder(filled_model(tmp_path / "broken.onnx", value))


def test_model_without_metadata_is_rejected(tmp_path):
    path = tmp_path / "plain.onnx"
    raw_export(GapEmbedder(nn.Conv2d(3, 8, 3)), torch.zeros(1, 3, 32, 16), path, None)
    with pytest.raises(ModelError, match="plain.onnx: model metadata lacks crossview.name"):
        Embedder(path)
    with pytest.raises(ModelError, match="absent.onnx: model file not found"):
        Embedder(tmp_path / "absent.onnx")


def test_hot_reload(tmp_path, make_tiny_model, caplog):
    caplog.set_level(logging.INFO, logger="crossview.kernel.embedder")
    path = tmp_path / "model.onnx"
    make_tiny_model(path, "tiny-1", seed=1)
    embedder = Embedder(path, reload_check_s=0)
    crops = list(np.random.default_rng(0).integers(0, 256, (5, 60, 30, 3), dtype=np.uint8))
    first = embedder.embed(crops)
    assert not embedder.maybe_reload()  # unchanged file

    make_tiny_model(path, "tiny-2", seed=2)
    assert embedder.maybe_reload()
    assert embedder.version == "tiny-2"
    assert "embedding model reloaded: tiny-1 → tiny-2" in caplog.text
    second = embedder.embed(crops)
    assert not np.allclose(first, second)  # the new weights are really in use

    caplog.clear()
    path.write_bytes(b"half-written garbage")
    assert not embedder.maybe_reload()
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1 and "model.onnx: cannot load ONNX model" in errors[0].getMessage()
    assert embedder.version == "tiny-2"
    np.testing.assert_allclose(embedder.embed(crops), second, atol=1e-6)
    assert not embedder.maybe_reload()  # the same broken file is not retried or logged again
    assert len([r for r in caplog.records if r.levelno == logging.ERROR]) == 1

    make_tiny_model(path, "tiny-3", seed=3)  # a fixed file is picked up again
    assert embedder.maybe_reload() and embedder.version == "tiny-3"


def test_hot_reload_keeps_the_running_model_when_the_new_one_gives_nan(tmp_path, make_tiny_model, caplog):
    path = tmp_path / "model.onnx"
    make_tiny_model(path, "tiny-1", seed=1)
    embedder = Embedder(path, reload_check_s=0)
    crops = list(np.random.default_rng(0).integers(0, 256, (3, 60, 30, 3), dtype=np.uint8))
    before = embedder.embed(crops)
    filled_model(tmp_path / "nan.onnx", float("nan")).replace(path)
    assert not embedder.maybe_reload() and embedder.version == "tiny-1"
    assert "embedding model not reloaded, keeping tiny-1: " in caplog.text and "model.onnx: test inference gives NaN" in caplog.text
    np.testing.assert_allclose(embedder.embed(crops), before, atol=1e-6)


def test_reload_checks_are_throttled(tmp_path, make_tiny_model):
    path = tmp_path / "model.onnx"
    make_tiny_model(path, "tiny-1")
    embedder = Embedder(path, reload_check_s=3600)
    make_tiny_model(path, "tiny-2")
    assert not embedder.maybe_reload() and embedder.version == "tiny-1"
