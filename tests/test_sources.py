"""edge.sources on real footage and a real MJPEG-over-HTTP camera that dies, comes back and hangs."""

from __future__ import annotations

import logging
import os
import threading
import time

import numpy as np
import pytest
from helpers import MjpegServer, free_port, jpeg_frames, shared_data, wait_for

from crossview.edge.sources import CameraSource, Frame, SourceError, open_capture
from crossview.kernel.config import CameraConfig

LIVE = dict(stall_timeout_s=1.0, reconnect_min_s=0.2, reconnect_max_s=1.0)


def cam(source, id: str = "cam1", **kw) -> CameraConfig:
    return CameraConfig(id=id, source=str(source), **kw)


def drain(src: CameraSource) -> list[Frame]:
    frames = []
    while (f := src.read(5.0)) is not None:
        frames.append(f)
    return frames



def read_after(src: CameraSource, t: float, timeout: float) -> Frame | None:
    """First frame captured after wall-clock `t` (the slot may still hold one from before)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        f = src.read(0.5)
        if f is not None and f.ts > t:
            return f
    return None


@pytest.fixture
def start():
    sources = []

    def _start(cfg: CameraConfig, **kw) -> CameraSource:
        src = CameraSource(cfg, **kw)
        src.start()
        sources.append(src)
        return src

    yield _start
    for src in sources:
        src.stop()


# ---- files ----------------------------------------------------------------------------------


def test_stride_keeps_every_fifth_frame(start):
    s = start(cam(shared_data("TUD-Campus/TUD-Campus.mp4"), fps=5))
    frames = drain(s)
    assert [f.index for f in frames] == list(range(0, 71, 5))
    assert (s.status, s.native_fps, s.frames_read, s.frames_skipped) == ("finished", 25.0, 71, 71 - 15)
    assert np.allclose(np.diff([f.ts for f in frames]), 0.2)
    assert frames[0].image.shape == (480, 640, 3) and frames[0].image.dtype == np.uint8
    assert s.read(0.1) is None


def test_play_once_backpressure_loses_nothing(start):
    s = start(cam(shared_data("vtest.avi"), fps=10))
    time.sleep(0.5)
    assert s.frames_read <= 3  # the reader waits for the consumer instead of decoding ahead
    seen = []  # (index, ts) only: 795 full frames would hold ~1 GB
    while (f := s.read(5.0)) is not None:
        seen.append((f.index, f.ts))
    assert [i for i, _ in seen] == list(range(795))
    assert s.status == "finished"
    assert all(b[1] > a[1] for a, b in zip(seen, seen[1:]))


def test_loop_continues_past_the_end(start):
    s = start(cam(shared_data("TUD-Campus/TUD-Campus.mp4"), fps=25, loop=True))
    frames = [s.read(5.0) for _ in range(100)]
    assert [f.index for f in frames] == list(range(100))
    assert all(b.ts > a.ts for a, b in zip(frames, frames[1:]))
    assert np.array_equal(frames[71].image, frames[0].image)  # second pass starts at the file's first frame
    assert s.status == "streaming"


def test_realtime_file_is_paced_and_newest_only(start):
    s = start(cam(shared_data("TUD-Campus/TUD-Campus.mp4"), fps=25, realtime=True))
    time.sleep(1.0)
    f = s.read(1.0)
    assert 15 <= f.index <= 35  # ~25 frames of video per second of wall-clock
    assert s.frames_skipped >= 10  # frames nobody asked for were superseded, not queued
    assert s.read(1.0).index > f.index


def test_missing_file_fails_without_raising(start, tmp_path):
    path = tmp_path / "nope.mp4"
    s = start(cam(path, id="gate"))
    assert s.read(2.0) is None
    assert s.status == "failed"
    assert "gate" in s.error and str(path) in s.error and "not found" in s.error
    with pytest.raises(SourceError, match=r"gate.*nope\.mp4.*not found"):
        CameraSource(cam(path, id="gate")).check()


@pytest.mark.parametrize("kind", ["random", "truncated-mp4"])
def test_corrupt_file_fails_clearly(start, tmp_path, kind):
    path = tmp_path / "bad.mp4"
    if kind == "random":
        path.write_bytes(os.urandom(200_000))
    else:  # TUD-Campus keeps its index (moov) at the end: half a file cannot be opened at all
        data = shared_data("TUD-Campus/TUD-Campus.mp4").read_bytes()
        path.write_bytes(data[: len(data) // 2])
    s = start(cam(path, id="yard"))
    assert s.read(2.0) is None
    assert s.status == "failed" and "yard" in s.error and str(path) in s.error
    with pytest.raises(SourceError, match=r"yard.*bad\.mp4"):
        CameraSource(cam(path, id="yard")).check()


def test_truncated_avi_yields_its_frames_then_finishes_with_warning(start, tmp_path, caplog):
    data = shared_data("vtest.avi").read_bytes()
    path = tmp_path / "cut.avi"
    path.write_bytes(data[: len(data) // 2])  # AVI has no index at the front: the first half still decodes
    CameraSource(cam(path)).check()
    s = start(cam(path, id="cut", fps=10))
    indices = [f.index for f in iter(lambda: s.read(5.0), None)]
    assert 300 < len(indices) < 795
    assert indices == list(range(len(indices)))
    assert s.status == "finished"
    assert any(r.levelno == logging.WARNING and "cut" in r.getMessage() and f"frame {len(indices)} of 795" in r.getMessage()
               for r in caplog.records)


# ---- live -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def jpegs() -> list[bytes]:
    return jpeg_frames(shared_data("vtest.avi"), 40)


@pytest.fixture
def server(jpegs):
    srv = MjpegServer(jpegs, fps=10).start()
    yield srv
    srv.stop()


def readers(camera_id: str) -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith(f"cam-{camera_id}-reader")]


@pytest.mark.timeout(20)
def test_opencv_reads_mjpeg_over_http(server):
    cap = open_capture(server.url, timeout_s=2.0)
    ok, img = cap.read()
    cap.release()
    assert ok and img.shape == (288, 384, 3)


@pytest.mark.timeout(30)
def test_live_reconnects_when_the_server_dies_and_returns(start, server, caplog):
    caplog.set_level(logging.INFO, logger="crossview.edge.sources")
    s = start(cam(server.url, id="door", **LIVE))
    assert s.read(3.0) is not None and s.status == "streaming"

    server.stop()  # listener gone, client connections cut
    assert wait_for(lambda: s.status == "reconnecting" and s.reconnects >= 2, 5.0)
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING and "door" in r.getMessage()]
    assert len(warnings) == 1  # once per outage, not once per attempt

    restarted = time.time()
    server.start()  # same port
    assert read_after(s, restarted, 5.0) is not None
    assert s.status == "streaming"
    assert any("streaming again" in r.getMessage() for r in caplog.records)


@pytest.mark.timeout(20)
def test_live_hands_out_the_newest_frame_only(start, server):
    s = start(cam(server.url, **LIVE))
    prev = s.read(3.0)
    for _ in range(3):
        time.sleep(0.5)  # a consumer slower than the camera
        f = s.read(1.0)
        assert time.time() - f.ts < 0.35
        assert f.index - prev.index >= 3
        prev = f
    assert s.frames_skipped >= 6


@pytest.mark.timeout(20)
def test_live_stall_caught_by_read_timeout(start, server):
    s = start(cam(server.url, id="still", **LIVE))
    assert s.read(3.0) is not None
    server.stall()  # connection stays open, nothing arrives
    assert wait_for(lambda: s.status == "reconnecting", 3.0)
    assert "no frame for 1.0 s" in s.error
    resumed = time.time()
    server.resume()
    assert read_after(s, resumed, 5.0) is not None and s.status == "streaming"


@pytest.mark.timeout(30)
def test_watchdog_replaces_a_reader_stuck_in_capture(start, server):
    # FFmpeg would wait 30 s before giving up: only the watchdog (2 x stall_timeout_s) can recover in time.
    s = start(cam(server.url, id="hung", **LIVE), io_timeout_s=30.0)
    assert s.read(3.0) is not None
    server.stall()
    stalled = time.monotonic()
    assert wait_for(lambda: s.reconnects >= 1, 5.0)
    assert 1.5 < time.monotonic() - stalled < 4.0
    assert s.status == "reconnecting" and "blocked" in s.error

    resumed = time.time()
    server.resume()  # also wakes the abandoned reader: its late frame must be dropped and the thread end
    assert read_after(s, resumed, 6.0) is not None and s.status == "streaming"
    assert wait_for(lambda: len(readers("hung")) == 1, 3.0)

    server.stall()
    time.sleep(0.5)  # the reader is now blocked inside cap.read()
    t = time.monotonic()
    s.stop()
    assert time.monotonic() - t < 2.0


def test_a_dead_stream_logs_our_lines_only_and_never_its_password(tmp_path, default_model):
    """A real node process: FFmpeg's and OpenCV's own spam stays out of its log, and so does the RTSP password."""
    import subprocess
    import sys

    import yaml

    port = free_port()  # nobody listens: every open is refused at once
    cfg = {"node_id": "n", "cameras": [{"id": "door", "source": f"rtsp://admin:Pa55w0rd@127.0.0.1:{port}/live",
                                        "reconnect_min_s": 0.2, "reconnect_max_s": 0.4, "stall_timeout_s": 1}],
           "detector": {"kind": "hog"}, "embedder": {"model": str(default_model)},
           "publisher": {"endpoint": "tcp://127.0.0.1:9", "security": {"mode": "plain"}}, "metrics": {"log_interval_s": 1}}
    (tmp_path / "edge.yaml").write_text(yaml.safe_dump(cfg))
    out = subprocess.run([sys.executable, "-m", "crossview.cli", "edge", "--config", str(tmp_path / "edge.yaml"),
                          "--max-seconds", "4"], capture_output=True, text=True, timeout=120)
    log = out.stdout + out.stderr
    assert "Pa55w0rd" not in log
    assert f"camera door: rtsp://admin:***@127.0.0.1:{port}/live: cannot open the stream; reconnecting" in log
    foreign = [line for line in log.splitlines() if line.startswith("[") or "VIDEOIO" in line or "global " in line]
    assert foreign == []


def test_a_file_clip_cut_later_from_a_recording_carries_its_offset(tmp_path):
    clip = str(shared_data("TUD-Campus") / "TUD-Campus.mp4")
    sources = [CameraSource(CameraConfig(id=f"c{k}", source=clip, fps=25, start_offset_s=offset))
               for k, offset in enumerate((0.0, 10.0))]
    for src in sources:  # started together: their first frames' times differ by the offset (and the moment between)
        src.start()
    first = [src.read(timeout=10) for src in sources]
    for src in sources:
        src.stop()
    assert 10.0 <= first[1].ts - first[0].ts < 10.5
