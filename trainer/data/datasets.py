"""Labelled re-ID datasets in their release folder layouts, parsed into `ReidSplit`s.

| kind         | layout under `root` (or under its one release subfolder)                          |
|--------------|-----------------------------------------------------------------------------------|
| `market1501` | `bounding_box_train/`, `bounding_box_test/`, `query/`; `0002_c1s1_000451_03.jpg`    |
| `dukemtmc`   | the same three folders; `0001_c2_f0046182.jpg`                                     |
| `msmt17`     | `list_{train,val,query,gallery}.txt` + `train/`, `test/` (V1) or `mask_{train,test}_v2/` (V2) |
| `cuhk03`     | cuhk03-np: `detected/` or `labeled/`, each like Market; `0001_c1_1.png`              |
| `folders`    | `<root>/<identity>/*.jpg`, or `<root>/<identity>/<camera>/*.jpg` with `camera_folders=True` |
| `mot`        | a MOTChallenge sequence (or a folder of them): see `trainer.data.mot`                |

As in torchreid, pid -1 (junk) is dropped and pid 0 (distractors) stays in the gallery; camera
numbers start at 0. Parsers return the release's own pids; `build_dataset` also drops unreadable
images and relabels training pids to 0..N-1.

    split = build_dataset("market1501", "data/Market-1501-v15.09.15")
    print(split.summary())
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

from crossview.trainer.data.loader import filter_readable
from crossview.trainer.data.samples import ReidSplit, Sample, relabel

log = logging.getLogger(__name__)

IMAGE_EXTS = frozenset({".jpg", ".jpeg", ".png", ".bmp"})
MARKET_LAYOUT = ("bounding_box_train", "bounding_box_test", "query")
MARKET_NAME = re.compile(r"^(?P<pid>-?\d+)_c(?P<cam>\d)s\d+_(?P<frame>\d+)_\d+")
DUKE_NAME = re.compile(r"^(?P<pid>-?\d+)_c(?P<cam>\d+)_f(?P<frame>\d+)")
CUHK03_NAME = re.compile(r"^(?P<pid>-?\d+)_c(?P<cam>\d+)_\d+")
MSMT_LISTS = ("list_train.txt", "list_val.txt", "list_query.txt", "list_gallery.txt")


def list_images(folder: Path, recursive: bool = False) -> list[Path]:
    """Image files in `folder` (by extension), sorted so every run sees the same order."""
    files = folder.rglob("*") if recursive else folder.iterdir()
    return sorted(p for p in files if p.suffix.lower() in IMAGE_EXTS and p.is_file())


def locate(root: Path, required: tuple[str, ...], what: str, candidates: list[Path] | None = None) -> Path:
    """The folder holding all `required` entries: `root` itself or one level down (release archives add one)."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"{what}: dataset folder {root} does not exist")
    options = candidates or [root] + sorted(p for p in root.iterdir() if p.is_dir())
    for folder in options:
        if all((folder / name).exists() for name in required):
            return folder
    missing = [name for name in required if not (root / name).exists()]
    raise FileNotFoundError(f"{what}: {root} lacks {', '.join(missing)} (expected {', '.join(required)} in it or in one subfolder)")


def parse_named(folder: Path, pattern: re.Pattern, what: str) -> list[Sample]:
    """Images named `<pid>_c<camera>...`; pid -1 is junk and dropped. A foreign name is an error: wrong kind."""
    samples = []
    for path in list_images(folder):
        m = pattern.match(path.name)
        if m is None:
            raise ValueError(f"{path}: not a {what} file name (pattern {pattern.pattern})")
        pid = int(m["pid"])
        if pid == -1:
            continue
        frame = int(m["frame"]) if "frame" in pattern.groupindex else -1
        samples.append(Sample(path, pid, int(m["cam"]) - 1, frame))
    return samples


def parse_market_style(folder: Path, pattern: re.Pattern, name: str) -> ReidSplit:
    """Train / query / gallery folders with pid-and-camera file names (Market-1501 and its followers)."""
    train = parse_named(folder / "bounding_box_train", pattern, name)
    # Distractors (pid 0) are many unrelated people, not an identity to learn; the release has none in train.
    train = [s for s in train if s.pid != 0]
    query = parse_named(folder / "query", pattern, name)
    gallery = parse_named(folder / "bounding_box_test", pattern, name)
    return ReidSplit(name, tuple(train), tuple(query), tuple(gallery))


def parse_market1501(root: str | Path) -> ReidSplit:
    return parse_market_style(locate(Path(root), MARKET_LAYOUT, "market1501"), MARKET_NAME, "market1501")


def parse_dukemtmc(root: str | Path) -> ReidSplit:
    return parse_market_style(locate(Path(root), MARKET_LAYOUT, "dukemtmc"), DUKE_NAME, "dukemtmc")


