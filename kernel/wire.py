"""The edge → matcher wire format: one versioned schema, imported by both sides.

| what               | how                                                                    |
|--------------------|------------------------------------------------------------------------|
| a sighting         | `Sighting` dataclass: one tracked person in one frame, with embedding  |
| encode             | `encode(s)` → bytes: a MessagePack map, never pickle                   |
| decode + validate  | `decode(buf)` → `Sighting`, or `WireError` saying what was wrong       |
| a batch            | `decode_many(bufs)` → a `Sighting` or `WireError` per message, in order |
| acknowledgement    | `encode_ack(seqs, refused)` / `decode_ack(buf)` → `Ack`: matcher → edge, the `seq`s it has committed, or refused for good |
| heartbeat          | `Heartbeat` of `CameraStatus`es: edge → matcher every few seconds, on the sightings' socket; |
|                    | `encode_heartbeat(h)`; `decode_many` returns it in its place among the sightings        |
| why one is refused | `Reason`: a fixed set of codes (`WireError.code`), so counters keyed by them stay small; |
|                    | the value that was wrong is in `WireError.detail` only, escaped with `ascii()`         |

    >>> s = Sighting("edge-1", "gate", 1700000000.25, 42, 7, (10.0, 20.0, 40.0, 100.0), 0.9,
    ...              np.full(4, 0.5, np.float32), "mobilenetv2-imagenet-1")
    >>> decode(encode(s)) == s, s.schema    # `schema`: the wire schema's version; `model`: the embedding model's
    (True, 2)
    >>> decode_ack(encode_ack([5, 6, 7, 9]))
    Ack(ranges=[(5, 7), (9, 9)], refused=False)
    >>> h = Heartbeat("edge-1", 1700000000.0, 5.0, "mobilenetv2-imagenet-1", 0, 0.0, 0,
    ...               (CameraStatus("gate", "streaming", 4.9, 5.0, 1200),))
    >>> decode(encode_heartbeat(h)) == h
    True

Schema version 2 (a MessagePack map with short keys; version 1 is the same without `seq`):

| key   | type                  | meaning                                                   |
|-------|-----------------------|-----------------------------------------------------------|
| `v`   | int                   | schema version (2; 1 is still decoded)                    |
| `seq` | int in [0, 2^63-1]    | v2: the edge's sequence number, rising per node across restarts; the matcher stores |
|       | (or absent)           | each (node, seq) once and acknowledges it. Absent (tools, v1): stored, never deduplicated |
| `node`| str ≤ 64, printable   | edge node id (identifiers hold no control characters: they end up in logs; |
|       | not only dots         | nor are they `.` or `..`: they name folders, `id_problem`) |
| `cam` | str ≤ 64, printable   | camera id                                                 |
| `ts`  | float in [0, MAX_TS]  | capture time, Unix seconds (MAX_TS: the year 2200)        |
| `frame`| int in [0, 2^63-1]   | frame index within the camera's source (SQLite's INTEGER range) |
| `track`| int in [0, 2^63-1]   | track id, unique per camera while the node runs           |
| `box` | [x1, y1, x2, y2] float| pixel box in the frame, each within ±MAX_PIXELS           |
| `score`| float in [0, 1]      | detector confidence                                       |
| `emb` | bytes                 | embedding, little-endian, L2-normalised                   |
| `dt`  | "f4" or "f2"          | embedding element type (float32 / float16)                |
| `model`| str ≤ 128, printable | embedding model version: vectors of different versions are never compared (MAX_MODEL_LEN) |
| `thumb`| bytes or nil         | optional JPEG of the crop: ≤ MAX_THUMBNAIL_PIXELS and `kernel.images.MAX_JPEG_SCANS` scans, |
|       |                       | as its header declares (a model promotion decodes every stored one) |

A heartbeat is a v2 map with `"hb": 1`, the node's state rather than a sighting, never spooled, never
acknowledged (the next one replaces it), every field bounded like a sighting's:

| key     | type                        | meaning                                                   |
|---------|-----------------------------|-----------------------------------------------------------|
| `node`  | str ≤ 64, printable         | edge node id                                              |
| `ts`    | float in [0, MAX_TS]        | the edge's clock when sent                                |
| `every` | float in [0.1, 3600]        | seconds until the next heartbeat: a few missed make the edge offline |
| `model` | str ≤ 128, printable        | the embedding model version it runs                       |
| `spool` | [int, float, int]           | sightings spooled unacknowledged, the oldest's age in s, sightings dropped so far |
| `cams`  | ≤ MAX_CAMERAS maps          | per camera: `id`, `state` (one of `CAMERA_STATES`), `fps` achieved and `target`, |
|         |                             | `frames` done; files: `pos`, `len` (frame n of N) and `eta` s; `error`: ≤ 256 printable |

Decoders accept every version in `SUPPORTED_VERSIONS`; a new version adds an upgrade step
rather than changing what an old message means.

Delivery is at least once: edges are ZeroMQ DEALER sockets, the matcher one ROUTER. A ROUTER sees
which connection each message came in on and can answer on that same CURVE-authenticated
connection, so acknowledgements need no second socket, port, key pair or allow-list (PUSH plus a
return channel would need all of those and a way to pair the two connections). The matcher answers
with an acknowledgement once a batch is committed (and for duplicates and sightings it refuses for
good, so the edge stops resending them); the edge keeps every sighting in its spool until then.
An acknowledgement is a map `{"v": 2, "ack": [[first, last], ...]}`: ranges of `seq`, at most
`MAX_ACK_RANGES` of them and `MAX_ACK_SEQS` numbers in all. PUSH edges (before v2) cannot connect.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import NamedTuple

import msgpack
import numpy as np

from crossview.kernel.images import JPEG_SOI, check_scans, jpeg_size

SCHEMA_VERSION = 2
SUPPORTED_VERSIONS = (1, 2)
MAX_MESSAGE_BYTES = 1 << 20  # 1 MiB: a 4096-d float32 embedding plus a generous thumbnail
MAX_EMBEDDING_DIM = 4096
MAX_ID_LEN = 64
MAX_MODEL_LEN = 128
MAX_INT = 2**63 - 1  # SQLite's INTEGER range: a larger frame or track number would refuse its whole commit
MAX_TS = 7.3e9  # the year 2200: later times are bit flips or broken clocks, and datetime cannot show 1e308
MAX_PIXELS = 1 << 20  # a box coordinate's magnitude; boxes may reach past the frame's edge, not this far
MAX_THUMBNAIL_PIXELS = 1 << 21  # 512 (publisher.thumbnail_height's most) x 4096: a 631-byte JPEG can declare 16000²
MAX_ACK_RANGES = 4096
MAX_CAMERAS = 256  # per heartbeat
MAX_ERROR_LEN = 256
MAX_FPS = 1000.0
CAMERA_STATES = ("connecting", "streaming", "reconnecting", "finished", "failed", "stopped")  # an edge source's states
MAX_ACK_SEQS = 1 << 20
_DTYPES = {"f4": np.dtype("<f4"), "f2": np.dtype("<f2")}


class Reason:
    """Why a message was refused: a fixed set of codes (`REASONS`), so the counters keyed by them stay small whatever
    is sent. The wire schema's codes, then the matcher's own checks past it (one vocabulary for edges and matcher)."""

    MALFORMED = "malformed"  # not a MessagePack map
    OVERSIZED = "oversized"  # over MAX_MESSAGE_BYTES
    SCHEMA_VERSION = "schema_version"
    MISSING_FIELD = "missing_field"
    FIELD_TYPE = "field_type"
    FIELD_RANGE = "field_range"  # a value out of bounds, an empty or too long string, an empty box, a ragged embedding
    IDENTIFIER = "identifier"  # a node, camera or model id holding control characters, or only dots
    NOT_FINITE = "not_finite"  # NaN or infinite values
    DIMENSION = "dimension"  # an embedding length other than its model version's
    ZERO_EMBEDDING = "zero_embedding"
    UNKNOWN_MODEL = "unknown_model"  # a new model version past the matcher's limit
    STORE_REFUSED = "store_refused"
    NODE_KEY = "node_key"  # a node id its connection's CURVE key is not filed under (`<node>.key`)


REASONS = frozenset(code for name, code in vars(Reason).items() if name.isupper())


class WireError(ValueError):
    """A message that does not follow the schema: `code` says why (one of `REASONS`), `detail` which field and what
    it held (escaped: safe to log)."""

    def __init__(self, code: str, detail: str, seq: int | None = None):
        super().__init__(f"{code}: {detail}")
        self.code, self.detail = code, detail
        self.seq = seq  # the sender's sequence number, when the message was readable that far: it can be refused


@dataclass(eq=False)
class Sighting:
    node: str
    camera: str
    ts: float
    frame: int
    track: int
    box: tuple[float, float, float, float]
    score: float
    embedding: np.ndarray  # (D,) float32 or float16
    model: str
    thumbnail: bytes | None = None
    schema: int = field(default=SCHEMA_VERSION)  # the wire schema's version; `model` is the embedding model's
    seq: int | None = None  # the edge's sequence number (v2); None: not deduplicated

    def _scalars(self) -> tuple:
        return (self.node, self.camera, self.ts, self.frame, self.track, tuple(self.box), self.score, self.model, self.thumbnail,
                self.seq)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Sighting):
            return NotImplemented
        return self._scalars() == other._scalars() and np.array_equal(self.embedding, other.embedding)


def encode(s: Sighting) -> bytes:
    emb = np.asarray(s.embedding)
    dt = {np.dtype("float32"): "f4", np.dtype("float16"): "f2"}.get(emb.dtype)
    if dt is None:
        raise WireError(Reason.FIELD_TYPE, f"embedding dtype must be float32 or float16, got {emb.dtype}")
    return msgpack.packb(
        {
            "v": SCHEMA_VERSION,
            "node": s.node,
            "cam": s.camera,
            "ts": float(s.ts),
            "frame": int(s.frame),
            "track": int(s.track),
            "box": [float(x) for x in s.box],
            "score": float(s.score),
            "emb": emb.astype(_DTYPES[dt], copy=False).tobytes(),
            "dt": dt,
            "model": s.model,
            "thumb": s.thumbnail,
            **({} if s.seq is None else {"seq": int(s.seq)}),
        },
        use_bin_type=True,
    )


@dataclass(frozen=True)
class CameraStatus:
    """One camera as its edge sees it."""

    id: str
    state: str  # one of CAMERA_STATES
    fps: float  # achieved detection frames per second
    target_fps: float
    frames: int
    position: tuple[int, int] | None = None  # files: (frame n, of N)
    eta_s: float | None = None  # files: seconds to the end
    error: str | None = None  # why it failed or reconnects

    @property
    def behind(self) -> bool:
        """Streaming, paced, and achieving less than 0.8 of its target (once the estimate has a few frames)."""
        return self.state == "streaming" and self.target_fps > 0 and self.frames >= 5 and self.fps < 0.8 * self.target_fps


@dataclass(frozen=True)
class Heartbeat:
    """An edge node's state, sent every `every_s` seconds."""

    node: str
    ts: float
    every_s: float
    model: str
    spooled: int  # sightings not yet acknowledged
    spool_age_s: float  # the oldest one's age
    dropped: int  # sightings dropped unacknowledged (spool full or failing) since the node started
    cameras: tuple[CameraStatus, ...]


