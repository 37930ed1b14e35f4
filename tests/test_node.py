"""The edge node end to end on real footage: cameras → HOG → tracker → ONNX embedder → real ZeroMQ.

Each test starts a real node (threads, sockets, decoders) and checks what a user would: the messages
that arrive, the per-camera statistics, and that one bad camera or a dead matcher harms nothing else.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
import yaml
from helpers import TINY_META, MjpegServer, edge_config, free_port, jpeg_frames, raw_export, shared_data, wait_for
from torch import nn

from crossview.edge import harvest
from crossview.edge.detections import Detections
from crossview.edge.node import EdgeNode
from crossview.kernel.ort import ModelError
from crossview.kernel.wire import Sighting
from crossview.matcher.ingest import Receiver
from crossview.trainer.modeling.backbones import GapEmbedder

REPO = Path(__file__).resolve().parents[1]


class Collector:
    """A receiver thread on the node's endpoint, keeping every valid sighting."""

    def __init__(self):
        self.rx = Receiver("tcp://127.0.0.1:*")  # the OS picks a free port; the node connects to it
        self.endpoint = self.rx.endpoint
        self.got: list[Sighting] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            if (s := self.rx.receive(0.1)) is not None:
                self.got.append(s)

    def close(self, expect: int = 0, wait: float = 5.0) -> list[Sighting]:
        deadline = time.monotonic() + wait
        while len(self.got) < expect and time.monotonic() < deadline:
            time.sleep(0.05)
        self._stop.set()
        self._thread.join()
        self.rx.close()
        return self.got


def trimmed(src: Path, dst: Path, frames: int) -> Path:
    """The first `frames` frames of a real video, so a test runs in seconds."""
    cap = cv2.VideoCapture(str(src))
    fps = cap.get(cv2.CAP_PROP_FPS)
    out = None
    for _ in range(frames):
        ok, img = cap.read()
        if not ok:
            break
        out = out or cv2.VideoWriter(str(dst), cv2.VideoWriter_fourcc(*"mp4v"), fps, (img.shape[1], img.shape[0]))
        out.write(img)
    out.release()
    cap.release()
    return dst


def squeezed(src: Path, dst: Path, w: int, h: int) -> Path:
    """`src`'s frames resized to w x h (MJPG takes any size, odd ones too): a tiny sensor, or a strip of a scene."""
    cap = cv2.VideoCapture(str(src))
    out = cv2.VideoWriter(str(dst), cv2.VideoWriter_fourcc(*"MJPG"), cap.get(cv2.CAP_PROP_FPS), (w, h))
    while (read := cap.read())[0]:
        out.write(cv2.resize(read[1], (w, h), interpolation=cv2.INTER_AREA))
    out.release()
    cap.release()
    return dst


