"""Per-camera person tracking and per-track appearance aggregation.

| what           | how                                                                    |
|----------------|------------------------------------------------------------------------|
| `Tracker`      | ultralytics' ByteTrack or BoT-SORT (boxes, or boxes + re-ID) on our `Detections`; sets `tracker_id` |
| `TrackGallery` | per track: quality-weighted mean embedding, sighting count, last seen   |

    tracker = Tracker(TrackerConfig())
    dets = tracker.update(dets, frame)  # dets.tracker_id filled, untracked boxes dropped

A crop half the reference height counts half as much in its track's mean:

    >>> gallery = TrackGallery()
    >>> _ = gallery.add(7, np.array([1.0, 0.0]), TrackGallery.quality(score=0.9, height=64), ts=0.0)
    >>> track = gallery.add(7, np.array([0.0, 1.0]), TrackGallery.quality(score=0.9, height=128), ts=0.2)
    >>> track.sightings, [round(v, 3) for v in track.mean.tolist()]
    (2, [0.447, 0.894])
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from crossview.edge.detections import Detections
from crossview.kernel.config import TrackerConfig
from crossview.kernel.runtime import ultralytics


class _UltralyticsBoxes:
    """The slice of ultralytics' `Boxes` interface its trackers read."""

    def __init__(self, xyxy: np.ndarray, conf: np.ndarray):
        self.xyxy, self.conf = xyxy, conf
        self.cls = np.zeros(len(conf), np.float32)

    @property
    def xywh(self) -> np.ndarray:
        wh = self.xyxy[:, 2:] - self.xyxy[:, :2]
        return np.concatenate([self.xyxy[:, :2] + wh / 2, wh], axis=1)

    def __len__(self) -> int:
        return len(self.conf)

    def __getitem__(self, i) -> "_UltralyticsBoxes":
        return _UltralyticsBoxes(self.xyxy[i], self.conf[i])


_RECENTLY_LOST = 5  # frames; beyond it a lost track's predicted box drifts too far to be worth a look


class Tracker:
    def __init__(self, cfg: TrackerConfig):
        ultralytics()  # offline, and OpenCV keeps its threads
        from ultralytics.trackers.bot_sort import BOTSORT
        from ultralytics.trackers.byte_tracker import BYTETracker
        from ultralytics.utils import IterableSimpleNamespace

        args = IterableSimpleNamespace(
            tracker_type=cfg.kind, track_high_thresh=cfg.track_high_thresh, track_low_thresh=cfg.track_low_thresh,
            new_track_thresh=cfg.new_track_thresh, track_buffer=cfg.track_buffer, match_thresh=cfg.match_thresh,
            fuse_score=True, gmc_method="none", proximity_thresh=cfg.proximity_thresh,
            # ultralytics gates on half the cosine distance: (1 - cos) / 2 <= 1 - appearance_thresh
            appearance_thresh=(1 + cfg.appearance_thresh) / 2, with_reid=cfg.appearance, model="auto",
        )
        self._impl = BOTSORT(args) if cfg.kind == "botsort" else BYTETracker(args)
        self.appearance = cfg.appearance

    def update(self, dets: Detections, frame: np.ndarray) -> Detections:
        """The detections that belong to a confirmed track, with `tracker_id` set; with `appearance`, `dets` carry
        their embeddings ("auto": ultralytics takes them as given, one per box) and so do the tracked ones."""
        feats = dets.embedding if self.appearance else None
        out = self._impl.update(_UltralyticsBoxes(dets.xyxy, dets.confidence), frame, feats=feats)
        if len(out) == 0:
            return dets[:0]  # keeps the embedding column (empty) when the boxes came with one
        idx = out[:, 7].astype(np.int64)
        # The tracker's smoothed box is steadier than the raw one; the score stays the detector's.
        return Detections(out[:, :4], dets.confidence[idx], out[:, 4].astype(np.int64),
                          None if dets.embedding is None else dets.embedding[idx])

    def forget_appearance(self) -> None:
        """Drop every track's appearance (they match by boxes until seen again): a new model's vectors do not
        compare with the old one's, and may not even have its length."""
        if self.appearance:
            for s in (*self._impl.tracked_stracks, *self._impl.lost_stracks):
                s.smooth_feat = s.curr_feat = None

    def live_boxes(self) -> np.ndarray:
        """(N, 4) boxes of the tracks being followed and of those lost only a few frames ago, where the Kalman
        filter expects them: motion gating looks there even when the person stands still."""
        t = self._impl
        live = [s for s in t.tracked_stracks if s.is_activated]
        live += [s for s in t.lost_stracks if t.frame_id - s.end_frame <= _RECENTLY_LOST]
        return np.array([s.xyxy for s in live], np.float64).reshape(-1, 4)


@dataclass
class TrackState:
    embedding: np.ndarray  # unnormalised weighted sum
    weight: float
    sightings: int
    first_ts: float
    last_ts: float

    @property
    def mean(self) -> np.ndarray:
        return self.embedding / max(np.linalg.norm(self.embedding), 1e-12)


class TrackGallery:
    """Aggregated appearance per track; quality = detector score x how much of a full-size crop it is."""

    def __init__(self, max_idle_s: float = 60.0):
        self.tracks: dict[int, TrackState] = {}
        self.max_idle_s = max_idle_s

    @staticmethod
    def quality(score: float, height: float, ref_height: float = 128.0) -> float:
        return float(score) * min(1.0, float(height) / ref_height)

    def add(self, track: int, emb: np.ndarray, quality: float, ts: float) -> TrackState:
        st = self.tracks.get(track)
        if st is None:
            st = self.tracks[track] = TrackState(np.zeros_like(emb, dtype=np.float32), 0.0, 0, ts, ts)
        st.embedding += quality * emb
        st.weight += quality
        st.sightings += 1
        st.last_ts = ts
        return st

    def expire(self, now: float) -> list[int]:
        """Forget tracks not seen for `max_idle_s`; returns their ids."""
        gone = [t for t, st in self.tracks.items() if now - st.last_ts > self.max_idle_s]
        for t in gone:
            del self.tracks[t]
        return gone
