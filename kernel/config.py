"""Typed service configuration, validated once at load.

| what            | how                                                                 |
|-----------------|---------------------------------------------------------------------|
| edge node       | `load_config("configs/edge.yaml", EdgeConfig)`                      |
| errors          | `ConfigError` naming the file and the dotted key (`cameras.1.fps`)  |

Every model forbids unknown keys, so a typo is an error instead of a silently ignored setting.
Relative paths in a config file are resolved against the file's folder. `${NAME}` in any string
value is replaced by the environment variable NAME (RTSP passwords, the HTTP token), so secrets need
not be written into config files; an unset variable is an error naming the key.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Annotated, Literal, TypeVar

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from crossview.kernel.wire import MAX_ID_LEN  # a longer id would pass here and have every sighting refused


class ConfigError(ValueError):
    """A configuration file is missing, unreadable or invalid; the message names the key."""


def read_secret(path: Path, key: str, what: str = "secret") -> str:
    """The secret in the file a config `key` names (a token, an HMAC key): stripped, at least 16 characters;
    `ValueError` naming the key and the file otherwise."""
    try:
        secret = Path(path).read_text().strip()
    except OSError as e:
        raise ValueError(f"{key}: {path}: cannot read the {what} ({e.strerror})") from None
    except UnicodeDecodeError:
        raise ValueError(f"{key}: {path}: the {what} is not text") from None
    if len(secret) < 16:
        raise ValueError(f"{key}: {path}: the {what} must be at least 16 characters")
    return secret


MAX_NUMBER = 1e9  # any number in a config: larger ones are typos, and overflow the C ints of ZeroMQ and OpenCV


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    @field_validator("*")
    @classmethod
    def _bounded(cls, value):
        if type(value) in (int, float) and not abs(value) <= MAX_NUMBER:  # NaN fails too
            raise ValueError(f"{value!r} is out of range (at most {MAX_NUMBER:g} in size)")
        return value


_URL_USERINFO = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*://)([^:@/]*):(.*)@(.*)$", re.S)


def redact_url(url: str) -> str:
    """`rtsp://user:secret@host/x` → `rtsp://user:***@host/x`; up to the last `@`, so a raw `@` in a
    password is hidden too."""
    return _URL_USERINFO.sub(r"\1\2:***@\4", url)


Point = tuple[float, float]


class CameraMotionConfig(_Strict):
    """Per camera: whether motion gating runs (None: as `detector.motion.enabled`) and the areas it ignores."""

    enabled: bool | None = Field(None, description="false for PTZ cameras: everything moves when they turn")
    mask: list[list[Point]] = Field(default_factory=list, description="polygons in frame pixels, [[x, y], ...]: "
                                                                      "motion there is ignored (a clock, trees)")

    @model_validator(mode="before")
    @classmethod
    def _bool_shorthand(cls, v: object) -> object:
        return {"enabled": v} if isinstance(v, bool) else v

    @field_validator("mask")
    @classmethod
    def _polygons(cls, polygons: list[list[Point]]) -> list[list[Point]]:
        for i, poly in enumerate(polygons):
            if len(poly) < 3:
                raise ValueError(f"polygon {i} has {len(poly)} points, a polygon needs at least 3")
            if any(x < 0 or y < 0 for x, y in poly):
                raise ValueError(f"polygon {i}: frame pixel coordinates are never negative")
        return polygons


_ID = re.compile(r"[A-Za-z0-9_.-]+")


def bad_id(value: str) -> str | None:
    """Why `value` cannot be a node or camera id, or None: an id is what the wire accepts as one and a folder or
    file name (the harvest's), so letters, digits, '_', '.', '-', and not only dots (`..` leaves the folder)."""
    if not _ID.fullmatch(value) or not value.strip("."):
        return f"an id is letters, digits, '_', '.', '-', and not only dots; got {value!r}"
    if len(value) > MAX_ID_LEN:
        return f"an id is at most {MAX_ID_LEN} characters (the wire's limit); got {len(value)}"
    return None


def _valid_id(value: str) -> str:
    if problem := bad_id(value):
        raise ValueError(problem)
    return value


Ident = Annotated[str, AfterValidator(_valid_id)]


class CameraConfig(_Strict):
    """One camera: a video file, an RTSP/HTTP URL or a USB device (`usb:0`)."""

    id: Ident
    source: str = Field(min_length=1)
    fps: float = Field(5.0, gt=0, le=120, description="target detection frames per second")
    loop: bool = Field(False, description="files only: start again at the end")
    realtime: bool = Field(False, description="files only: pace reading at the file's own rate, like a live camera")
    start_offset_s: float = Field(0.0, ge=0, le=86400 * 366, description="files only: the clip begins this long into "
                                  "the recording, so its frame times are shifted by it (clips cut from one recording)")
    stall_timeout_s: float = Field(10.0, gt=0, le=3600, description="live only: no frame for this long reopens the stream")
    reconnect_min_s: float = Field(0.5, gt=0, le=3600)
    reconnect_max_s: float = Field(30.0, gt=0, le=3600)
    motion: CameraMotionConfig = Field(CameraMotionConfig(), description="`false` turns motion gating off for this "
                                                                        "camera (PTZ); or {enabled, mask}")

    @field_validator("source")
    @classmethod
    def _usb_index(cls, v: str) -> str:
        if v.startswith("usb:") and not v[4:].isdigit():
            raise ValueError(f"USB cameras are written usb:N with a device number, got {v!r}")
        return v

    @property
    def is_file(self) -> bool:
        return "://" not in self.source and not self.source.startswith("usb:")

    @property
    def shown_source(self) -> str:
        """The source as logs and errors show it: a URL's password is never written out."""
        return redact_url(self.source)

    @model_validator(mode="after")
    def _backoff_order(self) -> "CameraConfig":
        if self.reconnect_max_s < self.reconnect_min_s:
            raise ValueError("reconnect_max_s must be >= reconnect_min_s")
        return self


class MotionConfig(_Strict):
    """Motion-gated detection: the detector looks only where something moved or a track is live."""

    enabled: bool = Field(True, description="false: the detector sees every whole frame, as before motion gating")
    width: int = Field(320, ge=64, le=1920, description="the motion stage works on frames scaled to this width")
    threshold: float = Field(16.0, gt=0, description="MOG2 variance threshold: higher ignores fainter changes")
    min_area: int = Field(300, ge=1, description="moving blobs smaller than this many frame pixels are noise")
    history: int = Field(200, ge=2, le=100_000, description="MOG2 background history, in detection frames")
    warmup_frames: int = Field(5, ge=1, description="the first frames learn the background; the detector sees them whole")
    full_frame_every: int = Field(25, ge=0, description="a whole-frame pass every N frames, so people standing still "
                                                        "are found again; 0: never")
    pad: float = Field(0.2, ge=0, le=2, description="moved areas and live tracks grow by this share of their size per side")


class HogConfig(_Strict):
    upscale: float = Field(1.6, ge=1.0, le=4.0, description="people ~30x80 px need upscaling for the 64x128 HOG window")
    hit_threshold: float = 0.0
    win_stride: int = Field(8, ge=4, le=32)
    scale: float = Field(1.05, gt=1.0, le=1.5)
    shrink: float = Field(0.1, ge=0.0, lt=0.5, description="HOG boxes carry margins: trim this share per side")
    max_side: int = Field(1920, ge=256, le=16384, description="a frame (or region) with a longer side is scanned "
                          "downscaled to it before the upscale: a 4K camera costs what a 1080p one does")


class DetectorConfig(_Strict):
    kind: Literal["auto", "yolo", "hog"] = Field("auto", description="auto: YOLO if weights exist, else HOG")
    weights: Path | None = Field(None, description="local YOLO .pt or .onnx; never downloaded")
    conf: float = Field(0.35, ge=0.0, le=1.0)
    iou: float = Field(0.5, ge=0.0, le=1.0)
    imgsz: int = Field(640, ge=32, le=4096)
    min_box_height: int = Field(24, ge=1)
    hog: HogConfig = HogConfig()
    motion: MotionConfig = MotionConfig()

    @field_validator("imgsz")
    @classmethod
    def _multiple_of_32(cls, v: int) -> int:
        if v % 32:
            raise ValueError("must be a multiple of 32")
        return v


class TrackerConfig(_Strict):
    kind: Literal["bytetrack", "botsort"] = "bytetrack"
    track_high_thresh: float = Field(0.25, ge=0, le=1)
    track_low_thresh: float = Field(0.1, ge=0, le=1)
    new_track_thresh: float = Field(0.25, ge=0, le=1)
    match_thresh: float = Field(0.8, ge=0, le=1)
    track_buffer: int = Field(30, ge=1, description="frames a lost track is kept")
    appearance: bool = Field(False, description="botsort: associate by the re-ID embedding too, where boxes overlap")
    appearance_thresh: float = Field(0.6, ge=0, le=1, description="the least cosine similarity an appearance match needs")
    proximity_thresh: float = Field(0.5, ge=0, le=1, description="the least IoU at which appearance may decide")

    @model_validator(mode="after")
    def _appearance_needs_botsort(self):
        if self.appearance and self.kind != "botsort":
            raise ValueError("appearance: true needs kind: botsort (ByteTrack matches boxes only)")
        return self


class _MatcherLink(_Strict):
    """An edge's HTTP link to the matcher, authenticated with the edges' token; off without a url."""

    url: str | None = Field(None, pattern=r"^https?://", description="the matcher's HTTP API, e.g. http://10.0.0.2:8080")
    token_file: Path | None = Field(None, description="the matcher's http.edge_token_file")

    @model_validator(mode="after")
    def _token_with_url(self):
        if self.url and self.token_file is None:
            raise ValueError(f"{self._what} url needs token_file (the matcher's http.edge_token_file)")
        return self


class RegistryConfig(_MatcherLink):
    """Where the edge fetches the production model from (the matcher's model registry); off without a url."""

    _what = "a registry"
    poll_s: float = Field(60.0, ge=1, le=86400, description="how often the production version is checked")
    timeout_s: float = Field(60.0, gt=0, le=3600, description="longest a model download may take")


class EmbedderConfig(_Strict):
    model: Path = Field(Path("models/mobilenetv2-imagenet.onnx"), description="ONNX re-ID model with crossview metadata")
    batch_size: int = Field(32, ge=1, le=1024)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    reload_check_s: float = Field(2.0, gt=0, description="how often the model file is checked for a new version")
    threads: int = Field(0, ge=0, description="ONNX Runtime intra-op threads; 0 = one per CPU core")
    registry: RegistryConfig = RegistryConfig()


class CurveConfig(_Strict):
    """ZeroMQ transport security between edges and matcher. `mode: plain` must be said explicitly."""

    mode: Literal["curve", "plain"] = "curve"
    secret_key: Path | None = Field(None, description="this side's secret key file (crossview keys)")
    server_key: Path | None = Field(None, description="edge only: the matcher's public key file")
    allowed_clients: Path | None = Field(None, description="matcher only: folder of allowed edge public key files")
    bind_nodes: bool = Field(True, description="matcher only: take a node's sightings and heartbeats only over a "
                                               "connection made with the key in `<node>.key`, so one edge's key cannot "
                                               "write as another edge")

    def require(self, **keys: str) -> None:
        """In curve mode, the key settings named (with what each is) must be set."""
        if self.mode == "curve" and any(getattr(self, k) is None for k in keys):
            wanted = " and ".join(f"{k} ({what})" for k, what in keys.items())
            raise ValueError(f"security: mode curve needs {wanted}; or say mode: plain")


_ENDPOINT = re.compile(r"^(tcp://\S+:(?P<port>\d{1,5})|(ipc|inproc)://\S+)$")


class PublisherConfig(_Strict):
    endpoint: str | list[str] = Field("tcp://127.0.0.1:5555", description="the matcher's ZeroMQ ingest endpoint, or a "
                                      "list of its replicas' (each sighting goes to one; a dead one's are resent to another)")
    hwm: int = Field(2000, ge=1, le=1_000_000, description="sightings in flight (sent, not yet acknowledged) at most; the rest wait "
                                             "in the spool")
    spool_dir: Path = Field(Path("spool"), description="where unacknowledged sightings are kept (survives restarts)")
    spool_mb: float = Field(500.0, gt=0, description="spool size bound; beyond it the oldest sightings are dropped")
    drain_s: float = Field(10.0, ge=0, description="on stop, how long to wait for the matcher to acknowledge the spool")
    embedding_dtype: Literal["float32", "float16"] = "float32"
    thumbnails: bool = True
    thumbnail_height: int = Field(128, ge=16, le=512)
    jpeg_quality: int = Field(80, ge=10, le=100)
    every_k: int = Field(1, ge=1, description="publish every k-th sighting of a track")
    heartbeat_s: float = Field(5.0, ge=0.1, le=3600, description="how often the node tells the matcher its state "
                               "(cameras, fps, spool); three missed make it offline on the matcher's status page")
    security: CurveConfig = CurveConfig()

    @field_validator("endpoint")
    @classmethod
    def _endpoints(cls, value: str | list[str]) -> str | list[str]:
        listed = [value] if isinstance(value, str) else value
        if not listed:
            raise ValueError("at least one endpoint")
        for e in listed:
            if not (m := _ENDPOINT.match(e)) or not 1 <= int(m["port"] or 1) <= 65535:
                raise ValueError(f"{e!r}: not a ZeroMQ endpoint (tcp://host:port, port 1-65535)")
        if len(set(listed)) < len(listed):
            raise ValueError("an endpoint is listed twice")
        return value

    @property
    def endpoints(self) -> list[str]:
        """Every endpoint the edge connects to: one matcher, or each replica."""
        return [self.endpoint] if isinstance(self.endpoint, str) else list(self.endpoint)

    @model_validator(mode="after")
    def _curve_keys(self) -> "PublisherConfig":
        self.security.require(secret_key="this edge's", server_key="the matcher's public key")
        return self


MAX_UPLOAD_BATCH = 100  # harvested crops in one upload at most; the matcher refuses a larger batch whole


class UploadConfig(_MatcherLink):
    """Harvested crops sent to the matcher's harvest store (`edge.uploader`); each is deleted on the edge once the
    matcher has acknowledged it. Off without a url."""

    _what = "an upload"
    batch: int = Field(16, ge=1, le=MAX_UPLOAD_BATCH, description="crops per request at most")
    interval_s: float = Field(10.0, ge=0.1, le=3600, description="how often the folder is checked for new crops; the "
                              "first wait after a failure, doubled up to 32 times that")
    timeout_s: float = Field(30.0, gt=0, le=600, description="longest one request may take")
    drain_s: float = Field(10.0, ge=0, le=3600, description="on stop, how long the last crops may take to upload")


class HarvestConfig(_Strict):
    enabled: bool = False
    dir: Path = Path("harvest")
    every_k: int = Field(10, ge=1, description="save every k-th frame of a track")
    min_height: int = Field(64, ge=1)
    min_score: float = Field(0.5, ge=0, le=1)
    quota_mb: float = Field(500.0, gt=0)
    jpeg_quality: int = Field(95, ge=10, le=100)
    upload: UploadConfig = UploadConfig()


class MetricsConfig(_Strict):
    port: int = Field(0, ge=0, le=65535, description="Prometheus /metrics port; 0 turns the server off")
    host: str = "127.0.0.1"
    log_interval_s: float = Field(10.0, gt=0)


class EdgeConfig(_Strict):
    node_id: Ident
    cameras: list[CameraConfig] = Field(min_length=1)
    detector: DetectorConfig = DetectorConfig()
    tracker: TrackerConfig = TrackerConfig()
    embedder: EmbedderConfig = EmbedderConfig()
    publisher: PublisherConfig  # required: where the matcher is and how to reach it securely
    harvest: HarvestConfig = HarvestConfig()
    metrics: MetricsConfig = MetricsConfig()

    @field_validator("cameras")
    @classmethod
    def _unique_ids(cls, cams: list[CameraConfig]) -> list[CameraConfig]:
        seen = [c.id for c in cams]
        dups = sorted({i for i in seen if seen.count(i) > 1})
        if dups:
            raise ValueError(f"camera ids must be unique, repeated: {', '.join(dups)}")
        return cams


class IngestConfig(_Strict):
    endpoint: str = "tcp://127.0.0.1:5555"
    security: CurveConfig = CurveConfig()
    batch_max: int = Field(1000, ge=1, description="sightings committed to disk in one transaction at most")
    batch_wait_ms: float = Field(5.0, ge=0, description="longest a sighting waits for its batch to commit")
    rcvhwm: int = Field(100000, ge=1, le=10_000_000)

    @model_validator(mode="after")
    def _curve_keys(self) -> "IngestConfig":
        self.security.require(secret_key="the matcher's", allowed_clients="folder of edge public keys")
        return self


class MilvusConfig(_Strict):
    """`index.engine: milvus`: where the vectors live instead of FAISS (`matcher.milvus_index`). One of `uri` (a Milvus
    server or cluster) or `lite_file` (Milvus Lite in this process: behaviour tests and trials, not production)."""

    uri: str | None = Field(None, max_length=1000, pattern=r"^(https?|tcp)://[^\s@]+$",
                            description="http://host:19530: a Milvus standalone server or cluster's proxy")
    lite_file: Path | None = Field(None, description="a local Milvus Lite database (a folder named *.db)")
    token_file: Path | None = Field(None, description="a file holding the user:password or API token (never logged)")
    collection_prefix: str = Field("crossview", pattern=r"^[A-Za-z_][A-Za-z0-9_]{0,31}$",
                                   description="collections are <prefix>_<model version>_<hash>: sites sharing a Milvus "
                                               "use different prefixes")
    index_type: Literal["FLAT", "IVF_FLAT", "HNSW"] = Field("HNSW", description="Milvus's index per sealed segment; "
                                                            "HNSW uses index.hnsw_m and hnsw_ef_search, IVF_FLAT nlist and index.nprobe")
    nlist: int = Field(1024, ge=1, le=65536)
    consistency: Literal["Strong", "Session", "Bounded"] = Field("Session", description="Session: a search sees every "
                                                                  "insert this matcher made; Strong: any client's (replicas), "
                                                                  "but waits ~200 ms a search (bench/milvus_tail.py)")
    timeout_s: float = Field(30.0, gt=0, le=600, description="one Milvus call at most")

    @model_validator(mode="after")
    def _one_target(self) -> "MilvusConfig":
        if (self.uri is None) == (self.lite_file is None):
            raise ValueError("give one of uri (a Milvus server) or lite_file (Milvus Lite)")
        if self.lite_file is not None and self.lite_file.suffix != ".db":
            raise ValueError("lite_file: Milvus Lite needs a name ending in .db")
        return self

    @property
    def shown(self) -> str:
        return self.uri or f"Milvus Lite {self.lite_file}"


class IndexConfig(_Strict):
    engine: Literal["faiss", "milvus"] = Field("faiss", description="faiss: partitions in this process, snapshots in "
                                               "data_dir/index; milvus: collections in the Milvus the `milvus` section names")
    milvus: MilvusConfig | None = None
    exact_max: int = Field(50000, ge=1, description="a partition above this many vectors moves to an approximate index")
    kind: Literal["ivf", "hnsw"] = "ivf"
    nprobe: int = Field(64, ge=1, description="IVF lists searched per query; 64 keeps recall@10 >= 0.95 to 1e6 "
                                               "sightings (bench/matcher_bench.py)")
    hnsw_m: int = Field(32, ge=4)
    hnsw_ef_search: int = Field(128, ge=8)
    nlist_max: int = Field(4096, ge=1, description="IVF lists at most; otherwise about 4 * sqrt(partition size)")
    threads: int = Field(1, ge=0, description="FAISS OpenMP threads, process-wide; 0 = all cores. One query at a time "
                                              "gains little from more, and stalls when the cores are busy")
    snapshot_interval_s: float = Field(300.0, gt=0)
    max_models: int = Field(8, ge=1, description="model versions holding sightings at once: a new one beyond is refused "
                                                 "(`unknown_model`), so bit flips cannot make partitions without end; "
                                                 "a version whose sightings all expired no longer counts")

    @model_validator(mode="after")
    def _engine_settings(self) -> "IndexConfig":
        if (self.engine == "milvus") != (self.milvus is not None):
            raise ValueError("engine milvus needs the milvus section, and the milvus section needs engine milvus")
        return self


class RetentionConfig(_Strict):
    max_age_hours: float | None = Field(None, gt=0, description="sightings older than this are deleted")
    max_per_camera: int | None = Field(None, ge=1, description="newest sightings kept per camera")
    check_interval_s: float = Field(60.0, gt=0)


class QueryConfig(_Strict):
    overfetch: int = Field(8, ge=1, description="sightings searched per wanted track; grown until enough tracks are found")
    sightings_per_track: int = Field(5, ge=1, le=100, description="best matching sightings returned per track")
    filter_scan_mb: float = Field(16.0, ge=0, description="a camera / time filter leaving at most this many MB of "
                                                           "vectors scores them exactly from the store instead of over-fetching")
    track_gap_s: float = Field(60.0, gt=0, description="an edge track id seen again after this gap starts a new track "
                                                        "(edge nodes reuse ids after a restart)")


class HttpConfig(_Strict):
    host: str = Field("127.0.0.1", description="binds to localhost unless told otherwise")
    port: int = Field(8080, ge=0, le=65535)
    token: str | None = Field(None, min_length=16, description="bearer token; or token_file")
    token_file: Path | None = None
    edge_token_file: Path | None = Field(None, description="a second token that may only read /api/v1/models and "
                                                           "upload harvested crops: what edges fetch the production model "
                                                           "with (embedder.registry) and upload with (harvest.upload)")
    # Refused before parsing or decoding, so one request cannot exhaust the matcher's memory.
    max_json_bytes: int = Field(1 << 20, ge=1024, description="largest JSON request body (a 4096-d embedding is ~100 KB)")
    max_upload_bytes: int = Field(8 << 20, ge=1024, description="largest image-query request body")
    max_model_bytes: int = Field(512 << 20, ge=1 << 20, description="largest model upload (POST /api/v1/models)")
    max_image_pixels: int = Field(16 << 20, ge=1024, description="largest uploaded image, width x height from its header "
                                                                "(decoding costs 3 bytes a pixel and more)")

    @model_validator(mode="after")
    def _one_token(self) -> "HttpConfig":
        if (self.token is None) == (self.token_file is None):
            raise ValueError("set exactly one of token and token_file")
        return self


class WebhookConfig(_Strict):
    url: str = Field(pattern=r"^https?://", description="POSTed every alert as JSON")
    secret: str | None = Field(None, min_length=16, description="HMAC-SHA256 key for the signature header; or secret_file")
    secret_file: Path | None = None
    timeout_s: float = Field(5.0, gt=0, le=60)

    @model_validator(mode="after")
    def _one_secret(self) -> "WebhookConfig":
        if (self.secret is None) == (self.secret_file is None):
            raise ValueError("set exactly one of secret or secret_file: receivers check every alert's signature")
        return self


class WatchlistConfig(_Strict):
    max_entries: int = Field(10_000, ge=1, le=1_000_000, description="people on the watchlist at most")
    default_probability: float = Field(0.9, gt=0, lt=1, description="an entry's threshold on P(same person) unless it "
                                                                    "gives one (calibrated models)")
    default_similarity: float = Field(0.8, ge=-1, le=1, description="an entry's threshold on cosine similarity, for "
                                                                    "models without a calibration")
    webhooks: list[WebhookConfig] = Field(default_factory=list, max_length=16)
    retry_max_s: float = Field(300.0, gt=0, description="longest wait between two tries of one webhook delivery")
    max_attempts: int = Field(20, ge=1, description="tries of one delivery before it is given up (logged and counted)")


class HarvestStoreConfig(_Strict):
    """The matcher's store of the crops edges upload (`matcher.harvest`); its age limit is `retention.max_age_hours`."""

    quota_mb: float = Field(2000.0, gt=0, description="crops kept at most; beyond it the oldest are deleted, counted "
                                                       "and logged")
    max_crop_bytes: int = Field(1 << 20, ge=1024, le=64 << 20, description="largest JPEG accepted")
    max_crop_pixels: int = Field(4 << 20, ge=1024, description="largest crop, width x height from its JPEG header, "
                                                                "checked before decoding")


class MigrationConfig(_Strict):
    """Re-embedding the gallery when a model version becomes production (`matcher.migration`)."""

    enabled: bool = Field(True, description="re-embed stored thumbnails with each new production version")
    batch: int = Field(32, ge=1, le=1024, description="thumbnails embedded and committed at a time")
    threads: int = Field(1, ge=1, le=64, description="ONNX Runtime intra-op threads: one, so ingest and queries keep "
                                                     "the other cores")
    poll_s: float = Field(5.0, gt=0, le=3600, description="how often the registry's production version is checked")
    log_every_pct: float = Field(10.0, gt=0, le=100, description="a progress line every this much of the work")


class AuditConfig(_Strict):
    max_age_days: float = Field(365.0, gt=0, description="audit entries older than this are deleted (its own "
                                                         "retention, apart from the sightings')")


CONNECT_TIMEOUT_S = 10  # PostgreSQL: a store's connection attempt gives up after this, unless its dsn says otherwise


class StoreConfig(_Strict):
    """Where the matcher keeps its sightings (`matcher.store` / `matcher.pgstore`) and its other databases (registry,
    watchlist, webhooks, harvest index, users, audit log, edges' heartbeats: `matcher.sqldb`): files in data_dir, or
    all in one PostgreSQL database that several matchers may share."""

    kind: Literal["sqlite", "postgres"] = Field("sqlite", description="sqlite: data_dir/sightings.db; postgres: a server")
    dsn: str | None = Field(None, min_length=1, max_length=1000, description="postgres: a libpq connection string or "
                            "postgresql:// URL, without a password; or host/port/dbname/user")
    host: str | None = Field(None, min_length=1, max_length=255)
    port: int | None = Field(None, ge=1, le=65535)
    dbname: str | None = Field(None, min_length=1, max_length=63)
    user: str | None = Field(None, min_length=1, max_length=63)
    password_file: Path | None = Field(None, description="postgres: a file holding the password (never logged)")
    pool_max: int = Field(8, ge=1, le=256, description="postgres: reader connections at most (one per concurrent query)")

    @model_validator(mode="after")
    def _postgres_settings(self) -> "StoreConfig":
        parts = {k: getattr(self, k) for k in ("dsn", "host", "port", "dbname", "user", "password_file")}
        if self.kind == "sqlite":
            if given := [k for k, v in parts.items() if v is not None]:
                raise ValueError(f"{', '.join(given)}: only for kind postgres")
            return self
        if self.dsn is None and self.dbname is None:
            raise ValueError("kind postgres needs dsn, or dbname (with host, port, user as needed)")
        if self.dsn is not None and re.search(r"password\s*=|://[^/@]*:[^/@]*@", self.dsn, re.I):
            raise ValueError("dsn: no password in the connection string; put it in password_file")
        return self

    def conninfo(self) -> str:
        """The libpq connection string, with the password read from password_file: for connecting, never for logs."""
        from psycopg.conninfo import conninfo_to_dict, make_conninfo  # the postgres extra

        password = read_secret(self.password_file, "store.password_file", "password") if self.password_file else None
        parts = {"host": self.host, "port": self.port, "dbname": self.dbname, "user": self.user, "password": password}
        if "connect_timeout" not in conninfo_to_dict(self.dsn or ""):
            parts["connect_timeout"] = CONNECT_TIMEOUT_S  # libpq's default waits minutes for a host that is gone
        return make_conninfo(self.dsn or "", **{k: v for k, v in parts.items() if v is not None})

    @property
    def shown(self) -> str:
        """Which server and database, as logs and errors show it (no password)."""
        return self.dsn or f"postgresql://{self.user or ''}{'@' if self.user else ''}{self.host or 'localhost'}" \
                           f"{f':{self.port}' if self.port else ''}/{self.dbname}"


class MatcherConfig(_Strict):
    data_dir: Path = Field(Path("var/matcher"), description="SQLite store, index snapshots")
    store: StoreConfig = StoreConfig()
    ingest: IngestConfig  # required: the endpoint and its security
    index: IndexConfig = IndexConfig()
    retention: RetentionConfig = RetentionConfig()
    query: QueryConfig = QueryConfig()
    http: HttpConfig
    models: list[Path] = Field(default_factory=list, description="ONNX embedders for image queries, one per model version")
    watchlist: WatchlistConfig = WatchlistConfig()
    harvest: HarvestStoreConfig = HarvestStoreConfig()
    migration: MigrationConfig = MigrationConfig()
    audit: AuditConfig = AuditConfig()
    metrics: MetricsConfig = MetricsConfig()


C = TypeVar("C", bound=BaseModel)


def _format_errors(path: Path, err: ValidationError) -> str:
    lines = []
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"]) or "<top level>"
        msg = "unknown key" if e["type"] == "extra_forbidden" else e["msg"]
        lines.append(f"  {key}: {msg}")
    return f"{path}: invalid configuration\n" + "\n".join(lines)


_ENV_REF = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")


def _expand_env(node: object, origin: Path, where: tuple[str, ...] = ()) -> object:
    """`${NAME}` in string values → the environment variable NAME, anywhere in the parsed YAML."""
    if isinstance(node, dict):
        return {k: _expand_env(v, origin, (*where, str(k))) for k, v in node.items()}
    if isinstance(node, list):
        return [_expand_env(v, origin, (*where, str(i))) for i, v in enumerate(node)]
    if not isinstance(node, str):
        return node

    def value(m: re.Match) -> str:
        if m[1] not in os.environ:
            raise ConfigError(f"{origin}: invalid configuration\n  {'.'.join(where)}: "
                              f"environment variable {m[1]} is not set")
        return os.environ[m[1]]

    return _ENV_REF.sub(value, node)


def _resolve_paths(raw: dict, base: Path, keys: list[tuple[str, ...]]) -> None:
    """Make relative file paths in `raw` relative to the config file's folder; `*` in a key: every list item."""
    for key in keys:
        for node in _parents(raw, key[:-1]):
            value = node.get(key[-1])
            if isinstance(value, str):
                node[key[-1]] = _resolve(value, base)
            elif isinstance(value, list):  # a list of paths, like the matcher's models
                node[key[-1]] = [_resolve(v, base) if isinstance(v, str) else v for v in value]


def _parents(node: object, key: tuple[str, ...]) -> list[dict]:
    """The mappings `key` leads to in `node`."""
    if not key:
        return [node] if isinstance(node, dict) else []
    if key[0] == "*":
        return [n for item in node for n in _parents(item, key[1:])] if isinstance(node, list) else []
    return _parents(node.get(key[0]), key[1:]) if isinstance(node, dict) else []


def _resolve(path: str, base: Path) -> str:
    p = Path(path).expanduser()
    return os.path.normpath(p if p.is_absolute() else base / p)


def parse_config(raw: object, model: type[C], origin: Path = Path("<config>")) -> C:
    if not isinstance(raw, dict):
        raise ConfigError(f"{origin}: expected a mapping at the top level, got {type(raw).__name__}")
    try:
        return model.model_validate(raw)
    except ValidationError as e:
        raise ConfigError(_format_errors(origin, e)) from None


EDGE_PATH_KEYS = [
    ("detector", "weights"), ("embedder", "model"), ("embedder", "registry", "token_file"), ("harvest", "dir"),
    ("harvest", "upload", "token_file"),
    ("publisher", "security", "secret_key"), ("publisher", "security", "server_key"), ("publisher", "spool_dir"),
]


MAX_CONFIG_BYTES = 1 << 20


def load_config(path: str | Path, model: type[C], path_keys: list[tuple[str, ...]] | None = None,
                defaults: dict | None = None) -> C:
    """Read a YAML file into `model`; relative paths under `path_keys` are taken from the file's folder, and a
    top-level key of `defaults` is taken where the file has none."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: configuration file not found")
    if path.stat().st_size > MAX_CONFIG_BYTES:
        raise ConfigError(f"{path}: {path.stat().st_size:,} bytes; a configuration file is at most {MAX_CONFIG_BYTES:,}")
    try:
        raw = _expand_env(yaml.safe_load(path.read_text()), path)
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not a text file (UTF-8 YAML)") from None
    except RecursionError:  # `a: &a [*a]` loads as a list holding itself
        raise ConfigError(f"{path}: a YAML alias refers to itself, or nesting too deep") from None
    if isinstance(raw, dict):
        _resolve_paths(raw, path.resolve().parent, path_keys or [])
        for cam in raw.get("cameras") or []:
            if isinstance(cam, dict) and isinstance(cam.get("source"), str):
                src = cam["source"]
                if "://" not in src and not src.startswith("usb:") and not Path(src).is_absolute():
                    cam["source"] = os.path.normpath(path.resolve().parent / src)
        raw = {**(defaults or {}), **raw}
    return parse_config(raw, model, path)


def load_edge_config(path: str | Path) -> EdgeConfig:
    cfg = load_config(path, EdgeConfig, EDGE_PATH_KEYS)
    pub = cfg.publisher
    if not pub.spool_dir.is_absolute():  # the default, unresolved: beside the config file too, not wherever the node starts
        pub = pub.model_copy(update={"spool_dir": Path(path).resolve().parent / pub.spool_dir})
        cfg = cfg.model_copy(update={"publisher": pub})
    return cfg


MATCHER_PATH_KEYS = [
    ("data_dir",), ("http", "token_file"), ("http", "edge_token_file"), ("models",),
    ("ingest", "security", "secret_key"), ("ingest", "security", "allowed_clients"),
    ("watchlist", "webhooks", "*", "secret_file"), ("store", "password_file"),
    ("index", "milvus", "lite_file"), ("index", "milvus", "token_file"),
]


def load_matcher_config(path: str | Path) -> MatcherConfig:
    return load_config(path, MatcherConfig, MATCHER_PATH_KEYS)
