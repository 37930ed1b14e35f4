"""The edge → trainer harvest format: crops and their JSON sidecars, one versioned schema for both sides.

| what               | how                                                                          |
|--------------------|------------------------------------------------------------------------------|
| a crop's metadata  | `Sidecar` dataclass: one harvested person crop, where and when it was seen   |
| file names         | `CropName(node, camera, track, frame).path(root)` builds; `CropName.parse(path)` reads back |
| encode             | `encode(s)` → JSON bytes, written beside the crop (`sidecar_path(crop)`)     |
| decode + validate  | `decode(buf, source)` / `read_sidecar(crop)` → `Sidecar`, or `HarvestError` naming the file and field |

    >>> s = Sidecar("edge-1", "back_door", 1714000000.4, 1234, 7, (101.3, 50.0, 117.3, 82.6), 0.8765, "m-1")
    >>> s.name.path("harvest")
    PosixPath('harvest/back_door/edge-1_back_door_t7_f1234.jpg')
    >>> CropName.parse("harvest/back_door/edge-1_back_door_t7_f1234.jpg") == s.name
    True
    >>> decode(encode(s)) == s, s.schema
    (True, 1)

Layout: `<root>/<camera>/<node>_<camera>_t<track>_f<frame>.jpg`, a JPEG, and the same path with `.json`,
the sidecar. The camera folder tells where `<node>` ends, since ids may hold `_`. The edge writes the
sidecar first, so a crop that is there has its metadata unless the write failed.

Schema version 1 (a JSON object):

| key      | type                     | meaning                                              |
|----------|--------------------------|------------------------------------------------------|
| `v`      | int                      | schema version (1); absent in sidecars written before it was added: read as 1 |
| `node`   | str, 1..64 of `[A-Za-z0-9_.-]` | edge node id; not only dots (`.`, `..`: it names files) |
| `camera` | str, 1..64 of `[A-Za-z0-9_.-]` | camera id; not only dots (it names a folder)   |
| `ts`     | number in [0, MAX_TS]    | capture time, Unix seconds (MAX_TS, like every bound here: the wire's) |
| `frame`  | int ≥ 0                  | frame index within the camera's source               |
| `track`  | int ≥ 0                  | track id, unique per camera while the node runs      |
| `box`    | [x1, y1, x2, y2] numbers | pixel box of the crop in the frame, 0.1 px, each within ±MAX_PIXELS |
| `score`  | number in [0, 1]         | detector confidence, 4 decimals                      |
| `model`  | str, 1..128, printable   | embedding model version running when the crop was saved |

Readers accept every version in `SUPPORTED_VERSIONS` and ignore keys they do not know; a new version
adds an upgrade step rather than changing what an old sidecar means.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

from crossview.kernel.config import bad_id
from crossview.kernel.wire import MAX_ID_LEN, MAX_INT, MAX_MODEL_LEN, MAX_PIXELS, MAX_TS, id_problem

SCHEMA_VERSION = 1
SUPPORTED_VERSIONS = (1,)
LEGACY_VERSION = 1  # what a sidecar without `v` is
CROP_SUFFIX, SIDECAR_SUFFIX = ".jpg", ".json"
MAX_SIDECAR_BYTES = 4096  # a v1 sidecar with the longest ids is under 1 KiB
_NAME = re.compile(r"(?P<head>[A-Za-z0-9_.-]+)_t(?P<track>\d{1,18})_f(?P<frame>\d{1,18})" + re.escape(CROP_SUFFIX))


class HarvestError(ValueError):
    """A crop name or sidecar that does not follow the format; the text names the file and what was wrong."""


class CropName(NamedTuple):
    """What a harvested crop's path says: `<camera>/<node>_<camera>_t<track>_f<frame>.jpg`."""

    node: str
    camera: str
    track: int
    frame: int

    def path(self, root: str | Path) -> Path:
        return Path(root) / self.camera / f"{self.node}_{self.camera}_t{self.track}_f{self.frame}{CROP_SUFFIX}"

    @classmethod
    def parse(cls, path: str | Path) -> CropName:
        """The parts of a crop's path; its folder is the camera, which also ends the node id in the name."""
        path = Path(path)
        camera, m = path.parent.name, _NAME.fullmatch(path.name)
        node = m["head"].removesuffix(f"_{camera}") if m else ""
        if not (m and _is_id(camera) and len(node) < len(m["head"]) and _is_id(node)):
            raise HarvestError(f"{path}: not a harvested crop's name (<camera>/<node>_<camera>_t<track>_f<frame>{CROP_SUFFIX})")
        return cls(node, camera, int(m["track"]), int(m["frame"]))


