"""The matcher's HTTP API over a real socket: a real `Matcher` fed real TUD-Campus sightings through
ZeroMQ (`live_matcher.py`), uvicorn on 127.0.0.1, plain `urllib` as the client.

Checks what a client relies on: the token gate, answers that find people on the other camera with
thumbnails that load, image uploads (and the 400 a broken one gets), errors that say what is wrong,
the OpenAPI schema, localhost binding, and `crossview query --url`. On both deployments (`served_matcher`:
the session's SQLite + FAISS matcher, then one on PostgreSQL + Milvus).
"""

from __future__ import annotations

import json
import subprocess
import sys
import urllib.error
import urllib.request

import cv2
import numpy as np
import pytest
from live_matcher import TOKEN, person_crop

from crossview.cli import main
from crossview.kernel.config import HttpConfig, MatcherConfig, parse_config
from crossview.matcher.api import serve
from crossview.matcher.client import encode_multipart

PROTECTED = [
    ("GET", "/api/v1/stats"), ("GET", "/api/v1/cameras"), ("GET", "/api/v1/sightings"), ("GET", "/api/v1/sightings/1"),
    ("GET", "/api/v1/sightings/1/thumbnail"), ("POST", "/api/v1/query"), ("POST", "/api/v1/query/image"),
    ("GET", "/api/v1/edges"), ("GET", "/api/v1/watchlist"), ("POST", "/api/v1/watchlist"), ("POST", "/api/v1/watchlist/image"),
    ("DELETE", "/api/v1/watchlist/1"), ("GET", "/api/v1/alerts"), ("GET", "/api/v1/models"),
    ("GET", "/api/v1/models/production"), ("GET", "/api/v1/models/m1/onnx"),
]


def call(live, method: str, path: str, body: bytes | dict | None = None, headers: dict | None = None,
         content_type: str = "application/json") -> tuple[int, dict, bytes]:
    """(status, headers, body) of one request; the bearer token is sent unless `headers` says otherwise."""
    data = json.dumps(body).encode() if isinstance(body, dict) else body
    hdrs = {**(live.auth if headers is None else headers), **({"Content-Type": content_type} if data else {})}
    req = urllib.request.Request(live.url + path, data=data, method=method, headers=hdrs)
    try:
        with urllib.request.urlopen(req, timeout=30) as res:
            return res.status, dict(res.headers), res.read()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read()


def ok_json(live, method: str, path: str, body: dict | None = None):
    status, _, raw = call(live, method, path, body)
    assert status == 200, raw
    return json.loads(raw)


def detail(raw: bytes) -> str:
    return json.loads(raw)["detail"]


def upload(live, data: bytes, filename: str = "crop.jpg", model: str | None = None, **filters) -> tuple[int, bytes]:
    body, content_type = encode_multipart({"model": model or live.model, **filters}, {"image": (filename, data, "image/jpeg")})
    status, _, raw = call(live, "POST", "/api/v1/query/image", body, content_type=content_type)
    return status, raw


def sent(live, record: dict):
    """The sighting that was pushed over ZeroMQ for a stored record."""
    return next(s for s in live.sightings if (s.camera, s.frame, s.track) == (record["camera"], record["frame"], record["track"]))


def hits(result: dict) -> list[tuple[str, dict]]:
    return [(camera, hit) for camera, hs in result["cameras"].items() for hit in hs]


# ---- auth, binding, page shell ------------------------------------------------------------------


@pytest.mark.parametrize("method,path", PROTECTED)
def test_every_api_path_needs_the_token(served_matcher, method, path):
    for headers in ({}, {"Authorization": "Bearer wrong-token-0123456789"}, {"Authorization": f"Basic {TOKEN}"}):
        status, hdrs, raw = call(served_matcher, method, path, {} if method == "POST" else None, headers=headers)
        assert status == 401, (headers, raw)
        assert "token" in detail(raw) and hdrs["www-authenticate"] == "Bearer"
    # No token in the query string: it would end up in logs and browser history.
    status, _, _ = call(served_matcher, method, f"{path}?token={TOKEN}", {} if method == "POST" else None, headers={})
    assert status == 401


def test_health_page_and_schema_need_no_token(served_matcher):
    for probe in ("/api/v1/health", "/api/v1/ready"):
        status, _, raw = call(served_matcher, "GET", probe, headers={})
        assert (status, json.loads(raw)) == (200, {"status": "ok"})
    status, hdrs, raw = call(served_matcher, "GET", "/", headers={})
    assert status == 200 and hdrs["content-type"].startswith("text/html") and b"/static/app.js" in raw
    assert "default-src 'self'" in hdrs["content-security-policy"]  # the page may load nothing from elsewhere
    for asset in ("/static/app.js", "/static/style.css"):
        assert call(served_matcher, "GET", asset, headers={})[0] == 200


