"""Re-ID embeddings with ONNX Runtime, one preprocessing for edge, matcher and trainer; hot-reloads the model file.

| what          | how                                                                                |
|---------------|------------------------------------------------------------------------------------|
| embed crops   | `Embedder(path).embed([bgr_uint8, ...])` → (N, dim) float32, rows L2-normalised     |
| preprocessing | from the model's `crossview.*` metadata: resize to HxW, BGR→RGB, /255, mean/std     |
|               | (`preprocess(crops)`: the batch `embed` feeds ONNX Runtime, for int8 calibration)  |
| precision     | fp32 and quantised (int8 QDQ) models alike: float32 in, float32 out; `meta.precision` |
| hot reload    | `maybe_reload()` each loop: a changed file is loaded, validated, then swapped in;   |
|               | a broken file is logged once and the running model kept                            |
| providers     | `crossview.kernel.ort.select_providers`: CUDA only when ONNX Runtime has it and a GPU is there  |
| errors        | `ModelError` naming the file and what is wrong with it, also for a test inference  |
|               | that gives NaN, infinite or all-zero vectors (broken weights)                      |

    embedder = Embedder("models/mobilenetv2-imagenet.onnx")
    embedder.embed([np.zeros((200, 80, 3), np.uint8)]).shape   # (1, 1280)
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import onnxruntime as ort

from crossview.kernel.modelmeta import ModelMeta
from crossview.kernel.ort import ModelError, create_session, select_providers

log = logging.getLogger(__name__)

_NO_BAD_STATE = object()  # not None: None is the state of a missing file


@dataclass(frozen=True)
class _Model:
    """A validated session and what is needed to feed it; swapped as one object on reload."""

    session: ort.InferenceSession
    meta: ModelMeta
    input_name: str
    output_name: str
    scale: np.ndarray  # (3,) per RGB channel: 1 / (255 * std)
    offset: np.ndarray  # (3,) per RGB channel: mean / std


def _file_state(path: Path) -> tuple[int, int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_mtime_ns, st.st_size, st.st_ino


def _load(path: Path, device: str, threads: int) -> _Model:
    session = create_session(path, device, threads)
    try:
        meta = ModelMeta.from_props(session.get_modelmeta().custom_metadata_map, str(path))
    except ValueError as e:
        raise ModelError(str(e)) from None
    inputs, outputs = session.get_inputs(), session.get_outputs()
    if len(inputs) != 1:
        raise ModelError(f"{path}: model must have one input, has {len(inputs)}")
    shape, dtype = inputs[0].shape, inputs[0].type
    if len(shape) != 4 or shape[1] != 3 or dtype != "tensor(float)":
        raise ModelError(f"{path}: input must be (batch, 3, H, W) float, got {shape} {dtype}")
    for dim, want, axis in zip(shape[2:], (meta.input_h, meta.input_w), "HW"):
        if isinstance(dim, int) and dim != want:  # str/None dims are dynamic and accept any size
            raise ModelError(f"{path}: input {axis} is {dim} but metadata crossview.input_size says {want}")
    model = _Model(
        session, meta, inputs[0].name, outputs[0].name,
        scale=1 / (255 * np.asarray(meta.std, np.float32)),
        offset=np.asarray(meta.mean, np.float32) / np.asarray(meta.std, np.float32),
    )
    # One real run checks what static shapes cannot (dynamic output dims, runtime failures, broken weights) before
    # the model is used, and warms the session up. A textured input, not zeros: a bias-free model maps zeros to zeros.
    probe = np.random.default_rng(0).standard_normal((1, 3, meta.input_h, meta.input_w)).astype(np.float32)
    try:
        out = _run(model, probe)
    except Exception as e:
        raise ModelError(f"{path}: test inference failed ({e})") from e
    if out.shape != (1, meta.embedding_dim):
        raise ModelError(f"{path}: output is {list(out.shape)} for one crop, metadata says dim {meta.embedding_dim}")
    if not np.isfinite(out).all():  # every sighting would be refused by the matcher
        raise ModelError(f"{path}: test inference gives NaN or infinite values: its weights are broken "
                         "(a training run that diverged?)")
    if not out.any():
        raise ModelError(f"{path}: test inference gives an all-zero embedding: it cannot tell people apart")
    return model


def _run(model: _Model, batch: np.ndarray) -> np.ndarray:
    return model.session.run([model.output_name], {model.input_name: batch})[0]


def _preprocess(model: _Model, crops: list[np.ndarray]) -> np.ndarray:
    """BGR uint8 crops of any size → (N, 3, H, W) float32, normalised RGB."""
    h, w = model.meta.input_h, model.meta.input_w
    for crop in crops:
        if crop.ndim != 3 or crop.shape[2] != 3 or crop.shape[0] == 0 or crop.shape[1] == 0:
            raise ValueError(f"crops must be non-empty (H, W, 3) BGR images, got shape {crop.shape}")
    resized = np.stack([cv2.resize(c, (w, h), interpolation=cv2.INTER_LINEAR) for c in crops])
    batch = np.empty((len(crops), 3, h, w), np.float32)
    for rgb, bgr in enumerate((2, 1, 0)):  # one fused scale-and-shift per channel, written straight to NCHW
        np.multiply(resized[..., bgr], model.scale[rgb], out=batch[:, rgb])
        batch[:, rgb] -= model.offset[rgb]
    return batch


class Embedder:
    """Embeds person crops with the ONNX model at `model_path`; see the module docstring."""

    def __init__(
        self,
        model_path: str | Path,
        batch_size: int = 32,
        device: str = "auto",
        reload_check_s: float = 2.0,
        threads: int = 0,
        key: str = "model",
    ):
        """`key` is the config key that named the file, for the error when it is missing."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.path = Path(model_path)
        self.batch_size = batch_size
        self.reload_check_s = reload_check_s
        self._device = device
        select_providers(device)  # a bad device fails here, not at the first reload
        self._threads = threads
        # Stat before loading: a file replaced during the load then differs at the next check.
        self._state = _file_state(self.path)
        if self._state is None:
            raise ModelError(f"{key}: {self.path}: model file not found; `crossview build-embedder --out {self.path}` "
                             "makes the default one")
        self._model = _load(self.path, device, threads)
        self._bad_state: object = _NO_BAD_STATE
        self._next_check = time.monotonic() + reload_check_s

    @property
    def meta(self) -> ModelMeta:
        return self._model.meta

    @property
    def version(self) -> str:
        return self._model.meta.version

    @property
    def input_name(self) -> str:
        return self._model.input_name

    @property
    def dim(self) -> int:
        return self._model.meta.embedding_dim

    def preprocess(self, crops: list[np.ndarray]) -> np.ndarray:
        """(N, 3, H, W) float32: exactly the input `embed` gives the model, so quantisation calibrates on it."""
        return _preprocess(self._model, crops)

    def embed(self, crops: list[np.ndarray]) -> np.ndarray:
        """(N, dim) float32 unit rows for BGR uint8 crops; (0, dim) for no crops."""
        model = self._model  # one model for the whole call, even if maybe_reload() swaps meanwhile
        if not crops:
            return np.zeros((0, model.meta.embedding_dim), np.float32)
        out = np.concatenate([
            _run(model, _preprocess(model, crops[i:i + self.batch_size]))
            for i in range(0, len(crops), self.batch_size)
        ]).astype(np.float32, copy=False)
        out /= np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-12)  # an all-zero row stays zero
        return out

    def maybe_reload(self) -> bool:
        """Swap in the model file if it changed (checked at most every reload_check_s); True if swapped."""
        now = time.monotonic()
        if now < self._next_check:
            return False
        self._next_check = now + self.reload_check_s
        state = _file_state(self.path)
        if state == self._state or state == self._bad_state:  # unchanged, or broken and already reported
            return False
        try:
            if state is None:
                raise ModelError(f"{self.path}: model file not found")
            model = _load(self.path, self._device, self._threads)
        except ModelError as e:
            self._bad_state = state
            log.error("embedding model not reloaded, keeping %s: %s", self.version, e)
            return False
        old = self.version
        self._model, self._state, self._bad_state = model, state, _NO_BAD_STATE
        log.info("embedding model reloaded: %s → %s", old, model.meta.version)
        return True
