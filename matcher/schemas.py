"""The HTTP API's request and response bodies: pydantic models, so `/openapi.json` describes every field.

| model          | what                                                                          |
|----------------|-------------------------------------------------------------------------------|
| `SightingOut`  | one stored sighting, with the URL of its thumbnail when it has one            |
| `TrackHitOut`  | one matching track: score, time span, best and best-matching sightings        |
| `QueryOut`     | a query's answer: hits grouped by camera; `coverage` during a gallery migration |
| `CameraOut`    | one camera's totals, for the page's camera list                               |
| `StatsOut`     | ingest counters and index partitions (one per embedding model version)        |
| `EdgesOut`     | every edge and camera as its last heartbeat left it (`matcher.edges`)         |
| `ModelOut`     | one registered model version (`matcher.registry`)                             |
| `HarvestUploadOut`, `HarvestCropOut`, `HarvestStatsOut` | harvest uploads' answers per crop, stored crops, the store's totals (`matcher.harvest`) |
| `WatchIn`, `WatchImageForm`, `WatchEntryOut`, `AlertOut` | watchlist entries (from a sighting, a track or a crop) and their alerts |
| `QueryFilters` | time window, cameras, minimum score or probability, top-k; shared by both query endpoints |
| `QueryIn`      | JSON query: exactly one of `embedding` (+ `model`), `sighting_id` or `track`  |
| `ImageQueryForm` | the form fields beside an uploaded crop: `model` and the filters            |

    >>> QueryIn.model_validate({"sighting_id": 12, "top_k": 5}).filters()
    Filters(since=None, until=None, cameras=None, min_score=0.0, top_k=5, min_probability=None)
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, Json, computed_field, model_validator

from crossview.kernel.wire import MAX_EMBEDDING_DIM, MAX_ID_LEN, MAX_INT, MAX_MODEL_LEN, MAX_TS, id_problem
from crossview.matcher.query import Filters

API_PREFIX = "/api/v1"
MAX_ID = MAX_INT  # SQLite's INTEGER: a larger id or track number could never be stored, so it is a 422, not a 500


def _ident(max_len: int) -> AfterValidator:
    """The wire's id check: what the edges may send is what may be asked for, and it is logged and stored."""
    def check(value: str) -> str:
        if problem := id_problem(value, max_len):
            raise ValueError(f"an id {problem}")
        return value

    return AfterValidator(check)


Ident = Annotated[str, _ident(MAX_ID_LEN)]  # a node or camera id
ModelId = Annotated[str, _ident(MAX_MODEL_LEN)]  # an embedding model version
CameraIds = Annotated[list[Ident], Field(min_length=1, max_length=1000)]  # null, not [], means every camera


class _Out(BaseModel):
    # Built straight from the matcher's dataclasses.
    model_config = ConfigDict(from_attributes=True)


class _TrackKey(_Out):
    """What names a track: shared by a sighting and a track hit."""

    node: str
    camera: str
    track: int = Field(description="the edge's track id (restarts with the edge node)")
    track_id: int = Field(description="the matcher's id for the track: its first sighting's id")
    model: str = Field(description="embedding model version")


class SightingOut(_TrackKey):
    id: int
    ts: float = Field(description="capture time, Unix seconds")
    frame: int
    box: tuple[float, float, float, float] = Field(description="x1, y1, x2, y2 in frame pixels")
    score: float = Field(description="the detector's confidence, as the edge sent it")
    has_thumbnail: bool

    @computed_field(description="GET it with the bearer token; null when the edge sent no thumbnail")
    @property
    def thumbnail_url(self) -> str | None:
        return f"{API_PREFIX}/sightings/{self.id}/thumbnail" if self.has_thumbnail else None


