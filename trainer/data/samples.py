"""The one sample record every data source produces, and the splits that group them.

| what              | how                                                                      |
|-------------------|--------------------------------------------------------------------------|
| one image         | `Sample(path, pid, camid, frame, track)`; pid -1 = unlabelled (or outlier), track -1 = unknown |
| labelled dataset  | `ReidSplit(name, train, query, gallery)`; `split.summary()` for the log   |
| unlabelled target | `TargetSet(samples, cameras, skipped)`: camid i is `cameras[i]`           |
| training labels   | `relabel(samples)` → pids 0..N-1; `with_labels(samples, pseudo)` for clusters |
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

UNLABELLED = -1


@dataclass(frozen=True)
class Sample:
    """One person image; `frame` is the source's frame number (orders one recording's images in time), -1 if unknown;
    `track` is the edge tracker's id of a harvested crop (one person within its camera, unless the tracker swapped), -1
    if unknown."""

    path: Path
    pid: int
    camid: int
    frame: int = -1
    track: int = -1


@dataclass(frozen=True)
class ReidSplit:
    """A labelled dataset: training images (pids 0..N-1 after `build_dataset`) and the evaluation query/gallery."""

    name: str
    train: tuple[Sample, ...] = ()
    query: tuple[Sample, ...] = ()
    gallery: tuple[Sample, ...] = ()

    def summary(self) -> str:
        """One line per split with its identity, image and camera counts, for the training log."""
        rows = [(part, getattr(self, part)) for part in ("train", "query", "gallery")]
        return "\n".join(f"{self.name} {part:7s} {describe(samples)}" for part, samples in rows)


@dataclass(frozen=True)
class TargetSet:
    """Unlabelled target images (pid -1); `skipped` counts files that could not be read."""

    samples: tuple[Sample, ...]
    cameras: tuple[str, ...]
    skipped: int = 0


def describe(samples: Iterable[Sample]) -> str:
    samples = list(samples)
    ids = {s.pid for s in samples if s.pid != UNLABELLED}
    cams = {s.camid for s in samples}
    return f"{len(ids):6d} ids {len(samples):7d} images {len(cams):3d} cameras"


def relabel(samples: Iterable[Sample]) -> list[Sample]:
    """Map pids to 0..N-1 in sorted order, as classification heads need; pid -1 stays -1."""
    samples = list(samples)
    ids = sorted({s.pid for s in samples if s.pid != UNLABELLED})
    new = {pid: i for i, pid in enumerate(ids)}
    return [replace(s, pid=new.get(s.pid, UNLABELLED)) for s in samples]


def with_labels(samples: Sequence[Sample], labels: Sequence[int]) -> list[Sample]:
    """The same images with new labels (e.g. cluster pseudo labels, -1 = outlier), in the same order."""
    if len(samples) != len(labels):
        raise ValueError(f"{len(labels)} labels for {len(samples)} samples")
    return [replace(s, pid=int(label)) for s, label in zip(samples, labels)]
