"""The edge → matcher wire format: one versioned schema, imported by both sides.

| what               | how                                                                    |
|--------------------|------------------------------------------------------------------------|
| a sighting         | `Sighting` dataclass: one tracked person in one frame, with embedding  |
| encode             | `encode(s)` → bytes: a MessagePack map, never pickle                   |
| decode + validate  | `decode(buf)` → `Sighting`, or `WireError` saying what was wrong       |
| a batch            | `decode_many(bufs)` → a `Sighting` or `WireError` per message, in order |

    >>> s = Sighting("edge-1", "gate", 1700000000.25, 42, 7, (10.0, 20.0, 40.0, 100.0), 0.9,
    ...              np.full(4, 0.5, np.float32), "mobilenetv2-imagenet-1")
    >>> decode(encode(s)) == s, s.schema    # `schema`: the wire schema's version; `model`: the embedding model's
    (True, 1)

Schema version 1 (a MessagePack map with short keys):

| key   | type                  | meaning                                                   |
|-------|-----------------------|-----------------------------------------------------------|
| `v`   | int                   | schema version (1)                                        |
| `node`| str ≤ 64              | edge node id                                              |
| `cam` | str ≤ 64              | camera id                                                 |
| `ts`  | float                 | capture time, Unix seconds                                |
| `frame`| int ≥ 0              | frame index within the camera's source                    |
| `track`| int ≥ 0              | track id, unique per camera while the node runs           |
| `box` | [x1, y1, x2, y2] float| pixel box in the frame                                    |
| `score`| float in [0, 1]      | detector confidence                                       |
| `emb` | bytes                 | embedding, little-endian, L2-normalised                   |
| `dt`  | "f4" or "f2"          | embedding element type (float32 / float16)                |
| `model`| str ≤ 128            | embedding model version: vectors of different versions are never compared |
| `thumb`| bytes or nil         | optional JPEG of the crop                                 |

Decoders accept every version in `SUPPORTED_VERSIONS`; a new version adds an upgrade step
rather than changing what an old message means.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field

import msgpack
import numpy as np

SCHEMA_VERSION = 1
SUPPORTED_VERSIONS = (1,)
MAX_MESSAGE_BYTES = 1 << 20  # 1 MiB: a 4096-d float32 embedding plus a generous thumbnail
MAX_EMBEDDING_DIM = 4096
MAX_ID_LEN = 64
_DTYPES = {"f4": np.dtype("<f4"), "f2": np.dtype("<f2")}
_JPEG_MAGIC = b"\xff\xd8"


class WireError(ValueError):
    """A message that does not follow the schema; the text says which field and why."""


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

    def _scalars(self) -> tuple:
        return (self.node, self.camera, self.ts, self.frame, self.track, tuple(self.box), self.score, self.model, self.thumbnail)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Sighting):
            return NotImplemented
        return self._scalars() == other._scalars() and np.array_equal(self.embedding, other.embedding)


def encode(s: Sighting) -> bytes:
    emb = np.asarray(s.embedding)
    dt = {np.dtype("float32"): "f4", np.dtype("float16"): "f2"}.get(emb.dtype)
    if dt is None:
        raise WireError(f"embedding dtype must be float32 or float16, got {emb.dtype}")
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
        },
        use_bin_type=True,
    )


_NUMBER = (int, float)
_NUMBER_TYPES = frozenset(_NUMBER)
_MISSING = object()


def _get(m: dict, key: str, types: tuple[type, ...]):
    value = m.get(key, _MISSING)
    if type(value) not in types:  # exact types: msgpack makes no subclasses, and bool must not pass as int
        raise WireError(f"missing field '{key}'" if value is _MISSING else f"field '{key}' has type {type(value).__name__}")
    return value


def _ident(m: dict, key: str, max_len: int = MAX_ID_LEN) -> str:
    value = _get(m, key, (str,))
    if not value or len(value) > max_len:
        raise WireError(f"field '{key}' must be 1..{max_len} characters")
    return value


def _finite(m: dict, key: str) -> float:
    value = float(_get(m, key, _NUMBER))
    if not math.isfinite(value):
        raise WireError(f"field '{key}' is not finite")
    return value


def _embedding(m: dict) -> np.ndarray:
    """The embedding's shape and type; whether its values are finite is checked for the whole batch."""
    dt = _get(m, "dt", (str,))
    if dt not in _DTYPES:
        raise WireError(f"field 'dt' must be one of {sorted(_DTYPES)}, got {dt!r}")
    raw = _get(m, "emb", (bytes,))
    size = _DTYPES[dt].itemsize
    if not raw or len(raw) % size or len(raw) // size > MAX_EMBEDDING_DIM:
        raise WireError(f"field 'emb' has {len(raw)} bytes: not 1..{MAX_EMBEDDING_DIM} {dt} values")
    return np.frombuffer(raw, _DTYPES[dt])


