"""A training run's data from its config: the labelled source, the unlabelled target and the target's evaluation split.

| what                 | how                                                                            |
|----------------------|--------------------------------------------------------------------------------|
| everything for a run | `load_train_data(cfg)` → `TrainData(source, target, query, gallery, num_source_ids, target_cameras)` |
| one labelled set     | `labelled_split(kind, root, cache_dir)` → `ReidSplit` (cache_dir is used by `mot` only) |
| the source           | `source_samples(cfg.source, cache_dir)`: the source and every `source.also` dataset, pids and cameras kept apart |
| labelled target      | its training images lose their labels (pid -1) so adaptation never sees them; its query/gallery evaluate the run when `target.evaluate` |
| harvest + labels     | `target.evaluate_on`: a site harvest trains, the same footage's labelled split (MOT ground truth) evaluates |
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

from crossview.trainer.data.datasets import build_dataset
from crossview.trainer.data.harvest import build_target
from crossview.trainer.data.samples import UNLABELLED, ReidSplit, Sample, describe

if TYPE_CHECKING:
    from crossview.trainer.config import SourceConfig, TrainConfig

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainData:
    """Source pids are 0..num_source_ids-1; target pids are all -1; query/gallery are None without target labels."""

    source: tuple[Sample, ...]
    target: tuple[Sample, ...]
    query: tuple[Sample, ...] | None
    gallery: tuple[Sample, ...] | None
    num_source_ids: int
    target_cameras: tuple[str, ...] = ()


def labelled_split(kind: str, root: str | Path, cache_dir: str | Path = "runs/cache", frame_step: int = 1,
                   camera_folders: bool = False) -> ReidSplit:
    """`build_dataset` with the options a config gives: MOT sequences need the crop cache and frame step, identity
    folders may hold camera folders."""
    if kind == "mot":
        return build_dataset(kind, root, cache_dir=cache_dir, frame_step=frame_step)
    if kind == "folders":
        return build_dataset(kind, root, camera_folders=camera_folders)
    return build_dataset(kind, root)


def source_samples(cfg: SourceConfig, cache_dir: str | Path) -> tuple[Sample, ...]:
    """The training images of `cfg` and of every dataset under `cfg.also`, as one labelled set: each dataset's pids
    and camera ids are moved past the previous ones', so no two datasets share an identity or a camera."""
    out: list[Sample] = []
    for s in (cfg, *cfg.also):
        train = labelled_split(s.kind, s.root, cache_dir, s.frame_step, s.camera_folders).train
        if not train:
            raise ValueError(f"source {s.kind}:{s.root} has no training images")
        pid0, cam0 = (max(x.pid for x in out) + 1, max(x.camid for x in out) + 1) if out else (0, 0)
        out += [replace(x, pid=x.pid + pid0, camid=x.camid + cam0) for x in train]
    return tuple(out)


def load_train_data(cfg: TrainConfig) -> TrainData:
    source = source_samples(cfg.source, cfg.cache_dir)
    num_ids = len({s.pid for s in source})
    if cfg.target.labelled:
        split = labelled_split(cfg.target.kind, cfg.target.root, cfg.cache_dir, cfg.target.frame_step)
        target = tuple(replace(s, pid=UNLABELLED) for s in split.train)
        cameras = tuple(str(c) for c in sorted({s.camid for s in target}))
    else:
        found = build_target(cfg.target.kind, cfg.target.root)
        target, cameras = found.samples, found.cameras
        e = cfg.target.evaluate_on
        split = labelled_split(e.kind, e.root, cfg.cache_dir, e.frame_step) if e is not None else None
    evaluate = split is not None and cfg.target.evaluate and bool(split.query) and bool(split.gallery)
    query, gallery = (split.query, split.gallery) if evaluate else (None, None)
    if not target:
        raise ValueError(f"target {cfg.target.kind}:{cfg.target.root} has no training images")
    kinds = " + ".join(s.kind for s in (cfg.source, *cfg.source.also))
    log.info("source %s: %s; target %s: %s%s", kinds, describe(source), cfg.target.kind, describe(target),
             "" if query is None else f"; evaluation on {len(query)} queries, {len(gallery)} gallery images")
    return TrainData(source, target, query, gallery, num_ids, cameras)
