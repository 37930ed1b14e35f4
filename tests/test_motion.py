"""Motion-gated detection: the detector looks only where something moved or a track is live.

Real OpenCV throughout (MOG2, HOG, ByteTrack); the scenes are synthetic where the test needs to know exactly
what moved, and real footage (vtest.avi, TUD-Campus) where people walk.
"""

from __future__ import annotations

import logging
import re

import cv2
import numpy as np
import pytest
from helpers import edge_config, shared_data

from crossview.edge.detections import Detections
from crossview.edge.detectors import HogDetector
from crossview.edge.motion import MotionGate
from crossview.edge.node import EdgeNode
from crossview.edge.tracking import Tracker
from crossview.kernel.config import (
    CameraMotionConfig,
    ConfigError,
    DetectorConfig,
    EdgeConfig,
    HogConfig,
    MotionConfig,
    TrackerConfig,
    parse_config,
)

W, H = 640, 480
NO_TRACKS = np.zeros((0, 4))


class Counting:
    """A real detector, with the crops it was handed written down."""

    def __init__(self, detector):
        self.detector, self.calls = detector, []
        self.tile_hw, self.min_region_wh = detector.tile_hw, detector.min_region_wh

    def __call__(self, image: np.ndarray) -> Detections:
        self.calls.append(image.shape[:2])
        return self.detector(image)


def scene(frames: int, blobs=(), seed: int = 0) -> list[np.ndarray]:
    """A static textured scene with sensor noise; each blob `(x0, y, dx)` is a dark 30x80 figure walking right."""
    rng = np.random.default_rng(seed)
    back = cv2.GaussianBlur(rng.integers(60, 200, (H, W, 3), dtype=np.uint8), (9, 9), 0)
    out = []
    for i in range(frames):
        img = np.clip(back + rng.normal(0, 2, back.shape), 0, 255).astype(np.uint8)
        for x0, y, dx in blobs:
            x = x0 + dx * i
            img[y:y + 80, x:x + 30] = 20
        out.append(img)
    return out


def blob_box(x0: int, y: int, dx: int, i: int) -> np.ndarray:
    return np.array([x0 + dx * i, y, x0 + dx * i + 30, y + 80])


def inside(box: np.ndarray, regions: np.ndarray) -> bool:
    return any((box[:2] >= r[:2]).all() and (box[2:] <= r[2:]).all() for r in regions)


def overlaps(box: np.ndarray, regions: np.ndarray) -> bool:
    return any(box[0] < r[2] and r[0] < box[2] and box[1] < r[3] and r[1] < box[3] for r in regions)


def test_a_static_scene_costs_only_warm_up_and_scheduled_full_frames():
    det = Counting(HogDetector(HogConfig(upscale=1.0)))
    gate = MotionGate(MotionConfig(warmup_frames=5, full_frame_every=20), CameraMotionConfig(), det)
    full = []
    for i, frame in enumerate(scene(50)):
        plan = gate.plan(frame, NO_TRACKS)
        dets = gate.detect(det, frame, plan)
        assert len(dets) == 0
        if plan.full:
            full.append(i + 1)
        else:
            assert len(plan.regions) == 0 and plan.share < 0.01, (i, plan)
    # Frames 1-5 learn the background; then every 20th frame after the last whole one.
    assert full == [1, 2, 3, 4, 5, 25, 45]
    assert det.calls == [(H, W)] * len(full)  # nothing else reached the detector


def test_regions_follow_what_moves_and_skip_the_mask():
    walker, masked = (40, 100, 6), (40, 330, 6)  # two figures; the lower one walks inside a masked band
    mask = CameraMotionConfig(mask=[[(0, 300), (W, 300), (W, 440), (0, 440)]])
    gate = MotionGate(MotionConfig(warmup_frames=3, full_frame_every=0), mask, HogDetector(HogConfig()))
    for i, frame in enumerate(scene(40, [walker, masked])):
        plan = gate.plan(frame, NO_TRACKS)
        if i < 3:
            assert plan.full
            continue
        assert not plan.full and len(plan.regions) == 1, (i, plan.regions)
        assert inside(blob_box(*walker, i), plan.regions)
        assert not overlaps(blob_box(*masked, i), plan.regions)
        assert plan.share < 0.05  # one figure of 640x480, the masked one not counted


