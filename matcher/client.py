"""A small client for a running matcher's HTTP API, used by `crossview query --url`: stdlib only, no FAISS or numpy
(its result types come from `matcher.results`).

| what              | how                                                                           |
|-------------------|-------------------------------------------------------------------------------|
| token             | `read_token(path)`: from a file, else `$CROSSVIEW_TOKEN`                      |
| JSON query        | `query({"sighting_id": 12, "top_k": 5})` → the `/api/v1/query` answer (a dict) |
| image query       | `query_image(jpeg_bytes, "crop.jpg", model, filters)` (multipart upload)      |
| back to objects   | `result_from_dict(d)` → `QueryResult`, so the CLI prints the same table either way |
| harvest           | `download_harvest(dest, since, until)`: the matcher's harvested crops and sidecars into `dest` in |
|                   | the `kernel.harvest` layout (what the trainer reads); crops already there are skipped |
| errors            | 404 → `LookupError`, 400/422 → `ValueError`, 401/403 → `PermissionError`, no server → `ConnectionError`; |
|                   | each with the server's own message; a URL without http(s):// → `ValueError`;  |
|                   | a server that is not a matcher API (the metrics port) → `ConnectionError` saying so |

    client = MatcherClient("http://127.0.0.1:8080", read_token(Path("keys/http-token")))
    print(result_from_dict(client.query({"sighting_id": 123})).to_text())
"""

from __future__ import annotations

import http.client
import json
import os
import re
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

from crossview.kernel.integrity import copy_verified
from crossview.kernel.multipart import encode_multipart
from crossview.matcher.results import QueryResult, SightingRecord, TrackHit

API_PREFIX = "/api/v1"
MAX_CROP_BYTES = 64 << 20  # the matcher's harvest.max_crop_bytes at most
# `<camera>/<node>_<camera>_t<track>_f<frame>.jpg` (kernel.harvest): ids of [A-Za-z0-9_.-], no way out of `dest`
_CROP_PATH = re.compile(r"(?!\.\.?/)[A-Za-z0-9_.-]{1,64}/[A-Za-z0-9_.-]{1,200}_t\d{1,18}_f\d{1,18}\.jpg")
TOKEN_ENV = "CROSSVIEW_TOKEN"


def read_token(token_file: Path | None) -> str:
    """The API token from `token_file`, else from $CROSSVIEW_TOKEN (never a command-line argument: `ps` shows those)."""
    if token_file is not None:
        try:
            token = Path(token_file).read_text().strip()
        except OSError as e:
            raise ValueError(f"--token-file {token_file}: cannot read the token ({e.strerror})") from None
    else:
        token = os.environ.get(TOKEN_ENV, "").strip()
    if not token:
        raise ValueError(f"the matcher's HTTP API needs its token: --token-file FILE or ${TOKEN_ENV}")
    return token


def _detail(err: urllib.error.HTTPError) -> str | None:
    """The API's own error message; None when the body is not one (then the server is not a matcher API)."""
    try:
        detail = json.loads(err.read()).get("detail")
    except (ValueError, AttributeError):
        return None
    if isinstance(detail, list):  # a malformed request: FastAPI lists each field's problem
        return "; ".join(f"{'.'.join(str(p) for p in e.get('loc', [])[1:])}: {e.get('msg')}" for e in detail)
    return None if detail is None else str(detail)