class TrackHitOut(_TrackKey):
    score: float = Field(description="cosine similarity of the track's best match to the query")
    probability: float | None = Field(None, description="P(same person) from the model's calibration; null: uncalibrated")
    verdict: str = Field(description="likely same person (P >= 0.9), possible (>= 0.5), unlikely, or uncalibrated")
    first_ts: float = Field(description="the whole stored track's time span")
    last_ts: float
    n_sightings: int = Field(description="sightings stored for the track")
    best: SightingOut
    sightings: list[SightingOut] = Field(description="the track's best matching sightings, oldest first")


class CoverageOut(BaseModel):
    model: str = Field(description="the production version the stored sightings are being re-embedded by")
    migrated: int = Field(description="earlier sightings re-embedded by it so far, newest first")
    total: int = Field(description="earlier sightings with a thumbnail to re-embed")
    oldest_ts_covered: float | None = Field(description="the oldest re-embedded so far: a search by `model` covers "
                                                        "the history back to here")
    without_thumbnail: int = Field(description="earlier sightings without a thumbnail: they cannot be re-embedded")


class QueryOut(_Out):
    model: str
    query: dict[str, Any] = Field(description="what was searched for, as the matcher understood it")
    calibrated: bool = Field(description="the model has a calibration: hits carry probabilities")
    coverage: CoverageOut | None = Field(None, description="while the gallery is re-embedded by a new production "
                                                          "version: how much of the history its search covers so far")
    cameras: dict[str, list[TrackHitOut]] = Field(description="camera id -> matching tracks by time; cameras by first hit")


class CameraOut(BaseModel):
    camera: str
    node: str = Field(description="edge node(s) reporting this camera, comma-separated")
    sightings: int
    tracks: int
    first_ts: float
    last_ts: float


class PartitionOut(BaseModel):
    size: int = Field(description="vectors searchable")
    kind: str = Field(description="index kind: flat (exact), ivf or hnsw")
    dim: int
    rebuilding: bool


class HarvestStatsOut(BaseModel):
    crops: int = Field(description="stored now")
    bytes: int = Field(description="their JPEGs' size")
    quota_bytes: int = Field(description="harvest.quota_mb: beyond it the oldest are deleted")
    stored: int = Field(description="since start: uploads stored")
    duplicate: int = Field(description="since start: uploads stored before, acknowledged again")
    expired: int = Field(description="since start: uploads past retention, acknowledged, not stored")
    refused: int = Field(description="since start: uploads refused (bad sidecar, not a JPEG, too large)")
    dropped: int = Field(description="since start: the oldest crops deleted to stay within the quota")


class StatsOut(BaseModel):
    model_config = ConfigDict(extra="allow")  # the matcher may report more than these

    accepted: int = Field(description="sightings committed since the matcher started")
    rejected: dict[str, int] = Field(description="messages dropped since start, by reason")
    partitions: dict[str, PartitionOut] = Field(description="embedding model version -> its index partition")
    cameras: dict[str, int] = Field(description="sightings accepted since start, by camera")
    harvest: HarvestStatsOut = Field(description="the harvest store: crops the edges uploaded")


class EdgeCameraOut(BaseModel):
    id: str
    state: Literal["online", "stalled", "offline"]
    since: float = Field(description="Unix seconds, matcher clock: when it entered this state")
    source_state: str = Field(description="the edge's word: connecting, streaming, reconnecting, finished, failed, stopped")
    fps: float = Field(description="detection frames per second achieved")
    target_fps: float = Field(description="its configured rate; 0: a file read as fast as it decodes")
    behind: bool = Field(description="streaming below 0.8 of its target fps")
    frames: int
    position: list[int] | None = Field(description="files: [frame n, of N]")
    eta_s: float | None = Field(description="files: seconds to the end")
    error: str | None


class SpoolOut(BaseModel):
    sightings: int = Field(description="spooled on the edge, not yet acknowledged")
    oldest_s: float = Field(description="age of the oldest of them")
    dropped: int = Field(description="dropped unacknowledged since the edge started (spool full or failing)")