def _camera_map(c: CameraStatus) -> dict:
    m = {"id": c.id, "state": c.state, "fps": float(c.fps), "target": float(c.target_fps), "frames": int(c.frames)}
    if c.position is not None:
        m["pos"], m["len"] = int(c.position[0]), int(c.position[1])
    if c.eta_s is not None:
        m["eta"] = float(c.eta_s)
    if c.error is not None:
        m["error"] = c.error
    return m


def encode_heartbeat(h: Heartbeat) -> bytes:
    return msgpack.packb({"v": SCHEMA_VERSION, "hb": 1, "node": h.node, "ts": float(h.ts), "every": float(h.every_s),
                          "model": h.model, "spool": [int(h.spooled), float(h.spool_age_s), int(h.dropped)],
                          "cams": [_camera_map(c) for c in h.cameras]}, use_bin_type=True)


class Ack(NamedTuple):
    ranges: list[tuple[int, int]]  # (first, last) seqs the edge may forget
    refused: bool  # True: the matcher will never store these (they broke the schema or its checks), not committed

    @property
    def seqs(self) -> list[int]:
        return [s for first, last in self.ranges for s in range(first, last + 1)]


def encode_ack(seqs: Iterable[int], refused: bool = False) -> bytes:
    """An acknowledgement of `seqs` (any order, repeats allowed), as ranges of consecutive numbers. `refused`:
    they are acknowledged so the edge stops resending what can never be stored, and counts them apart."""
    ranges: list[list[int]] = []
    for s in sorted(set(seqs)):
        if ranges and s == ranges[-1][1] + 1:
            ranges[-1][1] = s
        else:
            ranges.append([s, s])
    return msgpack.packb({"v": SCHEMA_VERSION, "ack": ranges, **({"refused": True} if refused else {})})


