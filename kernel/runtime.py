"""Process setup shared by every Crossview command.

| what                 | why                                                                 |
|----------------------|---------------------------------------------------------------------|
| `offline_env()`      | ultralytics must never download weights or pip-install at run time |
| `ultralytics()`      | the ultralytics module, imported offline and without its global thread limits |
| `passive_threads()`  | idle OpenMP threads sleep instead of spinning: on a shared 2-core box spinning torch threads starve each other |
| `setup_logging()`    | one log format for every service                                    |
| `listening(key, address)` | a failed bind names the config key and the address, not a raw socket error |

Import ultralytics through `ultralytics()`: it reads these variables at import.
"""

from __future__ import annotations

import errno
import logging
import os
from contextlib import contextmanager

OFFLINE_ENV = {
    "YOLO_OFFLINE": "1",  # ultralytics treats the machine as offline: no hub, no downloads
    "YOLO_AUTOINSTALL": "false",  # never pip-install missing requirements on the fly
    "YOLO_VERBOSE": "false",
}


def offline_env() -> None:
    for key, value in OFFLINE_ENV.items():
        os.environ[key] = value


def passive_threads() -> None:
    """Must run before torch is imported (libgomp reads it once). On this 2-core machine while other
    processes ran, a DAAM training step at 64x32 with 2 threads went from 28 to 103 images/s with it; with
    little other load the two are close (docs/benchmarks.md). Set OMP_WAIT_POLICY yourself to override."""
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def ultralytics():
    """Import ultralytics offline. Its import turns OpenCV's threading off (`cv2.setNumThreads(0)`, for
    its DataLoader) and caps OpenMP; the edge's HOG detector and decoders want every core back."""
    import cv2

    offline_env()
    threads, omp = cv2.getNumThreads(), os.environ.get("OMP_NUM_THREADS")
    import ultralytics

    cv2.setNumThreads(threads)
    if omp is None:
        os.environ.pop("OMP_NUM_THREADS", None)
    return ultralytics


def setup_logging(level: str = "INFO") -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper(), logging.INFO),
        format="%(asctime)s %(levelname)-7s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    logging.getLogger("faiss.loader").setLevel(logging.WARNING)  # which SIMD build loaded: noise on every run


@contextmanager
def listening(key: str, address: str):
    """Wrap a bind (ZeroMQ, HTTP, metrics): the error names the config key and the address."""
    try:
        yield
    except Exception as e:  # OSError, zmq.ZMQError: both carry errno
        if getattr(e, "errno", None) == errno.EADDRINUSE:
            raise OSError(f"{key}: {address} is already in use (another Crossview process, or another program); "
                          "pick a free port") from None
        if isinstance(e, OSError) or hasattr(e, "errno"):
            raise OSError(f"{key}: cannot listen on {address}: {e}") from None
        raise