def test_a_live_track_is_looked_at_even_when_nothing_moves():
    gate = MotionGate(MotionConfig(warmup_frames=2, full_frame_every=0), CameraMotionConfig(), HogDetector(HogConfig()))
    track = np.array([[300.0, 200, 340, 300]])
    plans = [gate.plan(frame, track) for frame in scene(6)]
    for plan in plans[2:]:
        assert not plan.full and len(plan.regions) == 1 and inside(track[0], plan.regions)
        assert (plan.regions[0, 2:] - plan.regions[0, :2] < [W / 2, H / 2]).all()  # padded, not the whole frame


def test_yolo_regions_are_tiles_of_the_model_input():
    class Yolo320:  # what the gate reads of a YOLO detector: its fixed input size
        tile_hw = (320, 320)

    gate = MotionGate(MotionConfig(warmup_frames=2, full_frame_every=0), CameraMotionConfig(), Yolo320())
    track = np.array([[100.0, 100, 130, 180]])
    plan = [gate.plan(frame, track) for frame in scene(4)][-1]
    assert not plan.full and (plan.regions[:, 2:] - plan.regions[:, :2] == 320).all()
    assert inside(track[0], plan.regions)


def test_too_much_motion_runs_the_whole_frame():
    """A crowd: once crops would cost more than the frame, the detector gets the frame, exactly as without gating."""
    rng = np.random.default_rng(1)
    crowd = []
    for frame in scene(10):
        for x, y in zip(rng.integers(0, W - 30, 40), rng.integers(0, H - 80, 40)):  # 40 people, all moving
            frame[y:y + 80, x:x + 30] = 20
        crowd.append(frame)
    gate = MotionGate(MotionConfig(warmup_frames=3, full_frame_every=0), CameraMotionConfig(), HogDetector(HogConfig()))
    plans = [gate.plan(frame, NO_TRACKS) for frame in crowd]
    assert all(p.full and (p.regions == [[0, 0, W, H]]).all() for p in plans)
    assert min(p.share for p in plans[3:]) > 0.05  # though each moving pixel is under a tenth of the frame


@pytest.fixture(scope="module")
def vtest() -> list[np.ndarray]:
    """vtest.avi's first 32 frames, every 2nd (people walking across a campus, filmed from above)."""
    cap = cv2.VideoCapture(str(shared_data("vtest.avi")))
    frames = [cap.read()[1] for _ in range(32)][::2]
    cap.release()
    return frames


def _matched(found: Detections, wanted: Detections, iou: float = 0.5) -> int:
    """How many of `wanted` have a box in `found` at IoU >= iou."""
    if not len(found) or not len(wanted):
        return 0
    a, b = wanted.xyxy[:, None], found.xyxy[None]
    inter = np.prod(np.clip(np.minimum(a[..., 2:], b[..., 2:]) - np.maximum(a[..., :2], b[..., :2]), 0, None), -1)
    union = np.prod(a[..., 2:] - a[..., :2], -1) + np.prod(b[..., 2:] - b[..., :2], -1) - inter
    return int(((inter / union) >= iou).any(1).sum())


def test_real_people_walking_are_found_where_they_move_or_are_tracked(vtest):
    hog = HogDetector(HogConfig(upscale=1.6))
    det = Counting(hog)
    gate = MotionGate(MotionConfig(warmup_frames=3, full_frame_every=10), CameraMotionConfig(), det)
    tracker = Tracker(TrackerConfig())
    found = wanted = 0
    region_share = []
    for frame in vtest:
        plan = gate.plan(frame, tracker.live_boxes())
        dets = gate.detect(det, frame, plan)
        tracker.update(dets, frame)
        if plan.full:
            continue
        # Every box lies in a crop that something moving or a live track asked for.
        assert all(inside(np.floor(b), plan.regions) or inside(np.ceil(b), plan.regions) for b in dets.xyxy)
        wh = plan.regions[:, 2:] - plan.regions[:, :2]
        region_share.append((wh[:, 0] * wh[:, 1]).sum() / (frame.shape[0] * frame.shape[1]))
        whole = hog(frame)
        found, wanted = found + _matched(dets, whole), wanted + len(whole)
    assert region_share and np.mean(region_share) < 0.5  # the detector scans well under half the pixels
    assert wanted > 50 and found >= 0.85 * wanted, (found, wanted)  # and finds the people the whole frame finds