class EdgeOut(BaseModel):
    node: str
    state: Literal["online", "offline"]
    since: float = Field(description="online since (a heartbeat after a gap), or offline since its last heartbeat")
    last_seen: float = Field(description="its last heartbeat, matcher clock")
    heartbeat_s: float = Field(description="its heartbeat interval; 3 missed make it offline")
    model: str = Field(description="the embedding model version it runs")
    spool: SpoolOut
    cameras: list[EdgeCameraOut]


class EdgesOut(BaseModel):
    now: float = Field(description="the matcher's clock when answering")
    edges: list[EdgeOut]
    summary: dict[str, dict[str, int]] = Field(description="edges and cameras counted by state")


class HealthOut(BaseModel):
    status: str = "ok"


class ErrorOut(BaseModel):
    detail: str


class QueryFilters(BaseModel):
    model_config = ConfigDict(extra="forbid")

    since: float | None = Field(None, ge=0, le=MAX_TS, description="only sightings at or after this Unix time")
    until: float | None = Field(None, ge=0, le=MAX_TS, description="only sightings at or before this Unix time")
    cameras: CameraIds | None = Field(None, description="only these cameras; all when absent")
    min_score: float = Field(0.0, ge=-1.0, le=1.0, description="cosine similarity threshold")
    top_k: int = Field(10, ge=1, le=1000, description="matching tracks wanted")
    min_probability: float | None = Field(None, gt=0, lt=1, description="P(same person) threshold; the model "
                                                                         "must be calibrated (else 400)")

    def filters(self) -> Filters:
        return Filters(since=self.since, until=self.until, cameras=self.cameras, min_score=self.min_score, top_k=self.top_k,
                       min_probability=self.min_probability)


class ImageQueryForm(QueryFilters):
    model_config = ConfigDict(extra="ignore")  # the same form carries the image file

    model: ModelId = Field(description="embedding model version to search; the matcher needs its ONNX file")


class TrackRef(BaseModel):
    model_config = ConfigDict(extra="forbid")

    node: Ident
    camera: Ident
    track: int = Field(ge=0, le=MAX_ID)
    model: ModelId | None = Field(None, description="needed only if the track was embedded by several models")


class QueryIn(QueryFilters):
    embedding: list[float] | None = Field(None, max_length=MAX_EMBEDDING_DIM, description="an embedding; needs `model`")
    model: ModelId | None = None
    sighting_id: int | None = Field(None, ge=1, le=MAX_ID)
    track: TrackRef | None = None

    @model_validator(mode="after")
    def _one_subject(self) -> "QueryIn":
        given = [name for name in ("embedding", "sighting_id", "track") if getattr(self, name) is not None]
        if len(given) != 1:
            raise ValueError(f"give exactly one of embedding, sighting_id, track (got {', '.join(given) or 'none'})")
        if self.embedding is not None and not self.model:
            raise ValueError("an embedding query needs the model version that produced it")
        return self


class _Threshold(BaseModel):
    name: str = Field(min_length=1, max_length=128, description="who this is, as the operator calls them")
    min_probability: float | None = Field(None, gt=0, lt=1, description="alert at or above this P(same person); "
                                                                        "calibrated models only")
    min_similarity: float | None = Field(None, ge=-1, le=1, description="alert at or above this cosine similarity")
    cameras: CameraIds | None = Field(None, description="watch only these cameras; all when absent")


class WatchIn(_Threshold):
    model_config = ConfigDict(extra="forbid")

    sighting_id: int | None = Field(None, ge=1, le=MAX_ID)
    track: TrackRef | None = None

    @model_validator(mode="after")
    def _one_subject(self) -> "WatchIn":
        if (self.sighting_id is None) == (self.track is None):
            raise ValueError("give exactly one of sighting_id, track (or upload a crop to /watchlist/image)")
        return self


