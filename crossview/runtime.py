"""Process setup shared by every Crossview command.

| what                 | why                                                                 |
|----------------------|---------------------------------------------------------------------|
| `offline_env()`      | ultralytics must never download weights or pip-install at run time |
| `setup_logging()`    | one log format for every service                                    |

Call `offline_env()` before `ultralytics` is imported: it reads these variables at import.
"""

from __future__ import annotations

import logging
import os

OFFLINE_ENV = {
    "YOLO_OFFLINE": "1",  # ultralytics treats the machine as offline: no hub, no downloads
    "YOLO_AUTOINSTALL": "false",  # never pip-install missing requirements on the fly
    "YOLO_VERBOSE": "false",
}


def offline_env() -> None:
    for key, value in OFFLINE_ENV.items():
        os.environ[key] = value


def setup_logging(level: str = "INFO") -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper(), logging.INFO),
        format="%(asctime)s %(levelname)-7s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    logging.getLogger("faiss.loader").setLevel(logging.WARNING)  # which SIMD build loaded: noise on every run