@dataclass(frozen=True)
class Sidecar:
    node: str
    camera: str
    ts: float
    frame: int
    track: int
    box: tuple[float, float, float, float]
    score: float
    model: str
    schema: int = field(default=SCHEMA_VERSION)  # the sidecar schema's version; `model` is the embedding model's

    @property
    def name(self) -> CropName:
        return CropName(self.node, self.camera, self.track, self.frame)


def sidecar_path(crop: Path) -> Path:
    return crop.with_suffix(SIDECAR_SUFFIX)


def encode(s: Sidecar) -> bytes:
    """The sidecar's JSON; box and score are rounded to what is worth keeping (0.1 px, 4 decimals)."""
    return json.dumps({
        "v": SCHEMA_VERSION, "node": s.node, "camera": s.camera, "ts": float(s.ts), "frame": int(s.frame),
        "track": int(s.track), "box": [round(float(v), 1) for v in s.box], "score": round(float(s.score), 4),
        "model": s.model,
    }).encode()


def _is_id(v: object) -> bool:
    """The config's id rule (`kernel.config.bad_id`): ids name folders and files."""
    return type(v) is str and bad_id(v) is None


def _number(v: object, bound: float) -> bool:
    return type(v) in (int, float) and abs(v) <= bound  # exact types: bool must not pass as a number; NaN fails


def _index(v: object) -> bool:
    return type(v) is int and 0 <= v <= MAX_INT


def _box(v: object) -> bool:
    return (type(v) is list and len(v) == 4 and all(_number(x, MAX_PIXELS) for x in v) and v[0] <= v[2]
            and v[1] <= v[3])


# key: (what it must be, test); every field is bounded, since another process wrote the file: as the wire bounds it
_FIELDS = {
    "node": (f"1..{MAX_ID_LEN} of [A-Za-z0-9_.-], not only dots", _is_id),
    "camera": (f"1..{MAX_ID_LEN} of [A-Za-z0-9_.-], not only dots", _is_id),
    "ts": (f"a number in [0, {MAX_TS:g}]", lambda v: _number(v, MAX_TS) and v >= 0),
    "frame": (f"an integer in 0..{MAX_INT}", _index),
    "track": (f"an integer in 0..{MAX_INT}", _index),
    "box": (f"[x1, y1, x2, y2]: numbers within ±{MAX_PIXELS}, x1 <= x2, y1 <= y2", _box),
    "score": ("a number in [0, 1]", lambda v: _number(v, 1) and v >= 0),
    "model": (f"1..{MAX_MODEL_LEN} printable characters", lambda v: type(v) is str and not id_problem(v, MAX_MODEL_LEN)),
}


def _parse(buf: bytes) -> Sidecar:
    if len(buf) > MAX_SIDECAR_BYTES:
        raise HarvestError(f"sidecar of {len(buf)} bytes exceeds {MAX_SIDECAR_BYTES}")
    try:
        m = json.loads(buf)
    except (ValueError, RecursionError) as e:  # bad JSON or UTF-8; nesting past the parser's depth
        raise HarvestError(f"not JSON: {e}") from None
    if type(m) is not dict:
        raise HarvestError(f"sidecar is a JSON {type(m).__name__}, not an object")
    schema = m.get("v", LEGACY_VERSION)
    if type(schema) is not int or schema not in SUPPORTED_VERSIONS:
        raise HarvestError(f"schema version {schema!r:.20} not supported (supported: {SUPPORTED_VERSIONS})")
    for key, (what, ok) in _FIELDS.items():
        if key not in m:
            raise HarvestError(f"missing field '{key}'")
        if not ok(m[key]):
            raise HarvestError(f"field '{key}' must be {what}, got {m[key]!r:.60}")
    return Sidecar(m["node"], m["camera"], float(m["ts"]), m["frame"], m["track"], tuple(map(float, m["box"])),
                   float(m["score"]), m["model"], schema)


def decode(buf: bytes, source: str | Path = "sidecar") -> Sidecar:
    """Parse and validate one sidecar; any defect raises `HarvestError`, its text starting with `source`."""
    try:
        return _parse(buf)
    except HarvestError as e:
        raise HarvestError(f"{source}: {e}") from None


def read_sidecar(crop: Path) -> Sidecar:
    """The sidecar of the crop at `crop`; a missing, unreadable or invalid one raises `HarvestError`."""
    path = sidecar_path(crop)
    try:
        with path.open("rb") as f:
            buf = f.read(MAX_SIDECAR_BYTES + 1)  # no more than enough to know it is too long
    except OSError as e:
        raise HarvestError(f"{path}: cannot read the sidecar: {e.strerror or e}") from None
    return decode(buf, path)
