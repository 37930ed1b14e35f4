"""Motion-gated detection: per camera, a cheap motion stage decides where the person detector looks.

| what          | how                                                                                       |
|---------------|-------------------------------------------------------------------------------------------|
| `MotionStage` | OpenCV MOG2 background subtraction on a small grey frame, masked → moving boxes, moving share |
| `MotionGate`  | per frame, one `Plan`: the whole frame (warm-up, every N frames, or when regions would cost   |
|               | more), the regions that moved plus those around live tracks (padded, merged, cut to the     |
|               | detector's tiles), or nothing at all: then the frame costs only the motion stage            |

    gate = MotionGate.for_camera(cfg.detector, camera_cfg, detector)   # None: gating off, whole frames
    plan = gate.plan(frame, tracker.live_boxes())          # the motion stage, every frame
    dets = gate.detect(detector, frame, plan)
    plan.full, plan.regions, plan.share   # whole frame?, (N, 4) crops in frame pixels, share of the frame moving

A camera that never moves costs the detector only its warm-up and scheduled whole-frame passes:

    >>> gate = MotionGate(MotionConfig(warmup_frames=2, full_frame_every=4), CameraMotionConfig(), None)
    >>> still = np.full((240, 320, 3), 90, np.uint8)
    >>> [gate.plan(still, np.zeros((0, 4))).full for _ in range(8)]
    [True, True, False, False, False, True, False, False]
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from crossview.edge.detections import Detections
from crossview.edge.regions import detect_regions, grow, merge, pack, region_cost
from crossview.kernel.config import CameraConfig, CameraMotionConfig, DetectorConfig, MotionConfig

_OPEN = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (3, 3))  # removes single-pixel sensor and codec noise
_WHOLE_FRAME_AREA = 0.8  # HOG crops covering more of the frame than this: the whole frame instead
_JOIN = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (7, 7))  # joins a walking person's limbs into one blob


class MotionStage:
    """Moving boxes in frame pixels and the share of the (unmasked) frame that moves, from MOG2 at low resolution."""

    def __init__(self, cfg: MotionConfig, mask: list[list[tuple[float, float]]]):
        self.cfg, self.polygons = cfg, mask
        self._shape: tuple[int, int] | None = None

    def _start(self, shape: tuple[int, int]) -> None:
        """Background model and mask for this frame size (a reconnected stream may come back at another size)."""
        h, w = shape
        self._shape, self._scale = shape, min(1.0, self.cfg.width / w)
        self._small = (max(1, round(w * self._scale)), max(1, round(h * self._scale)))
        self._mog = cv2.createBackgroundSubtractorMOG2(history=self.cfg.history, varThreshold=self.cfg.threshold,
                                                       detectShadows=False)
        self._keep = np.full(self._small[::-1], 255, np.uint8)
        for poly in self.polygons:
            cv2.fillPoly(self._keep, [np.round(np.asarray(poly) * self._scale).astype(np.int32)], 0)
        self._kept = max(int(np.count_nonzero(self._keep)), 1)

    def __call__(self, image: np.ndarray) -> tuple[np.ndarray, float]:
        if image.shape[:2] != self._shape:
            self._start(image.shape[:2])
        grey = cv2.cvtColor(cv2.resize(image, self._small, interpolation=cv2.INTER_AREA), cv2.COLOR_BGR2GRAY)
        fg = self._mog.apply(cv2.GaussianBlur(grey, (5, 5), 0))
        fg = cv2.bitwise_and(fg, self._keep)
        share = np.count_nonzero(fg) / self._kept
        fg = cv2.dilate(cv2.morphologyEx(fg, cv2.MORPH_OPEN, _OPEN), _JOIN)
        contours, _ = cv2.findContours(fg, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
        rects = np.array([cv2.boundingRect(c) for c in contours], np.float64).reshape(-1, 4)
        rects = rects[rects[:, 2] * rects[:, 3] >= self.cfg.min_area * self._scale**2]
        boxes = np.concatenate([rects[:, :2], rects[:, :2] + rects[:, 2:]], axis=1) / self._scale
        return boxes, float(share)


@dataclass
class Plan:
    """Where the detector looks in one frame."""

    full: bool  # the whole frame, exactly as without gating
    regions: np.ndarray  # (N, 4) int crops in frame pixels; the whole frame when `full`; none: the detector is skipped
    share: float  # share of the unmasked frame that moved


class MotionGate:
    """One camera's motion stage and region planning, for one detector."""

    def __init__(self, cfg: MotionConfig, camera: CameraMotionConfig, detector, iou: float = 0.5):
        self.cfg, self.iou = cfg, iou
        self.stage = MotionStage(cfg, camera.mask)
        # YOLO has a fixed input: regions become tiles of it. HOG scans any crop that holds its window.
        self.tile_hw = getattr(detector, "tile_hw", None)
        self.min_wh = getattr(detector, "min_region_wh", (0, 0))
        self.frames = 0
        self.since_full = 0

    @classmethod
    def for_camera(cls, detector_cfg: DetectorConfig, camera: CameraConfig, detector) -> "MotionGate | None":
        """The camera's gate, or None when gating is off for it (its own `motion.enabled` wins over the detector's)."""
        on = camera.motion.enabled if camera.motion.enabled is not None else detector_cfg.motion.enabled
        return cls(detector_cfg.motion, camera.motion, detector, detector_cfg.iou) if on else None

    def plan(self, image: np.ndarray, live: np.ndarray) -> Plan:
        """Where to look in this frame, given the boxes of the camera's live tracks."""
        moved, share = self.stage(image)  # every frame, so the background keeps learning
        h, w = image.shape[:2]
        self.frames += 1
        due = self.cfg.full_frame_every and self.since_full + 1 >= self.cfg.full_frame_every
        if self.frames <= self.cfg.warmup_frames or due:
            return self._full(w, h, share)
        self.since_full += 1
        boxes = np.concatenate([moved, np.asarray(live, np.float64).reshape(-1, 4)])
        if not len(boxes):
            return Plan(False, np.zeros((0, 4), np.int64), share)
        regions = merge(grow(boxes, self.cfg.pad, self.min_wh, w, h))
        if self.tile_hw is not None:
            regions = pack(regions, self.tile_hw, w, h)
        # So much moves that crops cost what the whole frame does: one fixed-input tile costs a whole pass (a second
        # costs more), and a sliding window over most of the pixels saves little and cuts people at crop edges.
        too_dear = region_cost(regions, self.tile_hw, w, h) > (1.0 if self.tile_hw else _WHOLE_FRAME_AREA)
        if too_dear or np.array_equal(regions, [[0, 0, w, h]]):  # or a tile as large as the frame
            return self._full(w, h, share)
        return Plan(False, regions, share)

    def _full(self, w: int, h: int, share: float) -> Plan:
        self.since_full = 0
        return Plan(True, np.array([[0, 0, w, h]], np.int64), share)

    def detect(self, detector, image: np.ndarray, plan: Plan) -> Detections:
        """The detector where `plan` says: the whole frame as without gating, its regions, or nowhere."""
        return detector(image) if plan.full else detect_regions(detector, image, plan.regions, self.iou)