def parse_cuhk03(root: str | Path, variant: str = "detected") -> ReidSplit:
    """cuhk03-np (the new protocol, 767/700 ids); `variant` picks the detector or the hand-labelled boxes."""
    if variant not in ("detected", "labeled"):
        raise ValueError(f"cuhk03 variant must be 'detected' or 'labeled', got {variant!r}")
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"cuhk03: dataset folder {root} does not exist")
    children = sorted(p for p in root.iterdir() if p.is_dir())
    candidates = [root / variant] + [c / variant for c in children] + [root]
    folder = locate(root, MARKET_LAYOUT, f"cuhk03 ({variant})", candidates)
    return parse_market_style(folder, CUHK03_NAME, "cuhk03")


def parse_msmt17(root: str | Path, combine_val: bool = False) -> ReidSplit:
    """MSMT17 from its list files, like torchreid; `combine_val` adds list_val.txt to training."""
    root = Path(root)
    candidates = [root] + [root / v for v in ("MSMT17_V1", "MSMT17_V2")] if root.is_dir() else None
    folder = locate(root, MSMT_LISTS, "msmt17", candidates)
    train_dir = _first_dir(folder, ("train", "mask_train_v2"), "msmt17 training images")
    test_dir = _first_dir(folder, ("test", "mask_test_v2"), "msmt17 test images")
    train = _msmt_list(folder / "list_train.txt", train_dir)
    if combine_val:
        train += _msmt_list(folder / "list_val.txt", train_dir)
    query = _msmt_list(folder / "list_query.txt", test_dir)
    gallery = _msmt_list(folder / "list_gallery.txt", test_dir)
    return ReidSplit("msmt17", tuple(train), tuple(query), tuple(gallery))


def _msmt_list(list_file: Path, image_dir: Path) -> list[Sample]:
    """Lines `<pid folder>/<pid>_<index>_<camera>_<date-time>_<n>_<m>.jpg <pid>`; camera 01 → camid 0."""
    samples = []
    for n, line in enumerate(list_file.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            rel, pid = line.split()
            samples.append(Sample(image_dir / rel, int(pid), int(Path(rel).name.split("_")[2]) - 1))
        except (ValueError, IndexError) as e:
            raise ValueError(f"{list_file}:{n}: expected '<relative path> <pid>' with an MSMT17 file name, got {line!r}") from e
    return samples


def _first_dir(folder: Path, names: tuple[str, ...], what: str) -> Path:
    for name in names:
        if (folder / name).is_dir():
            return folder / name
    raise FileNotFoundError(f"{what}: {folder} has none of the folders {', '.join(names)}")


def parse_identity_folders(root: str | Path, camera_folders: bool = False) -> ReidSplit:
    """One folder per identity (sorted names → pids 0..N-1), training only; cameras from a sub-level or all 0."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"folders: dataset folder {root} does not exist")
    identities = sorted(p for p in root.iterdir() if p.is_dir())
    found: list[tuple[int, str, Path]] = []
    for pid, ident in enumerate(identities):
        if camera_folders:
            found += [(pid, cam.name, img) for cam in sorted(ident.iterdir()) if cam.is_dir() for img in list_images(cam)]
        else:
            found += [(pid, "", img) for img in list_images(ident)]
    if not found:
        layout = "<identity>/<camera>/*.jpg" if camera_folders else "<identity>/*.jpg"
        raise FileNotFoundError(f"folders: no images in {root} (expected {layout})")
    cams = {name: i for i, name in enumerate(sorted({cam for _, cam, _ in found}))}
    train = [Sample(path, pid, cams[cam]) for pid, cam, path in found]
    return ReidSplit(f"folders/{root.name}", tuple(train))


def _mot(root: Path, cache_dir: str | Path | None = None, **options) -> ReidSplit:
    from crossview.trainer.data.mot import mot_split  # cv2 decoding only when a MOT sequence is asked for

    if cache_dir is None:
        raise ValueError("mot: cache_dir is required (crops are cut from the sequence once and kept there)")
    return mot_split(root, cache_dir, **options)


PARSERS: dict[str, Callable[..., ReidSplit]] = {
    "market1501": parse_market1501,
    "dukemtmc": parse_dukemtmc,
    "msmt17": parse_msmt17,
    "cuhk03": parse_cuhk03,
    "folders": parse_identity_folders,
    "mot": _mot,
}


def build_dataset(kind: str, root: str | Path, *, verify: bool = True, **options) -> ReidSplit:
    """Parse `root` as `kind`, drop unreadable images (`verify`), relabel training pids to 0..N-1.

    `options` go to the parser: `variant` (cuhk03), `combine_val` (msmt17), `camera_folders` (folders),
    `cache_dir`, `min_height`, `min_visible`, `frame_step`, `query_stride` (mot).
    """
    parser = PARSERS.get(kind)
    if parser is None:
        raise ValueError(f"unknown dataset kind {kind!r}; known kinds: {', '.join(PARSERS)}")
    root = Path(root)
    if not root.exists():
        raise FileNotFoundError(f"{kind}: dataset folder {root} does not exist")
    split = parser(root, **options)
    if not (split.train or split.query or split.gallery):
        raise FileNotFoundError(f"{kind}: no images found under {root}")
    if verify:
        split = replace(split, **{part: tuple(filter_readable(getattr(split, part))[0]) for part in ("train", "query", "gallery")})
    split = replace(split, train=tuple(relabel(split.train)))
    log.info("dataset %s from %s:\n%s", kind, root, split.summary())
    return split
