"""MOTChallenge sequences as labelled re-ID data: every ground-truth box becomes an identity crop.

| what            | how                                                                                   |
|-----------------|---------------------------------------------------------------------------------------|
| input           | `<seq>/gt/gt.txt` (frame, id, left, top, width, height, conf, x, y, z) + `img1/000001.jpg` frames or a video (`<seq>/<seq>.mp4`, or the folder's only video) |
| boxes kept      | conf != 0, clipped to the image, >= `min_height` px tall, >= `min_visible` of the box inside the frame |
| cache           | `<cache>/<seq>/<pid>/<frame>.jpg`, cut once; `manifest.json` is written last, so a cache without it (or made from another gt.txt or other options) is rebuilt |
| samples         | `mot_crops(seq, cache)` → Sample(pid = MOT id, camid 0, frame = MOT frame number)       |
| one-camera eval | `time_split(samples)` → query (first half of each identity's frames, camid 0) and gallery (second half, camid 1) |

    crops = mot_crops("data/TUD-Campus", "runs/cache")
    query, gallery = time_split(crops, query_stride=5)
"""

from __future__ import annotations

import configparser
import hashlib
import json
import logging
import os
from collections import defaultdict
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import cv2
import numpy as np

from crossview.trainer.data.samples import UNLABELLED, ReidSplit, Sample

log = logging.getLogger(__name__)

VIDEO_EXTS = frozenset({".mp4", ".avi", ".mkv", ".mov", ".webm", ".mpg", ".mpeg", ".m4v"})
MANIFEST = "manifest.json"
CACHE_VERSION = 1
JPEG_QUALITY = 95


@dataclass(frozen=True)
class GtBox:
    frame: int
    pid: int
    left: float
    top: float
    width: float
    height: float


def read_gt(path: Path) -> list[GtBox]:
    """Boxes of `gt.txt` with conf != 0 (MOT16+ marks boxes to ignore with 0); the first row wins for a repeated (frame, id)."""
    boxes, seen = [], set()
    for n, line in enumerate(Path(path).read_text().splitlines(), 1):
        if not line.strip():
            continue
        cols = line.replace(" ", "").split(",")
        try:
            frame, pid = int(float(cols[0])), int(float(cols[1]))
            left, top, width, height, conf = (float(c) for c in cols[2:7])
        except (ValueError, IndexError) as e:
            raise ValueError(f"{path}:{n}: expected 'frame, id, left, top, width, height, conf, ...', got {line!r}") from e
        if conf == 0 or (frame, pid) in seen:
            continue
        seen.add((frame, pid))
        boxes.append(GtBox(frame, pid, left, top, width, height))
    return boxes


def crop_rect(box: GtBox, image_w: int, image_h: int, min_height: int, min_visible: float) -> tuple[int, int, int, int] | None:
    """(x0, y0, x1, y1) of the box clipped to the image, or None when too small or mostly outside."""
    x0, y0 = round(box.left), round(box.top)
    x1, y1 = round(box.left + box.width), round(box.top + box.height)
    cx0, cy0, cx1, cy1 = max(x0, 0), max(y0, 0), min(x1, image_w), min(y1, image_h)
    if cx1 <= cx0 or cy1 <= cy0 or cy1 - cy0 < min_height:
        return None
    if (cx1 - cx0) * (cy1 - cy0) < min_visible * (x1 - x0) * (y1 - y0):
        return None
    return cx0, cy0, cx1, cy1


def frames_source(seq_dir: Path) -> Path:
    """`img1/` if present (the original frames), else the sequence's video."""
    if (seq_dir / "img1").is_dir():
        return seq_dir / "img1"
    videos = sorted(p for p in seq_dir.iterdir() if p.suffix.lower() in VIDEO_EXTS and p.is_file())
    named = [p for p in videos if p.stem == seq_dir.name]
    if named or len(videos) == 1:
        return (named or videos)[0]
    raise FileNotFoundError(
        f"{seq_dir}: no frames: expected img1/000001.jpg... or a video {seq_dir.name}.mp4"
        + (f" (found {len(videos)} videos, none named after the sequence)" if videos else "")
    )


