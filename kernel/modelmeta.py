"""The metadata every Crossview ONNX embedding model carries in its `metadata_props`.

| what            | how                                                                          |
|-----------------|------------------------------------------------------------------------------|
| write (trainer) | `meta.to_props()` → `{"crossview.name": ..., ...}`, all strings              |
| read (edge)     | `ModelMeta.from_props(session.get_modelmeta().custom_metadata_map, path)`    |
| errors          | `ValueError` naming the model file and the missing or bad key                |
| free keys       | `extra={"source": ..., "target": ..., "date": ..., "metrics": ...}`           |
| optional keys   | `crossview.precision` ("fp32" when absent, "int8" for a quantised model);     |
|                 | `crossview.calibration` (`kernel.calibration.Calibration` JSON; absent: uncalibrated) |

No torch or onnx import here: the edge node reads metadata through ONNX Runtime alone.

    >>> meta = ModelMeta("m", "m-1", 256, 128, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225), 1280)
    >>> meta.to_props()["crossview.input_size"]
    '256x128'
    >>> ModelMeta.from_props(meta.to_props(), "m.onnx") == meta
    True
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field

from crossview.kernel.calibration import Calibration

PREFIX = "crossview."
KEY_NAME = "crossview.name"
KEY_VERSION = "crossview.version"
KEY_INPUT_SIZE = "crossview.input_size"  # "HxW", e.g. "256x128"
KEY_MEAN = "crossview.mean"  # "0.485,0.456,0.406", RGB order, on 0..1 pixels
KEY_STD = "crossview.std"
KEY_EMBEDDING_DIM = "crossview.embedding_dim"
REQUIRED_KEYS = (KEY_NAME, KEY_VERSION, KEY_INPUT_SIZE, KEY_MEAN, KEY_STD, KEY_EMBEDDING_DIM)
# Optional free keys, stored in `ModelMeta.extra` without the prefix.
KEY_SOURCE, KEY_TARGET, KEY_DATE, KEY_METRICS = (PREFIX + k for k in ("source", "target", "date", "metrics"))
# Optional typed keys, added after the first models shipped: a model without them still loads.
KEY_PRECISION = "crossview.precision"
KEY_CALIBRATION = "crossview.calibration"
PRECISIONS = ("fp32", "fp16", "int8")
TYPED_KEYS = (*REQUIRED_KEYS, KEY_PRECISION, KEY_CALIBRATION)


@dataclass(frozen=True)
class ModelMeta:
    name: str
    version: str  # what the edge logs and publishes; a new model file must bring a new version
    input_h: int
    input_w: int
    mean: tuple[float, float, float]  # RGB
    std: tuple[float, float, float]
    embedding_dim: int
    extra: dict[str, str] = field(default_factory=dict)  # free keys without the "crossview." prefix
    precision: str = "fp32"  # of the weights and arithmetic; the input and output stay float32
    calibration: Calibration | None = None  # cosine → P(same person); None: scores are raw cosines

    def to_props(self) -> dict[str, str]:
        props = {
            KEY_NAME: self.name,
            KEY_VERSION: self.version,
            KEY_INPUT_SIZE: f"{self.input_h}x{self.input_w}",
            KEY_MEAN: _floats_str(self.mean),
            KEY_STD: _floats_str(self.std),
            KEY_EMBEDDING_DIM: str(self.embedding_dim),
            KEY_PRECISION: self.precision,
        }
        if self.calibration is not None:
            props[KEY_CALIBRATION] = self.calibration.to_json()
        # Non-string extras (e.g. a metrics dict) are stored as JSON, the contract for crossview.metrics.
        props.update({PREFIX + k: v if isinstance(v, str) else json.dumps(v) for k, v in self.extra.items()})
        return props

    @classmethod
    def from_props(cls, props: dict[str, str], origin: str) -> ModelMeta:
        missing = [k for k in REQUIRED_KEYS if not props.get(k)]
        if missing:
            raise ValueError(f"{origin}: model metadata lacks {', '.join(missing)}")
        h, w = _parse(origin, props, KEY_INPUT_SIZE, lambda s: [_positive(int(x)) for x in s.split("x")], 2, "HxW")
        mean = _parse(origin, props, KEY_MEAN, lambda s: [float(x) for x in s.split(",")], 3, "3 floats R,G,B")
        std = _parse(origin, props, KEY_STD, lambda s: [_positive(float(x)) for x in s.split(",")], 3, "3 floats > 0")
        (dim,) = _parse(origin, props, KEY_EMBEDDING_DIM, lambda s: [_positive(int(s))], 1, "an integer > 0")
        precision = props.get(KEY_PRECISION, "fp32")
        if precision not in PRECISIONS:
            raise ValueError(f"{origin}: bad model metadata {KEY_PRECISION}={precision!r}, expected one of {PRECISIONS}")
        calibration = Calibration.from_json(props[KEY_CALIBRATION], origin) if KEY_CALIBRATION in props else None
        extra = {k[len(PREFIX):]: v for k, v in props.items() if k.startswith(PREFIX) and k not in TYPED_KEYS}
        version = props[KEY_VERSION]
        if not _VERSION.fullmatch(version) or not version.strip("."):
            raise ValueError(f"{origin}: bad model metadata {KEY_VERSION}={version[:200]!r}: 1..128 letters, digits, "
                             "'_', '.', '+', '-', not only dots (it names the model's file in the registry)")
        return cls(props[KEY_NAME], version, h, w, tuple(mean), tuple(std), dim, extra, precision, calibration)


_VERSION = re.compile(r"[A-Za-z0-9_.+-]{1,128}")  # on the wire as `model` (kernel.wire.MAX_MODEL_LEN), and a file name


def _floats_str(values) -> str:
    return ",".join(str(float(v)) for v in values)  # str(float) round-trips exactly


def _positive(x):
    if x <= 0:
        raise ValueError("not positive")
    return x


def _parse(origin: str, props: dict[str, str], key: str, parse, count: int, expected: str) -> list:
    try:
        values = parse(props[key])
    except ValueError:
        values = []
    if len(values) != count:
        raise ValueError(f"{origin}: bad model metadata {key}={props[key]!r}, expected {expected}")
    return values
