"""Person detectors; every one returns `Detections` for one BGR frame.

| detector        | model                                   | when                                   |
|-----------------|-----------------------------------------|----------------------------------------|
| `YoloOnnx`      | YOLO exported to `.onnx`, ONNX Runtime  | the fast path on edge CPUs and GPUs    |
| `YoloTorch`     | YOLO `.pt` through ultralytics          | weights straight from training         |
| `HogDetector`   | OpenCV's built-in HOG people detector   | no detector weights: the offline fallback |

    >>> det = build_detector(DetectorConfig(kind="hog"))
    >>> dets = det(np.zeros((240, 320, 3), np.uint8))  # a BGR frame
    >>> type(dets).__name__, len(dets)  # nobody in an empty frame
    ('Detections', 0)
"""

from __future__ import annotations

import logging
from pathlib import Path

import cv2
import numpy as np

from crossview.edge.detections import Detections
from crossview.kernel.config import DetectorConfig, HogConfig
from crossview.kernel.ort import ModelError, create_session
from crossview.kernel.runtime import ultralytics

log = logging.getLogger(__name__)

PERSON = 0  # COCO class id
_HOG_PAD = 8  # px around the scanned image; OpenCV rounds it up to a multiple of gcd(win_stride, 8): 8 stays 8


class DetectorError(ModelError):
    """Detector weights are missing or unusable; the message names the file."""


def _letterbox(img: np.ndarray, size: tuple[int, int]) -> tuple[np.ndarray, float, tuple[int, int]]:
    """Resize keeping aspect ratio and pad to size = (H, W), as YOLO was trained."""
    h, w = img.shape[:2]
    r = min(size[0] / h, size[1] / w)
    nh, nw = round(h * r), round(w * r)
    top, left = (size[0] - nh) // 2, (size[1] - nw) // 2
    out = np.full((*size, 3), 114, np.uint8)
    out[top : top + nh, left : left + nw] = cv2.resize(img, (nw, nh), interpolation=cv2.INTER_LINEAR)
    return out, r, (left, top)


def nms(xyxy: np.ndarray, conf: np.ndarray, conf_thr: float, iou: float) -> np.ndarray:
    xywh = np.concatenate([xyxy[:, :2], xyxy[:, 2:] - xyxy[:, :2]], axis=1)
    keep = cv2.dnn.NMSBoxes(xywh.tolist(), conf.tolist(), conf_thr, iou)
    return np.asarray(keep, dtype=np.int64).reshape(-1)


class YoloOnnx:
    """YOLOv8/11 detection head exported by ultralytics: output (1, 4 + classes, anchors)."""

    def __init__(self, cfg: DetectorConfig, device: str = "auto"):
        self.cfg = cfg
        self.session = create_session(cfg.weights, device)
        inp = self.session.get_inputs()[0]
        shape = inp.shape
        if len(shape) != 4 or shape[1] != 3:
            raise DetectorError(f"{cfg.weights}: not a YOLO detector, input shape {shape} is not (1, 3, H, W)")
        # A static export fixes the input size (square, or e.g. 480x640 for 4:3 cameras: a quarter less
        # work than 640x640); follow the model rather than the config value.
        h, w = shape[2:]
        self.imgsz = (h if isinstance(h, int) else cfg.imgsz, w if isinstance(w, int) else cfg.imgsz)
        self.tile_hw = self.imgsz  # motion-gated regions are cut to the input size: people at full resolution
        self.input_name = inp.name
        out = self.session.get_outputs()[0].shape
        if len(out) != 3 or (isinstance(out[1], int) and out[1] < 5):
            raise DetectorError(f"{cfg.weights}: output shape {out} is not a YOLO detection head (1, 4+classes, N)")

    def __call__(self, frame: np.ndarray) -> Detections:
        img, r, (dx, dy) = _letterbox(frame, self.imgsz)
        blob = np.ascontiguousarray(img[:, :, ::-1].transpose(2, 0, 1))[None].astype(np.float32) / 255.0
        pred = self.session.run(None, {self.input_name: blob})[0][0]  # (4 + nc, N)
        conf = pred[4 + PERSON]
        sel = conf >= self.cfg.conf
        if not sel.any():
            return Detections.empty()
        cx, cy, w, h = pred[:4, sel]
        xyxy = np.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], axis=1)
        xyxy = (xyxy - [dx, dy, dx, dy]) / r
        keep = nms(xyxy, conf[sel], self.cfg.conf, self.cfg.iou)
        return Detections(xyxy[keep], conf[sel][keep]).clip(frame.shape[1], frame.shape[0])


