"""Where in a frame the detector looks: box geometry for motion-gated detection, and detection on regions.

| function          | what                                                                          |
|-------------------|-------------------------------------------------------------------------------|
| `grow`            | boxes padded by a share of their size, at least a minimum size, inside the frame |
| `merge`           | overlapping boxes joined into their union where that scans no more pixels      |
| `pack`            | boxes gathered into as few tiles of a fixed size (a YOLO input) as they fit    |
| `detect_regions`  | a detector run on region crops, boxes mapped back to the frame, NMS across crops |

    >>> merge(np.array([[0, 0, 10, 20], [5, 0, 15, 20], [40, 40, 50, 50]]))
    array([[ 0,  0, 15, 20],
           [40, 40, 50, 50]])
    >>> pack(np.array([[10, 10, 50, 90], [60, 20, 100, 100]]), (128, 128), 640, 480)
    array([[  0,   0, 128, 128]])
"""

from __future__ import annotations

import numpy as np

from crossview.edge.detections import Detections
from crossview.edge.detectors import nms


def grow(boxes: np.ndarray, pad: float, min_wh: tuple[int, int], width: int, height: int) -> np.ndarray:
    """Each box padded by `pad` x its size per side, widened to at least `min_wh` about its centre, kept in the frame."""
    b = np.asarray(boxes, np.float64).reshape(-1, 4)
    wh = b[:, 2:] - b[:, :2]
    half = np.maximum(wh * (0.5 + pad), np.asarray(min_wh, np.float64) / 2)
    half = np.minimum(half, [width / 2, height / 2])  # a box never grows past the frame's size
    centre = (b[:, :2] + b[:, 2:]) / 2
    centre = np.clip(centre, half, [width, height] - half)  # shifted inside rather than cut: the size is what counts
    return np.round(np.concatenate([centre - half, centre + half], axis=1)).astype(np.int64)


def _overlap(a: np.ndarray, b: np.ndarray) -> bool:
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


def _area(b: np.ndarray) -> int:
    return int((b[2] - b[0]) * (b[3] - b[1]))


def merge(boxes: np.ndarray) -> np.ndarray:
    """Overlapping boxes replaced by their union where the union is no larger than the two apart (so a crop never
    scans more pixels for being merged), repeated until no such pair is left (a union can reach a third box)."""
    out = [np.asarray(b, np.int64) for b in np.asarray(boxes).reshape(-1, 4)]
    merged = True
    while merged:
        merged = False
        for i in range(len(out)):
            for j in range(i + 1, len(out)):
                union = np.concatenate([np.minimum(out[i][:2], out[j][:2]), np.maximum(out[i][2:], out[j][2:])])
                if _overlap(out[i], out[j]) and _area(union) <= _area(out[i]) + _area(out[j]):
                    out[i] = union
                    del out[j]
                    merged = True
                    break
            if merged:
                break
    return np.stack(out) if out else np.zeros((0, 4), np.int64)


def pack(boxes: np.ndarray, tile_hw: tuple[int, int], width: int, height: int) -> np.ndarray:
    """Tiles of `tile_hw` (a fixed-input model's size) covering the boxes: boxes that fit in one tile together share
    it, largest first. A box larger than a tile is its own tile, and tiles that overlap are joined (one pass instead of
    two): the model scales those down."""
    th, tw = tile_hw
    groups: list[np.ndarray] = []
    boxes = np.asarray(boxes, np.int64).reshape(-1, 4)
    for box in sorted(boxes, key=lambda b: -(b[2] - b[0]) * (b[3] - b[1])):
        for k, g in enumerate(groups):
            u = np.concatenate([np.minimum(g[:2], box[:2]), np.maximum(g[2:], box[2:])])
            if u[2] - u[0] <= tw and u[3] - u[1] <= th:
                groups[k] = u
                break
        else:
            groups.append(box)
    if not groups:
        return np.zeros((0, 4), np.int64)
    # At the tile's size the model sees the people at full resolution; shifting inside keeps that size.
    return merge(grow(np.stack(groups), 0.0, (tw, th), width, height))


def region_cost(regions: np.ndarray, tile_hw: tuple[int, int] | None, width: int, height: int) -> float:
    """Detector work on these crops relative to one whole-frame pass: a fixed-input model costs one pass per tile,
    a sliding-window detector (HOG) costs in proportion to the pixels it scans."""
    if tile_hw is not None:
        return float(len(regions))
    wh = regions[:, 2:] - regions[:, :2]
    return float((wh[:, 0] * wh[:, 1]).sum()) / (width * height)


def detect_regions(detector, image: np.ndarray, regions: np.ndarray, iou: float) -> Detections:
    """The detector on each region's crop; boxes back in frame coordinates, duplicates from overlapping crops removed
    by NMS at `iou`."""
    parts = []
    for x1, y1, x2, y2 in regions:
        d = detector(image[y1:y2, x1:x2])
        parts.append(Detections(d.xyxy + np.float32([x1, y1, x1, y1]), d.confidence))
    if not parts:
        return Detections.empty()
    xyxy = np.concatenate([p.xyxy for p in parts])
    conf = np.concatenate([p.confidence for p in parts])
    if len(parts) == 1 or not len(conf):
        return Detections(xyxy, conf)
    keep = nms(xyxy, conf, 0.0, iou)
    return Detections(xyxy[keep], conf[keep])