@pytest.fixture(scope="module")
def clips(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("clips")
    return {
        "vtest": trimmed(shared_data("vtest.avi"), d / "vtest-30.mp4", 30),
        "campus": shared_data("TUD-Campus/TUD-Campus.mp4"),
        "stadtmitte": trimmed(shared_data("TUD-Stadtmitte/TUD-Stadtmitte.mp4"), d / "stadtmitte-60.mp4", 60),
    }


@pytest.mark.timeout(300)
def test_three_real_cameras_and_two_broken_ones(default_model, clips, tmp_path):
    corrupt = tmp_path / "corrupt.mp4"
    corrupt.write_bytes(os.urandom(200_000))
    cfg = edge_config(
        default_model,
        [
            {"id": "overhead", "source": str(clips["vtest"]), "fps": 5},
            {"id": "campus", "source": str(clips["campus"]), "fps": 5},
            {"id": "stadtmitte", "source": str(clips["stadtmitte"]), "fps": 5},
            {"id": "missing", "source": str(tmp_path / "nope.mp4")},
            {"id": "corrupt", "source": str(corrupt)},
        ],
        endpoint=(rx := Collector()).endpoint,
        detector={"hog": {"upscale": 1.6}},
    )
    node = EdgeNode(cfg)
    stats = node.run(max_seconds=240)
    got = rx.close(expect=sum(s.sightings for s in stats.values()))

    # Frame counts follow each file's own rate: 10 fps → every 2nd frame, 25 fps → every 5th.
    assert {c: stats[c].frames for c in ("overhead", "campus", "stadtmitte")} == {"overhead": 15, "campus": 15, "stadtmitte": 12}
    assert stats["missing"].status == "failed" and "nope.mp4" in stats["missing"].error
    assert stats["corrupt"].status == "failed" and "corrupt.mp4" in stats["corrupt"].error
    assert all(stats[c].status == "finished" for c in ("overhead", "campus", "stadtmitte"))

    by_cam = {c: [s for s in got if s.camera == c] for c in stats}
    assert len(got) == sum(s.sightings for s in stats.values()) == node.publisher.acknowledged > 0
    assert node.publisher.spooled == 0 and sorted(s.seq for s in got) == list(range(got[0].seq, got[0].seq + len(got)))
    for cam in ("overhead", "campus", "stadtmitte"):
        assert by_cam[cam], f"no sightings from {cam}"
        assert len(stats[cam].tracks) >= 2  # several people walk through each clip
    for s in got:
        assert s.node == "test-edge" and s.model == "mobilenetv2-imagenet-1"
        assert s.embedding.shape == (1280,) and abs(np.linalg.norm(s.embedding) - 1) < 1e-3
        assert cv2.imdecode(np.frombuffer(s.thumbnail, np.uint8), cv2.IMREAD_COLOR).shape[0] == 128
    assert {s.frame % 2 for s in by_cam["overhead"]} == {0} and {s.frame % 5 for s in by_cam["campus"]} == {0}
    # One track's sightings are one person: consecutive embeddings of a track stay close.
    track = max({s.track for s in by_cam["campus"]}, key=lambda t: sum(s.track == t for s in by_cam["campus"]))
    embs = np.stack([s.embedding for s in by_cam["campus"] if s.track == track])
    assert len(embs) >= 3 and (embs[1:] * embs[:-1]).sum(1).min() > 0.9


@pytest.mark.timeout(120)
def test_matcher_down_the_node_keeps_going_spools_and_counts_drops(default_model, clips):
    """A spool too small for the clip's sightings: the oldest are dropped and counted, the rest kept for later."""
    cfg = edge_config(default_model, [{"id": "campus", "source": str(clips["campus"]), "fps": 5}], publisher={"spool_mb": 0.1})
    node = EdgeNode(cfg)
    stats = node.run(max_seconds=100)["campus"]
    pub = node.publisher
    assert stats.frames == 15 and stats.status == "finished"
    assert pub.dropped > 0 and pub.spooled > 0 and pub.spooled + pub.dropped == stats.sightings and pub.acknowledged == 0
    assert pub.spool.bytes <= 0.1e6 and not pub.reachable


@pytest.mark.timeout(180)
def test_live_stream_dies_and_comes_back_while_a_file_camera_runs(default_model, clips):
    server = MjpegServer(jpeg_frames(shared_data("TUD-Stadtmitte/TUD-Stadtmitte.mp4"), 60, width=640), fps=10).start()
    cfg = edge_config(
        default_model,
        [
            {"id": "live", "source": server.url, "fps": 4, "stall_timeout_s": 1.0, "reconnect_min_s": 0.2, "reconnect_max_s": 1.0},
            {"id": "file", "source": str(clips["stadtmitte"]), "fps": 2, "loop": True, "realtime": True},
        ],
    )
    node = EdgeNode(cfg)
    result: dict = {}
    runner = threading.Thread(target=lambda: result.update(node.run(max_seconds=150)))
    runner.start()
    live, file = node.cameras["live"].stats, node.cameras["file"].stats
    try:
        assert wait_for(lambda: live.frames >= 3, 40), "live camera never delivered"
        server.stop()
        assert wait_for(lambda: live.status == "reconnecting", 20)
        during = file.frames, live.frames
        assert wait_for(lambda: file.frames >= during[0] + 3, 30), "file camera stalled while the stream was down"
        assert live.frames <= during[1] + 1
        server.start()
        assert wait_for(lambda: live.status == "streaming" and live.frames >= during[1] + 3, 40), "stream not reopened"
    finally:
        node.stop()
        runner.join()
        server.stop()
    assert node.cameras["live"].source.reconnects >= 1
    assert node.metrics.value("crossview_edge_reconnects_total", "live") >= 1


@pytest.mark.timeout(180)
def test_model_hot_reload_while_streaming(default_model, clips, tmp_path, make_tiny_model, caplog):
    caplog.set_level(logging.INFO, logger="crossview.kernel.embedder")
    model = tmp_path / "embedder.onnx"
    shutil.copy(default_model, model)
    rx = Collector()
    cfg = edge_config(model, [{"id": "campus", "source": str(clips["campus"]), "fps": 5, "loop": True, "realtime": True}], rx.endpoint)
    node = EdgeNode(cfg)
    runner = threading.Thread(target=node.run, kwargs={"max_seconds": 150})
    runner.start()
    try:
        assert wait_for(lambda: len(rx.got) >= 3, 60)
        frames_before = node.cameras["campus"].stats.frames
        make_tiny_model(tmp_path / "next.onnx", "tiny-2", dim=8)
        os.replace(tmp_path / "next.onnx", model)  # how a deployment swaps it: atomic rename
        assert wait_for(lambda: any(s.model == "tiny-2" for s in rx.got), 60), "new model never used"
    finally:
        node.stop()
        runner.join()
    got = rx.close()
    versions = [s.model for s in got]
    first_new = versions.index("tiny-2")
    assert set(versions[:first_new]) == {"mobilenetv2-imagenet-1"} and set(versions[first_new:]) == {"tiny-2"}
    assert all(s.embedding.shape == (8,) for s in got[first_new:])
    assert node.cameras["campus"].stats.frames > frames_before  # the stream never stopped
    assert "embedding model reloaded: mobilenetv2-imagenet-1 → tiny-2" in caplog.text


def test_wrong_model_fails_before_any_camera_starts(tmp_path, clips):
    bad = tmp_path / "gray.onnx"
    raw_export(GapEmbedder(nn.Conv2d(1, 8, 3)), torch.zeros(1, 1, 32, 16), bad, TINY_META)
    cfg = edge_config(bad, [{"id": "campus", "source": str(clips["campus"])}])
    with pytest.raises(ModelError, match=r"gray.onnx: input must be \(batch, 3, H, W\)"):
        EdgeNode(cfg)


@pytest.mark.timeout(120)
def test_harvest_saves_sampled_crops_within_quota(default_model, clips, tmp_path):
    out = tmp_path / "harvest"
    cfg = edge_config(
        default_model, [{"id": "campus", "source": str(clips["campus"]), "fps": 25}],
        harvest={"enabled": True, "dir": str(out), "every_k": 5, "min_height": 100, "min_score": 0.5, "quota_mb": 0.25},
    )
    node = EdgeNode(cfg)
    node.run(max_seconds=100)
    jpgs = sorted(out.rglob("*.jpg"))
    assert jpgs and all(p.with_suffix(".json").is_file() for p in jpgs)
    total = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    assert total <= 0.25 * 2**20
    assert node.harvester.full, "the clip has more crops than a 0.25 MB quota holds"
    import json

    meta = json.loads(jpgs[0].with_suffix(".json").read_text())
    assert meta["camera"] == "campus" and meta["score"] >= 0.5 and meta["box"][3] - meta["box"][1] >= 100
    frames_per_track: dict[int, list[int]] = {}
    for p in jpgs:
        m = json.loads(p.with_suffix(".json").read_text())
        frames_per_track.setdefault(m["track"], []).append(m["frame"])
    assert all(len(set(f)) == len(f) for f in frames_per_track.values())


@pytest.mark.timeout(120)
def test_a_harvest_dir_that_cannot_be_written_pauses_harvesting_not_the_node(default_model, clips, tmp_path, monkeypatch,
                                                                             caplog):
    """A file where harvest.dir should be (it fails for root too, unlike chmod; no permission or a full disk fail the
    same way): each failure is logged and counted, harvesting retries after a pause, every camera runs to its end."""
    monkeypatch.setattr(harvest, "_PAUSE_S", 0.5)
    blocked = tmp_path / "harvest"
    blocked.write_text("a file, not a folder")
    cams = [{"id": "campus", "source": str(clips["campus"]), "fps": 25}, {"id": "overhead", "source": str(clips["vtest"]), "fps": 5}]
    cfg = edge_config(default_model, cams, harvest={"enabled": True, "dir": str(blocked), "every_k": 1, "min_height": 1,
                                                    "min_score": 0})
    node = EdgeNode(cfg)
    t0 = time.monotonic()
    stats = node.run(max_seconds=100)
    took = time.monotonic() - t0
    assert {c: (s.status, s.frames) for c, s in stats.items()} == {"campus": ("finished", 71), "overhead": ("finished", 15)}
    assert all(s.sightings for s in stats.values()) and node.publisher.spooled == sum(s.sightings for s in stats.values())
    failed = node.harvester.failed
    errors = [r.getMessage() for r in caplog.records if "harvest.dir" in r.getMessage()]
    # retried after each pause (not at every crop), and logged once per failure
    assert 2 <= failed == len(errors) <= took / harvest._PAUSE_S + 1
    assert f"cannot write crops into harvest.dir {blocked} ([Errno 20] Not a directory" in errors[0]
    assert node.metrics.value("crossview_edge_harvest_failed") == failed
    assert node.harvester.saved == 0 and node.harvester.used == 0 and blocked.read_text() == "a file, not a folder"


@pytest.mark.timeout(120)
def test_cameras_with_frames_smaller_than_the_hog_window_harm_no_other(default_model, clips, tmp_path):
    """OpenCV's HOG killed the whole node on such frames (SIGSEGV or heap corruption, no log line): run as deployed, in
    its own process, so a regression is a crash here, not a dead test runner."""
    cams = [{"id": "overhead", "source": str(clips["vtest"]), "fps": 5}]
    for w, h in ((640, 60), (9, 17), (1, 1)):
        cams.append({"id": f"tiny{w}x{h}", "source": str(squeezed(clips["vtest"], tmp_path / f"{w}x{h}.avi", w, h)), "fps": 5})
    config = tmp_path / "edge.yaml"
    config.write_text(yaml.safe_dump({
        "node_id": "test-edge", "cameras": cams, "detector": {"kind": "hog"}, "embedder": {"model": str(default_model)},
        "publisher": {"endpoint": "tcp://127.0.0.1:9", "security": {"mode": "plain"}, "spool_dir": str(tmp_path / "spool")},
    }))
    r = subprocess.run([sys.executable, "-m", "crossview.cli", "edge", "--config", str(config)], capture_output=True,
                       text=True, timeout=100)
    assert r.returncode == 0, r.stderr[-3000:]
    assert re.search(r"HOG: a \d+x\d+ image \(\d+x\d+ scanned\) is smaller than the 64x128 window", r.stderr)
    for cam in cams:
        assert re.search(rf"camera {cam['id']}: finished, [\d.]+ fps, 15 frames", r.stderr), cam["id"]
    assert int(re.findall(r"camera overhead: .*sightings (\d+)", r.stderr)[-1]) > 0


@pytest.mark.timeout(120)
def test_metrics_endpoint(default_model, clips):
    port = free_port()
    cfg = edge_config(default_model, [{"id": "campus", "source": str(clips["campus"]), "fps": 5}], metrics={"port": port})
    EdgeNode(cfg).run(max_seconds=100)
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    assert 'crossview_edge_frames_total{camera="campus"} 15.0' in text
    for name in ("crossview_edge_sightings_total", "crossview_edge_spooled", "crossview_edge_spool_dropped",
                 "crossview_edge_oldest_unacknowledged_seconds", "crossview_edge_detector_seconds_bucket", "crossview_edge_tracker_seconds_bucket",
                 "crossview_edge_embedder_seconds_count", "crossview_edge_fps"):
        assert name in text


@pytest.mark.timeout(120)
def test_detector_seconds_are_the_detectors_alone(default_model, clips):
    """A slow tracker shows in its own series, not as detector time."""
    node = EdgeNode(edge_config(default_model, [{"id": "campus", "source": str(clips["campus"]), "fps": 5}]))
    node.detector = lambda image: Detections.empty()
    tracker = node.cameras["campus"].tracker
    update = tracker.update

    def slow_update(dets, image):
        time.sleep(0.02)
        return update(dets, image)

    tracker.update = slow_update
    stats = node.run(max_seconds=100)["campus"]
    m = node.metrics
    assert stats.frames == m.value("crossview_edge_tracker_seconds_count", "campus") == 15
    assert m.value("crossview_edge_tracker_seconds_sum", "campus") == pytest.approx(stats.tracker_seconds)
    assert m.value("crossview_edge_detector_seconds_sum", "campus") == pytest.approx(stats.detector_seconds)
    assert stats.tracker_seconds >= 15 * 0.02 > 10 * stats.detector_seconds


def test_cli_bad_config_names_the_key(tmp_path):
    bad = tmp_path / "edge.yaml"
    bad.write_text("node_id: x\ncameras: [{id: a, source: a.mp4, fsp: 3}]\n")
    r = subprocess.run([sys.executable, "-m", "crossview.cli", "edge", "--config", str(bad)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2
    assert "cameras.0.fsp: unknown key" in r.stderr and str(bad) in r.stderr



@pytest.mark.timeout(120)
def test_status_lines_never_contradict_each_other(default_model, tmp_path, caplog):
    """A camera left out stays out (no "reconnecting" after it), and one that never delivered is "stopped",
    not "finished"."""
    dead = f"rtsp://127.0.0.1:{free_port()}/x"
    cams = [{"id": "gone", "source": str(tmp_path / "nope.mp4")}, {"id": "usb", "source": "usb:7"},
            {"id": "dead", "source": dead, "reconnect_min_s": 0.2, "reconnect_max_s": 0.2}]
    caplog.set_level(logging.INFO, logger="crossview.edge")
    stats = EdgeNode(edge_config(default_model, cams)).run(max_seconds=3)
    assert {c: s.status for c, s in stats.items()} == {"gone": "failed", "usb": "failed", "dead": "stopped"}
    for cam in ("gone", "usb"):
        lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith(f"camera {cam}")]
        assert "left out" in lines[0] and not any("reconnect" in x.split(",")[0] or "finished" in x for x in lines)
        assert sum("left out" in x or "failed:" in x for x in lines) == 1, lines
    dead_lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("camera dead")]
    assert not any("finished" in x for x in dead_lines) and "stopped" in dead_lines[-1]


@pytest.mark.timeout(120)
def test_status_line_shows_file_progress_and_a_camera_falling_behind(default_model, caplog):
    """A file says how far it is and when it ends; a paced camera the node cannot keep up with says so."""
    demo = REPO / "data" / "demo"
    cams = [{"id": "file", "source": str(demo / "vtest-a.mp4"), "fps": 5},
            {"id": "paced", "source": str(demo / "tud-campus.mp4"), "fps": 25, "realtime": True, "loop": True}]
    caplog.set_level(logging.INFO, logger="crossview.edge")
    cfg = edge_config(default_model, cams, detector={"hog": {"upscale": 1.6}}, metrics={"log_interval_s": 0.5})
    EdgeNode(cfg).run(max_seconds=15)
    lines = [r.getMessage() for r in caplog.records]
    assert any(re.search(r"^camera file: streaming, .* frame \d+ of 100 \(\d+%\), ETA \d+m\d\ds, queue", x) for x in lines)
    assert any(re.search(r"^camera paced: streaming, .*, falling behind: \d+\.\d of 25 fps, queue", x) for x in lines)