class YoloTorch:
    """A YOLO `.pt` file run through ultralytics (person class only)."""

    def __init__(self, cfg: DetectorConfig, device: str = "auto"):
        ultralytics()  # offline, and OpenCV keeps its threads
        from ultralytics import YOLO

        self.cfg = cfg
        try:
            self.model = YOLO(str(cfg.weights), task="detect")
        except Exception as e:  # ultralytics raises many types for a bad file
            raise DetectorError(f"{cfg.weights}: cannot load YOLO weights: {e}") from e
        self.device = None if device == "auto" else device
        self.tile_hw = (cfg.imgsz, cfg.imgsz)

    def __call__(self, frame: np.ndarray) -> Detections:
        r = self.model.predict(
            frame, classes=[PERSON], conf=self.cfg.conf, iou=self.cfg.iou, imgsz=self.cfg.imgsz,
            device=self.device, verbose=False,
        )[0].boxes
        return Detections(r.xyxy.cpu().numpy(), r.conf.cpu().numpy())


class HogDetector:
    """OpenCV's HOG + linear SVM people detector, tuned for small people seen from above.

    The 64x128 window misses people under ~100 px, so the frame is upscaled first; HOG boxes
    carry generous margins, so they are shrunk toward the body.
    """

    tile_hw = None  # a sliding window: any crop size, and the cost follows the pixels scanned

    def __init__(self, cfg: HogConfig):
        self.cfg = cfg
        # A crop must hold the 64x128 window at this upscale, with room for a person's whole body around it.
        self.min_region_wh = (round(1.5 * 64 / cfg.upscale), round(1.5 * 128 / cfg.upscale))
        self.hog = cv2.HOGDescriptor()
        self.hog.setSVMDetector(cv2.HOGDescriptor_getDefaultPeopleDetector())
        self.win_wh = self.hog.winSize  # (64, 128)
        self._small_logged = False

    def __call__(self, frame: np.ndarray) -> Detections:
        c = self.cfg
        # The scan costs its pixels: a large frame is brought down to max_side first (its people are large too).
        f = c.upscale * min(1.0, c.max_side / max(frame.shape[:2]))
        # OpenCV slides the window over the image plus its padding and reads out of bounds (SIGSEGV, heap
        # corruption) when that is smaller than the window; the size is resize's (rounded half to even, as round()).
        h, w = (round(s * f) for s in frame.shape[:2])
        win_w, win_h = self.win_wh
        if h + 2 * _HOG_PAD < win_h or w + 2 * _HOG_PAD < win_w:
            if not self._small_logged:
                self._small_logged = True
                log.warning("HOG: a %dx%d image (%dx%d scanned) is smaller than the %dx%d window with %d px padding: "
                            "no person fits, none searched for (logged once)", frame.shape[1], frame.shape[0], w, h,
                            win_w, win_h, _HOG_PAD)
            return Detections.empty()
        img = cv2.resize(frame, None, fx=f, fy=f, interpolation=cv2.INTER_AREA if f < 1 else cv2.INTER_LINEAR) \
            if f != 1 else frame
        rects, weights = self.hog.detectMultiScale(
            img, hitThreshold=c.hit_threshold, winStride=(c.win_stride, c.win_stride), padding=(_HOG_PAD, _HOG_PAD),
            scale=c.scale,
        )
        if len(rects) == 0:
            return Detections.empty()
        rects = np.asarray(rects, np.float32) / f
        x, y, w, h = rects.T
        dx, dy = w * c.shrink, h * c.shrink / 2  # HOG's window pads more at the sides than top and bottom
        xyxy = np.stack([x + dx, y + dy, x + w - dx, y + h - dy], axis=1)
        # SVM margins are unbounded; squash to (0, 1) so thresholds mean the same for every detector.
        conf = 1.0 / (1.0 + np.exp(-np.asarray(weights, np.float32).reshape(-1)))
        keep = nms(xyxy, conf, 0.0, 0.5)
        return Detections(xyxy[keep], conf[keep]).clip(frame.shape[1], frame.shape[0])


def build_detector(cfg: DetectorConfig, device: str = "auto"):
    """The configured detector; `auto` falls back to HOG when no weights are configured or present."""
    weights = cfg.weights
    if cfg.kind == "hog" or (cfg.kind == "auto" and (weights is None or not Path(weights).is_file())):
        reason = "configured" if cfg.kind == "hog" else f"no YOLO weights at {weights}" if weights else "no YOLO weights configured"
        log.warning("person detector: OpenCV HOG (%s); YOLO is more accurate", reason)
        return HogDetector(cfg.hog)
    if weights is None or not Path(weights).is_file():
        raise DetectorError(f"detector.weights: YOLO weights not found: {weights}")
    suffix = Path(weights).suffix.lower()
    if suffix == ".onnx":
        det = YoloOnnx(cfg, device)
    elif suffix == ".pt":
        det = YoloTorch(cfg, device)
    else:
        raise DetectorError(f"detector.weights: {weights}: expected a .pt or .onnx file")
    log.info("person detector: YOLO %s (imgsz %d, conf %.2f)", weights, cfg.imgsz, cfg.conf)
    return det