def test_binds_localhost_by_default_and_refuses_to_start_without_a_token(served_matcher, tmp_path):
    assert HttpConfig(token=TOKEN).host == "127.0.0.1"
    assert served_matcher.server.host == "127.0.0.1"
    with pytest.raises(ValueError, match="exactly one of token and token_file"):
        parse_config({"ingest": {"security": {"mode": "plain"}}, "http": {}}, MatcherConfig)
    missing, short = tmp_path / "missing-token", tmp_path / "short-token"
    short.write_text("abc\n")
    for token_file, why in ((missing, "cannot read the token"), (short, "at least 16 characters")):
        with pytest.raises(ValueError, match=why) as err:
            serve(served_matcher.matcher, HttpConfig(token_file=token_file, port=0))
        assert str(token_file) in str(err.value)


def test_busy_port_is_a_clear_error(served_matcher):
    with pytest.raises(OSError, match=f"http.port: 127.0.0.1:{served_matcher.server.port} is already in use"):
        serve(served_matcher.matcher, HttpConfig(token=TOKEN, port=served_matcher.server.port))


# ---- browsing -----------------------------------------------------------------------------------


def test_cameras_stats_and_recent_sightings(served_matcher):
    cameras = {c["camera"]: c for c in ok_json(served_matcher, "GET", "/api/v1/cameras")}
    n_gate = sum(s.camera == "gate" for s in served_matcher.sightings)
    assert set(cameras) == {"gate", "hall"} and cameras["gate"]["sightings"] == n_gate
    assert cameras["gate"]["node"] == "edge-1" and cameras["gate"]["last_ts"] < cameras["hall"]["first_ts"]

    stats = ok_json(served_matcher, "GET", "/api/v1/stats")
    assert stats["accepted"] == len(served_matcher.sightings)
    assert stats["partitions"][served_matcher.model]["dim"] == served_matcher.embedder.dim

    recent = ok_json(served_matcher, "GET", "/api/v1/sightings?camera=hall&limit=5")
    assert len(recent) == 5 and {r["camera"] for r in recent} == {"hall"}
    assert [r["ts"] for r in recent] == sorted((r["ts"] for r in recent), reverse=True)
    one = ok_json(served_matcher, "GET", f"/api/v1/sightings/{recent[0]['id']}")
    assert one == recent[0] and one["thumbnail_url"] == f"/api/v1/sightings/{one['id']}/thumbnail"
    assert one["score"] == pytest.approx(sent(served_matcher, one).score) and "det_score" not in one  # named as on the wire
    assert call(served_matcher, "GET", "/api/v1/sightings?limit=0")[0] == 422


def test_unknown_sighting_is_404_naming_it(served_matcher):
    for path in ("/api/v1/sightings/999999", "/api/v1/sightings/999999/thumbnail"):
        status, _, raw = call(served_matcher, "GET", path)
        assert status == 404 and "999999" in detail(raw)
    status, _, raw = call(served_matcher, "POST", "/api/v1/query", {"sighting_id": 999999})
    assert status == 404 and "sighting 999999 not found" in detail(raw)


# ---- queries ------------------------------------------------------------------------------------


def test_query_by_sighting_finds_the_person_on_the_other_camera(served_matcher):
    # Person 3 walks through gate (frames 1-30) and hall (36-63).
    subject = next(r for r in ok_json(served_matcher, "GET", "/api/v1/sightings?camera=gate&limit=100") if r["track"] == 3)
    result = ok_json(served_matcher, "POST", "/api/v1/query", {"sighting_id": subject["id"], "top_k": 20})
    assert result["query"]["by"] == "sighting" and result["model"] == served_matcher.model

    found = hits(result)
    assert {camera for camera, _ in found} == {"gate", "hall"}
    assert ("gate", 3) not in {(c, h["track"]) for c, h in found}, "the query's own track is left out"
    hall = result["cameras"]["hall"]
    assert 3 in {h["track"] for h in hall}
    assert [h["first_ts"] for h in hall] == sorted(h["first_ts"] for h in hall)
    for _, hit in found:
        assert hit["best"]["id"] in {s["id"] for s in hit["sightings"]}
        assert [s["ts"] for s in hit["sightings"]] == sorted(s["ts"] for s in hit["sightings"])

    # Every thumbnail the page would show loads, and is exactly what the edge sent.
    for _, hit in found:
        for s in hit["sightings"]:
            status, hdrs, jpeg = call(served_matcher, "GET", s["thumbnail_url"])
            assert status == 200 and hdrs["content-type"] == "image/jpeg"
            assert jpeg == sent(served_matcher, s).thumbnail
            assert cv2.imdecode(np.frombuffer(jpeg, np.uint8), cv2.IMREAD_COLOR) is not None


