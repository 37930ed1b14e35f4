"""Queries: where else was this person seen? Answers are tracks, not hundreds of near-identical frames.

| what        | how                                                                                      |
|-------------|------------------------------------------------------------------------------------------|
| by          | an embedding; a stored sighting (its embedding); an edge track (its newest sighting: the |
|             | edge sends a track's running mean, so the newest is the best); a person image, embedded   |
|             | with the loaded ONNX model of the partition's version                                      |
| filters     | `Filters(since, until, cameras, min_score, top_k, min_probability)`, applied to sightings; |
|             | `min_probability` becomes the cosine where the model's calibration reaches it (calibrated only) |
| over-fetch  | search top_k·overfetch sightings; ×4 until top_k tracks pass the filters, the scores fall  |
|             | below min_score or the partition is exhausted                                              |
| selective   | when cameras / time window leave few sightings (≤ `filter_scan_mb` of vectors), those are  |
| filters     | read from the store and scored exactly instead: over-fetching would walk most of the index |
| tracks      | sightings grouped by `track_id`; a track scores as its best sighting; the query's own track |
|             | is left out                                                                                |
| probability | the calibration's P of each track's score, then `results.exclusive`: tracks one camera saw  |
|             | at once share one person's odds, and one seen beside the query's own track is someone else |
| results     | `QueryResult.cameras` (see `matcher.results`): camera → `TrackHit`s by time, cameras by   |
|             | their first hit; `ranked()` best first; `to_dict()` for JSON; `to_text()` for a terminal   |
| errors      | `LookupError` for a missing sighting, track or model partition; `ValueError` for bad input or |
|             | an image query naming a model version with no loaded ONNX file                           |
| across a    | a sighting or track stored under an older version is searched by its vector re-embedded by the |
| model switch| production version once `matcher.migration` made one; while it runs, answers carry `coverage` |

    engine = QueryEngine(store, index, load_embedders(cfg.models), cfg.query)   # or Matcher(cfg).queries
    result = engine.search_sighting(123, Filters(cameras=["gate", "lobby"], min_score=0.6, top_k=5))
    [(hit.camera, hit.track, round(hit.score, 2)) for hit in result.ranked()]
    # [('lobby', 17, 0.91), ('gate', 4, 0.74)]
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

import numpy as np

from crossview.kernel.calibration import Calibration
from crossview.kernel.config import QueryConfig
from crossview.matcher.index import VectorIndex
from crossview.matcher.results import QueryResult, SightingRecord, TrackHit, exclusive
from crossview.matcher.store import Store

if TYPE_CHECKING:
    from crossview.kernel.embedder import Embedder
    from crossview.matcher.migration import Migration

_GROWTH = 4


@dataclass(frozen=True)
class Filters:
    since: float | None = None  # Unix seconds, inclusive
    until: float | None = None
    cameras: list[str] | None = None
    min_score: float = 0.0  # cosine similarity
    top_k: int = 10  # tracks
    min_probability: float | None = None  # P(same person): needs the model's calibration; tightens min_score

    def __post_init__(self) -> None:
        if not 1 <= self.top_k <= 1000:
            raise ValueError(f"top_k must be 1..1000, got {self.top_k}")
        if not -1.0 <= self.min_score <= 1.0:
            raise ValueError(f"min_score is a cosine similarity in [-1, 1], got {self.min_score}")
        if self.min_probability is not None and not 0 < self.min_probability < 1:
            raise ValueError(f"min_probability is a probability in (0, 1), got {self.min_probability}")
        if self.since is not None and self.until is not None and self.since > self.until:
            raise ValueError(f"since ({self.since}) is after until ({self.until})")
        if self.cameras is not None and (not self.cameras or not all(isinstance(c, str) and c for c in self.cameras)):
            raise ValueError(f"cameras must be a non-empty list of camera ids, got {self.cameras!r}")

    def admits(self, r: SightingRecord, score: float) -> bool:
        return (score >= self.min_score
                and (self.since is None or r.ts >= self.since)
                and (self.until is None or r.ts <= self.until)
                and (self.cameras is None or r.camera in self.cameras))

    def to_dict(self) -> dict:
        return asdict(self)


def _probability_floor(filters: Filters, cal: Calibration | None, model: str) -> Filters | None:
    """`filters` with min_score raised to the cosine at which the calibration reaches min_probability, None when
    no cosine does; an uncalibrated model cannot say what a probability is."""
    if cal is None:
        raise ValueError(f"model {model!r} has no score calibration, so min_probability means nothing for it: "
                         "calibrate it (crossview calibrate) or filter by min_score (cosine similarity)")
    floor = cal.cosine_at(filters.min_probability)
    return None if floor is None else replace(filters, min_score=max(filters.min_score, floor))


def _unit(vec: np.ndarray) -> np.ndarray:
    vec = np.asarray(vec, np.float32).reshape(-1)
    norm = float(np.linalg.norm(vec))
    if not math.isfinite(norm) or norm < 1e-6:
        raise ValueError("query embedding must be finite and non-zero")
    return vec / norm


def load_embedders(paths: list[Path]) -> dict[str, "Embedder"]:
    """ONNX embedders for image queries, by model version; two files of one version are an error."""
    if not paths:
        return {}
    from crossview.kernel.embedder import Embedder  # onnxruntime and OpenCV only when image queries are configured

    out: dict[str, Embedder] = {}
    for path in paths:
        emb = Embedder(path)
        if emb.version in out:
            raise ValueError(f"{path} and {out[emb.version].path} are both embedding model version {emb.version!r}")
        out[emb.version] = emb
    return out


class Subject(NamedTuple):
    """What is searched for: a unit vector of a model version, how the query was put, and the track it came from
    (left out of its own answers)."""

    vec: np.ndarray
    model: str
    query: dict
    exclude_track: int | None = None


class QueryEngine:
    def __init__(self, store: Store, index: VectorIndex, embedders: dict[str, "Embedder"], cfg: QueryConfig):
        self.store, self.index, self.embedders, self.cfg = store, index, embedders, cfg
        self.migration: Migration | None = None  # set by the service: the production version and its coverage

    def search_embedding(self, vec: np.ndarray, model: str, filters: Filters | None = None) -> QueryResult:
        return self._search(_unit(vec), model, {"by": "embedding"}, None, filters or Filters())

    def search_sighting(self, sighting_id: int, filters: Filters | None = None) -> QueryResult:
        return self._search(*self.sighting_subject(sighting_id), filters or Filters())

    def search_track(self, node: str, camera: str, track: int, model: str | None = None,
                     filters: Filters | None = None) -> QueryResult:
        return self._search(*self.track_subject(node, camera, track, model), filters or Filters())

    def search_image(self, image_bgr: np.ndarray, model: str, filters: Filters | None = None) -> QueryResult:
        return self._search(*self.image_subject(image_bgr, model), filters or Filters())

    # -- what a query (or a watchlist entry) looks for -------------------------------------------

    def sighting_subject(self, sighting_id: int) -> Subject:
        rec = self.store.record(sighting_id)
        if rec is None:
            raise LookupError(f"sighting {sighting_id} not found (never stored, or deleted by retention)")
        query = {"by": "sighting", "sighting": rec.id, "node": rec.node, "camera": rec.camera, "track": rec.track}
        return Subject(*self._vector(rec), query, rec.track_id)

    def track_subject(self, node: str, camera: str, track: int, model: str | None = None) -> Subject:
        """The edge track's latest stretch (ids restart with an edge node), by its newest sighting."""
        rec = self.store.latest_in_track(node, camera, track, model)
        if rec is None:
            of = f" with model version {model!r}" if model else ""
            raise LookupError(f"no track {node}:{camera}:{track}{of} in the store")
        query = {"by": "track", "node": node, "camera": camera, "track": int(track), "track_id": rec.track_id, "sighting": rec.id}
        return Subject(*self._vector(rec), query, rec.track_id)

    def _vector(self, rec: SightingRecord) -> tuple[np.ndarray, str]:
        """(vector, model version) a stored sighting is searched by: re-embedded by the production version once the
        migration got to it, so the answer spans the switch; else its own; else (its own partition dropped, as a
        reader of the data directory finds it) any other partition's."""
        target = self.migration.target if self.migration else None
        for model in dict.fromkeys([target, rec.model, *self.index.partitions]):
            if model in self.index.partitions and (vec := self.store.vector(rec.id, model)) is not None:
                return vec, model
        raise LookupError(f"sighting {rec.id} has no embedding any more: its model version {rec.model!r} was "
                          "replaced and it had no thumbnail to re-embed")

    def image_subject(self, image_bgr: np.ndarray, model: str) -> Subject:
        embedder = self.embedders.get(model)
        if embedder is None:
            loaded = ", ".join(sorted(self.embedders)) or "none"
            raise ValueError(f"no embedding model loaded for version {model!r} (loaded: {loaded}); "
                             "list its ONNX file under `models` in the matcher configuration")
        image = np.asarray(image_bgr)
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3 or min(image.shape[:2]) < 2:
            raise ValueError(f"query image must be an (H, W, 3) uint8 BGR image, got {image.shape} {image.dtype}")
        vec = embedder.embed([image])[0]
        return Subject(_unit(vec), model, {"by": "image", "height": image.shape[0], "width": image.shape[1]})

    def _search(self, vec: np.ndarray, model: str, query: dict, exclude_track: int | None, filters: Filters) -> QueryResult:
        cal = self.calibration_of(model)
        asked = filters
        if filters.min_probability is not None:
            filters = _probability_floor(filters, cal, model)
        # None: no similarity reaches that probability, so nothing can match
        groups = {} if filters is None else self._candidates(self._ranker(vec, model, filters), filters, exclude_track)
        filters = filters or asked
        best = sorted(groups.values(), key=lambda g: -g[0][0])[: filters.top_k]
        spans = self.store.track_spans([g[0][1].track_id for g in best] + [exclude_track] * (exclude_track is not None))
        hits = [self._hit(g, spans) for g in best]
        if cal is not None:
            probabilities = cal.probability([h.score for h in hits]).tolist() if hits else []
            own = spans.get(exclude_track)  # the query's own track: who it overlaps in its camera is someone else
            hits = exclusive([replace(h, probability=p) for h, p in zip(hits, probabilities)],
                             (query["node"], query["camera"], *own[:2]) if own else None)
            hits = [h for h in hits if asked.min_probability is None or h.probability >= asked.min_probability]
        return QueryResult(model, {**query, "filters": asked.to_dict()}, _by_camera(hits), calibrated=cal is not None,
                           coverage=self.migration.coverage() if self.migration else None)

    def use_model(self, path: Path) -> None:
        """Load (or replace) the embedder of `path`'s model version: image queries and its calibration."""
        self.embedders.update(load_embedders([path]))

    def calibration_of(self, model: str) -> Calibration | None:
        """The model version's score calibration, from its ONNX file (the matcher's `models`); None: raw similarity."""
        embedder = self.embedders.get(model)
        return embedder.meta.calibration if embedder else None

    def _ranker(self, vec: np.ndarray, model: str, filters: Filters) -> Callable[[int], tuple[np.ndarray, np.ndarray]]:
        """`top(k) -> (scores, ids)` best first: the index, or exact scores of the few sightings a selective filter leaves."""
        vec = self.index.query_vector(model, vec)  # an unknown model or a wrong dimension fails here, clearly
        if filters.cameras or filters.since is not None or filters.until is not None:
            where, most = (model, filters.cameras, filters.since, filters.until), int(self.cfg.filter_scan_mb * 2**20) // (4 * len(vec))
            if self.store.count(*where, limit=most + 1) <= most:
                ids, vecs = self.store.vectors_where(*where)
                scores = vecs @ vec if len(ids) else np.zeros(0, np.float32)
                order = np.argsort(-scores, kind="stable")
                scores, ids = scores[order], ids[order]
                return lambda k: (scores[:k], ids[:k])
        return lambda k: self.index.search(model, vec, k, filters.cameras)  # Milvus filters by camera itself

    def _candidates(self, top: Callable[[int], tuple[np.ndarray, np.ndarray]], filters: Filters,
                    exclude_track: int | None) -> dict[int, list]:
        """track_id -> [(score, record), ...] best first, for sightings that pass the filters."""
        k = filters.top_k * self.cfg.overfetch
        while True:
            scores, ids = top(k)
            records = self.store.records(ids.tolist())
            groups: dict[int, list] = {}
            for score, i in zip(scores.tolist(), ids.tolist()):
                r = records.get(i)  # None: deleted since the search
                if r is not None and r.track_id != exclude_track and filters.admits(r, score):
                    groups.setdefault(r.track_id, []).append((score, r))
            exhausted = len(ids) < k or (len(scores) > 0 and scores[-1] < filters.min_score)
            if len(groups) >= filters.top_k or exhausted:
                return groups
            k *= _GROWTH

    def _hit(self, group: list[tuple[float, SightingRecord]], spans: dict[int, tuple[float, float, int]]) -> TrackHit:
        score, best = group[0]
        first, last, n = spans.get(best.track_id, (best.ts, best.ts, len(group)))
        shown = sorted((r for _, r in group[: self.cfg.sightings_per_track]), key=lambda r: (r.ts, r.id))
        return TrackHit(best.node, best.camera, best.track, best.model, score, first, last, best, shown, best.track_id, n)


def _by_camera(hits: list[TrackHit]) -> dict[str, list[TrackHit]]:
    out: dict[str, list[TrackHit]] = {}
    for h in sorted(hits, key=lambda h: (h.first_ts, h.track_id)):
        out.setdefault(h.camera, []).append(h)
    return out