def decode_ack(buf: bytes | memoryview) -> Ack:
    """The (first, last) ranges of an acknowledgement and whether they were refused; `WireError` for anything else."""
    try:
        m = msgpack.unpackb(buf, raw=False, max_array_len=MAX_ACK_RANGES, max_bin_len=0, max_str_len=8, max_map_len=3)
    except Exception as e:  # msgpack raises several unrelated types for bad input
        raise WireError(Reason.MALFORMED, f"not an acknowledgement: {type(e).__name__}") from None
    ranges = m.get("ack") if type(m) is dict and m.get("v") == 2 else None
    if type(ranges) is not list or not all(type(r) is list and len(r) == 2 and all(type(x) is int for x in r) for r in ranges):
        raise WireError(Reason.MALFORMED, "not an acknowledgement: want {'v': 2, 'ack': [[first, last], ...]}")
    out = [(a, b) for a, b in ranges]
    if not all(0 <= a <= b <= MAX_INT for a, b in out) or sum(b - a + 1 for a, b in out) > MAX_ACK_SEQS:
        raise WireError(Reason.FIELD_RANGE, f"acknowledgement ranges out of bounds (at most {MAX_ACK_SEQS} numbers)")
    refused = m.get("refused", False)
    if type(refused) is not bool:
        raise WireError(Reason.MALFORMED, "not an acknowledgement: 'refused' must be true or false")
    return Ack(out, refused)