def read_frames(source: Path, wanted: Iterable[int]) -> Iterator[tuple[int, np.ndarray]]:
    """(frame number, BGR image) for the wanted 1-based frame numbers, in increasing order."""
    wanted = sorted(set(wanted))
    if source.is_dir():
        ext = _image_ext(source.parent)
        for frame in wanted:
            img = cv2.imread(str(source / f"{frame:06d}{ext}"))
            if img is None:
                log.warning("%s: frame %d missing or unreadable: its boxes are skipped", source, frame)
                continue
            yield frame, img
        return
    cap = cv2.VideoCapture(str(source))
    if not cap.isOpened():
        raise OSError(f"{source}: OpenCV cannot open the video")
    try:
        todo, frame = set(wanted), 0
        while todo:
            ok, img = cap.read()
            if not ok:
                log.warning("%s ended at frame %d: %d annotated frame(s) after it are skipped", source, frame, len(todo))
                return
            frame += 1  # MOT frame numbers start at 1 and follow decoding order
            if frame in todo:
                todo.discard(frame)
                yield frame, img
    finally:
        cap.release()


def _image_ext(seq_dir: Path) -> str:
    info = configparser.ConfigParser()
    info.read(seq_dir / "seqinfo.ini")
    return info.get("Sequence", "imExt", fallback=".jpg")


def mot_crops(seq_dir: str | Path, cache_dir: str | Path, *, min_height: int = 32, min_visible: float = 0.5,
              frame_step: int = 1) -> list[Sample]:
    """One Sample per kept gt box (pid = MOT id, camid 0), cut into `<cache_dir>/<seq>/` once and reused.

    `frame_step` keeps every n-th frame: neighbouring frames at 25 fps are near duplicates.
    """
    seq_dir = Path(seq_dir)
    gt = seq_dir / "gt" / "gt.txt"
    if not gt.is_file():
        raise FileNotFoundError(f"mot: {gt} not found (expected a MOTChallenge sequence folder with gt/gt.txt)")
    out = Path(cache_dir) / seq_dir.name
    if out.resolve() == seq_dir.resolve():
        raise ValueError(f"mot: cache folder {out} is the sequence folder itself; use a separate cache_dir")
    source = frames_source(seq_dir)
    key = {
        "version": CACHE_VERSION, "source": source.name, "gt_sha1": hashlib.sha1(gt.read_bytes()).hexdigest(),
        "min_height": min_height, "min_visible": min_visible, "frame_step": frame_step,
    }
    cached = _cached(out, key)
    if cached is not None:
        return cached
    return _cut(seq_dir, source, gt, out, key)


