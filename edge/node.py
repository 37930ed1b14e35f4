"""The edge node: every camera's frames through detection, tracking and embedding to the matcher.

| stage      | module            | per                                  |
|------------|-------------------|--------------------------------------|
| capture    | `edge.sources`    | camera thread, newest frame for live |
| detect     | `edge.detectors`  | frame                                |
| track      | `edge.tracking`   | camera                               |
| embed      | `crossview.kernel.embedder`   | one batch of all cameras' crops      |
| publish    | `edge.publisher`  | sighting: spooled, sent, acknowledged |
| harvest    | `edge.harvest`    | sampled sighting                     |
| upload     | `edge.uploader`   | pass: harvested crops to the matcher, deleted once it has them |
| rollout    | `edge.rollout`    | poll: the registry's production model |

    node = EdgeNode(load_edge_config("configs/edge.yaml"))
    summary = node.run()           # until files end or stop() is called
    $ crossview edge --config configs/edge.yaml

A camera that fails (missing file, dead stream, decoder error) is logged and left out; the other
cameras keep running. The embedding model is swapped between batches when its file changes.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field

import cv2
import numpy as np

from crossview.edge.detections import Detections
from crossview.edge.detectors import build_detector
from crossview.edge.harvest import Harvester
from crossview.edge.metrics import EdgeMetrics
from crossview.edge.motion import MotionGate, Plan
from crossview.edge.publisher import Publisher
from crossview.edge.rollout import Rollout
from crossview.edge.sources import CameraSource, Frame, SourceError
from crossview.edge.tracking import Tracker, TrackGallery
from crossview.edge.uploader import Uploader
from crossview.kernel.config import CameraConfig, EdgeConfig
from crossview.kernel.embedder import Embedder
from crossview.kernel.runtime import listening
from crossview.kernel.wire import MAX_ERROR_LEN, CameraStatus, Heartbeat, Sighting

log = logging.getLogger(__name__)


@dataclass
class CameraStats:
    frames: int = 0
    detections: int = 0
    sightings: int = 0  # handed to the publisher's spool; what the matcher acknowledged is the publisher's to say
    detector_seconds: float = 0.0
    tracker_seconds: float = 0.0
    tracks: set[int] = field(default_factory=set)
    status: str = "connecting"
    error: str | None = None


class Camera:
    """One camera's capture, tracker and track appearances; live cameras are read at their target fps."""

    def __init__(self, cfg: CameraConfig, tracker: Tracker, gate: MotionGate | None = None):
        self.cfg = cfg
        self.source = CameraSource(cfg)
        self.tracker = tracker
        self.gate = gate  # None: the detector sees every whole frame
        self.gallery = TrackGallery()
        self.stats = CameraStats()
        self.next_due = 0.0
        self.last_index = -1  # index of the last frame processed
        self.reconnects_seen = 0
        self.failure_logged = False

    @property
    def done(self) -> bool:
        return self.source.status in ("finished", "failed")

    def next_frame(self, now: float) -> Frame | None:
        # Files (not realtime) hand out every strided frame in order; live sources only when due.
        if not self.cfg.is_file or self.cfg.realtime:
            if now < self.next_due:
                return None
            frame = self.source.read(timeout=0)
            if frame is not None:
                self.next_due = max(self.next_due + 1.0 / self.cfg.fps, now)
            return frame
        return self.source.read(timeout=0)


def _camera_status(cam: Camera, fps: float) -> CameraStatus:
    """What the status line and the heartbeat say of a camera. `target_fps` 0: a file read as fast as it decodes."""
    src, st = cam.source, cam.stats
    paced = not cam.cfg.is_file or cam.cfg.realtime
    position = eta = None
    if cam.cfg.is_file and src.frame_count and cam.last_index >= 0:
        done = cam.last_index % src.frame_count + 1  # indices run on across loops
        position = (done, src.frame_count)
        rate = src.native_fps if cam.cfg.realtime else fps * src.stride  # file frames per second
        if not cam.cfg.loop and rate > 0:
            eta = (src.frame_count - done) / rate
    return CameraStatus(cam.cfg.id, st.status, fps, cam.cfg.fps if paced else 0.0, st.frames, position, eta,
                        st.error[:MAX_ERROR_LEN] if st.error else None)


