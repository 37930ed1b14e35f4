"""Export an embedding model to ONNX with Crossview metadata, checked against PyTorch.

| what                  | how                                                                        |
|-----------------------|----------------------------------------------------------------------------|
| export any embedder   | `export_onnx(model, "models/x.onnx", meta)` → max abs diff vs PyTorch       |
| default edge embedder | `build_default_embedder(Path("models/mobilenetv2-imagenet.onnx"))`           |
| trained model         | `export_trained(net, cfg, history, out)`: only its `.embedder()` (DAAM: the domain-shared path) |
| from a checkpoint     | `export_checkpoint("runs/train/daam/last.pt")`, read by `crossview.kernel.checkpoint` |
| new metadata only     | `write_metadata(src, out, meta)`: same graph, `meta`'s props (calibration, quantisation) |
| graph contract        | input "images" (batch, 3, H, W) float, mean/std normalised RGB;              |
|                       | output "embeddings" (batch, D), not L2-normalised; batch axis dynamic        |
| metadata contract     | `crossview.kernel.modelmeta` keys in ONNX `metadata_props` (re-exported here)       |

The file appears atomically (temp file + `os.replace`), so an edge node hot-reloading it never
reads a half-written model. For example, the default edge embedder:

    meta = build_default_embedder(Path("models/mobilenetv2-imagenet.onnx"))
    meta.version, meta.embedding_dim  # ('mobilenetv2-imagenet-1', 1280)
"""

from __future__ import annotations

import logging
import os
import warnings
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from torch import nn

from crossview.kernel.modelmeta import (  # noqa: F401  (re-exported: the contract lives beside the exporter)
    KEY_DATE,
    KEY_EMBEDDING_DIM,
    KEY_INPUT_SIZE,
    KEY_MEAN,
    KEY_METRICS,
    KEY_NAME,
    KEY_SOURCE,
    KEY_STD,
    KEY_TARGET,
    KEY_VERSION,
    PREFIX,
    ModelMeta,
)
from crossview.trainer.data.transforms import IMAGENET_MEAN, IMAGENET_STD  # noqa: F401  (re-exported)
from crossview.trainer.modeling.backbones import GapEmbedder, mobilenet_v2_imagenet

INPUT_NAME = "images"
OUTPUT_NAME = "embeddings"


def export_onnx(model: nn.Module, path: str | Path, meta: ModelMeta, opset: int = 17, atol: float = 1e-4) -> float:
    """Write `model` to `path` as ONNX with `meta`; return the max abs difference to PyTorch.

    Raises ValueError, leaving any existing file at `path` untouched, when the output width is not
    `meta.embedding_dim` or ONNX Runtime differs from PyTorch by more than `atol`.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)  # `crossview export --out models/site/v3.onnx` into a new folder
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")  # same folder, so os.replace is atomic
    was_training = model.training
    model.eval()
    try:
        _torch_export(model, tmp, meta, opset)
        proto = onnx.load(tmp)
        set_props(proto, meta)
        onnx.checker.check_model(proto)
        onnx.save(proto, tmp)
        diff = _parity(model, tmp, meta, path)
        if not diff <= atol:  # NaN weights give a NaN difference, which no ">" catches
            raise ValueError(f"{path}: ONNX Runtime differs from PyTorch by {diff:.2e} > atol {atol:.0e}")
        os.replace(tmp, path)
        return diff
    finally:
        tmp.unlink(missing_ok=True)
        model.train(was_training)


def set_props(proto: onnx.ModelProto, meta: ModelMeta) -> None:
    """Replace every `crossview.*` metadata prop of `proto` with `meta`'s; other tools' props are kept."""
    kept = [(p.key, p.value) for p in proto.metadata_props if not p.key.startswith(PREFIX)]
    del proto.metadata_props[:]
    for key, value in [*kept, *meta.to_props().items()]:
        proto.metadata_props.add(key=key, value=value)


def write_metadata(src: str | Path, out: str | Path, meta: ModelMeta) -> None:
    """`src`'s graph with `meta` as its Crossview metadata, to `out` atomically (`out` may be `src`)."""
    out = Path(out)
    proto = onnx.load(src)
    set_props(proto, meta)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    try:
        onnx.save(proto, tmp)
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)


