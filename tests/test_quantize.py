"""int8 embedders: static QDQ quantisation calibrated on a real harvest, loaded by the edge's Embedder."""

from __future__ import annotations

import logging

import cv2
import numpy as np
import onnx
import pytest
from helpers import shared_data

from crossview.cli import main
from crossview.kernel.embedder import Embedder
from crossview.trainer.data.mot_harvest import mot_harvest
from crossview.trainer.quantize import MIN_CROPS, quantize_model


@pytest.fixture(scope="module")
def harvest(tmp_path_factory):
    """TUD-Campus gt crops in the harvest format (75 crops of 8 people)."""
    root = tmp_path_factory.mktemp("campus")
    mot_harvest(shared_data("TUD-Campus"), root / "cache", root / "harvest", frame_step=5)
    return root / "harvest"


@pytest.fixture(scope="module")
def crops(harvest):
    return [cv2.imread(str(p)) for p in sorted(harvest.rglob("*.jpg"))]


def test_quantize_cli_writes_an_int8_model_the_edge_loads_under_its_own_version(harvest, crops, default_model, tmp_path,
                                                                               capsys):
    out = tmp_path / "int8.onnx"
    assert main(["quantize", str(default_model), "--calib-harvest", str(harvest), "--out", str(out),
                 "--max-crops", "32", "--float-stem", "4"]) == 0
    assert "int8" in capsys.readouterr().out
    fp32, int8 = Embedder(default_model, device="cpu"), Embedder(out, device="cpu")
    assert int8.meta.precision == "int8" and fp32.meta.precision == "fp32"
    assert int8.version.startswith(f"{fp32.version}-int8-") and int8.version != fp32.version  # never one partition
    assert int8.meta.extra["quantized_from"] == fp32.version and int8.meta.extra["float_stem"] == "4"
    assert int8.dim == fp32.dim
    graph = onnx.load(out).graph
    assert {"QuantizeLinear", "DequantizeLinear"} <= {n.op_type for n in graph.node}  # QDQ format
    shapes = {i.name: list(i.dims) for i in graph.initializer}
    # Per channel: weight scales are vectors, one per output channel, not one number per tensor.
    assert any(len(shapes.get(n.input[1], [])) == 1 and shapes[n.input[1]][0] > 1
               for n in graph.node if n.op_type == "DequantizeLinear")
    agree = np.einsum("nd,nd->n", fp32.embed(crops), int8.embed(crops))
    assert agree.mean() > 0.98
    assert main(["model-info", str(out)]) == 0
    assert f"{int8.version}, int8" in capsys.readouterr().out


def test_the_float_stem_is_searched_until_the_vectors_agree(harvest, crops, make_tiny_model, tmp_path):
    fp32_path = tmp_path / "tiny.onnx"
    make_tiny_model(fp32_path, "tiny-1")
    meta = quantize_model(fp32_path, harvest, tmp_path / "tiny-int8.onnx", max_crops=32)
    assert meta.extra["float_stem"] == "0"  # one small conv quantises well: nothing kept float
    other = quantize_model(fp32_path, harvest, tmp_path / "other-int8.onnx", max_crops=16)
    assert other.version != meta.version  # other calibration crops, other vectors: another version
    agree = np.einsum("nd,nd->n", Embedder(fp32_path, device="cpu").embed(crops),
                      Embedder(tmp_path / "tiny-int8.onnx", device="cpu").embed(crops))
    assert agree.mean() >= 0.99
    with pytest.raises(ValueError, match="does not quantise well, keep it fp32"):
        quantize_model(fp32_path, harvest, tmp_path / "never.onnx", max_crops=32, min_agreement=1.01)
    assert not (tmp_path / "never.onnx").exists()


def test_bad_inputs_give_clear_errors(harvest, make_tiny_model, tmp_path, caplog):
    fp32_path, int8_path = tmp_path / "tiny.onnx", tmp_path / "tiny-int8.onnx"
    make_tiny_model(fp32_path, "tiny-1")
    with pytest.raises(ValueError, match="needs its own file"):
        quantize_model(fp32_path, harvest, fp32_path)
    few = tmp_path / "few"
    for crop in sorted(harvest.rglob("*.jpg"))[:MIN_CROPS - 1]:
        (few / crop.parent.name).mkdir(parents=True, exist_ok=True)
        (few / crop.parent.name / crop.name).write_bytes(crop.read_bytes())
    with pytest.raises(ValueError, match=f"{MIN_CROPS - 1} readable crop\\(s\\), need at least {MIN_CROPS}"):
        quantize_model(fp32_path, few, int8_path)
    quantize_model(fp32_path, harvest, int8_path, max_crops=16, float_stem=0)
    with pytest.raises(ValueError, match="tiny-1-int8-[0-9a-f]{8} is already int8: quantise its fp32 original"):
        quantize_model(int8_path, harvest, tmp_path / "twice.onnx")
    with caplog.at_level(logging.ERROR, logger="crossview"):
        assert main(["export", str(tmp_path / "last.pt"), "--int8"]) == 2
    assert "--int8 needs --calib-harvest DIR" in caplog.text
