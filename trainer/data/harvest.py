"""The unlabelled target domain: crops the edge nodes harvested on site, or any folder of images.

| kind      | how                                                                                   |
|-----------|---------------------------------------------------------------------------------------|
| `harvest` | the edge's crops and sidecars (`crossview.kernel.harvest`); camera, frame and track from the sidecar, else from the folder and file name |
| `images`  | every image under the folder, recursively; one camera (camid 0)                        |
| cameras   | camera names sorted → camids 0..C-1 (`TargetSet.cameras[camid]` is the name)          |
| bad files | images that do not decode are skipped and counted (`TargetSet.skipped`), with one warning |

    target = build_target("harvest", "harvest")
    len(target.samples), target.cameras, target.skipped
"""

from __future__ import annotations

import logging
from pathlib import Path

from crossview.kernel.harvest import CropName, HarvestError, read_sidecar
from crossview.trainer.data.datasets import list_images
from crossview.trainer.data.loader import filter_readable
from crossview.trainer.data.samples import UNLABELLED, Sample, TargetSet

log = logging.getLogger(__name__)


def crop_camera_frame(path: Path) -> tuple[str, int, int, HarvestError | None]:
    """(camera, frame, track, why the sidecar was unusable or None) of a harvested crop; without a sidecar, folder and
    name tell."""
    try:
        sidecar = read_sidecar(path)
        return sidecar.camera, sidecar.frame, sidecar.track, None
    except HarvestError as e:
        return path.parent.name, *_frame_track_from_name(path), e


def _frame_track_from_name(path: Path) -> tuple[int, int]:
    try:
        name = CropName.parse(path)
        return name.frame, name.track
    except HarvestError:
        return -1, -1  # not named by the edge: frame and track are unknown


def harvest_samples(root: str | Path, verify: bool = True) -> TargetSet:
    """Harvested crops as unlabelled samples with camids from their camera names."""
    root = _require_dir(root, "harvest", "<dir>/<camera>/*.jpg with .json sidecars")
    crops = [(path, *crop_camera_frame(path)) for path in list_images(root, recursive=True)]
    problems = [error for *_, error in crops if error]
    if problems:
        log.warning("%d harvested crop(s) without a usable sidecar: camera taken from the folder name, e.g. %s",
                    len(problems), problems[0])
    cameras = tuple(sorted({camera for _, camera, *_ in crops}))
    camid = {name: i for i, name in enumerate(cameras)}
    samples = [Sample(path, UNLABELLED, camid[camera], frame, track) for path, camera, frame, track, _ in crops]
    return _finish(root, samples, cameras, verify)


def image_folder_samples(root: str | Path, verify: bool = True) -> TargetSet:
    """Every image under `root` (recursively) as one unlabelled camera."""
    root = _require_dir(root, "images", "image files, in any subfolders")
    samples = [Sample(path, UNLABELLED, 0) for path in list_images(root, recursive=True)]
    return _finish(root, samples, (root.name,), verify)


TARGET_KINDS = {"harvest": harvest_samples, "images": image_folder_samples}


def build_target(kind: str, root: str | Path, verify: bool = True) -> TargetSet:
    """The unlabelled target of `kind` ("harvest" or "images") under `root`."""
    if kind not in TARGET_KINDS:
        raise ValueError(f"unknown target kind {kind!r}; known kinds: {', '.join(TARGET_KINDS)}")
    return TARGET_KINDS[kind](root, verify)


def _require_dir(root: str | Path, kind: str, expected: str) -> Path:
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"{kind}: target folder {root} does not exist (expected {expected})")
    return root


def _finish(root: Path, samples: list[Sample], cameras: tuple[str, ...], verify: bool) -> TargetSet:
    skipped = 0
    if verify:
        samples, skipped = filter_readable(samples)
    if not samples:
        raise FileNotFoundError(f"no readable images under {root}" + (f" ({skipped} unreadable)" if skipped else ""))
    log.info("target %s: %d images from %d camera(s), %d skipped", root, len(samples), len(cameras), skipped)
    return TargetSet(tuple(samples), cameras, skipped)
