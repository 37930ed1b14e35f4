"""The matcher's HTTP JSON API and web page (FastAPI), and the server thread that runs them.

| path                                     | what                                                   |
|------------------------------------------|--------------------------------------------------------|
| `GET /`                                  | the web page (`matcher/web/`); no token, it asks for one |
| `GET /api/v1/health`                     | liveness; no token                                     |
| `GET /api/v1/ready`                      | readiness: 503 while the store does not answer; no token |
| `GET /api/v1/stats`, `/cameras`          | matcher totals; cameras with their counts              |
| `GET /api/v1/edges`                      | edges and cameras online, stalled or offline, since when |
| `GET /api/v1/sightings?camera=&limit=`   | newest sightings, for picking one                      |
| `GET /api/v1/sightings/{id}[/thumbnail]` | one sighting; its JPEG thumbnail                       |
| `POST /api/v1/query`                     | by embedding + model, by sighting id or by edge track  |
| `POST /api/v1/query/image`               | by an uploaded JPEG/PNG crop + model (multipart)       |
| `GET/POST /api/v1/watchlist`             | watchlist entries; add one from a sighting or a track  |
| `POST /api/v1/watchlist/image`           | add one from an uploaded crop + model (multipart)      |
| `DELETE /api/v1/watchlist/{id}`          | remove one                                             |
| `GET /api/v1/models`, `/models/production`, `/models/{version}/onnx` | the model registry (`matcher.registry`); also with `http.edge_token_file`'s token |
| `POST /api/v1/models`, `/models/{version}/promote`, `/models/rollback` | register an ONNX upload (multipart, ≤ `http.max_model_bytes`) with its gate report; promote (or canary); roll back |
| `GET /api/v1/alerts?after=&limit=`       | alerts with an id above `after`, oldest first (poll with the last id seen) |
| `POST /api/v1/harvest`                   | harvested crops + sidecars (multipart, `matcher.harvest`), each answered stored, duplicate, expired or refused; also with the edge token |
| `GET /api/v1/harvest?after=&since=&until=&limit=`, `/harvest/{id}` | harvested crops by id (the cursor), a crop's JPEG; the API token only |
| `GET /openapi.json`, `/docs`             | the schema; Swagger UI (its assets come from a CDN)    |

Auth: every `/api/v1` path but health needs `Authorization: Bearer <token>`: the configured token (the user
`admin`), the edges' token (role `edge`: models and harvest upload only) or a user's (`matcher.users`: `viewer`
searches and sees; `admin` also changes the watchlist and the registry, reads the harvest and the audit log;
403 names the role needed). Every search, thumbnail view, watchlist and model change is written to the
audit log (`matcher.audit`, `GET /api/v1/audit`) with its user. Fixed tokens are compared in constant
time; there is no `?token=` form, so the token never lands in URLs, logs or browser history (the page
fetches thumbnails with the header and shows them as blob URLs). Errors are `{"detail": "..."}`:
401 bad token, 404 unknown sighting/track/model (`LookupError`), 400 bad query or image (`ValueError`), 503 the
store unavailable (a database error: a PostgreSQL server restarting, a SQLite disk error),
413 a body over `http.max_json_bytes` / `max_upload_bytes` (`matcher.limits`); a malformed request, an id or
track number out of range included, is a 422 with one entry per field (FastAPI's, without the input it held).

    server = serve(matcher, cfg.http)     # binds cfg.http.host (127.0.0.1 unless configured)
    server.url                            # 'http://127.0.0.1:8080/'
    server.stop()
"""

from __future__ import annotations

import hashlib
import ipaddress
import logging
import secrets
import shutil
import socket
import sqlite3
import tempfile
import threading
import time
from pathlib import Path
from typing import Annotated

import numpy as np
import pydantic
import uvicorn
from fastapi import APIRouter, Depends, FastAPI, File, Form, HTTPException, Query, Request, UploadFile
from fastapi import Path as PathParam
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from fastapi.staticfiles import StaticFiles