def test_query_by_track_and_by_embedding_with_filters(served_matcher):
    by_track = ok_json(served_matcher, "POST", "/api/v1/query", {"track": {"node": "edge-2", "camera": "hall", "track": 3},
                                                               "cameras": ["gate"], "top_k": 2})
    assert by_track["query"]["by"] == "track" and list(by_track["cameras"]) == ["gate"]
    assert len(hits(by_track)) == 2

    vec = next(s for s in served_matcher.sightings if s.camera == "hall" and s.track == 5).embedding
    since = min(s.ts for s in served_matcher.sightings if s.camera == "hall")
    body = {"embedding": vec.tolist(), "model": served_matcher.model, "since": since, "top_k": 50}
    by_vec = ok_json(served_matcher, "POST", "/api/v1/query", body)
    assert list(by_vec["cameras"]) == ["hall"], "since keeps gate out: it was earlier"
    best = max((h for _, h in hits(by_vec)), key=lambda h: h["score"])
    assert best["track"] == 5 and best["score"] == pytest.approx(1.0, abs=1e-4)  # its own vector

    none = ok_json(served_matcher, "POST", "/api/v1/query", {**body, "min_score": 0.9999, "cameras": ["gate"]})
    assert none["cameras"] == {}


@pytest.mark.parametrize("body,status,message", [
    ({"sighting_id": 1, "track": {"node": "edge-1", "camera": "gate", "track": 1}}, 422, "exactly one of"),
    ({}, 422, "exactly one of"),
    ({"embedding": [0.1, 0.2]}, 422, "needs the model version"),
    ({"embedding": [0.1, 0.2], "model": "mobilenetv2-imagenet-1"}, 400, "has 2 dimensions"),
    ({"embedding": [0.1, 0.2], "model": "no-such-model"}, 404, "no-such-model"),
    ({"sighting_id": 1, "since": 20, "until": 10}, 400, "since (20.0) is after until (10.0)"),
    ({"sighting_id": 1, "cameras": []}, 422, '"loc":["body","cameras"],"msg":"List should have at least 1 item'),
    ({"sighting_id": 1, "top_k": 0}, 422, "greater than or equal to 1"),
    ({"track": {"node": "edge-9", "camera": "gate", "track": 1}}, 404, "no track edge-9:gate:1"),
])
def test_bad_queries_say_what_is_wrong(served_matcher, body, status, message):
    got, _, raw = call(served_matcher, "POST", "/api/v1/query", body)
    assert got == status, raw
    assert message in raw.decode()


def test_query_by_uploaded_crop(served_matcher, tud_frames):
    # Frame 33 was never sent: the crop is new to the matcher, like a photo someone hands in.
    crop = person_crop(tud_frames, 33, 3)
    for ext in (".jpg", ".png"):
        status, raw = upload(served_matcher, cv2.imencode(ext, crop)[1].tobytes(), f"person{ext}", top_k=5, cameras=["gate", "hall"])
        assert status == 200, raw
        result = json.loads(raw)
        assert result["query"]["by"] == "image" and result["query"]["width"] == crop.shape[1]
        assert {c for c, _ in hits(result)} == {"gate", "hall"} and len(hits(result)) == 5

    status, raw = upload(served_matcher, cv2.imencode(".jpg", crop)[1].tobytes(), cameras=["hall"], top_k=3)
    assert status == 200 and list(json.loads(raw)["cameras"]) == ["hall"]