def _checked_url(url: str) -> str:
    """`url` without its trailing slash; `ValueError` saying what to fix when it is no http(s) URL."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        raise ValueError(f"--url needs a scheme: http://{url}")
    if scheme.lower() not in ("http", "https") or not rest:
        raise ValueError(f"--url {url!r}: give an http:// or https:// address, e.g. http://127.0.0.1:8080")
    return url.rstrip("/")


class MatcherClient:
    def __init__(self, url: str, token: str, timeout: float = 60.0):
        self.url, self.token, self.timeout = _checked_url(url), token, timeout

    def _not_ours(self, what: str) -> ConnectionError:
        return ConnectionError(f"{self.url}: that is not a Crossview matcher API (metrics port?): {what}")

    def _call(self, path: str, body: bytes | None = None, content_type: str | None = None) -> dict:
        """POST `body`, or GET without one; the JSON answer."""
        return json.loads(self._request(path, body, content_type, "application/json"))

    def _request(self, path: str, body: bytes | None, content_type: str | None, expect: str, limit: int = -1) -> bytes:
        headers = {"Authorization": f"Bearer {self.token}", **({"Content-Type": content_type} if content_type else {})}
        req = urllib.request.Request(f"{self.url}{API_PREFIX}{path}", data=body, method="GET" if body is None else "POST",
                                     headers=headers)
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as res:
                answer, kind = res.read(limit), res.headers.get_content_type()
        except urllib.error.HTTPError as e:
            raise self._http_error(e) from None
        except urllib.error.URLError as e:
            raise ConnectionError(f"cannot reach the matcher at {self.url}: {e.reason}") from None
        except http.client.HTTPException as e:  # not HTTP at all, e.g. the ZeroMQ port
            raise self._not_ours(f"{type(e).__name__} {e}") from None
        if kind != expect:
            raise self._not_ours(f"it answered {kind}")
        return answer

    def _http_error(self, e: urllib.error.HTTPError) -> Exception:
        detail = _detail(e)
        if detail is None:
            return self._not_ours(f"HTTP {e.code} {e.reason}")
        message = f"{self.url}: {detail}"
        if e.code == 404:
            return LookupError(message)
        if e.code in (401, 403):  # no token, or one whose user may not do this
            return PermissionError(message)
        if e.code in (400, 422):
            return ValueError(message)
        return ConnectionError(f"{self.url}: HTTP {e.code}: {detail}")

    def models(self) -> list[dict]:
        """GET /api/v1/models: every registered version with its state."""
        return self._call("/models")

    def production(self) -> dict | None:
        """GET /api/v1/models/production: the production version's entry, None when there is none yet."""
        try:
            return self._call("/models/production")
        except LookupError:
            return None

    def download_model(self, entry: dict, out: Path) -> Path:
        """The ONNX file of a registry `entry` into `out`, checked against its size and SHA-256 (`ValueError`)."""
        version = urllib.parse.quote(entry["version"], safe="")
        req = urllib.request.Request(f"{self.url}{API_PREFIX}/models/{version}/onnx",
                                     headers={"Authorization": f"Bearer {self.token}"})
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as res:
                copy_verified(res, Path(out), int(entry["bytes"]), entry["sha256"], f"model {entry['version']}")
        except urllib.error.HTTPError as e:
            raise self._http_error(e) from None
        except urllib.error.URLError as e:
            raise ConnectionError(f"cannot reach the matcher at {self.url}: {e.reason}") from None
        return Path(out)

    def register_model(self, path: Path, gate: dict | None = None) -> dict:
        """POST /api/v1/models: upload an ONNX model as a candidate, with its gate report."""
        fields = {"gate": json.dumps(gate)} if gate is not None else {}
        body, content_type = encode_multipart(fields, {"onnx": (Path(path).name, Path(path).read_bytes(),
                                                                "application/octet-stream")})
        return self._call("/models", body, content_type)

    def promote(self, version: str, canary: list[str] = (), hold_s: float = 3600.0) -> dict:
        """POST /api/v1/models/{version}/promote: production now, or first on the `canary` edges."""
        body = json.dumps({"canary": list(canary), "hold_s": hold_s}).encode()
        return self._call(f"/models/{urllib.parse.quote(version, safe='')}/promote", body, "application/json")

    def harvest(self, after: int = 0, since: float | None = None, until: float | None = None, limit: int = 500) -> list[dict]:
        """GET /api/v1/harvest: crops with an id above `after`, captured within [since, until], lowest id first."""
        window = {k: v for k, v in (("since", since), ("until", until)) if v is not None}
        return self._call(f"/harvest?{urllib.parse.urlencode({'after': int(after), 'limit': int(limit), **window})}")

    def download_harvest(self, dest: Path, since: float | None = None, until: float | None = None) -> dict[str, int]:
        """Every harvested crop captured within [since, until] into `dest`, with its sidecar, in the `kernel.harvest`
        layout the trainer's harvest loader reads. Resumable: a crop already in `dest` is skipped (the sidecar is
        written first and the JPEG renamed into place whole, so a crop that is there is complete). Counts of
        downloaded, skipped and gone (deleted by retention or the quota meanwhile) crops, and bytes written."""
        dest, counts, after = Path(dest), {"downloaded": 0, "skipped": 0, "gone": 0, "bytes": 0}, 0
        while page := self.harvest(after, since, until):
            for crop in page:
                after = int(crop["id"])
                path = dest / _crop_path(crop["path"])
                if path.is_file():
                    counts["skipped"] += 1
                    continue
                try:
                    jpeg = self._request(f"/harvest/{after}", None, None, "image/jpeg", MAX_CROP_BYTES)
                except LookupError:
                    counts["gone"] += 1
                    continue
                path.parent.mkdir(parents=True, exist_ok=True)
                _write_whole(path.with_suffix(".json"), json.dumps(crop["sidecar"]).encode())
                _write_whole(path, jpeg)
                counts["downloaded"] += 1
                counts["bytes"] += len(jpeg)
        return counts

    def edges(self) -> dict:
        """GET /api/v1/edges: every edge and camera, online, stalled or offline, since when."""
        return self._call("/edges")

    def watch(self, body: dict) -> dict:
        """POST /api/v1/watchlist: `name`, one of `sighting_id` or `track`, optional threshold and `cameras`."""
        return self._call("/watchlist", json.dumps(body).encode(), "application/json")

    def watch_image(self, image: bytes, filename: str, fields: dict) -> dict:
        """POST /api/v1/watchlist/image with a JPEG or PNG crop; `None` fields are left out."""
        return self._upload("/watchlist/image", image, filename, fields)

    def audit(self, after: int = 0, limit: int = 1000) -> list[dict]:
        """GET /api/v1/audit (admins): entries with an id above `after`, oldest first."""
        return self._call(f"/audit?after={int(after)}&limit={int(limit)}")

    def alerts(self, after: int = 0, limit: int = 100) -> list[dict]:
        """GET /api/v1/alerts: those with an id above `after`, oldest first."""
        return self._call(f"/alerts?after={int(after)}&limit={int(limit)}")

    def query(self, body: dict) -> dict:
        """POST /api/v1/query: `body` holds one of embedding + model, sighting_id or track, plus filters."""
        return self._call("/query", json.dumps(body).encode(), "application/json")

    def query_image(self, image: bytes, filename: str, model: str, filters: dict) -> dict:
        """POST /api/v1/query/image with a JPEG or PNG crop; `None` filters are left out."""
        return self._upload("/query/image", image, filename, {"model": model, **filters})

    def _upload(self, path: str, image: bytes, filename: str, fields: dict) -> dict:
        kind = "image/png" if image.startswith(b"\x89PNG") else "image/jpeg"
        body, content_type = encode_multipart({k: v for k, v in fields.items() if v is not None},
                                              {"image": (filename, image, kind)})
        return self._call(path, body, content_type)


def _crop_path(path: object) -> str:
    """A crop's path from the matcher's answer, checked to stay inside the folder it is written to."""
    if not isinstance(path, str) or not _CROP_PATH.fullmatch(path):
        raise ValueError(f"the matcher's answer names a crop path outside the harvest layout: {path!r:.100}")
    return path


def _write_whole(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _record(d: dict) -> SightingRecord:
    return SightingRecord(d["id"], d["node"], d["camera"], d["ts"], d["frame"], d["track"], d["track_id"], tuple(d["box"]),
                          d["score"], d["model"], d["has_thumbnail"])


def result_from_dict(d: dict) -> QueryResult:
    """The inverse of `QueryResult.to_dict()` (the API answers with its superset)."""
    cameras = {
        cam: [TrackHit(h["node"], h["camera"], h["track"], h["model"], h["score"], h["first_ts"], h["last_ts"],
                       _record(h["best"]), [_record(s) for s in h["sightings"]], h["track_id"], h["n_sightings"],
                       h.get("probability"))
              for h in hits]
        for cam, hits in d["cameras"].items()
    }
    return QueryResult(d["model"], d["query"], cameras, d.get("calibrated", False), d.get("coverage"))