_NUMBER = (int, float)
_NUMBER_TYPES = frozenset(_NUMBER)
_MISSING = object()


def _get(m: dict, key: str, types: tuple[type, ...]):
    value = m.get(key, _MISSING)
    if value is _MISSING:
        raise WireError(Reason.MISSING_FIELD, f"missing field '{key}'")
    if type(value) not in types:  # exact types: msgpack makes no subclasses, and bool must not pass as int
        raise WireError(Reason.FIELD_TYPE, f"field '{key}' has type {type(value).__name__}")
    return value


def id_problem(value: str, max_len: int = MAX_ID_LEN) -> str | None:
    """What keeps `value` from being an identifier (a node, camera or model id), completing "field 'x' ...";
    None when nothing does. Every id check (the wire, harvest sidecars, the HTTP API) uses this one."""
    if not value or len(value) > max_len:
        return f"must be 1..{max_len} characters"
    if not value.isprintable():  # a newline in a node id would forge log lines; other controls garble terminals
        return f"holds control characters: {ascii(value)}"
    if not value.strip("."):  # `.` and `..` name folders: a harvested crop's camera folder would leave its root
        return f"is only dots: {ascii(value)}"
    return None


def _ident(m: dict, key: str, max_len: int = MAX_ID_LEN) -> str:
    value = _get(m, key, (str,))
    if problem := id_problem(value, max_len):
        code = Reason.FIELD_RANGE if not value or len(value) > max_len else Reason.IDENTIFIER
        raise WireError(code, f"field '{key}' {problem}")
    return value


def _finite(m: dict, key: str, low: float, high: float) -> float:
    value = float(_get(m, key, _NUMBER))
    if not math.isfinite(value):
        raise WireError(Reason.NOT_FINITE, f"field '{key}' is not finite")
    if not low <= value <= high:
        raise WireError(Reason.FIELD_RANGE, f"field '{key}' {value!r} outside [{low:g}, {high:g}]")
    return value