def build_default_embedder(out: Path, input_size: tuple[int, int] = (256, 128)) -> ModelMeta:
    """Export the default edge embedder: ImageNet MobileNetV2 features + GAP, 1280-d."""
    meta = ModelMeta(
        name="mobilenetv2-imagenet",
        version="mobilenetv2-imagenet-1",
        input_h=input_size[0],
        input_w=input_size[1],
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        embedding_dim=1280,
        extra={"source": "imagenet"},
    )
    export_onnx(GapEmbedder(mobilenet_v2_imagenet()), out, meta)
    return meta


def _torch_export(model: nn.Module, path: Path, meta: ModelMeta, opset: int) -> None:
    dummy = torch.zeros(2, 3, meta.input_h, meta.input_w, device=_device(model))
    # The TorchScript exporter (dynamo=False) works offline without onnxscript; torch flags it as
    # deprecated on every call, which would only be noise in the trainer's log.
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(
            model,
            (dummy,),
            str(path),
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME],
            dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
            opset_version=opset,
            dynamo=False,
        )


def _parity(model: nn.Module, onnx_path: Path, meta: ModelMeta, name: Path) -> float:
    """Max abs difference between PyTorch and ONNX Runtime (CPU) on a random batch of 4."""
    x = torch.randn(4, 3, meta.input_h, meta.input_w, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = model(x.to(_device(model))).cpu().numpy()
    if expected.shape != (4, meta.embedding_dim):
        raise ValueError(
            f"{name}: model outputs {list(expected.shape)} for a batch of 4, metadata says dim {meta.embedding_dim}"
        )
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    got = session.run([OUTPUT_NAME], {INPUT_NAME: x.numpy()})[0]
    return float(np.abs(got - expected).max())


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters(), torch.empty(0)).device


def export_trained(model, cfg, history: list[dict], out: Path) -> Path:
    """Export a trained network's `.embedder()` (DAAM / DAAL: the domain-shared path) with the run's provenance."""
    now = datetime.now(timezone.utc)
    meta = ModelMeta(
        name=cfg.name,
        version=f"{cfg.name}-{now:%Y%m%dT%H%M%S.%f}"[:-3] + "Z",  # every export a new version for the edge
        input_h=cfg.input.height,
        input_w=cfg.input.width,
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        embedding_dim=model.dim,
        extra={
            "source": " + ".join(f"{s.kind}:{Path(s.root).name}" for s in (cfg.source, *cfg.source.also)),
            "target": f"{cfg.target.kind}:{Path(cfg.target.root).name}",
            "date": now.isoformat(timespec="seconds"),
            "metrics": history[-1] if history else {},
            "backbone": cfg.model.backbone,
            "method": cfg.method,
            "attention": cfg.model.attention,
            "attn3": cfg.model.attn3,
        },
    )
    diff = export_onnx(model.embedder(), out, meta)
    logging.getLogger("crossview.trainer").info("exported %s (version %s, max |ORT - torch| %.1e)", out,
                                                meta.version, diff)
    return out


def export_checkpoint(path: str | Path, out: Path | None = None) -> Path:
    """Re-export a training checkpoint (`<output_dir>/last.pt`) without training again."""
    from pydantic import ValidationError

    from crossview.kernel import checkpoint
    from crossview.trainer.config import TrainConfig
    from crossview.trainer.methods import METHODS

    path = Path(path)
    ckpt = checkpoint.load(path)
    try:
        cfg = TrainConfig.model_validate(ckpt.config)
    except ValidationError as e:
        raise ValueError(f"{path}: not a crossview training checkpoint (its config: {e})") from e
    method = METHODS[cfg.method](cfg)
    net = method.build(ckpt.num_source_ids, pretrained="none")
    method.load_state_dict(ckpt.method, net)
    net.load_state_dict(ckpt.deployed())  # the mean teacher, where the run kept one (`adapt.ema`)
    return export_trained(net, cfg, ckpt.state["history"], out or path.with_name(f"{cfg.name}.onnx"))