def _cached(out: Path, key: dict) -> list[Sample] | None:
    """The cache's samples if its manifest matches `key` and every crop is on disk, else None."""
    try:
        manifest = json.loads((out / MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    if manifest.get("key") != key:
        log.info("%s: crop cache made with other data or options: rebuilding", out)
        return None
    samples = [Sample(out / rel, pid, 0, frame) for pid, frame, rel in manifest["crops"]]
    if not all(s.path.is_file() for s in samples):
        log.info("%s: crop cache incomplete: rebuilding", out)
        return None
    return samples


def _cut(seq_dir: Path, source: Path, gt: Path, out: Path, key: dict) -> list[Sample]:
    (out / MANIFEST).unlink(missing_ok=True)  # from here until the new manifest, the cache counts as half-written
    by_frame: dict[int, list[GtBox]] = defaultdict(list)
    for box in read_gt(gt):
        if (box.frame - 1) % key["frame_step"] == 0:
            by_frame[box.frame].append(box)
    crops, dropped = [], 0
    for frame, img in read_frames(source, by_frame):
        h, w = img.shape[:2]
        for box in by_frame[frame]:
            rect = crop_rect(box, w, h, key["min_height"], key["min_visible"])
            if rect is None:
                dropped += 1
                continue
            x0, y0, x1, y1 = rect
            rel = f"{box.pid}/{frame}.jpg"
            ok, jpg = cv2.imencode(".jpg", img[y0:y1, x0:x1], [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY])
            if not ok:
                raise OSError(f"{seq_dir}: cannot encode the crop of id {box.pid} in frame {frame}")
            (out / str(box.pid)).mkdir(parents=True, exist_ok=True)
            (out / rel).write_bytes(jpg.tobytes())
            crops.append((box.pid, frame, rel))
    _remove_stale(out, {rel for _, _, rel in crops})
    tmp = out / f"{MANIFEST}.tmp"
    out.mkdir(parents=True, exist_ok=True)
    tmp.write_text(json.dumps({"key": key, "crops": crops}))
    os.replace(tmp, out / MANIFEST)
    log.info("%s: cut %d crops of %d identities into %s (%d boxes too small or outside the frame)",
             seq_dir.name, len(crops), len({c[0] for c in crops}), out, dropped)
    return [Sample(out / rel, pid, 0, frame) for pid, frame, rel in crops]


def _remove_stale(out: Path, keep: set[str]) -> None:
    """Delete crops of an earlier build that this one did not write; only our `<id>/<frame>.jpg` files."""
    if not out.is_dir():
        return
    for path in out.glob("*/*.jpg"):
        rel = f"{path.parent.name}/{path.name}"
        if path.parent.name.lstrip("-").isdigit() and path.stem.isdigit() and rel not in keep:
            path.unlink()


def time_split(samples: Sequence[Sample], query_stride: int = 1) -> tuple[list[Sample], list[Sample]]:
    """(query, gallery) for evaluating on one camera: per identity, the earlier half of its frames are queries.

    Queries get camid 0 and gallery camid 1, so the standard protocol's same-camera exclusion keeps
    everything. `query_stride` keeps every n-th query (per identity, the first always). An identity
    with fewer than 2 images goes to the gallery only; label -1 is left out.
    """
    if query_stride < 1:
        raise ValueError(f"query_stride must be >= 1, got {query_stride}")
    by_pid: dict[int, list[Sample]] = defaultdict(list)
    for s in samples:
        if s.pid != UNLABELLED:
            by_pid[s.pid].append(s)
    query, gallery = [], []
    for pid in sorted(by_pid):
        items = sorted(by_pid[pid], key=lambda s: (s.frame, str(s.path)))
        half = len(items) // 2
        query += [replace(s, camid=0) for s in items[:half][::query_stride]]
        gallery += [replace(s, camid=1) for s in items[half:]]
    return query, gallery


def find_sequences(root: Path) -> list[Path]:
    """`root` if it is a sequence, else its subfolders that are (a MOT release's train/ folder)."""
    if (root / "gt" / "gt.txt").is_file():
        return [root]
    seqs = sorted(p for p in root.iterdir() if (p / "gt" / "gt.txt").is_file()) if root.is_dir() else []
    if not seqs:
        raise FileNotFoundError(f"mot: {root} is no MOTChallenge sequence (expected gt/gt.txt in it or in its subfolders)")
    return seqs


def mot_split(root: str | Path, cache_dir: str | Path, *, min_height: int = 32, min_visible: float = 0.5,
              frame_step: int = 1, query_stride: int = 1) -> ReidSplit:
    """All crops of the sequence(s) as train (camid = sequence index), and their `time_split` as query/gallery.

    Train and query/gallery hold the same crops: use a sequence either to train or to evaluate.
    Pids are numbered over (sequence, MOT id), so identities of different sequences stay apart.
    """
    root = Path(root)
    crops = []
    for camid, seq in enumerate(find_sequences(root)):
        for s in mot_crops(seq, cache_dir, min_height=min_height, min_visible=min_visible, frame_step=frame_step):
            crops.append((camid, s))
    ids = {key: i for i, key in enumerate(sorted({(camid, s.pid) for camid, s in crops}))}
    train = [replace(s, pid=ids[camid, s.pid], camid=camid) for camid, s in crops]
    query, gallery = time_split(train, query_stride)
    return ReidSplit(f"mot/{root.name}", tuple(train), tuple(query), tuple(gallery))
