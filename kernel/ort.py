"""ONNX Runtime sessions for the edge node's models (detector and embedder).

| what                 | why                                                                    |
|----------------------|------------------------------------------------------------------------|
| `select_providers()` | CUDA only when a GPU is really usable: onnxruntime-gpu on a CPU-only machine otherwise logs errors at every session |
| `create_session()`   | one place that opens a model file and turns its failures into `ModelError` |

    sess = create_session("models/yolo11n.onnx", device="auto")

    >>> select_providers("cpu")
    ['CPUExecutionProvider']
"""

from __future__ import annotations

import ctypes
import functools
import os
import sys
from pathlib import Path

import onnxruntime as ort

# Without this, onnxruntime-gpu on a machine with no GPU logs provider warnings at every session.
ort.set_default_logger_severity(3)

DEVICES = ("auto", "cpu", "cuda")


class ModelError(ValueError):
    """A model file is missing, unloadable or breaks the Crossview model contract; names the file."""


@functools.cache
def _gpu_usable() -> bool:
    """True when the CUDA driver reports a device; asked through libcuda, so torch is not needed."""
    try:
        cuda = ctypes.CDLL("nvcuda.dll" if sys.platform == "win32" else "libcuda.so.1")
    except OSError:
        return False
    count = ctypes.c_int(0)
    return cuda.cuInit(0) == 0 and cuda.cuDeviceGetCount(ctypes.byref(count)) == 0 and count.value > 0


def select_providers(device: str) -> list[str]:
    """ONNX Runtime providers for `device` ("auto", "cpu" or "cuda"), best first."""
    if device not in DEVICES:
        raise ValueError(f"device must be one of {DEVICES}, got {device!r}")
    cuda = device != "cpu" and "CUDAExecutionProvider" in ort.get_available_providers() and _gpu_usable()
    if device == "cuda" and not cuda:
        raise ValueError("device 'cuda' requested but ONNX Runtime has no CUDA provider or no GPU is usable: set "
                         "the device to auto (a GPU when one is usable) or cpu")
    return ["CUDAExecutionProvider", "CPUExecutionProvider"] if cuda else ["CPUExecutionProvider"]


def create_session(path: str | Path, device: str = "auto", threads: int = 0) -> ort.InferenceSession:
    path = Path(path)
    if not path.is_file():
        raise ModelError(f"{path}: model file not found")
    options = ort.SessionOptions()
    # All cores, no busy-waiting: on a small edge box the spinning threads of the detector's and the
    # embedder's sessions otherwise steal each other's (and the decoders') cores (bench/edge_bench.py).
    options.intra_op_num_threads = threads or len(os.sched_getaffinity(0))  # the cores this process may use
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    try:
        return ort.InferenceSession(str(path), options, providers=select_providers(device))
    except Exception as e:  # ORT raises its own exception types for corrupt and invalid files
        raise ModelError(f"{path}: cannot load ONNX model ({e})") from e
