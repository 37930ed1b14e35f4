"""int8 embedders: ONNX Runtime static quantisation (QDQ, per channel), calibrated on the site's harvested crops.

| step          | how                                                                                   |
|---------------|---------------------------------------------------------------------------------------|
| calibration   | up to `max_crops` harvested crops, preprocessed by `kernel.embedder.Embedder.preprocess`: |
|               | exactly the tensors the edge will feed the model                                      |
| quantisation  | `onnxruntime.quantization.quantize_static`: QDQ format, per-channel int8 weights,    |
|               | uint8 activations (U8S8, the x86 VNNI fast path), MinMax ranges                       |
| metadata      | the fp32 model's, with `precision="int8"` and version `<fp32 version>-int8-<graph hash>`: the matcher |
|               | keeps the two models' vectors in separate partitions; a calibration is dropped, as the |
|               | int8 model's cosines differ: fit one for it with `crossview calibrate`                 |
| float stem    | the fewest leading convolutions (`FLOAT_STEMS`) kept float for the int8 vectors to agree |
|               | with fp32's (mean cosine >= `min_agreement` on held-out crops), each tried model loaded |
|               | in the edge `Embedder`; or a fixed `float_stem`                                         |

    meta = quantize_model(Path("models/mobilenetv2-imagenet.onnx"), Path("harvest"), Path("models/mnv2-int8.onnx"))
    meta.version, meta.precision  # ('mobilenetv2-imagenet-1-int8-3f2a9c1e', 'int8')
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
from dataclasses import replace
from pathlib import Path

import cv2
import numpy as np
import onnx
from onnxruntime.quantization import CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType, quantize_static
from onnxruntime.quantization.shape_inference import quant_pre_process

from crossview.kernel.embedder import Embedder
from crossview.kernel.modelmeta import ModelMeta
from crossview.trainer.data.harvest import harvest_samples
from crossview.trainer.export import write_metadata

log = logging.getLogger(__name__)

MAX_CROPS = 256  # calibration crops: ranges settle after a few hundred; more only slows the fit
MIN_CROPS = 16
BATCH = 16
# The ImageNet MobileNetV2's first convolutions do not survive per-tensor uint8 activations (mean cosine
# to fp32 0.89, 4.9 mAP lost on TUD-Stadtmitte); keeping 4 float restores 0.997. A DAAM-trained one
# quantises whole at 0.982 for 0.2 mAP lost: 0.98 tells the two apart. Stems are tried in order.
FLOAT_STEMS = (0, 2, 4, 8)
MIN_AGREEMENT = 0.98


class CropReader(CalibrationDataReader):
    """Feeds quantisation calibration the edge's own preprocessing of harvested crops, one batch at a time."""

    def __init__(self, embedder: Embedder, crops: list[np.ndarray], input_name: str):
        self._batches = iter([embedder.preprocess(crops[i:i + BATCH]) for i in range(0, len(crops), BATCH)])
        self._input = input_name

    def get_next(self) -> dict[str, np.ndarray] | None:
        batch = next(self._batches, None)
        return None if batch is None else {self._input: batch}


def calibration_crops(harvest: str | Path, max_crops: int = MAX_CROPS, seed: int = 0) -> list[np.ndarray]:
    """Up to `max_crops` harvested crops (BGR), drawn at random over the whole harvest, not its first camera."""
    samples = harvest_samples(harvest).samples
    if len(samples) < MIN_CROPS:
        raise ValueError(f"{harvest}: {len(samples)} readable crop(s), need at least {MIN_CROPS} to calibrate int8 ranges")
    picked = np.random.default_rng(seed).permutation(len(samples))[:max_crops]
    return [cv2.imread(str(samples[k].path)) for k in sorted(picked)]