def _box(m: dict) -> tuple[float, float, float, float]:
    box = _get(m, "box", (list,))
    if len(box) != 4 or not set(map(type, box)) <= _NUMBER_TYPES or not all(map(math.isfinite, box)):
        raise WireError("field 'box' must be 4 finite numbers")
    x1, y1, x2, y2 = map(float, box)
    if x2 <= x1 or y2 <= y1:
        raise WireError(f"field 'box' is empty: {box}")
    return x1, y1, x2, y2


def _thumbnail(m: dict) -> bytes | None:
    thumb = m.get("thumb")
    if thumb is None:
        return None
    if type(thumb) is not bytes or not thumb.startswith(_JPEG_MAGIC):
        raise WireError("field 'thumb' is not a JPEG")
    return thumb


def _parse(buf: bytes | memoryview) -> Sighting:
    if len(buf) > MAX_MESSAGE_BYTES:
        raise WireError(f"message of {len(buf)} bytes exceeds {MAX_MESSAGE_BYTES}")
    try:
        m = msgpack.unpackb(buf, raw=False, strict_map_key=True, max_bin_len=MAX_MESSAGE_BYTES)
    except Exception as e:  # msgpack raises several unrelated types for bad input
        raise WireError(f"not a MessagePack message: {type(e).__name__}: {e}") from None
    if type(m) is not dict:
        raise WireError(f"message is a {type(m).__name__}, not a map")
    schema = _get(m, "v", (int,))
    if schema not in SUPPORTED_VERSIONS:
        raise WireError(f"schema version {schema} not supported (supported: {SUPPORTED_VERSIONS})")
    score = _finite(m, "score")
    if not 0.0 <= score <= 1.0:
        raise WireError(f"field 'score' {score} outside [0, 1]")
    frame, track = _get(m, "frame", (int,)), _get(m, "track", (int,))
    if frame < 0 or track < 0:
        raise WireError("fields 'frame' and 'track' must be >= 0")
    return Sighting(_ident(m, "node"), _ident(m, "cam"), _finite(m, "ts"), frame, track, _box(m), score, _embedding(m),
                    _ident(m, "model", 128), _thumbnail(m), schema)


_NOT_FINITE = "field 'emb' holds NaN or infinite values"


def decode_many(bufs: Iterable[bytes | memoryview]) -> list[Sighting | WireError]:
    """Parse and validate a batch of messages: in their order, a `Sighting` for each valid one and the
    `WireError` for each defective one. The embeddings' values are checked in one numpy pass per
    (dtype, dimension): a numpy call costs microseconds however small its array."""
    out: list[Sighting | WireError] = []
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
            out[rows[k]] = WireError(_NOT_FINITE)
    return out


def decode(buf: bytes | memoryview) -> Sighting:
    """Parse and validate one message; any defect raises `WireError`."""
    [s] = decode_many([buf])
    if isinstance(s, WireError):
        raise s
    return s
