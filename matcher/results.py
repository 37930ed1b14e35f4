"""What the matcher answers with: plain dataclasses, stdlib only, so the HTTP client needs neither FAISS nor numpy.

| type             | what                                                                              |
|------------------|-----------------------------------------------------------------------------------|
| `SightingRecord` | one stored sighting: where, when, its box and detector score, its track ids         |
| `TrackHit`       | one matching track: similarity of its best sighting (and P(same person) when the model is |
|                  | calibrated), time span, best few sightings                                        |
| `verdict(p)`     | the words for a probability: "likely same person", "possible", "unlikely"           |
| `QueryResult`    | a query's answer: `cameras` (camera → hits by time), `ranked()`, `to_dict()`, `to_text()`; |
|                  | during a gallery migration, `coverage`: how much of the history the new version covers so far |

    >>> r = SightingRecord(7, "edge-1", "gate", 0.0, 3, 17, 5, (10.0, 20.0, 50.0, 140.0), 0.9, "m1", False)
    >>> hit = TrackHit("edge-1", "gate", 17, "m1", 0.83, 0.0, 4.0, r, [r], track_id=5, n_sightings=9)
    >>> QueryResult("m1", {"by": "sighting"}, {"gate": [hit]}).ranked()[0].score
    0.83
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from datetime import datetime


@dataclass(frozen=True)
class SightingRecord:
    id: int
    node: str
    camera: str
    ts: float
    frame: int
    track: int
    track_id: int  # id of the track's first sighting: tracks are (node, camera, track, model) split at gaps
    box: tuple[float, float, float, float]
    score: float  # the detector's confidence, as on the wire
    model: str
    has_thumbnail: bool

    def to_dict(self) -> dict:
        return {**asdict(self), "box": list(self.box)}


LIKELY, POSSIBLE = 0.9, 0.5  # P(same person) bands: the page's colours and the words below


def verdict(probability: float | None) -> str:
    """What an operator reads beside a score; "uncalibrated" when the model gives no probability.

    >>> verdict(0.95), verdict(0.6), verdict(0.1), verdict(None)
    ('likely same person', 'possible', 'unlikely', 'uncalibrated')
    """
    if probability is None:
        return "uncalibrated"
    return "likely same person" if probability >= LIKELY else "possible" if probability >= POSSIBLE else "unlikely"


@dataclass(frozen=True)
class TrackHit:
    node: str
    camera: str
    track: int
    model: str
    score: float  # best sighting's similarity to the query
    first_ts: float  # the whole stored track's time span
    last_ts: float
    best: SightingRecord
    sightings: list[SightingRecord]  # the best-matching few, by time
    track_id: int = 0  # store's track id (first sighting's id): stable handle for a track
    n_sightings: int = 0  # stored sightings of the track
    probability: float | None = None  # P(same person) from the model's calibration; None: uncalibrated

    @property
    def verdict(self) -> str:
        return verdict(self.probability)

    def to_dict(self) -> dict:
        d = {k: getattr(self, k) for k in ("node", "camera", "track", "track_id", "model", "score", "probability",
                                            "first_ts", "last_ts", "n_sightings")}
        return {**d, "verdict": self.verdict, "best": self.best.to_dict(),
                "sightings": [s.to_dict() for s in self.sightings]}


def exclusive(hits: list[TrackHit], query_track: tuple[str, str, float, float] | None = None) -> list[TrackHit]:
    """`hits` with probabilities that respect what one camera shows: two tracks it saw at overlapping times are
    two people, so at most one of them is the person asked about; and a track that overlaps the query's own
    (`query_track`: node, camera, first and last time) is not.

    A calibrated p (fitted at prior 0.5) is a likelihood ratio LR = p / (1 - p). Over "neither", "this track" and
    "one it overlaps", P = LR / (1 + LR + the LRs of the tracks it overlaps). A hit that overlaps none keeps p.

    >>> r = SightingRecord(1, "e", "gate", 0.0, 0, 1, 1, (0.0, 0.0, 1.0, 1.0), 0.9, "m", False)
    >>> a = TrackHit("e", "gate", 1, "m", 0.9, 0.0, 5.0, r, [r], probability=0.9)
    >>> b = TrackHit("e", "gate", 2, "m", 0.9, 4.0, 9.0, r, [r], probability=0.9)
    >>> [round(h.probability, 3) for h in exclusive([a, b])], exclusive([a])[0].probability
    ([0.474, 0.474], 0.9)
    """
    odds = {id(h): h.probability / max(1 - h.probability, 1e-9) for h in hits if h.probability is not None}
    out = []
    for h in hits:
        if h.probability is not None and query_track is not None and _overlaps(h, query_track):
            h = replace(h, probability=0.0)
        elif h.probability is not None:
            lr, span = odds[id(h)], (h.node, h.camera, h.first_ts, h.last_ts)
            others = sum(odds[id(g)] for g in hits if g is not h and id(g) in odds and _overlaps(g, span))
            h = replace(h, probability=lr / (1 + lr + others)) if others else h
        out.append(h)
    return out


def _overlaps(h: TrackHit, track: tuple[str, str, float, float]) -> bool:
    node, camera, first, last = track
    return (h.node, h.camera) == (node, camera) and h.first_ts <= last and first <= h.last_ts


@dataclass(frozen=True)
class QueryResult:
    model: str
    query: dict
    cameras: dict[str, list[TrackHit]] = field(default_factory=dict)
    calibrated: bool = False  # the hits carry probabilities
    # While the gallery is re-embedded by a new production version (matcher.migration): {"model", "migrated", "total",
    # "oldest_ts_covered", "without_thumbnail"}, the earlier sightings re-embedded so far; None otherwise.
    coverage: dict | None = None

    def ranked(self) -> list[TrackHit]:
        return sorted((h for hits in self.cameras.values() for h in hits), key=lambda h: -h.score)

    def to_dict(self) -> dict:
        return {"model": self.model, "query": self.query, "calibrated": self.calibrated, "coverage": self.coverage,
                "cameras": {cam: [h.to_dict() for h in hits] for cam, hits in self.cameras.items()}}

    def to_text(self) -> str:
        scale = ("P = P(same person), from the model's calibration" if self.calibrated
                 else "score = cosine similarity (the model has no calibration: not a probability)")
        lines = [f"model {self.model}, query {_describe(self.query)}", scale, *self._coverage_lines()]
        if not self.cameras:
            return "\n".join([*lines, "no matching tracks"])
        head = "P" if self.calibrated else "score"
        lines.append(f"{'camera':<16} {'node:camera:track':<28} {head:>6}  {'':<18}  {'first seen':<19}  {'last seen':<19}  "
                     f"{'best id':>8}  box")
        for cam, hits in self.cameras.items():
            for h in hits:
                box = ",".join(f"{v:.0f}" for v in h.best.box)
                value = h.probability if self.calibrated else h.score
                lines.append(f"{cam:<16} {f'{h.node}:{h.camera}:{h.track}':<28} {value:6.3f}  "
                             f"{h.verdict if self.calibrated else '':<18}  {_clock(h.first_ts)}  "
                             f"{_clock(h.last_ts)}  {h.best.id:>8}  {box}")
        return "\n".join(lines)


    def _coverage_lines(self) -> list[str]:
        c = self.coverage
        if c is None:
            return []
        back = f", back to {_clock(c['oldest_ts_covered'])}" if c["oldest_ts_covered"] is not None else ""
        return [f"history: {c['model']} became production; {c['migrated']:,} of {c['total']:,} earlier sightings "
                f"re-embedded by it so far{back}: a search by {c['model']} does not cover the rest yet"]


def _clock(ts: float) -> str:
    try:
        return datetime.fromtimestamp(ts).strftime("%Y-%m-%d %H:%M:%S")
    except (OverflowError, ValueError, OSError):  # a time stored before the wire bounded them (1e308, -1e20)
        return f"{ts:g}"


def _describe(query: dict) -> str:
    return " ".join(f"{k}={v}" for k, v in query.items() if k != "filters" and not isinstance(v, dict))