def _node(default_model, **detector) -> EdgeNode:
    cams = [{"id": "campus", "source": str(shared_data("TUD-Campus/TUD-Campus.mp4")), "fps": 5}]
    return EdgeNode(edge_config(default_model, cams, detector=detector))


def test_gating_off_is_todays_behaviour(default_model, tud_frames):
    """`detector.motion.enabled: false`: the detector gets every whole frame, and the node the same boxes."""
    node = _node(default_model, motion={"enabled": False})
    cam = node.cameras["campus"]
    assert cam.gate is None
    seen, tracked = [], []
    hog, update = node.detector, cam.tracker.update
    node.detector = lambda image: seen.append(image) or hog(image)
    cam.tracker.update = lambda dets, image: tracked.append(dets) or update(dets, image)
    assert node.run(max_seconds=100)["campus"].frames == 15
    # One call per frame, with the whole decoded frame; the tracker got exactly the detector's boxes on it.
    frames = tud_frames[::5][:15]
    assert len(seen) == 15 and all(np.array_equal(s, f) for s, f in zip(seen, frames))
    for dets, frame in zip(tracked, frames):
        want = hog(frame)
        want = want[want.height >= node.cfg.detector.min_box_height]
        assert np.array_equal(dets.xyxy, want.xyxy) and np.array_equal(dets.confidence, want.confidence)


def test_camera_override_switches_gating_off_for_a_ptz_camera(default_model, tmp_path):
    cams = [{"id": "fixed", "source": "a.mp4"}, {"id": "ptz", "source": "b.mp4", "motion": False}]
    cfg = edge_config(default_model, cams)
    node = EdgeNode(cfg)
    assert cfg.detector.motion.enabled and node.cameras["fixed"].gate is not None and node.cameras["ptz"].gate is None
    node.publisher.close()


def test_the_gated_node_reports_motion_metrics(default_model, caplog):
    node = _node(default_model)
    with caplog.at_level(logging.INFO, logger="crossview.edge.node"):
        stats = node.run(max_seconds=100)["campus"]
    line = [r.getMessage() for r in caplog.records if r.getMessage().startswith("camera campus: finished")][-1]
    assert re.search(r"detector \d+ ms/frame \(motion \d+% of the frame, [\d.]+ crops, \d+ whole frames\)", line), line
    m = node.metrics
    assert stats.frames == 15 and stats.detections > 0
    assert m.value("crossview_edge_regions_count", "campus") == m.value("crossview_edge_motion_share_count", "campus") == 15
    assert m.value("crossview_edge_full_frames_total", "campus") >= 5  # the warm-up at least
    assert 0 < m.value("crossview_edge_motion_share_sum", "campus") < 15
    assert m.value("crossview_edge_detector_ms", "campus") > 0 and m.value("crossview_edge_motion_seconds_count", "campus") == 15


@pytest.mark.parametrize("motion, needle", [
    ({"full_frame_every": -1}, "detector.motion.full_frame_every"),
    ({"width": 10}, "detector.motion.width"),
    ({"enabeld": True}, "detector.motion.enabeld: unknown key"),
])
def test_bad_motion_settings_name_the_key(default_model, motion, needle):
    with pytest.raises(ConfigError, match=needle.replace(".", r"\.")):
        edge_config(default_model, [{"id": "a", "source": "a.mp4"}], detector={"motion": motion})


@pytest.mark.parametrize("camera_motion, needle", [
    ({"mask": [[[0, 0], [10, 0]]]}, "cameras.0.motion.mask: Value error, polygon 0 has 2 points"),
    ({"mask": [[[0, 0], [10, -1], [5, 5]]]}, "cameras.0.motion.mask: Value error, polygon 0: frame pixel"),
    ("sometimes", "cameras.0.motion"),
])
def test_bad_camera_motion_names_the_key(default_model, camera_motion, needle):
    with pytest.raises(ConfigError) as e:
        edge_config(default_model, [{"id": "a", "source": "a.mp4", "motion": camera_motion}])
    assert needle in str(e.value)


def test_motion_defaults_are_on_and_typed():
    cfg = parse_config({"node_id": "n", "cameras": [{"id": "a", "source": "x"}],
                        "publisher": {"security": {"mode": "plain"}}}, EdgeConfig)
    assert cfg.detector.motion == MotionConfig() == DetectorConfig().motion and cfg.detector.motion.enabled
    assert cfg.cameras[0].motion.enabled is None  # follows detector.motion.enabled