def _count(m: dict, key: str) -> int:
    value = _get(m, key, (int,))
    if not 0 <= value <= MAX_INT:
        raise WireError(Reason.FIELD_RANGE, f"field '{key}' must be in [0, 2^63-1], got {value}")
    return value


def _embedding(m: dict) -> np.ndarray:
    """The embedding's shape and type; whether its values are finite is checked for the whole batch."""
    dt = _get(m, "dt", (str,))
    if dt not in _DTYPES:
        raise WireError(Reason.FIELD_RANGE, f"field 'dt' must be one of {sorted(_DTYPES)}, got {ascii(dt)}")
    raw = _get(m, "emb", (bytes,))
    size = _DTYPES[dt].itemsize
    if not raw or len(raw) % size or len(raw) // size > MAX_EMBEDDING_DIM:
        raise WireError(Reason.FIELD_RANGE, f"field 'emb' has {len(raw)} bytes: not 1..{MAX_EMBEDDING_DIM} {dt} values")
    return np.frombuffer(raw, _DTYPES[dt])


def _box(m: dict) -> tuple[float, float, float, float]:
    box = _get(m, "box", (list,))
    if len(box) != 4 or not set(map(type, box)) <= _NUMBER_TYPES:
        raise WireError(Reason.FIELD_TYPE, "field 'box' must be 4 numbers")
    if not all(abs(v) <= MAX_PIXELS for v in box):  # NaN fails too
        raise WireError(Reason.FIELD_RANGE, f"field 'box' must be 4 numbers within ±{MAX_PIXELS}")
    x1, y1, x2, y2 = map(float, box)
    if x2 <= x1 or y2 <= y1:
        raise WireError(Reason.FIELD_RANGE, f"field 'box' is empty: {box}")
    return x1, y1, x2, y2


def _thumbnail(m: dict) -> bytes | None:
    thumb = m.get("thumb")
    if thumb is None:
        return None
    if type(thumb) is not bytes or not thumb.startswith(JPEG_SOI):
        raise WireError(Reason.FIELD_TYPE, "field 'thumb' is not a JPEG")
    # A model promotion's gallery migration decodes it: bounded by its header, as uploads are. Without a frame
    # header nothing decodes it to pixels.
    width, height = jpeg_size(thumb) or (0, 0)
    if width * height > MAX_THUMBNAIL_PIXELS:
        raise WireError(Reason.FIELD_RANGE, f"field 'thumb' is a {width} x {height} JPEG: over {MAX_THUMBNAIL_PIXELS:,} pixels")
    try:
        check_scans(thumb)
    except ValueError as e:
        raise WireError(Reason.FIELD_RANGE, f"field 'thumb' is {e}") from None
    return thumb


def _text(m: dict, key: str, max_len: int) -> str | None:
    """An optional free text (an error message): bounded, printable."""
    value = m.get(key)
    if value is None:
        return None
    if type(value) is not str or len(value) > max_len:
        raise WireError(Reason.FIELD_RANGE, f"field '{key}' must be a string of at most {max_len} characters")
    if not value.isprintable():
        raise WireError(Reason.IDENTIFIER, f"field '{key}' holds control characters: {ascii(value)}")
    return value


def _camera_status(m) -> CameraStatus:
    if type(m) is not dict:
        raise WireError(Reason.FIELD_TYPE, "field 'cams' must hold maps")
    state = _get(m, "state", (str,))
    if state not in CAMERA_STATES:
        raise WireError(Reason.FIELD_RANGE, f"camera state {ascii(state[:32])} is not one of {CAMERA_STATES}")
    position = None
    if "pos" in m or "len" in m:
        position = (_count(m, "pos"), _count(m, "len"))
    eta = _finite(m, "eta", 0.0, MAX_TS) if "eta" in m else None
    return CameraStatus(_ident(m, "id"), state, _finite(m, "fps", 0.0, MAX_FPS), _finite(m, "target", 0.0, MAX_FPS),
                        _count(m, "frames"), position, eta, _text(m, "error", MAX_ERROR_LEN))