def int8_meta(meta: ModelMeta, harvest: Path, crops: int, float_stem: int, graph: bytes) -> ModelMeta:
    """The int8 model's metadata; its version names the fp32 one and hashes the quantised graph: two
    quantisations (other crops, another float stem) give other vectors, so never one version."""
    note = (f"onnxruntime static QDQ, per-channel s8 weights, u8 activations, MinMax on {crops} crops of {harvest.name}; "
            f"first {float_stem} convolution(s) float")
    digest = hashlib.sha1(graph).hexdigest()[:8]
    return replace(meta, version=f"{meta.version}-int8-{digest}", precision="int8", calibration=None,
                   extra={**meta.extra, "quantized_from": meta.version, "quantization": note, "float_stem": str(float_stem)})


def quantize_model(model: str | Path, harvest: str | Path, out: str | Path, max_crops: int = MAX_CROPS, seed: int = 0,
                   float_stem: int | None = None, min_agreement: float = MIN_AGREEMENT) -> ModelMeta:
    """Write the int8 version of the fp32 `model` to `out`, calibrated on `harvest`; its metadata.

    `float_stem` convolutions at the input stay float; None tries `FLOAT_STEMS` in order and keeps the
    first whose vectors agree with fp32's (mean cosine on held-out crops) by `min_agreement`.
    """
    model, harvest, out = Path(model), Path(harvest), Path(out)
    if out.resolve() == model.resolve():
        raise ValueError(f"{out}: the int8 model needs its own file; the fp32 original stays for other edges")
    fp32 = Embedder(model, device="cpu")
    if fp32.meta.precision != "fp32":
        raise ValueError(f"model {fp32.version} is already {fp32.meta.precision}: quantise its fp32 original")
    crops = calibration_crops(harvest, max_crops, seed)
    # Every 4th crop is held out of the range calibration to judge the result on crops it did not fit.
    fit, check = [c for k, c in enumerate(crops) if k % 4], crops[::4]
    if fp32.meta.calibration is not None:
        log.warning("%s: its calibration is not carried over (int8 cosines differ): run crossview calibrate %s", model, out)
    log.info("quantising %s: ranges from %d crops of %s, %d held out", fp32.version, len(fit), harvest, len(check))
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        prepared = Path(tmp) / "prepared.onnx"
        # Shape inference and graph folding first, as ONNX Runtime advises: quantisation then sees fused ops.
        quant_pre_process(str(model), str(prepared))
        convs = [n.name for n in onnx.load(prepared).graph.node if n.op_type == "Conv"]
        for stem in FLOAT_STEMS if float_stem is None else (float_stem,):
            path = Path(tmp) / f"int8-{stem}.onnx"
            quantize_static(str(prepared), str(path), CropReader(fp32, fit, fp32.input_name), quant_format=QuantFormat.QDQ,
                            per_channel=True, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                            calibrate_method=CalibrationMethod.MinMax, nodes_to_exclude=convs[:stem])
            meta = int8_meta(fp32.meta, harvest, len(fit), stem, path.read_bytes())
            write_metadata(path, path, meta)
            agreement = _agreement(fp32, path, check)
            log.info("first %d convolution(s) float: int8 vs fp32 cosine on held-out crops %.4f", stem, agreement)
            if agreement >= min_agreement or float_stem is not None:
                break
        else:
            raise ValueError(f"{model}: int8 vectors agree with fp32's at cosine {agreement:.3f} < {min_agreement} even "
                             f"with the first {stem} convolutions float: this model does not quantise well, keep it fp32")
        os.replace(path, out)
    log.info("wrote %s (version %s)", out, meta.version)
    return meta


def _agreement(fp32: Embedder, int8_path: Path, crops: list[np.ndarray]) -> float:
    """Mean cosine between the fp32 and int8 vectors of `crops`, the int8 model loaded as the edge loads it."""
    int8 = Embedder(int8_path, device="cpu")
    return float(np.einsum("nd,nd->n", fp32.embed(crops), int8.embed(crops)).mean())