def _progress(c: CameraStatus) -> str:
    """", frame 120 of 795 (15%), ETA 2m10s" for a file; ", falling behind: 0.6 of 5 fps" for a paced camera."""
    if c.state != "streaming":
        return ""
    if c.behind:
        return f", falling behind: {c.fps:.1f} of {c.target_fps:g} fps"
    if c.position is None:
        return ""
    done, total = c.position
    text = f", frame {done} of {total} ({100 * done / total:.0f}%)"
    if c.eta_s is not None:
        eta = int(c.eta_s)
        text += f", ETA {eta // 60}m{eta % 60:02d}s"
    return text


def _crop(image: np.ndarray, box: np.ndarray) -> np.ndarray:
    x1, y1, x2, y2 = (int(round(v)) for v in box)
    return image[max(y1, 0) : y2, max(x1, 0) : x2]


class EdgeNode:
    def __init__(self, cfg: EdgeConfig):
        self.cfg = cfg
        self.metrics = EdgeMetrics()
        e = cfg.embedder
        # Models load before any camera starts, so a wrong model fails fast and says which file.
        self.embedder = Embedder(e.model, batch_size=e.batch_size, device=e.device, reload_check_s=e.reload_check_s,
                                 threads=e.threads, key="embedder.model")
        self.rollout = Rollout(e.registry, e.model, lambda: self.embedder.version, cfg.node_id) if e.registry.url else None
        self.detector = build_detector(cfg.detector, e.device)
        self.cameras = {c.id: Camera(c, Tracker(cfg.tracker), MotionGate.for_camera(cfg.detector, c, self.detector))
                        for c in cfg.cameras}
        self.publisher = Publisher(cfg.publisher)
        self.metrics.watch(self.publisher)
        self.harvester = Harvester(cfg.harvest, cfg.node_id) if cfg.harvest.enabled else None
        if self.harvester:
            self.metrics.watch_harvester(self.harvester)
        self.uploader = None
        if cfg.harvest.upload.url:  # also without harvesting: what an earlier run harvested still goes
            self.uploader = Uploader(cfg.harvest, self.harvester.release if self.harvester else lambda n: None)
            self.metrics.watch_uploader(self.uploader)
        self._stop = threading.Event()
        self._dtype = np.float16 if cfg.publisher.embedding_dtype == "float16" else np.float32
        if cfg.metrics.port:
            with listening("metrics.port", f"{cfg.metrics.host}:{cfg.metrics.port}"):
                self.metrics.serve(cfg.metrics.port, cfg.metrics.host)
            log.info("metrics on http://%s:%d/metrics", cfg.metrics.host, cfg.metrics.port)

    def stop(self) -> None:
        self._stop.set()

    def run(self, max_seconds: float | None = None) -> dict[str, CameraStats]:
        """Process until every file camera has ended (live cameras never end), stop() or max_seconds."""
        self._start_cameras()
        deadline = time.monotonic() + max_seconds if max_seconds else float("inf")
        next_log = time.monotonic() + self.cfg.metrics.log_interval_s
        next_beat = 0.0  # at once: the matcher's status page shows the cameras connecting
        try:
            while not self._stop.is_set() and time.monotonic() < deadline:
                batch = self._collect()
                if batch:
                    self._process(batch)
                    if self.embedder.maybe_reload():
                        # Embeddings of two model versions do not mix: tracks start their means afresh.
                        for cam in self.cameras.values():
                            cam.gallery.tracks.clear()
                            cam.tracker.forget_appearance()
                elif all(cam.done for cam in self.cameras.values()):
                    break
                else:
                    time.sleep(0.005)
                if time.monotonic() >= next_log:
                    self._log_status()
                    next_log = time.monotonic() + self.cfg.metrics.log_interval_s
                if time.monotonic() >= next_beat:
                    self._heartbeat()
                    next_beat = time.monotonic() + self.cfg.publisher.heartbeat_s
        finally:
            self._shutdown()
        return {cid: cam.stats for cid, cam in self.cameras.items()}

    def _start_cameras(self) -> None:
        for cam in self.cameras.values():
            try:
                cam.source.check()
            except SourceError as e:
                log.error("camera %s left out: %s (other cameras keep running)", cam.cfg.id, e)
                cam.source.leave_out(str(e))
                cam.failure_logged = True
                continue
            cam.source.start()
        log.info("edge node %s running %d camera(s)", self.cfg.node_id, len(self.cameras))
        if self.rollout:
            self.rollout.start()
        if self.uploader:
            self.uploader.start()

    def _collect(self) -> list[tuple[Camera, Frame]]:
        now = time.monotonic()
        batch = []
        for cam in self.cameras.values():
            self._sync_source_state(cam)
            frame = cam.next_frame(now)
            if frame is not None:
                batch.append((cam, frame))
        return batch

    def _sync_source_state(self, cam: Camera) -> None:
        src, st = cam.source, cam.stats
        st.status, st.error = src.status, src.error
        if src.reconnects > cam.reconnects_seen:
            self.metrics.reconnects.labels(cam.cfg.id).inc(src.reconnects - cam.reconnects_seen)
            cam.reconnects_seen = src.reconnects
        self.metrics.queue.labels(cam.cfg.id).set(src.queue_depth)
        if src.status == "failed" and not cam.failure_logged:
            cam.failure_logged = True
            log.error("camera %s failed: %s (other cameras keep running)", cam.cfg.id, src.error)

    def _look(self, cam: Camera, frame: Frame) -> Plan | None:
        """Where motion gating has the detector look; None: the whole frame (gating off, or its motion stage failed)."""
        if cam.gate is None:
            return None
        t0 = time.perf_counter()
        try:
            plan = cam.gate.plan(frame.image, cam.tracker.live_boxes())
        except Exception:  # gating is an optimisation: without it the frame is still detected
            log.exception("camera %s frame %d: motion stage failed, whole frame detected", cam.cfg.id, frame.index)
            return None
        self.metrics.gated(cam.cfg.id, plan.share, len(plan.regions), plan.full, time.perf_counter() - t0)
        return plan

    def _detect(self, cam: Camera, frame: Frame, plan: Plan | None = None) -> Detections:
        """The frame's boxes tall enough to keep, found where `plan` says to look; a frame the detector fails on has
        none."""
        try:
            dets = self.detector(frame.image) if plan is None else cam.gate.detect(self.detector, frame.image, plan)
        except Exception:  # one bad frame must not take down the node
            log.exception("camera %s frame %d: detector failed", cam.cfg.id, frame.index)
            return Detections.empty()
        return dets[dets.height >= self.cfg.detector.min_box_height]

    def _detect_timed(self, cam: Camera, frame: Frame) -> tuple[Detections, float]:
        plan = self._look(cam, frame)  # timed apart: the detector's seconds are its own
        t0 = time.perf_counter()
        dets = self._detect(cam, frame, plan)
        return dets, time.perf_counter() - t0

    def _track(self, cam: Camera, frame: Frame, dets: Detections, detector_s: float) -> Detections:
        t0 = time.perf_counter()
        tracked = cam.tracker.update(dets, frame.image)
        tracker_s = time.perf_counter() - t0
        self.metrics.frame_done(cam.cfg.id, len(tracked), detector_s, tracker_s)
        cam.gallery.expire(frame.ts)
        cam.stats.detector_seconds += detector_s
        cam.stats.tracker_seconds += tracker_s
        cam.stats.frames += 1
        cam.stats.detections += len(tracked)
        cam.last_index = frame.index
        return tracked

    def _embedded(self, frames: list[Frame], found: list[Detections]) -> list[Detections]:
        """Every box of every frame, embedded in one batch; boxes with no pixels in their frame are dropped."""
        kept, crops = [], []
        for frame, dets in zip(frames, found):
            cut = [_crop(frame.image, box) for box in dets.xyxy]
            kept.append(dets[np.array([c.size > 0 for c in cut], bool)] if len(dets) else dets)
            crops += [c for c in cut if c.size]
        t0 = time.perf_counter()
        embeddings = self.embedder.embed(crops)
        if crops:
            self.metrics.emb_s.observe(time.perf_counter() - t0)
        at = np.cumsum([0] + [len(d) for d in kept])
        return [Detections(d.xyxy, d.confidence, d.tracker_id, embeddings[a:b]) for d, a, b in zip(kept, at, at[1:])]

    def _process(self, batch: list[tuple[Camera, Frame]]) -> None:
        """Detect in every frame; track, then embed the tracked boxes, or with `tracker.appearance` embed every box
        first so that the tracker can match by it (one embedding batch either way)."""
        frames = [frame for _, frame in batch]
        looked = [self._detect_timed(cam, frame) for cam, frame in batch]
        found = [dets for dets, _ in looked]
        appearance = self.cfg.tracker.appearance
        if appearance:
            found = self._embedded(frames, found)
        tracked = [self._track(cam, frame, dets, s) for (cam, frame), dets, (_, s) in zip(batch, found, looked)]
        if not appearance:
            tracked = self._embedded(frames, tracked)
        for (cam, frame), dets in zip(batch, tracked):
            for box, score, tid, emb in zip(dets.xyxy, dets.confidence, dets.tracker_id, dets.embedding):
                self._emit(cam, frame, box, float(score), int(tid), _crop(frame.image, box), emb)

    def _emit(self, cam: Camera, frame: Frame, box, score: float, tid: int, crop: np.ndarray, emb: np.ndarray) -> None:
        height = float(box[3] - box[1])
        track = cam.gallery.add(tid, emb, TrackGallery.quality(score, height), frame.ts)
        cam.stats.tracks.add(tid)
        pub = self.cfg.publisher
        if track.sightings % pub.every_k == 1 % pub.every_k:
            sighting = Sighting(
                node=self.cfg.node_id, camera=cam.cfg.id, ts=frame.ts, frame=frame.index, track=tid,
                box=tuple(float(v) for v in box), score=score, embedding=track.mean.astype(self._dtype),
                model=self.embedder.version, thumbnail=self._thumbnail(crop) if pub.thumbnails else None,
            )
            self.publisher.send(sighting)
            self.metrics.sightings.labels(cam.cfg.id).inc()
            cam.stats.sightings += 1
        if self.harvester and self.harvester.wants(track.sightings, height, score):
            self.harvester.save(cam.cfg.id, tid, frame.index, frame.ts, crop, box, score, self.embedder.version)

    def _thumbnail(self, crop: np.ndarray) -> bytes | None:
        h = self.cfg.publisher.thumbnail_height
        scale = h / crop.shape[0]
        small = cv2.resize(crop, (max(1, round(crop.shape[1] * scale)), h), interpolation=cv2.INTER_AREA)
        ok, jpg = cv2.imencode(".jpg", small, [cv2.IMWRITE_JPEG_QUALITY, self.cfg.publisher.jpeg_quality])
        return jpg.tobytes() if ok else None

    def _statuses(self) -> list[CameraStatus]:
        return [_camera_status(cam, self.metrics.value("crossview_edge_fps", cid)) for cid, cam in self.cameras.items()]

    def _heartbeat(self) -> None:
        pub = self.publisher
        self.publisher.beat(Heartbeat(self.cfg.node_id, time.time(), self.cfg.publisher.heartbeat_s, self.embedder.version,
                                      pub.spooled, pub.oldest_age_s(), pub.dropped, tuple(self._statuses())))

    def _log_status(self) -> None:
        for c in self._statuses():
            cam = self.cameras[c.id]
            frames = max(c.frames, 1)
            log.info(
                "camera %s: %s, %.1f fps, %d frames%s, queue %d, detector %.0f ms/frame%s, tracker %.1f ms/frame, "
                "sightings %d, reconnects %d",
                c.id, c.state, c.fps, c.frames, _progress(c), cam.source.queue_depth,
                1000 * cam.stats.detector_seconds / frames, self._gating(c.id) if cam.gate else "",
                1000 * cam.stats.tracker_seconds / frames, cam.stats.sightings, cam.source.reconnects,
            )
        log.info("delivery: %s", self.publisher.status())
        if self.uploader:
            saved = f"{self.harvester.saved:,} crops saved, " if self.harvester else ""
            log.info("harvest upload: %s%s", saved, self.uploader.status())

    def _gating(self, camera: str) -> str:
        """" (motion 12% of the frame, 1.4 crops, 3 whole frames)": what motion gating did, on average."""
        m = self.metrics
        n = m.value("crossview_edge_regions_count", camera)
        if not n:
            return ""
        share = m.value("crossview_edge_motion_share_sum", camera) / n
        crops = m.value("crossview_edge_regions_sum", camera) / n
        return (f" (motion {100 * share:.0f}% of the frame, {crops:.1f} crops, "
                f"{m.value('crossview_edge_full_frames_total', camera):.0f} whole frames)")

    def _shutdown(self) -> None:
        if self.rollout:
            self.rollout.stop()
        for cam in self.cameras.values():
            cam.source.stop()
            self._sync_source_state(cam)
        if self.uploader:
            self.uploader.stop()  # the last crops, for up to harvest.upload.drain_s
        self._log_status()
        self._heartbeat()  # the cameras' last states (stopped, finished), sent before the publisher stops
        self.publisher.close()  # waits up to publisher.drain_s for the matcher's acknowledgements, and says how it ended
