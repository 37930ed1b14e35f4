"""Per-camera capture: one reader thread per camera, so a slow or dead camera never blocks another.

| source                          | delivery                                               | at the end / on failure                       |
|---------------------------------|--------------------------------------------------------|-----------------------------------------------|
| file                            | every `stride`-th frame, queue of 2: blocks, loses none | `loop` reopens, else "finished"; unreadable → "failed" |
| file, `realtime: true`          | paced at the file's fps, newest frame only             | as above                                      |
| URL (RTSP/HTTP), `usb:N`        | newest frame only (one slot)                           | reopen with exponential backoff ("reconnecting") |
| capture call stuck past timeout | watchdog abandons the reader thread, starts a new one  | the stale thread's late result is ignored     |
| `stop()` before any of these    |                                                        | "stopped"                                     |

    src = CameraSource(CameraConfig(id="gate", source="gate.mp4", fps=5))
    src.check()            # optional: raises SourceError if the file is missing or undecodable
    src.start()
    frame = src.read(timeout=1.0)   # Frame(camera_id, index, ts, image) or None
    src.status, src.frames_read, src.frames_skipped, src.reconnects
    src.stop()

File frames: `index` counts decoded frames from 0 and keeps increasing across loops, so indices are unique
and `ts = start wall-clock + start_offset_s + index / native_fps` stays monotonic (the frame within the file is `index` modulo
the frame count). Live frames: `index` is a running counter across reconnects, `ts` the wall-clock at capture.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, TypeVar

import cv2
import numpy as np

from crossview.kernel.config import CameraConfig

log = logging.getLogger(__name__)

T = TypeVar("T")

_QUEUE = 2  # non-realtime files: frames decoded ahead of the consumer
_STUCK_FACTOR = 2.0  # watchdog: a capture call blocked this many stall timeouts is stuck (FFmpeg's own timeout is 1x)
_WATCH_PERIOD_S = 0.2
_MAX_STUCK = 3  # abandoned readers still blocked: beyond this no new one is started, bounding leaked threads
_STOP_JOIN_S = 1.5


@dataclass
class Frame:
    camera_id: str
    index: int  # files: decoded frame number (continuing across loops); live: running counter
    ts: float  # unix time; files: start wall-clock + start_offset_s + index / native_fps
    image: np.ndarray  # BGR uint8


class SourceError(RuntimeError):
    """A source that cannot be used at all; the message names the camera, the source and the problem."""


def quiet_video_libraries() -> None:
    """FFmpeg and OpenCV print lines of their own for every failed open or read of a dead stream or USB
    device, again at every retry; our reconnect lines say what is going on. A user's own
    OPENCV_FFMPEG_LOGLEVEL / OPENCV_LOG_LEVEL win (set them to see those lines)."""
    os.environ.setdefault("OPENCV_FFMPEG_LOGLEVEL", "-8")  # AV_LOG_QUIET; read when FFmpeg first opens a source
    if "OPENCV_LOG_LEVEL" not in os.environ:
        cv2.utils.logging.setLogLevel(cv2.utils.logging.LOG_LEVEL_SILENT)


def open_capture(source: str, timeout_s: float = 10.0) -> cv2.VideoCapture:
    """Open a file or URL through FFmpeg with open/read timeouts, or `usb:N` as device N."""
    quiet_video_libraries()
    if source.startswith("usb:"):
        return cv2.VideoCapture(int(source[4:]))
    ms = int(timeout_s * 1000)
    # Without these a dead RTSP/HTTP stream blocks open()/read() for OpenCV's default 30 s.
    params = [cv2.CAP_PROP_OPEN_TIMEOUT_MSEC, ms, cv2.CAP_PROP_READ_TIMEOUT_MSEC, ms]
    return cv2.VideoCapture(source, cv2.CAP_FFMPEG, params)


class CameraSource:
    """Reads one camera in background threads; `read()` hands out frames. See the module docstring."""

    def __init__(self, cfg: CameraConfig, io_timeout_s: float | None = None):
        self.cfg = cfg
        # FFmpeg open/read timeout; the watchdog only steps in if a call outlives the stall timeout anyway.
        self.io_timeout_s = io_timeout_s or cfg.stall_timeout_s
        self.status = "connecting"
        self.error: str | None = None
        self.frames_read = self.frames_skipped = self.reconnects = 0
        self.native_fps = 0.0
        self.frame_count = 0  # files: frames the container reports (0: unknown)
        self.stride = 1  # files: one frame in `stride` is handed out
        self._keep_all = cfg.is_file and not cfg.realtime
        self._buf: deque[Frame] = deque()
        self._cond = threading.Condition()  # guards _buf, _gen, _busy_since
        self._stop = threading.Event()
        self._gen = 0  # bumped when the watchdog abandons a reader; stale readers check it and quit
        self._busy_since: float | None = None  # when the current reader entered a blocking capture call
        self._delay = cfg.reconnect_min_s
        self._count = 0  # live frame counter
        self._reader: threading.Thread | None = None
        self._watchdog: threading.Thread | None = None
        self._stuck: list[threading.Thread] = []

    # ---- public API -------------------------------------------------------------------------

    def check(self) -> None:
        """Raise SourceError now if the source is unusable (file missing/undecodable, USB device absent).

        URLs are not checked: an unreachable stream is an outage the reader rides out by reconnecting."""
        if self.cfg.is_file:
            self._open_file()[0].release()
        elif self.cfg.source.startswith("usb:"):
            cap = open_capture(self.cfg.source)
            opened = cap.isOpened()
            cap.release()
            if not opened:
                raise SourceError(f"camera {self.cfg.id}: USB device {self.cfg.source} absent or busy")

    def start(self) -> None:
        if self._reader is not None:
            return
        self._reader = self._spawn(self._gen, 0.0)
        if not self.cfg.is_file:
            self._watchdog = threading.Thread(target=self._watch, name=f"cam-{self.cfg.id}-watchdog", daemon=True)
            self._watchdog.start()

    def leave_out(self, error: str) -> None:
        """The node does not start this source (its check failed): it reads as failed from now on."""
        self.error, self.status = error, "failed"

    def stop(self) -> None:
        """Stop reading; returns within ~1.5 s even if a capture call is stuck (that thread is left to die).

        A source that had not finished or failed is "stopped" afterwards, never "finished"."""
        self._stop.set()
        with self._cond:
            self._cond.notify_all()
        deadline = time.monotonic() + _STOP_JOIN_S
        for t in (self._watchdog, self._reader):
            if t is not None:
                t.join(max(0.0, deadline - time.monotonic()))
        if self.status not in ("finished", "failed"):
            self.status = "stopped"

    @property
    def queue_depth(self) -> int:
        """Frames decoded and waiting for `read()` (at most 2 for files, 1 otherwise)."""
        return len(self._buf)

    def read(self, timeout: float) -> Frame | None:
        """The next frame (files) or the newest frame not yet returned (live), waiting up to `timeout`.

        None on timeout, and at once when the source has finished or failed and nothing is buffered."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while not self._buf:
                left = deadline - time.monotonic()
                if left <= 0 or self._stop.is_set() or self.status in ("finished", "failed"):
                    return None
                self._cond.wait(left)
            frame = self._buf.popleft()
            self._cond.notify_all()  # a file reader may be waiting for queue room
            return frame

    # ---- shared plumbing --------------------------------------------------------------------

    def _spawn(self, gen: int, delay: float) -> threading.Thread:
        run = self._run_file if self.cfg.is_file else self._run_live
        t = threading.Thread(target=run, args=(gen, delay), name=f"cam-{self.cfg.id}-reader-{gen}", daemon=True)
        t.start()
        return t

    def _current(self, gen: int) -> bool:
        return gen == self._gen and not self._stop.is_set()

    def _blocking(self, gen: int, fn: Callable[..., T], *args) -> T:
        """Run a capture call that may hang, so the watchdog can see how long it has been blocked."""
        with self._cond:
            if gen == self._gen:
                self._busy_since = time.monotonic()
        try:
            return fn(*args)
        finally:
            with self._cond:
                if gen == self._gen:
                    self._busy_since = None

    def _publish(self, frame: Frame, gen: int) -> None:
        if not self._current(gen):
            return
        self._delay = self.cfg.reconnect_min_s
        if self.status != "streaming":  # before the frame is visible, so a reader never sees a stale status
            again = self.status == "reconnecting"
            self.status = "streaming"
            log.info("camera %s: streaming %s%s", self.cfg.id, "again from " if again else "", self.cfg.shown_source)
        with self._cond:
            while self._keep_all and len(self._buf) >= _QUEUE and self._current(gen):
                self._cond.wait()  # backpressure: no file frame is lost, memory stays bounded
            if not self._current(gen):
                return
            if not self._keep_all and self._buf:
                self._buf.clear()  # one slot: the unread older frame is superseded
                self.frames_skipped += 1
            self._buf.append(frame)
            self._cond.notify_all()

    # ---- files ------------------------------------------------------------------------------

    def _open_file(self) -> tuple[cv2.VideoCapture, int]:
        """Open the file and grab (decode) its first frame; returns the capture and the reported frame count."""
        src, cid = self.cfg.source, self.cfg.id
        if not Path(src).is_file():
            raise SourceError(f"camera {cid}: video file {src} not found")
        cap = open_capture(src)
        if not cap.isOpened():
            raise SourceError(f"camera {cid}: cannot open {src} (not a video FFmpeg can read, or corrupt)")
        if not cap.grab():
            cap.release()
            raise SourceError(f"camera {cid}: {src} opens but no frame decodes (corrupt or empty)")
        fps = cap.get(cv2.CAP_PROP_FPS)
        self.native_fps = fps if 0 < fps < 1000 else self.cfg.fps  # unknown rate: take every frame
        self.frame_count = max(0, int(cap.get(cv2.CAP_PROP_FRAME_COUNT)))
        return cap, self.frame_count

    def _run_file(self, gen: int, _delay: float) -> None:
        stride = index = 0
        t0, m0 = time.time() + self.cfg.start_offset_s, time.monotonic()
        while True:
            try:
                cap, expected = self._open_file()
            except SourceError as e:
                self.error, self.status = str(e), "failed"  # logged by whoever watches status (the node)
                with self._cond:
                    self._cond.notify_all()
                return
            if not stride:
                stride = self.stride = max(1, round(self.native_fps / self.cfg.fps))
                log.info("camera %s: %s at %.3g fps, keeping 1 frame in %d", self.cfg.id, self.cfg.source, self.native_fps, stride)
            self.status = "streaming"
            decoded, index = self._play(cap, gen, index, stride, t0, m0)
            cap.release()
            if self._stop.is_set():
                return
            if 0 < expected and decoded < expected:
                log.warning("camera %s: %s: decode failed at frame %d of %d; treating it as the end",
                            self.cfg.id, self.cfg.source, decoded, expected)
            if not self.cfg.loop:
                self.status = "finished"
                with self._cond:
                    self._cond.notify_all()  # wake readers waiting for a frame that will not come
                return

    def _play(self, cap: cv2.VideoCapture, gen: int, index: int, stride: int, t0: float, m0: float) -> tuple[int, int]:
        """Hand out every `stride`-th frame of an opened file (first frame already grabbed).

        Returns the frames decoded in this pass and the next index."""
        decoded, ok = 0, True
        while ok and self._current(gen):
            if self.cfg.realtime and self._stop.wait(max(0.0, m0 + index / self.native_fps - time.monotonic())):
                break
            if index % stride:
                self.frames_skipped += 1
            else:
                ok, img = cap.retrieve()  # colour conversion only for frames we hand out
                if not ok:
                    break
                self._publish(Frame(self.cfg.id, index, t0 + index / self.native_fps, img), gen)
            self.frames_read += 1
            decoded += 1
            index += 1
            ok = cap.grab()
        return decoded, index

    # ---- live -------------------------------------------------------------------------------

    def _run_live(self, gen: int, delay: float) -> None:
        while not self._stop.wait(delay) and self._current(gen):
            cap = self._blocking(gen, open_capture, self.cfg.source, self.io_timeout_s)
            try:
                reason = self._pump(cap, gen) if cap.isOpened() else "cannot open the stream"
            finally:
                self._blocking(gen, cap.release)
            if not self._current(gen):
                return  # stopped, or the watchdog gave up on us and a new reader runs
            delay = self._outage(reason)

    def _pump(self, cap: cv2.VideoCapture, gen: int) -> str:
        """Read until the stream fails; returns why."""
        fps = cap.get(cv2.CAP_PROP_FPS)
        self.native_fps = fps if 0 < fps < 1000 else 0.0
        while True:
            t = time.monotonic()
            ok, img = self._blocking(gen, cap.read)
            if not self._current(gen):
                return ""  # stopped or abandoned: the caller quits without recording an outage
            if not ok:
                waited = time.monotonic() - t
                return f"no frame for {waited:.1f} s" if waited >= 0.9 * self.io_timeout_s else "stream ended or read failed"
            self.frames_read += 1
            self._count += 1
            self._publish(Frame(self.cfg.id, self._count - 1, time.time(), img), gen)

    def _outage(self, reason: str) -> float:
        """Record a failed or stalled stream; returns how long to wait before reopening."""
        self.reconnects += 1
        self.error = f"camera {self.cfg.id}: {self.cfg.shown_source}: {reason}"
        if self.status != "reconnecting":  # warn once per outage, not once per attempt
            log.warning("%s; reconnecting (backoff %.1f-%.1f s)", self.error, self.cfg.reconnect_min_s, self.cfg.reconnect_max_s)
        else:
            log.debug("%s; retry %d", self.error, self.reconnects)
        self.status = "reconnecting"
        delay, self._delay = self._delay, min(self._delay * 2, self.cfg.reconnect_max_s)
        return delay

    def _watch(self) -> None:
        """Abandon a reader stuck in a capture call well past FFmpeg's timeout, and start a fresh one."""
        limit = _STUCK_FACTOR * self.cfg.stall_timeout_s
        while not self._stop.wait(_WATCH_PERIOD_S):
            self._stuck = [t for t in self._stuck if t.is_alive()]
            if len(self._stuck) >= _MAX_STUCK:
                continue  # wait for one of them to come back before leaking another thread
            with self._cond:
                since = self._busy_since
                if since is None or time.monotonic() - since < limit:
                    continue
                self._gen += 1
                self._busy_since = None
                gen = self._gen
            self._stuck.append(self._reader)
            delay = self._outage(f"capture call blocked for {time.monotonic() - since:.1f} s; abandoned its reader thread")
            self._reader = self._spawn(gen, delay)
