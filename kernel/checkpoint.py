"""The training checkpoint format: one owner for the file the trainer writes and `crossview export` reads.

| what       | how                                                                                   |
|------------|---------------------------------------------------------------------------------------|
| format     | `Checkpoint`: the run's config, network weights, loop state, the method's own state, optimizer / scheduler / AMP scaler, and the mean teacher's weights (`adapt.ema`) |
| version    | `VERSION` 3 is stored with every file; v2 files (no teacher) read as v3; files from before the version key are v1 |
| deploy     | `deployed()`: the weights to export or start from: the mean teacher's where there is one, else the network's |
| write      | `save(ckpt, path)`: temp file beside it + `os.replace`, so a kill mid-write leaves the previous one whole |
| read       | `load(path)` → `Checkpoint`; FileNotFoundError, or ValueError naming the file for junk or another version |

The values are plain dicts (state dicts, `TrainConfig.model_dump(mode="json")`): the kernel knows the
layout, not the trainer's classes. torch is imported inside `save` / `load` only, so importing the
kernel does not need it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, fields
from pathlib import Path

VERSION = 3


@dataclass
class Checkpoint:
    """One training checkpoint; `optimizer`, `scheduler` and `scaler` are None outside a stage's epochs."""

    config: dict  # the run's TrainConfig as JSON-able values
    num_source_ids: int  # width of the source classifier, needed to rebuild the network
    model: dict  # the network's state dict
    state: dict  # where the loop is: stage, iteration, epoch, evaluation history
    method: dict | None = None  # the adaptation method's own state (DAAM / DAAL: the pseudo labels)
    optimizer: dict | None = None
    scheduler: dict | None = None
    scaler: dict | None = None
    ema: dict | None = None  # the mean teacher's state dict (`adapt.ema`), once adapting; None without one

    def deployed(self) -> dict:
        """The network weights to export, or to start another run from."""
        return self.ema if self.ema is not None else self.model


def save(ckpt: Checkpoint, path: str | Path) -> None:
    import torch

    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    # Field by field, not dataclasses.asdict: that would deep-copy every weight tensor first.
    torch.save({"version": VERSION, **{f.name: getattr(ckpt, f.name) for f in fields(ckpt)}}, tmp)
    os.replace(tmp, path)


def load(path: str | Path) -> Checkpoint:
    import torch

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:  # our own file: it holds numpy pseudo labels, so not weights_only
        raw = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:
        raise ValueError(f"{path}: not a crossview training checkpoint ({e})") from e
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: not a crossview training checkpoint (holds a {type(raw).__name__})")
    version = raw.pop("version", 1)
    if version == 1:  # v1 had no version key and kept the method's state (the pseudo labels) as "labels"
        raw["method"] = raw.pop("labels", None)
    elif version not in (2, VERSION):  # v2 is v3 without the teacher
        raise ValueError(f"{path}: checkpoint format version {version!r}; this crossview reads versions 1 to {VERSION}")
    try:
        return Checkpoint(**raw)
    except TypeError as e:
        raise ValueError(f"{path}: not a crossview training checkpoint ({e})") from e