class WatchImageForm(_Threshold):
    model_config = ConfigDict(extra="ignore")  # the same form carries the image file

    model: ModelId = Field(description="embedding model version; the matcher needs its ONNX file")


class WatchEntryOut(BaseModel):
    id: int
    name: str
    model: str
    calibrated: bool = Field(description="false: the model has no calibration, the threshold is raw similarity")
    min_probability: float | None
    min_similarity: float = Field(description="the cosine similarity the threshold stands for")
    cameras: list[str] | None
    origin: dict[str, Any] = Field(description="how the person was given: sighting, track or image")
    created: float


class AlertOut(BaseModel):
    id: int
    entry: int = Field(description="the watchlist entry")
    name: str
    sighting: int = Field(description="the sighting that raised it: the track's first over the threshold")
    node: str
    camera: str
    track: int
    track_id: int
    ts: float
    similarity: float
    probability: float | None = Field(description="P(same person); null when the model has no calibration")
    created: float = Field(description="when the matcher raised it")


class AuditOut(BaseModel):
    id: int
    ts: float
    user: str
    action: str = Field(description="search, thumbnail, watchlist.add/remove, model.register/promote/rollback, "
                                    "harvest.read, audit.read")
    asked: dict[str, Any] = Field(description="what was asked: the subject and filters; an image by name and SHA-256")
    results: int | None = Field(description="how many tracks (or items) the answer held")


class PromoteIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    canary: list[Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.-]+$")]] = Field(
        [], max_length=256, description="these edges first; the rest once they ran it hold_s seconds (empty: everyone now)")
    hold_s: float = Field(3600.0, ge=0, le=30 * 86400, description="canary hold time")


class ModelForm(BaseModel):
    model_config = ConfigDict(extra="ignore")  # the same form carries the ONNX file

    gate: Json[dict[str, Any]] | None = Field(None, description="the gate report, a JSON object (the adapt job's)")


class HarvestAnswerOut(BaseModel):
    status: Literal["stored", "duplicate", "expired", "refused"] = Field(
        description="stored; duplicate: stored before, kept once; expired: past retention.max_age_hours, not stored. "
                    "These three acknowledge the crop (the edge deletes it); refused: for good, do not send it again")
    path: str | None = Field(description="the crop in the harvest layout, <camera>/<node>_<camera>_t<track>_f<frame>.jpg;"
                                         " null when its sidecar was unreadable")
    reason: str | None = Field(description="why it was refused, expired or a duplicate")
    id: int | None = Field(description="the stored crop's id")


class HarvestUploadOut(BaseModel):
    results: list[HarvestAnswerOut] = Field(description="one per crop, in the order sent")


class HarvestCropOut(BaseModel):
    id: int = Field(description="ids only grow: list with after=<the last one seen> for what came since")
    path: str = Field(description="where it goes in a harvest folder; its sidecar is the same path with .json")
    node: str
    camera: str
    track: int
    frame: int
    ts: float = Field(description="capture time, Unix seconds")
    box: tuple[float, float, float, float] = Field(description="x1, y1, x2, y2 in frame pixels")
    score: float
    model: str = Field(description="the embedding model the edge ran when it saved the crop")
    bytes: int = Field(description="of the JPEG")
    received: float = Field(description="when the matcher stored it")
    sidecar: dict[str, Any] = Field(description="the sidecar to write beside the crop, as kernel.harvest encodes it")

    @computed_field(description="GET it with the API token")
    @property
    def jpeg_url(self) -> str:
        return f"{API_PREFIX}/harvest/{self.id}"


class ModelOut(BaseModel):
    version: str
    sha256: str = Field(description="of the ONNX file: edges check their download against it")
    bytes: int
    meta: dict[str, Any] = Field(description="name, input size, dimension, precision, calibrated")
    gate: dict[str, Any] | None = Field(description="the gate report it was registered with")
    state: Literal["candidate", "canary", "production", "retired"]
    registered: float
    changed: float = Field(description="when its state last changed")
