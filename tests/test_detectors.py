"""Person detectors on real footage: OpenCV HOG, and the ultralytics YOLO path (.pt and exported .onnx).

YOLO weights cannot be downloaded here, so the YOLO tests build YOLO11n from ultralytics' model YAML
(random weights): the loading, export and inference code that real weights go through still runs.
"""

import os
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
from helpers import shared_data

from crossview.edge.detections import Detections
from crossview.edge.detectors import (
    DetectorError,
    HogDetector,
    YoloOnnx,
    YoloTorch,
    build_detector,
)
from crossview.edge.yolo_export import export_yolo
from crossview.kernel.config import DetectorConfig, HogConfig
from crossview.kernel.ort import ModelError


@pytest.fixture(scope="module")
def vtest_frames() -> list[np.ndarray]:
    cap = cv2.VideoCapture(str(shared_data("vtest.avi")))
    frames = [cap.read()[1] for _ in range(5)]
    cap.release()
    return frames


@pytest.fixture(scope="module")
def yolo_files(tmp_path_factory) -> tuple[Path, Path]:
    from crossview.kernel.runtime import offline_env

    offline_env()
    from ultralytics import YOLO

    d = tmp_path_factory.mktemp("yolo")
    pt = d / "yolo11n-random.pt"
    YOLO("yolo11n.yaml").save(str(pt))
    return pt, export_yolo(pt, d / "yolo11n-random.onnx", imgsz=320)


def test_hog_finds_the_people_on_the_campus(vtest_frames):
    det = build_detector(DetectorConfig(kind="hog"))
    assert isinstance(det, HogDetector)
    counts = []
    for frame in vtest_frames:
        d = det(frame)
        assert isinstance(d, Detections)
        assert (d.xyxy[:, 2] > d.xyxy[:, 0]).all() and (d.xyxy[:, 3] <= 576).all()
        assert ((d.confidence > 0) & (d.confidence < 1)).all()
        counts.append(len(d))
    # PETS S2.L1 opens with about six people walking across; HOG at 1.6x upscale finds most of them.
    assert 3 <= np.median(counts) <= 12, counts


def test_hog_scans_a_4k_frame_at_its_max_side_and_answers_in_the_frames_pixels(vtest_frames, monkeypatch):
    """A frame 4x the footage's size (3072x2304) costs the scan of a 768-px-wide one: the same people, in the big
    frame's coordinates."""
    from crossview.kernel.config import HogConfig

    small = vtest_frames[0]
    big = cv2.resize(small, None, fx=4, fy=4, interpolation=cv2.INTER_LINEAR)
    det = HogDetector(HogConfig(max_side=max(small.shape[:2])))
    scanned = []
    detect = det.hog.detectMultiScale
    monkeypatch.setattr(det, "hog", type("Spy", (), {"detectMultiScale": lambda self, img, **kw: scanned.append(
        img.shape) or detect(img, **kw)})())
    at_small, at_big = det(small), det(big)
    assert scanned[1][:2] == scanned[0][:2]  # the big frame was brought down to the small one's size before the scan
    assert len(at_big) == len(at_small) >= 3
    assert np.allclose(np.sort(at_big.xyxy, 0), 4 * np.sort(at_small.xyxy, 0), atol=16)
    assert (at_big.xyxy[:, 2] <= big.shape[1]).all() and (at_big.xyxy[:, 3] <= big.shape[0]).all()