from crossview import __version__
from crossview.kernel.config import MAX_UPLOAD_BATCH, HttpConfig, read_secret
from crossview.kernel.harvest import MAX_SIDECAR_BYTES
from crossview.kernel.runtime import listening
from crossview.kernel.wire import MAX_TS
from crossview.matcher.limits import BodyLimit, decode_image
from crossview.matcher.schemas import (
    API_PREFIX,
    MAX_ID,
    AlertOut,
    AuditOut,
    CameraOut,
    EdgesOut,
    ErrorOut,
    HarvestCropOut,
    HarvestUploadOut,
    HealthOut,
    Ident,
    ImageQueryForm,
    ModelForm,
    ModelOut,
    PromoteIn,
    QueryIn,
    QueryOut,
    SightingOut,
    StatsOut,
    WatchEntryOut,
    WatchImageForm,
    WatchIn,
)
from crossview.matcher.service import Matcher
from crossview.matcher.users import User, Users

log = logging.getLogger(__name__)
WEB_DIR = Path(__file__).with_name("web")
# The page loads nothing from elsewhere; thumbnails are blob URLs made from authenticated fetches.
PAGE_CSP = "default-src 'self'; img-src 'self' blob: data:; object-src 'none'; base-uri 'none'; frame-ancestors 'none'"
SightingId = Annotated[int, PathParam(ge=1, le=MAX_ID, description="a sighting's id")]
EntryId = Annotated[int, PathParam(ge=1, le=MAX_ID, description="a watchlist entry's id")]
CropId = Annotated[int, PathParam(ge=1, le=MAX_ID, description="a harvested crop's id")]
Time = Annotated[float | None, Query(ge=0, le=MAX_TS, description="capture time, Unix seconds")]
ModelVersion = Annotated[str, PathParam(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9_.+-]+$")]
_BEARER = HTTPBearer(auto_error=False, description="the token from the matcher's `http.token` or `http.token_file`")
_ERRORS = {401: {"model": ErrorOut, "description": "missing or wrong token"}}
_NOT_FOUND = {404: {"model": ErrorOut, "description": "no such sighting (or it has no thumbnail)"}}
_QUERY_ERRORS = {400: {"model": ErrorOut, "description": "a bad query or image"},
                 404: {"model": ErrorOut, "description": "unknown sighting, track or model"}}


def _auth(token: str, edge_token: str | None, users: Users):
    """`require(*roles)`: a dependency letting a request through only from a user holding one of `roles`.

    The configured token is the user `admin` (role admin), the edges' token the user `edge` (role edge), any
    other token a user of `users.db`; the user is left in `request.state.user` for the audit log.
    """
    fixed = [(token.encode(), User("admin", "admin"))]
    fixed += [(edge_token.encode(), User("edge", "edge"))] if edge_token else []

    def who(given: str) -> User | None:
        raw = given.encode()
        # every fixed token compared, in constant time each, so the timing says nothing about which was near
        hits = [user for tok, user in fixed if secrets.compare_digest(raw, tok)]
        return hits[0] if hits else users.lookup(given)

    def require(*roles: str):
        def check(request: Request, creds: Annotated[HTTPAuthorizationCredentials | None, Depends(_BEARER)]) -> None:
            user = who(creds.credentials if creds is not None else "")
            if user is None:
                raise HTTPException(401, "missing or wrong token: send the header 'Authorization: Bearer <token>'",
                                    headers={"WWW-Authenticate": "Bearer"})
            if not any(user.may(role) for role in roles):
                raise HTTPException(403, f"user {user.name!r} has the {user.role} role; this needs {' or '.join(roles)}")
            request.state.user = user

        return Depends(check)

    return require


def _audit(matcher: Matcher, request: Request, action: str, asked: dict, results: int | None = None) -> None:
    matcher.audit.record(request.state.user.name, action, asked, results)


def _api_router(matcher: Matcher, require, max_pixels: int) -> APIRouter:
    queries, store = matcher.queries, matcher.store
    api = APIRouter(prefix=API_PREFIX, dependencies=[require("viewer")], responses=_ERRORS)

    @api.get("/stats", summary="Matcher totals: sightings, models, ingest and index state")
    def stats() -> StatsOut:
        return StatsOut.model_validate(matcher.stats())

    @api.get("/cameras", summary="Every camera with its sighting and track counts")
    def cameras() -> list[CameraOut]:
        return [CameraOut.model_validate(c) for c in store.cameras()]

    @api.get("/edges", summary="Every edge and camera as its last heartbeat left it: online, stalled or offline")
    def edges() -> EdgesOut:
        return EdgesOut.model_validate(matcher.edges.report())

    @api.get("/sightings", summary="Newest sightings first, of one camera or all")
    def recent(camera: Annotated[Ident | None, Query()] = None,
               limit: Annotated[int, Query(ge=1, le=1000)] = 50) -> list[SightingOut]:
        return [SightingOut.model_validate(r) for r in store.recent(camera=camera, limit=limit)]

    @api.get("/sightings/{sighting_id}", summary="One sighting", responses=_NOT_FOUND)
    def sighting(sighting_id: SightingId) -> SightingOut:
        record = store.record(sighting_id)
        if record is None:
            raise LookupError(f"no sighting {sighting_id}")
        return SightingOut.model_validate(record)

    @api.get("/sightings/{sighting_id}/thumbnail", summary="A sighting's JPEG thumbnail", response_class=Response,
             responses={**_NOT_FOUND, 200: {"content": {"image/jpeg": {}}, "description": "the JPEG"}})
    def thumbnail(sighting_id: SightingId, request: Request) -> Response:
        jpeg = store.thumbnail(sighting_id)
        _audit(matcher, request, "thumbnail", {"sighting_id": sighting_id}, int(jpeg is not None))
        if jpeg is None:
            raise LookupError(f"sighting {sighting_id} does not exist or has no thumbnail")
        # Personal data: no copy in the browser's disk cache outlives retention (the page keeps its own in memory).
        return Response(jpeg, media_type="image/jpeg", headers={"Cache-Control": "no-store"})

    @api.post("/query", summary="Where else was this person seen", responses=_QUERY_ERRORS)
    def query(body: QueryIn, request: Request) -> QueryOut:
        filters = body.filters()
        asked = body.model_dump(exclude={"embedding"}, exclude_none=True)
        if body.sighting_id is not None:
            result = _searched(lambda: queries.search_sighting(body.sighting_id, filters), request, asked)
        elif body.track is not None:
            t = body.track
            result = _searched(lambda: queries.search_track(t.node, t.camera, t.track, t.model, filters), request, asked)
        else:
            asked["embedding"] = f"{len(body.embedding)} numbers"  # the vector itself says nothing to a reader
            vec = np.asarray(body.embedding, np.float32)
            result = _searched(lambda: queries.search_embedding(vec, body.model, filters), request, asked)
        return QueryOut.model_validate(result)

    def _searched(search, request: Request, asked: dict):
        """Run a search and log it, with its result count, or with the error that refused it."""
        try:
            result = search()
        except (LookupError, ValueError) as e:
            _audit(matcher, request, "search", {**asked, "refused": str(e)[:200]}, 0)
            raise
        _audit(matcher, request, "search", asked, len(result.ranked()))
        return result

    @api.post("/query/image", summary="Where was the person in this crop seen", responses=_QUERY_ERRORS)
    def query_image(image: Annotated[UploadFile, File(description="a JPEG or PNG person crop")],
                    form: Annotated[ImageQueryForm, Form()], request: Request) -> QueryOut:
        data = image.file.read()  # BodyLimit bounds its size
        asked = {"image": _upload_ref(image, data), **form.model_dump(exclude_none=True)}
        pixels = decode_image(data, image.filename or "image", max_pixels)
        return QueryOut.model_validate(_searched(lambda: queries.search_image(pixels, form.model, form.filters()),
                                                 request, asked))

    _watch_routes(api, matcher, require, max_pixels)
    _harvest_routes(api, matcher, require)
    _model_admin_routes(api, matcher, require)
    _audit_routes(api, matcher, require)
    return api


def _upload_ref(upload: UploadFile, data: bytes) -> dict:
    """An uploaded image as the audit log keeps it: by name, size and digest, never its pixels."""
    return {"name": (upload.filename or "image")[:128], "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def _watch_routes(api: APIRouter, matcher: Matcher, require, max_pixels: int) -> None:
    queries, watchlist = matcher.queries, matcher.watchlist

    @api.get("/watchlist", summary="Everyone on the watchlist")
    def entries() -> list[WatchEntryOut]:
        return [WatchEntryOut.model_validate(e.to_dict()) for e in watchlist.entries()]

    admin = [require("admin")]

    @api.post("/watchlist", summary="Put the person of a sighting or track on the watchlist (admins)",
              responses=_QUERY_ERRORS, dependencies=admin)
    def watch(body: WatchIn, request: Request) -> WatchEntryOut:
        if body.sighting_id is not None:
            subject = queries.sighting_subject(body.sighting_id)
        else:
            t = body.track
            subject = queries.track_subject(t.node, t.camera, t.track, t.model)
        return _added(matcher, request, watchlist.add(body.name, subject, body.min_probability, body.min_similarity,
                                                      body.cameras), body.model_dump(exclude_none=True))

    @api.post("/watchlist/image", summary="Put the person in this crop on the watchlist (admins)",
              responses=_QUERY_ERRORS, dependencies=admin)
    def watch_image(image: Annotated[UploadFile, File(description="a JPEG or PNG person crop")],
                    form: Annotated[WatchImageForm, Form()], request: Request) -> WatchEntryOut:
        data = image.file.read()
        pixels = decode_image(data, image.filename or "image", max_pixels)
        subject = queries.image_subject(pixels, form.model)
        subject = subject._replace(query={**subject.query, "filename": (image.filename or "image")[:128]})
        return _added(matcher, request, watchlist.add(form.name, subject, form.min_probability, form.min_similarity,
                                                      form.cameras),
                      {"image": _upload_ref(image, data), **form.model_dump(exclude_none=True)})

    @api.delete("/watchlist/{entry_id}", summary="Take someone off the watchlist (their alerts stay; admins)",
                responses={404: {"model": ErrorOut, "description": "no such entry"}}, dependencies=admin)
    def unwatch(entry_id: EntryId, request: Request) -> dict:
        removed = watchlist.remove(entry_id)
        _audit(matcher, request, "watchlist.remove", {"entry_id": entry_id}, int(bool(removed)))
        if not removed:
            raise LookupError(f"no watchlist entry {entry_id}")
        return {"removed": entry_id}

    @api.get("/alerts", summary="Alerts with an id above `after`, oldest first")
    def alerts(after: Annotated[int, Query(ge=0, le=MAX_ID)] = 0,
               limit: Annotated[int, Query(ge=1, le=1000)] = 100) -> list[AlertOut]:
        return [AlertOut.model_validate(a.to_dict()) for a in watchlist.alerts(after, limit)]


def _model_admin_routes(api: APIRouter, matcher: Matcher, require) -> None:
    """Registering and promoting models: the adapt job's and the operator's (admins)."""
    registry, admin = matcher.registry, [require("admin")]

    @api.post("/models", summary="Register an ONNX model as a candidate, with its gate report", responses=_QUERY_ERRORS,
              dependencies=admin)
    def register(onnx: Annotated[UploadFile, File(description="the model; checked as an edge would load it")],
                 form: Annotated[ModelForm, Form()], request: Request) -> ModelOut:
        # BodyLimit bounds the upload by http.max_model_bytes; the registry copies it in only once it loads.
        with tempfile.NamedTemporaryFile(dir=registry.dir, prefix=".upload-", suffix=".onnx") as tmp:
            shutil.copyfileobj(onnx.file, tmp)
            tmp.flush()
            try:
                entry = registry.register(Path(tmp.name), form.gate)
            except ValueError as e:  # name the upload, not the matcher's own folders
                raise ValueError(str(e).replace(tmp.name, repr((onnx.filename or "upload")[:128]))) from None
        _audit(matcher, request, "model.register", {"version": entry.version, "sha256": entry.sha256,
                                                    "passed": (form.gate or {}).get("passed")}, 1)
        return ModelOut.model_validate(entry.to_dict())

    @api.post("/models/{version}/promote", summary="Make a version production, or start its canary",
              responses=_QUERY_ERRORS, dependencies=admin)
    def promote(version: ModelVersion, body: PromoteIn, request: Request) -> ModelOut:
        entry = registry.start_canary(version, body.canary, body.hold_s) if body.canary else registry.promote(version)
        _audit(matcher, request, "model.promote", {"version": version, **body.model_dump()}, 1)
        return ModelOut.model_validate(entry.to_dict())

    @api.post("/models/rollback", summary="Stop a canary, else make the production version before this one production",
              responses=_QUERY_ERRORS, dependencies=admin)
    def rollback(request: Request) -> ModelOut:
        entry = registry.rollback()
        _audit(matcher, request, "model.rollback", {"version": entry.version}, 1)
        return ModelOut.model_validate(entry.to_dict())


def _audit_routes(api: APIRouter, matcher: Matcher, require) -> None:
    @api.get("/audit", summary="The audit log: who searched, viewed or changed what; id above `after`, oldest first "
             "(admins)", dependencies=[require("admin")])
    def audit(request: Request, after: Annotated[int, Query(ge=0, le=MAX_ID)] = 0,
              limit: Annotated[int, Query(ge=1, le=1000)] = 100) -> list[AuditOut]:
        entries = matcher.audit.entries(after, limit)
        _audit(matcher, request, "audit.read", {"after": after, "limit": limit}, len(entries))
        return [AuditOut.model_validate(e) for e in entries]


def _harvest_routes(api: APIRouter, matcher: Matcher, require) -> None:
    """Reading the harvest store (the adapt job's): images of people, so admins only, never the edges."""
    harvest, admin = matcher.harvest, [require("admin")]

    @api.get("/harvest", summary="Harvested crops with an id above `after`, captured within [since, until], lowest id first",
             dependencies=admin)
    def crops(request: Request, after: Annotated[int, Query(ge=0, le=MAX_ID)] = 0, since: Time = None,
              until: Time = None, limit: Annotated[int, Query(ge=1, le=1000)] = 100) -> list[HarvestCropOut]:
        found = harvest.list(after, since, until, limit)
        _audit(matcher, request, "harvest.read", {"after": after, "since": since, "until": until}, len(found))
        return [HarvestCropOut.model_validate(c.to_dict()) for c in found]

    @api.get("/harvest/{crop_id}", summary="A harvested crop's JPEG", response_class=Response, dependencies=admin,
             responses={404: {"model": ErrorOut, "description": "no such crop (or retention or the quota deleted it)"},
                        200: {"content": {"image/jpeg": {}}, "description": "the JPEG"}})
    def crop(crop_id: CropId) -> Response:
        jpeg = harvest.jpeg(crop_id)
        if jpeg is None:
            raise LookupError(f"no harvested crop {crop_id} (or retention or the quota deleted it)")
        return Response(jpeg, media_type="image/jpeg", headers={"Cache-Control": "no-store"})


def _harvest_upload_router(matcher: Matcher, require) -> APIRouter:
    """Uploading harvested crops: the edges' and admins'."""
    api = APIRouter(prefix=API_PREFIX, dependencies=[require("edge", "admin")], responses=_ERRORS)

    @api.post("/harvest", summary="Store harvested crops: `crops` (JPEGs) and `sidecars` (their JSON), pairwise in order",
              responses={400: {"model": ErrorOut, "description": "not one sidecar per crop, or too many crops"}})
    def upload(crops: Annotated[list[UploadFile], File(description=f"JPEG crops, at most {MAX_UPLOAD_BATCH}")],
               sidecars: Annotated[list[UploadFile], File(description="each crop's sidecar (kernel.harvest)")]
               ) -> HarvestUploadOut:
        if len(crops) != len(sidecars) or len(crops) > MAX_UPLOAD_BATCH:
            raise ValueError(f"{len(crops)} crops and {len(sidecars)} sidecars: send one sidecar per crop, in the same "
                             f"order, at most {MAX_UPLOAD_BATCH} crops at a time")
        items = [(s.file.read(MAX_SIDECAR_BYTES + 1), c.file.read(), c.filename or f"crop {i}")
                 for i, (c, s) in enumerate(zip(crops, sidecars))]  # BodyLimit bounds what all of them hold
        return HarvestUploadOut(results=[a.to_dict() for a in matcher.harvest.receive(items)])

    return api


def _model_router(matcher: Matcher, require) -> APIRouter:
    """The model registry, readable by every user and the edges."""
    registry = matcher.registry
    api = APIRouter(prefix=API_PREFIX, dependencies=[require("viewer", "edge")], responses=_ERRORS)

    @api.get("/models", summary="Every registered model version, oldest first, with its state and gate report")
    def models() -> list[ModelOut]:
        return [ModelOut.model_validate(m.to_dict()) for m in registry.list()]

    @api.get("/models/production", summary="The version an edge should run: production, or the canary on a canary edge",
             responses={404: {"model": ErrorOut, "description": "no version is production yet"}})
    def production(node: Annotated[str | None, Query(max_length=64, description="the asking edge: a canary edge gets "
                                                                          "the version on trial")] = None) -> ModelOut:
        entry = registry.production_for(node)
        if entry is None:
            raise LookupError("no model version is production yet (crossview models promote VERSION)")
        return ModelOut.model_validate(entry.to_dict())

    @api.get("/models/{version}/onnx", summary="A registered model's ONNX file", response_class=FileResponse,
             responses={404: {"model": ErrorOut, "description": "no such version"}})
    def onnx_file(version: ModelVersion) -> FileResponse:
        entry = registry.get(version)
        if entry is None:
            raise LookupError(f"model version {version!r} is not in the registry")
        return FileResponse(registry.file_of(version), media_type="application/octet-stream",
                            headers={"X-Crossview-SHA256": entry.sha256})

    return api


def _added(matcher: Matcher, request: Request, entry, asked: dict) -> WatchEntryOut:
    _audit(matcher, request, "watchlist.add", {**asked, "entry_id": entry.id}, 1)
    return WatchEntryOut.model_validate(entry.to_dict())


def _error(status: int):
    def handler(_: Request, exc: Exception) -> JSONResponse:
        detail = exc.args[0] if len(exc.args) == 1 and isinstance(exc.args[0], str) else str(exc)
        return JSONResponse({"detail": detail}, status_code=status)

    return handler


def _invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
    # FastAPI's own 422 echoes each field's input, and NaN or a lone surrogate there cannot be serialised: the answer
    # became a 400 naming no field. The client has its input; a field name (a JSON key) may hold a surrogate too.
    def text(part):
        return part if isinstance(part, int) else str(part).encode("utf-8", "backslashreplace").decode()

    return JSONResponse({"detail": [{"type": e["type"], "loc": [text(p) for p in e["loc"]], "msg": text(e["msg"])}
                                    for e in exc.errors()]}, status_code=422)


def _schema_bug(_: Request, exc: Exception) -> JSONResponse:
    # pydantic's ValidationError is a ValueError, but here it means our answer broke our schema: not a 400.
    log.error("HTTP API answer does not fit its schema: %s", exc)
    return JSONResponse({"detail": "internal error: the answer did not fit the API schema (see the matcher's log)"},
                        status_code=500)


def _store_down(_: Request, exc: Exception) -> JSONResponse:
    log.error("HTTP API: the store failed: %s", exc)  # the reason stays in the log: it may name the server
    return JSONResponse({"detail": "the store is unavailable (see the matcher's log): try again shortly"},
                        status_code=503)


def create_app(matcher: Matcher, cfg: HttpConfig) -> FastAPI:
    """The API and page over `matcher`; every `/api/v1` path but health needs the token (`load_token(cfg)`)."""
    token = load_token(cfg)
    app = FastAPI(title="Crossview matcher", version=__version__,
                  description="Where else was this person seen: sightings from the edge nodes, searched by appearance.")
    app.add_middleware(BodyLimit, max_json=cfg.max_json_bytes, max_upload=cfg.max_upload_bytes,
                       max_model=cfg.max_model_bytes, model_path=f"{API_PREFIX}/models")
    app.add_exception_handler(RequestValidationError, _invalid)
    app.add_exception_handler(LookupError, _error(404))
    app.add_exception_handler(ValueError, _error(400))
    app.add_exception_handler(pydantic.ValidationError, _schema_bug)
    for error in {sqlite3.Error, matcher.store.Error, ConnectionError}:  # a database away, SQLite's or PostgreSQL's
        app.add_exception_handler(error, _store_down)

    @app.get(f"{API_PREFIX}/health", summary="Liveness; needs no token")
    def health() -> HealthOut:
        return HealthOut()

    @app.get(f"{API_PREFIX}/ready", summary="Readiness: the store answers (503 while it does not); needs no token",
             responses={503: {"model": ErrorOut, "description": "the store is unavailable"}})
    def ready() -> HealthOut:
        matcher.store.next_id()  # a store error answers 503 (`_store_down`)
        return HealthOut()

    edge_token = read_secret(cfg.edge_token_file, "http.edge_token_file", "token") if cfg.edge_token_file else None
    require = _auth(token, edge_token, matcher.users)
    app.include_router(_api_router(matcher, require, cfg.max_image_pixels))
    app.include_router(_model_router(matcher, require))
    app.include_router(_harvest_upload_router(matcher, require))
    app.mount("/static", StaticFiles(directory=WEB_DIR), name="static")

    @app.get("/", include_in_schema=False)
    def page() -> FileResponse:
        return FileResponse(WEB_DIR / "index.html", headers={
            "Content-Security-Policy": PAGE_CSP, "X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer"})

    return app


def load_token(cfg: HttpConfig) -> str:
    """The bearer token from `http.token` or `http.token_file`; `ValueError` if it is missing or too short."""
    if cfg.token is not None:
        return cfg.token
    if cfg.token_file is None:
        raise ValueError("http: set token or token_file; the HTTP API does not run without a token")
    return read_secret(cfg.token_file, "http.token_file", "token")


class ApiServer:
    """uvicorn serving `app` from a background thread, on a socket bound before the thread starts
    (so a busy port fails here, and port 0 is known at once)."""

    def __init__(self, app: FastAPI, host: str, port: int):
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
        # IPPROTO_TCP named: asyncio sets TCP_NODELAY only on sockets whose proto says TCP. Without it (proto 0)
        # every keep-alive response after the first waited ~40 ms: Nagle holding its body for the delayed ACK.
        self._sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            with listening("http.port", f"{host}:{port}"):
                self._sock.bind((host, port))
        except OSError:
            self._sock.close()
            raise
        self.host, self.port = host, self._sock.getsockname()[1]
        config = uvicorn.Config(app, log_config=None, log_level="warning", access_log=False, timeout_graceful_shutdown=5)
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, kwargs={"sockets": [self._sock]}, name="http-api",
                                        daemon=True)

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/"

    def start(self, timeout: float = 10.0) -> "ApiServer":
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self._server.started:
            if not self._thread.is_alive():
                raise RuntimeError(f"HTTP API on {self.url} stopped while starting; see the log above")
            if time.monotonic() > deadline:
                raise TimeoutError(f"HTTP API on {self.url} did not start within {timeout:.0f} s")
            time.sleep(0.02)
        return self

    def stop(self) -> None:
        self._server.should_exit = True
        self._thread.join(timeout=10)
        self._sock.close()


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def serve(matcher: Matcher, cfg: HttpConfig) -> ApiServer:
    """Start the API and page on `cfg.host:cfg.port` in a background thread; `.stop()` shuts it down."""
    server = ApiServer(create_app(matcher, cfg), cfg.host, cfg.port).start()
    log.info("HTTP API and web page on %s (bearer token required)", server.url)
    if not _is_loopback(cfg.host):
        log.warning("HTTP API listens on %s, reachable from the network in plain HTTP: put TLS in front of it", cfg.host)
    return server
