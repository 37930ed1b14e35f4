"""Edge node metrics: Prometheus series plus the periodic log line, from one set of counters.

| series                               | labels   |
|--------------------------------------|----------|
| `crossview_edge_frames_total`        | camera   |
| `crossview_edge_detections_total`    | camera   |
| `crossview_edge_sightings_total`     | camera: sightings made and spooled for the matcher |
| `crossview_edge_acknowledged`        | sightings the matcher acknowledged (committed) since start |
| `crossview_edge_spooled` / `_spool_bytes` | unacknowledged sightings in the spool now, and its size |
| `crossview_edge_spool_dropped`       | unacknowledged sightings dropped since start: the spool was full |
| `crossview_edge_refused`             | sightings the matcher refused for good since start (malformed, or failing its checks) |
| `crossview_edge_oldest_unacknowledged_seconds` | age of the oldest sighting in the spool |
| `crossview_edge_matcher_reachable`   | 1 while the CURVE/ZeroMQ connection to the matcher is up |
| `crossview_edge_harvest_uploaded` / `_refused` / `_pending` | harvested crops the matcher acknowledged since start; refused for good (moved to `.refused/`); waiting (`edge.uploader`) |
| `crossview_edge_harvest_failed`      | crops that could not be written into `harvest.dir` since start (`edge.harvest`) |
| `crossview_edge_reconnects_total`    | camera   |
| `crossview_edge_fps`                 | camera   |
| `crossview_edge_queue_depth`         | camera   |
| `crossview_edge_detector_seconds`    | camera (histogram, the detector alone) |
| `crossview_edge_detector_ms`         | camera: detector milliseconds per frame, mean of the last 50 frames |
| `crossview_edge_motion_share`        | camera (histogram): share of the unmasked frame that moved, per gated frame |
| `crossview_edge_regions`             | camera (histogram): crops the detector ran on per gated frame; 0: skipped |
| `crossview_edge_motion_seconds`      | camera (histogram): motion gating's motion stage and region planning |
| `crossview_edge_full_frames_total`   | camera: gated frames the detector saw whole (warm-up, schedule, too much motion) |
| `crossview_edge_tracker_seconds`     | camera (histogram) |
| `crossview_edge_embedder_seconds`    | (histogram, one batch of all cameras) |

    >>> m = EdgeMetrics()
    >>> m.frame_done("gate", detections=3, detector_seconds=0.04, tracker_seconds=0.002)
    >>> m.value("crossview_edge_detections_total", "gate"), m.value("crossview_edge_detector_seconds_sum", "gate")
    (3.0, 0.04)

`m.serve(9100)` then serves them on http://127.0.0.1:9100/metrics.
"""

from __future__ import annotations

import time
from collections import defaultdict, deque

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    start_http_server,
)

_LATENCY_BUCKETS = (0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0)
_SHARE_BUCKETS = (0.001, 0.01, 0.05, 0.1, 0.2, 0.5, 1.0)
_REGION_BUCKETS = (0, 1, 2, 4, 8, 16)


class EdgeMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.frames = Counter("crossview_edge_frames", "Frames processed", ["camera"], registry=r)
        self.detections = Counter("crossview_edge_detections", "Tracked person detections", ["camera"], registry=r)
        self.sightings = Counter("crossview_edge_sightings", "Sightings made and spooled for the matcher", ["camera"], registry=r)
        self.reconnects = Counter("crossview_edge_reconnects", "Stream reopen attempts", ["camera"], registry=r)
        self.fps = Gauge("crossview_edge_fps", "Processed frames per second", ["camera"], registry=r)
        self.queue = Gauge("crossview_edge_queue_depth", "Frames waiting in the camera's buffer", ["camera"], registry=r)
        self.det_s = Histogram("crossview_edge_detector_seconds", "Detector time per frame", ["camera"], buckets=_LATENCY_BUCKETS, registry=r)
        self.track_s = Histogram("crossview_edge_tracker_seconds", "Tracker time per frame", ["camera"], buckets=_LATENCY_BUCKETS, registry=r)
        self.det_ms = Gauge("crossview_edge_detector_ms", "Detector milliseconds per frame, last 50 frames", ["camera"], registry=r)
        self.motion_share = Histogram("crossview_edge_motion_share", "Share of the unmasked frame that moved", ["camera"],
                                      buckets=_SHARE_BUCKETS, registry=r)
        self.regions = Histogram("crossview_edge_regions", "Crops the detector ran on per frame (0: skipped)", ["camera"],
                                 buckets=_REGION_BUCKETS, registry=r)
        self.motion_s = Histogram("crossview_edge_motion_seconds", "Motion stage time per frame", ["camera"],
                                  buckets=_LATENCY_BUCKETS, registry=r)
        self.full_frames = Counter("crossview_edge_full_frames", "Gated frames the detector saw whole", ["camera"], registry=r)
        self.emb_s = Histogram("crossview_edge_embedder_seconds", "Embedder time per batch", buckets=_LATENCY_BUCKETS, registry=r)
        self._frame_times: dict[str, deque] = defaultdict(lambda: deque(maxlen=50))
        self._detector_times: dict[str, deque] = defaultdict(lambda: deque(maxlen=50))

    def watch_uploader(self, uploader) -> None:
        """Harvest upload gauges, read from an `edge.uploader.Uploader` at each scrape."""
        self._gauges((
            ("harvest_uploaded", "Harvested crops the matcher acknowledged since start", lambda: uploader.uploaded),
            ("harvest_refused", "Harvested crops refused for good since start (moved to .refused/)", lambda: uploader.refused),
            ("harvest_pending", "Harvested crops waiting to be uploaded", lambda: uploader.pending),
        ))

    def watch_harvester(self, harvester) -> None:
        """Harvest write failures, read from an `edge.harvest.Harvester` at each scrape."""
        self._gauges((("harvest_failed", "Crops that could not be written into harvest.dir since start",
                       lambda: harvester.failed),))

    def _gauges(self, series) -> None:
        for name, text, read in series:
            Gauge(f"crossview_edge_{name}", text, registry=self.registry).set_function(read)

    def watch(self, publisher) -> None:
        """Delivery gauges, read from an `edge.publisher.Publisher` at each scrape."""
        self._gauges((
            ("acknowledged", "Sightings the matcher acknowledged (committed) since start", lambda: publisher.acknowledged),
            ("spooled", "Unacknowledged sightings in the spool", lambda: publisher.spooled),
            ("refused", "Sightings the matcher refused for good since start (its log says why)", lambda: publisher.refused_sightings),
            ("spool_bytes", "Spool size in bytes", lambda: publisher.spool.bytes),
            ("spool_dropped", "Unacknowledged sightings dropped since start: spool full", lambda: publisher.dropped),
            ("oldest_unacknowledged_seconds", "Age of the oldest unacknowledged sighting", publisher.oldest_age_s),
            ("matcher_reachable", "1 while connected to the matcher", lambda: float(publisher.reachable)),
        ))

    def serve(self, port: int, host: str = "127.0.0.1") -> None:
        start_http_server(port, addr=host, registry=self.registry)

    def frame_done(self, camera: str, detections: int, detector_seconds: float, tracker_seconds: float) -> None:
        now = time.monotonic()
        times = self._frame_times[camera]
        times.append(now)
        self.frames.labels(camera).inc()
        self.detections.labels(camera).inc(detections)
        self.det_s.labels(camera).observe(detector_seconds)
        self.track_s.labels(camera).observe(tracker_seconds)
        spent = self._detector_times[camera]
        spent.append(detector_seconds)
        self.det_ms.labels(camera).set(1000 * sum(spent) / len(spent))
        if len(times) > 1:
            self.fps.labels(camera).set((len(times) - 1) / max(times[-1] - times[0], 1e-9))

    def gated(self, camera: str, share: float, regions: int, full: bool, motion_seconds: float) -> None:
        """One motion-gated frame: how much moved, how many crops the detector ran on, and the motion stage's time."""
        self.motion_s.labels(camera).observe(motion_seconds)
        self.motion_share.labels(camera).observe(share)
        self.regions.labels(camera).observe(regions)
        if full:
            self.full_frames.labels(camera).inc()

    def value(self, name: str, camera: str | None = None) -> float:
        """Current value of a series (for logs, summaries and tests)."""
        v = self.registry.get_sample_value(name, {"camera": camera} if camera else {})
        return v or 0.0