def test_broken_uploads_get_400_naming_the_problem(served_matcher, tud_frames):
    jpeg = cv2.imencode(".jpg", tud_frames[0][100:300, 100:200])[1].tobytes()
    cases = [
        (b"", "is empty"),
        (b"name,camera\nalice,gate\n", "not a JPEG or PNG image"),
        (jpeg[: len(jpeg) // 2], "truncated or corrupt JPEG"),
        (b"\xff\xd8\xff\xe0" + bytes(200) + b"\xff\xd9", "corrupt JPEG: it has no frame header"),
        (b"\x89PNG\r\n\x1a\n" + bytes(100), "corrupt PNG"),
    ]
    for data, message in cases:
        status, raw = upload(served_matcher, data, "evidence.jpg")
        assert status == 400, (message, raw)
        assert message in detail(raw) and "evidence.jpg" in detail(raw)
    status, raw = upload(served_matcher, jpeg, model="no-such-model")
    assert status == 400 and "no embedding model loaded for version 'no-such-model'" in detail(raw)
    status, raw = upload(served_matcher, jpeg, top_k=0)
    assert status == 422 and "top_k" in raw.decode()


# ---- schema and CLI -----------------------------------------------------------------------------


def test_openapi_schema_is_valid_and_lists_the_endpoints(served_matcher):
    from openapi_spec_validator import validate

    status, _, raw = call(served_matcher, "GET", "/openapi.json", headers={})
    assert status == 200
    spec = json.loads(raw)
    validate(spec)
    ops = {(path, method.upper()) for path, item in spec["paths"].items() for method in item}
    assert ops == {("/api/v1/health", "GET"), ("/api/v1/ready", "GET"), ("/api/v1/stats", "GET"), ("/api/v1/cameras", "GET"),
                   ("/api/v1/sightings", "GET"), ("/api/v1/sightings/{sighting_id}", "GET"),
                   ("/api/v1/sightings/{sighting_id}/thumbnail", "GET"), ("/api/v1/query", "POST"),
                   ("/api/v1/query/image", "POST"), ("/api/v1/edges", "GET"), ("/api/v1/watchlist", "GET"),
                   ("/api/v1/watchlist", "POST"), ("/api/v1/watchlist/image", "POST"),
                   ("/api/v1/watchlist/{entry_id}", "DELETE"), ("/api/v1/alerts", "GET"), ("/api/v1/models", "GET"),
                   ("/api/v1/models/production", "GET"), ("/api/v1/models/{version}/onnx", "GET"),
                   ("/api/v1/models", "POST"), ("/api/v1/models/{version}/promote", "POST"), ("/api/v1/models/rollback", "POST"),
                   ("/api/v1/harvest", "POST"), ("/api/v1/harvest", "GET"), ("/api/v1/harvest/{crop_id}", "GET"),
                   ("/api/v1/audit", "GET")}
    assert spec["components"]["securitySchemes"]["HTTPBearer"] == {
        "type": "http", "scheme": "bearer", "description": "the token from the matcher's `http.token` or `http.token_file`"}
    for path, method in ops:
        op = spec["paths"][path][method.lower()]
        assert ("security" in op) == (path not in ("/api/v1/health", "/api/v1/ready")), path
    thumb = spec["paths"]["/api/v1/sightings/{sighting_id}/thumbnail"]["get"]["responses"]
    assert "image/jpeg" in thumb["200"]["content"] and {"401", "404"} <= set(thumb)
    upload = spec["paths"]["/api/v1/query/image"]["post"]["requestBody"]["content"]["multipart/form-data"]["schema"]
    body = spec["components"]["schemas"][upload["$ref"].split("/")[-1]]
    assert "image" in body["properties"] and body["allOf"][0]["$ref"].endswith("/ImageQueryForm")
    assert {"model", "cameras", "top_k"} <= set(spec["components"]["schemas"]["ImageQueryForm"]["properties"])
    query = spec["components"]["schemas"]["QueryIn"]["properties"]
    assert {"embedding", "model", "sighting_id", "track", "since", "until", "cameras", "min_score", "top_k"} <= set(query)
    hit = spec["components"]["schemas"]["TrackHitOut"]["properties"]
    assert {"score", "first_ts", "last_ts", "best", "sightings"} <= set(hit)
    assert call(served_matcher, "GET", "/docs", headers={})[0] == 200


def test_the_client_needs_neither_faiss_nor_numpy():
    code = "import sys, crossview.matcher.client; print(sorted({'faiss', 'numpy'} & sys.modules.keys()))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and out.stdout.strip() == "[]", out.stderr


def test_cli_query_over_http(served_matcher, tud_frames, tmp_path, capsys, caplog):
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    subject = next(s for s in ok_json(served_matcher, "GET", "/api/v1/sightings?camera=hall&limit=100") if s["track"] == 4)
    base = ["query", "--url", served_matcher.url, "--token-file", str(token_file)]

    assert main([*base, "--sighting", str(subject["id"]), "--camera", "gate", "--top-k", "3"]) == 0
    table = capsys.readouterr().out
    assert "query by=sighting" in table and table.count("edge-1:gate:") == 3

    assert main([*base, "--track", "edge-2:hall:4", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["query"]["by"] == "track" and result["cameras"]

    crop = tmp_path / "crop.png"
    cv2.imwrite(str(crop), person_crop(tud_frames, 33, 4))
    assert main([*base, "--image", str(crop), "--model", served_matcher.model, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["query"]["by"] == "image"

    assert main([*base, "--sighting", "999999"]) == 1
    assert "sighting 999999 not found" in caplog.text
    token_file.write_text("wrong-token-0123456789\n")
    assert main([*base, "--sighting", str(subject["id"])]) == 2
    assert "missing or wrong token" in caplog.text