def _heartbeat(m: dict) -> Heartbeat:
    spool = _get(m, "spool", (list,))
    if len(spool) != 3:
        raise WireError(Reason.FIELD_TYPE, "field 'spool' must be [spooled, oldest age s, dropped]")
    spool_m = dict(zip(("spooled", "age", "dropped"), spool))
    cams = _get(m, "cams", (list,))
    if len(cams) > MAX_CAMERAS:
        raise WireError(Reason.FIELD_RANGE, f"field 'cams' holds {len(cams)} cameras, at most {MAX_CAMERAS}")
    return Heartbeat(_ident(m, "node"), _finite(m, "ts", 0.0, MAX_TS), _finite(m, "every", 0.1, 3600.0),
                     _ident(m, "model", MAX_MODEL_LEN), _count(spool_m, "spooled"), _finite(spool_m, "age", 0.0, MAX_TS),
                     _count(spool_m, "dropped"), tuple(_camera_status(c) for c in cams))


def _parse(buf: bytes | memoryview) -> Sighting | Heartbeat:
    if len(buf) > MAX_MESSAGE_BYTES:
        raise WireError(Reason.OVERSIZED, f"message of {len(buf)} bytes exceeds {MAX_MESSAGE_BYTES}")
    try:
        m = msgpack.unpackb(buf, raw=False, strict_map_key=True, max_bin_len=MAX_MESSAGE_BYTES)
    except Exception as e:  # msgpack raises several unrelated types for bad input
        raise WireError(Reason.MALFORMED, f"not a MessagePack message: {type(e).__name__}: {e}") from None
    if type(m) is not dict:
        raise WireError(Reason.MALFORMED, f"message is a {type(m).__name__}, not a map")
    schema = _get(m, "v", (int,))
    if schema not in SUPPORTED_VERSIONS:
        raise WireError(Reason.SCHEMA_VERSION, f"schema version {schema} not supported (supported: {SUPPORTED_VERSIONS})")
    if schema >= 2 and m.get("hb") == 1:
        return _heartbeat(m)
    seq = _count(m, "seq") if schema >= 2 and "seq" in m else None
    try:
        return Sighting(_ident(m, "node"), _ident(m, "cam"), _finite(m, "ts", 0.0, MAX_TS), _count(m, "frame"),
                        _count(m, "track"), _box(m), _finite(m, "score", 0.0, 1.0), _embedding(m), _ident(m, "model", MAX_MODEL_LEN),
                        _thumbnail(m), schema, seq)
    except WireError as e:
        e.seq = seq
        raise


_NOT_FINITE = "field 'emb' holds NaN or infinite values"


def decode_many(bufs: Iterable[bytes | memoryview]) -> list[Sighting | Heartbeat | WireError]:
    """Parse and validate a batch of messages: in their order, a `Sighting` (or `Heartbeat`) for each valid one and
    the `WireError` for each defective one. The embeddings' values are checked in one numpy pass per
    (dtype, dimension): a numpy call costs microseconds however small its array."""
    out: list[Sighting | Heartbeat | WireError] = []
    for buf in bufs:
        try:
            out.append(_parse(buf))
        except WireError as e:
            out.append(e)
    groups: dict[tuple[str, int], list[int]] = {}
    for n, s in enumerate(out):
        if isinstance(s, Sighting):
            groups.setdefault((s.embedding.dtype.char, len(s.embedding)), []).append(n)
    for rows in groups.values():
        embs = [out[n].embedding for n in rows]  # joined as bytes: much faster than np.stack for many small rows
        finite = np.isfinite(np.frombuffer(b"".join(embs), embs[0].dtype).reshape(len(embs), -1)).all(axis=1)
        for k in np.flatnonzero(~finite).tolist():
            out[rows[k]] = WireError(Reason.NOT_FINITE, _NOT_FINITE, out[rows[k]].seq)
    return out


def decode(buf: bytes | memoryview) -> Sighting | Heartbeat:
    """Parse and validate one message; any defect raises `WireError`."""
    [s] = decode_many([buf])
    if isinstance(s, WireError):
        raise s
    return s