def test_frames_smaller_than_the_hog_window_have_no_one_in_them_and_crash_nothing():
    """OpenCV's HOG reads out of bounds (SIGSEGV, heap corruption) when the scanned image plus its padding is smaller
    than the 64x128 window. In a subprocess with glibc's heap checks, so a regression is a crash, not a dead runner."""
    code = """
import numpy as np
from crossview.edge.detectors import HogDetector
from crossview.kernel.config import HogConfig
small = {1.6: [(60, 300), (69, 300), (300, 29), (1, 1), (3, 5), (9, 17), (17, 9)],
         1.0: [(60, 640), (111, 300), (300, 47), (96, 480), (1, 1), (3, 5), (9, 17)]}
for upscale, sizes in small.items():
    for stride in (4, 5, 8):
        det = HogDetector(HogConfig(upscale=upscale, win_stride=stride, hit_threshold=-5.0))  # noise would be found
        for hw in sizes:
            assert len(det(np.random.default_rng(0).integers(0, 256, (*hw, 3), np.uint8))) == 0, hw
print("alive")
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                       env={**os.environ, "MALLOC_CHECK_": "3"})
    assert r.returncode == 0 and r.stdout == "alive\n", r.stderr
    assert "HOG: a 300x60 image (480x96 scanned) is smaller than the 64x128 window with 8 px padding" in r.stderr


@pytest.mark.parametrize("cfg, fits, scanned, too_small", [
    # 1.6x: 70 px → 112 (+ 2 x 8 padding = 128), 30 → 48 (+ 16 = 64); 69 → 110, 29 → 46
    (HogConfig(), [(70, 30)], [(112, 48)], [(69, 300), (300, 29)]),
    # 4000 px down to max_side 256, then 2x: 0.128 per px; 875 → 112, 375 → 48; 871 → 111.49, 371 → 47.49
    (HogConfig(upscale=2.0, max_side=256), [(875, 4000), (4000, 375)], [(112, 512), (512, 48)], [(871, 4000), (4000, 371)]),
])
def test_hog_scans_the_smallest_frames_the_window_fits_and_nothing_smaller(cfg, fits, scanned, too_small, monkeypatch):
    """The bound counts the padding and the size after the max_side downscale and the upscale, rounded as resize
    rounds it: what is scanned is exactly the size the check allowed."""
    det = HogDetector(cfg)
    seen = []
    monkeypatch.setattr(det, "hog", type("Spy", (), {"detectMultiScale": lambda self, img, **kw: seen.append(
        img.shape[:2]) or ((), ())})())
    for hw in too_small + fits:
        assert len(det(np.zeros((*hw, 3), np.uint8))) == 0
    assert seen == scanned


def test_auto_falls_back_to_hog_and_says_so(tmp_path, caplog):
    det = build_detector(DetectorConfig(kind="auto", weights=tmp_path / "missing.onnx"))
    assert isinstance(det, HogDetector)
    assert "OpenCV HOG" in caplog.text and "missing.onnx" in caplog.text


def test_explicit_yolo_without_weights_is_an_error(tmp_path):
    with pytest.raises(DetectorError, match="missing.pt"):
        build_detector(DetectorConfig(kind="yolo", weights=tmp_path / "missing.pt"))


def test_exported_onnx_matches_the_pytorch_model(yolo_files, vtest_frames):
    import torch
    from ultralytics import YOLO

    from crossview.edge.detectors import _letterbox

    pt, onnx = yolo_files
    img, _, _ = _letterbox(vtest_frames[0], (320, 320))
    x = np.ascontiguousarray(img[:, :, ::-1].transpose(2, 0, 1))[None].astype(np.float32) / 255
    model = YOLO(str(pt)).model.float().eval()
    with torch.no_grad():
        want = model(torch.from_numpy(x))[0].numpy()
    det = YoloOnnx(DetectorConfig(kind="yolo", weights=onnx, imgsz=320))
    got = det.session.run(None, {det.input_name: x})[0]
    assert got.shape == want.shape == (1, 84, 2100)
    assert np.abs(got - want).max() < 1e-2 * max(1.0, np.abs(want).max())


def test_both_yolo_paths_give_detections_inside_the_frame(yolo_files, vtest_frames):
    # Random weights score every box about 1.5e-4: a tiny threshold still runs decoding and NMS.
    for weights in yolo_files:
        det = build_detector(DetectorConfig(kind="yolo", weights=weights, conf=1e-4, imgsz=320))
        d = det(vtest_frames[0])
        assert isinstance(d, Detections) and len(d) > 0, weights
        assert (d.xyxy >= 0).all() and (d.xyxy[:, [0, 2]] <= 768).all() and (d.xyxy[:, [1, 3]] <= 576).all()
    assert isinstance(build_detector(DetectorConfig(kind="yolo", weights=yolo_files[0])), YoloTorch)


def test_a_model_that_is_not_a_detector_is_refused(default_model):
    with pytest.raises(DetectorError, match="not a YOLO"):
        YoloOnnx(DetectorConfig(kind="yolo", weights=default_model))


def test_corrupt_detector_file(tmp_path):
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not onnx at all")
    with pytest.raises(ModelError, match="bad.onnx: cannot load ONNX model"):
        build_detector(DetectorConfig(kind="yolo", weights=bad))


def test_a_rectangular_export_fits_4_3_frames_without_padding(yolo_files, tmp_path, vtest_frames):
    onnx = export_yolo(yolo_files[0], tmp_path / "yolo-256x320.onnx", imgsz=(256, 320))
    det = build_detector(DetectorConfig(kind="yolo", weights=onnx, conf=1e-4, imgsz=640))
    assert det.imgsz == (256, 320)  # the model's own input size wins over the config's
    d = det(vtest_frames[0])
    assert len(d) > 0 and (d.xyxy[:, [0, 2]] <= 768).all() and (d.xyxy[:, [1, 3]] <= 576).all()


def test_importing_ultralytics_leaves_opencv_its_threads():
    """ultralytics' import turns OpenCV threading off; the HOG detector then ran ~1.5x slower."""
    import os
    import subprocess
    import sys

    code = ("import cv2; n = cv2.getNumThreads(); from edge.tracking import Tracker; from crossview.kernel.config import TrackerConfig; "
            "Tracker(TrackerConfig()); import os; print(n, cv2.getNumThreads(), os.environ.get('OMP_NUM_THREADS'))")
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}  # an earlier import here may have set it
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True,
                         env=env).stdout.split()
    assert out[0] == out[1] != "0" and out[2] == "None"
