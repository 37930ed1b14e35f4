"""Watchlists and alerts: entries from a sighting, a track or a crop, one alert per track, camera filters,
calibrated and raw thresholds, the API, and webhooks with signatures and retries against a real HTTP receiver.
Storage on both backends (`store_section`); on PostgreSQL two matchers share entries, alerts and the webhook queue."""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import json
import logging
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import cv2
import numpy as np
import pytest
import requests
from helpers import Pusher, make_sighting, matcher_config, unit_vectors, wait_until
from live_matcher import person_crop, tud_sightings

from crossview.edge.tracking import TrackGallery
from crossview.kernel.calibration import Calibration
from crossview.kernel.config import ConfigError, StoreConfig, WatchlistConfig, parse_config
from crossview.matcher.api import serve
from crossview.matcher.query import Filters, Subject
from crossview.matcher.service import Matcher
from crossview.matcher.watchlist import Watchlist

TOKEN = "test-token-0123456789"
SECRET = "webhook-secret-0123456789"
T0 = time.time() - 3600


class Receiver:
    """A real webhook receiver: records each POST and whether its signature verifies; the first `fail` answer 500."""

    def __init__(self, fail: int = 0):
        self.requests: list[dict] = []
        self.fail = fail
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers["Content-Length"]))
                ts = self.headers["X-Crossview-Timestamp"]
                good = hmac.new(SECRET.encode(), ts.encode() + b"." + body, hashlib.sha256).hexdigest()
                receiver.requests.append({"alert": self.headers["X-Crossview-Alert"], "body": json.loads(body),
                                          "signed": hmac.compare_digest(self.headers["X-Crossview-Signature"], f"sha256={good}")})
                failing = len(receiver.requests) <= receiver.fail
                self.send_response(500 if failing else 204)
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook?key=in-the-url"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def delivered(self) -> list[dict]:
        return self.requests[self.fail:]

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def receiver():
    r = Receiver(fail=2)
    yield r
    r.close()


def start(tmp_path, receiver=None, **sections):
    hooks = [{"url": receiver.url, "secret": SECRET}] if receiver else []
    cfg = matcher_config(tmp_path / "matcher", http={"port": 0, "token": TOKEN},
                         watchlist={"webhooks": hooks, "default_similarity": 0.9}, **sections)
    m = Matcher(cfg)
    m.start()
    return m


def feed(m: Matcher, sightings) -> None:
    before = m.ingest.accepted
    with Pusher(m.ingest.endpoint) as p:
        p.send(sightings)
    wait_until(lambda: m.ingest.accepted >= before + len(sightings), 20, "sightings accepted")
    with m.ingest.quiet():  # accepted counts before the watchlist check: that has run too once every batch is indexed
        pass


def walk(vec, camera: str, track: int, frames: int, rng, t: float, noise: float = 0.05):
    """One person's track: `frames` noisy copies of `vec`, half a second apart."""
    out = []
    for f in range(frames):
        v = vec + noise * rng.standard_normal(vec.shape).astype(np.float32) / np.sqrt(len(vec))
        out.append(make_sighting(v / np.linalg.norm(v), camera=camera, track=track, ts=t + f * 0.5, frame=f))
    return out


def test_a_person_passing_a_second_camera_alerts_once_per_track_and_only_on_watched_cameras(tmp_path, receiver,
                                                                                           store_section):
    rng = np.random.default_rng(0)
    people = unit_vectors(rng, 6, 64)
    m = start(tmp_path, receiver, store=store_section)
    try:
        feed(m, walk(people[0], "gate", 1, 5, rng, T0))
        gate_sighting = m.store.recent("gate", 1)[0]
        entry = m.watchlist.add("visitor", m.queries.sighting_subject(gate_sighting.id))
        lobby_only = m.watchlist.add("lobby only", m.queries.sighting_subject(gate_sighting.id), cameras=["lobby"])
        assert (entry.min_probability, entry.min_similarity) == (None, 0.9)  # m1 has no calibration: raw similarity
        # the same person on hall for 12 frames, then again later as a new edge track; 5 others meanwhile
        feed(m, walk(people[0], "hall", 7, 12, rng, T0 + 10) + walk(people[0], "hall", 9, 4, rng, T0 + 200)
             + [s for p in range(1, 6) for s in walk(people[p], "hall", 20 + p, 6, rng, T0 + 20)])
        alerts = m.watchlist.alerts()
        assert [(a.entry, a.camera, a.track) for a in alerts] == [(entry.id, "hall", 7), (entry.id, "hall", 9)]
        assert (m.store.record(alerts[0].sighting).camera, m.store.record(alerts[0].sighting).track) == ("hall", 7)
        assert all(a.probability is None and a.similarity >= 0.9 for a in alerts)
        # after 2 refused tries; the sender counts a delivery once the receiver's answer is back, a moment after it
        wait_until(lambda: len(receiver.delivered()) == 2 and m.stats()["watchlist"]["webhooks"]["delivered"] == 2, 20,
                   "both alerts delivered and counted")
        assert all(r["signed"] for r in receiver.requests)
        assert sorted(int(r["alert"]) for r in receiver.delivered()) == [a.id for a in alerts]
        assert receiver.delivered()[0]["body"]["alert"]["name"] == "visitor"
        stats = m.stats()["watchlist"]
        assert stats["entries"] == 2 and stats["alerts"] == 2 and stats["webhooks"]["delivered"] == 2 and stats["webhooks"]["failed_tries"] == 2
        assert lobby_only.id not in {a.entry for a in alerts}
    finally:
        m.stop()


def test_alerts_and_entries_survive_a_restart_and_a_track_never_alerts_twice(tmp_path, store_section):
    rng = np.random.default_rng(1)
    person = unit_vectors(rng, 1, 64)[0]
    m = start(tmp_path, store=store_section)
    feed(m, walk(person, "gate", 1, 3, rng, T0))
    entry = m.watchlist.add("visitor", m.queries.track_subject("edge-1", "gate", 1))
    feed(m, walk(person, "hall", 4, 3, rng, T0 + 10))
    assert len(m.watchlist.alerts()) == 1
    m.stop()
    m = start(tmp_path, store=store_section)
    try:
        assert [e.id for e in m.watchlist.entries()] == [entry.id]
        feed(m, walk(person, "hall", 4, 3, rng, T0 + 12))  # the same track goes on
        assert len(m.watchlist.alerts()) == 1
        assert m.watchlist.remove(entry.id) and not m.watchlist.remove(entry.id)
        feed(m, walk(person, "lobby", 5, 3, rng, T0 + 30))
        assert len(m.watchlist.alerts()) == 1  # off the list: no more alerts, the old one stays
    finally:
        m.stop()


def test_calibrated_thresholds_are_probabilities_and_uncalibrated_ones_refuse_them(tmp_path, store_section):
    cal = Calibration((0.6, 0.8, 0.9), (0.05, 0.5, 0.95))  # P 0.5 at cosine 0.8, at most 0.95
    wl = Watchlist(tmp_path / "w.db", WatchlistConfig(max_entries=2), lambda model: cal if model == "cal" else None,
                   StoreConfig(**store_section))
    v = np.ones(8, np.float32)
    e = wl.add("a", Subject(v, "cal", {"by": "embedding"}), min_probability=0.5)
    assert e.min_similarity == pytest.approx(0.8) and e.to_dict()["calibrated"]
    assert wl.add("b", Subject(v, "cal", {}), min_similarity=0.9).min_probability == pytest.approx(float(cal.probability(0.9)))
    with pytest.raises(ValueError, match="never reaches P 0.99"):
        wl.add("c", Subject(v, "cal", {}), min_probability=0.99)
    with pytest.raises(ValueError, match="watchlist is full"):
        wl.add("c", Subject(v, "raw", {}))
    wl.remove(e.id)
    with pytest.raises(ValueError, match="has no calibration: give min_similarity"):
        wl.add("c", Subject(v, "raw", {}), min_probability=0.9)
    with pytest.raises(ValueError, match="printable"):
        wl.add("bad\nname", Subject(v, "raw", {}))
    wl.close()


def test_two_matchers_on_one_postgres_share_entries_alerts_the_webhook_queue_registry_and_audit(tmp_path, pg_server,
                                                                                                 default_model):
    section = pg_server.store_section(pg_server.fresh_db())
    rng = np.random.default_rng(5)
    person = unit_vectors(rng, 1, 64)[0]
    receiver = Receiver()
    one, other = start(tmp_path / "one", receiver, store=section), start(tmp_path / "other", receiver, store=section)
    try:
        feed(one, walk(person, "gate", 1, 3, rng, T0))
        entry = one.watchlist.add("visitor", one.queries.track_subject("edge-1", "gate", 1))
        assert [e.id for e in other.watchlist.entries()] == [entry.id]
        feed(other, walk(person, "hall", 4, 3, rng, T0 + 10))  # checked against the entry one added, by the lease holder
        wait_until(lambda: [(a.entry, a.track) for a in one.watchlist.alerts()] == [(entry.id, 4)], 5,
                   "the watchlist lease holder to check the other's sightings (`matcher.lease`)")
        wait_until(lambda: len(receiver.requests) == 1, 20, "the alert delivered")
        time.sleep(1.5)  # both matchers' webhook threads have passed over the queue again meanwhile
        assert len(receiver.requests) == 1 and one.webhooks.pending == other.webhooks.pending == 0
        assert other.watchlist.remove(entry.id) and one.watchlist.entries() == []
        version = one.registry.register(default_model).version
        other.registry.promote(version)
        assert one.registry.production().version == version
        one.audit.record("alice", "search", {"sighting_id": 1}, 0)
        assert [e["user"] for e in other.audit.entries()] == ["alice"]
    finally:
        one.stop()
        other.stop()
        receiver.close()


def as_edges_send(sightings: list) -> list:
    """Each track's running mean embedding in place of the frame's own, as edge nodes send (`TrackGallery`)."""
    galleries: dict[str, TrackGallery] = {}
    out = []
    for s in sightings:
        gallery = galleries.setdefault(s.camera, TrackGallery(max_idle_s=1e9))
        track = gallery.add(s.track, s.embedding, TrackGallery.quality(s.score, s.box[3] - s.box[1]), s.ts)
        out.append(dataclasses.replace(s, embedding=track.mean.astype(np.float32)))
    return out


def test_the_api_adds_lists_and_removes_entries_and_lists_alerts(tmp_path, default_model, tud_frames):
    """TUD-Campus people seen on gate, then hall (persons 2-5 walk from one to the other), embedded by the real
    default model: a person put on the watchlist from their gate track alerts on hall, once."""
    from crossview.kernel.embedder import Embedder

    embedder = Embedder(default_model, device="cpu")
    sightings = as_edges_send(tud_sightings(embedder, tud_frames, T0))
    cfg = matcher_config(tmp_path / "matcher", http={"port": 0, "token": TOKEN}, models=[str(default_model)])
    m = Matcher(cfg)
    m.start()
    server = serve(m, cfg.http)
    url, auth = server.url.rstrip("/"), {"Authorization": f"Bearer {TOKEN}"}
    try:
        feed(m, [s for s in sightings if s.camera == "gate"])
        r = requests.post(f"{url}/api/v1/watchlist", headers=auth, timeout=10, json={
            "name": "person 3", "track": {"node": "edge-1", "camera": "gate", "track": 3}, "min_similarity": 0.94})
        assert r.status_code == 200, r.text
        entry = r.json()
        assert (entry["calibrated"], entry["min_similarity"], entry["origin"]["by"]) == (False, 0.94, "track")
        bad = requests.post(f"{url}/api/v1/watchlist", headers=auth, timeout=10,
                            json={"name": "x", "sighting_id": 1, "min_probability": 0.9})
        assert bad.status_code == 400 and "no calibration" in bad.json()["detail"]
        assert requests.post(f"{url}/api/v1/watchlist", headers=auth, timeout=10,
                             json={"name": "x", "sighting_id": 10**6}).status_code == 404
        crop = cv2.imencode(".png", person_crop(tud_frames, 33, 3))[1].tobytes()
        form = {"name": "from a crop", "model": embedder.version, "min_similarity": "0.5", "cameras": ["hall", "lobby"]}
        r = requests.post(f"{url}/api/v1/watchlist/image", headers=auth, timeout=30, data=form,
                          files={"image": ("person.png", crop, "image/png")})
        assert r.status_code == 200, r.text
        assert (r.json()["origin"]["by"], r.json()["origin"]["filename"], r.json()["cameras"]) == ("image", "person.png",
                                                                                                  ["hall", "lobby"])
        assert requests.delete(f"{url}/api/v1/watchlist/{r.json()['id']}", headers=auth, timeout=10).status_code == 200
        bad = requests.post(f"{url}/api/v1/watchlist/image", headers=auth, timeout=30, data={**form, "model": "nope"},
                            files={"image": ("person.png", crop, "image/png")})
        assert bad.status_code == 400 and "no embedding model loaded" in bad.json()["detail"]

        hall = [s for s in sightings if s.camera == "hall"]
        feed(m, hall)
        alerts = requests.get(f"{url}/api/v1/alerts", headers=auth, timeout=10).json()
        # what may alert, computed here by brute force: a batch's newest sighting of each track is checked, so a
        # track whose last sighting reaches the threshold must alert, and one none of whose sightings reach it must not
        q = m.store.vector(m.store.latest_in_track("edge-1", "gate", 3).id)
        best, last = {}, {}
        for s in hall:
            last[s.track] = float(s.embedding @ q / np.linalg.norm(s.embedding))
            best[s.track] = max(best.get(s.track, -1.0), last[s.track])
        alerted = {a["track"] for a in alerts}
        assert {t for t, c in last.items() if c >= 0.94} <= alerted <= {t for t, b in best.items() if b >= 0.94}
        assert 3 in alerted and len(alerted) == len(alerts)
        assert requests.get(f"{url}/api/v1/alerts?after={alerts[-1]['id']}", headers=auth, timeout=10).json() == []

        assert requests.delete(f"{url}/api/v1/watchlist/{entry['id']}", headers=auth, timeout=10).status_code == 200
        assert requests.delete(f"{url}/api/v1/watchlist/{entry['id']}", headers=auth, timeout=10).status_code == 404
        assert requests.get(f"{url}/api/v1/watchlist", headers=auth, timeout=10).json() == []
    finally:
        server.stop()
        m.stop()


def test_webhook_config_needs_a_secret_and_names_the_key():
    with pytest.raises(ConfigError, match="set exactly one of secret or secret_file"):
        parse_config({"webhooks": [{"url": "http://127.0.0.1:9/x"}]}, WatchlistConfig)
    with pytest.raises(ConfigError, match="webhooks.0.url"):
        parse_config({"webhooks": [{"url": "ftp://x", "secret": SECRET}]}, WatchlistConfig)


def test_a_webhook_secret_file_is_read_from_beside_the_config_and_a_bad_one_names_the_key(tmp_path):
    from crossview.kernel.config import load_matcher_config
    from crossview.matcher.webhooks import Webhooks

    site = tmp_path / "site"
    (site / "keys").mkdir(parents=True)
    (site / "keys" / "hook").write_text(SECRET + "\n")
    (site / "matcher.yaml").write_text("ingest: {endpoint: 'tcp://127.0.0.1:*', security: {mode: plain}}\n"
                                       f"http: {{token: {TOKEN}}}\n"
                                       "watchlist: {webhooks: [{url: 'http://127.0.0.1:9/a', secret_file: keys/hook}]}\n")
    cfg = load_matcher_config(site / "matcher.yaml")
    assert cfg.watchlist.webhooks[0].secret_file == site / "keys" / "hook"
    Webhooks(tmp_path / "ok.db", cfg.watchlist).close()
    (site / "keys" / "hook").write_text("short")
    with pytest.raises(ValueError, match="watchlist.webhooks.0.secret_file: .* at least 16 characters"):
        Webhooks(tmp_path / "w.db", cfg.watchlist)
    (site / "keys" / "hook").unlink()
    with pytest.raises(ValueError, match="watchlist.webhooks.0.secret_file: .*cannot read the secret"):
        Webhooks(tmp_path / "w2.db", cfg.watchlist)


def test_a_calibrated_model_turns_scores_into_probabilities_in_queries_and_watch_thresholds(tmp_path, default_model,
                                                                                           tud_frames):
    from crossview.kernel.embedder import Embedder
    from crossview.trainer.export import write_metadata

    embedder = Embedder(default_model, device="cpu")
    cal = Calibration((0.6, 0.8, 0.9), (0.05, 0.5, 0.95))
    calibrated = tmp_path / "calibrated.onnx"
    write_metadata(default_model, calibrated, dataclasses.replace(embedder.meta, calibration=cal))
    m = Matcher(matcher_config(tmp_path / "matcher", models=[str(calibrated)]))
    m.start()
    try:
        feed(m, as_edges_send(tud_sightings(embedder, tud_frames, T0)))
        subject = m.store.latest_in_track("edge-1", "gate", 3)
        result = m.queries.search_sighting(subject.id)
        hits = result.ranked()
        assert result.calibrated and hits
        assert "P = P(same person)" in result.to_text() and hits[0].verdict in result.to_text()
        # People one camera saw at once are different people (the tracks are TUD-Campus's ground truth):
        raw = dict(zip((h.track_id for h in hits), cal.probability([h.score for h in hits]).tolist()))
        first, last, _ = m.store.track_spans([subject.track_id])[subject.track_id]
        beside_query = [h for h in hits if _seen_at_once(h, subject.camera, first, last)]
        assert beside_query and all(h.probability == 0 and h.track != 3 for h in beside_query)
        others = [h for h in hits if h not in beside_query]
        rivals = {h.track_id: [g for g in others if g is not h and _seen_at_once(g, h.camera, h.first_ts, h.last_ts)]
                  for h in others}
        assert any(rivals.values())  # hall saw several of them at once
        for h in others:  # at most one of a camera's simultaneous tracks is the person; a track alone keeps its P
            assert all(h.probability + g.probability < 1 for g in rivals[h.track_id])
            assert h.probability < raw[h.track_id] if rivals[h.track_id] else h.probability == pytest.approx(raw[h.track_id])
        # A probability threshold: only hits whose P reaches it, and every one that reached it without the threshold.
        p = sorted(h.probability for h in others)[len(others) // 2]
        likely = m.queries.search_sighting(subject.id, Filters(min_probability=p))
        assert likely.ranked() and all(h.probability >= p for h in likely.ranked())
        assert {h.track_id for h in hits if h.probability >= p} <= {h.track_id for h in likely.ranked()}
        assert likely.query["filters"]["min_probability"] == p and likely.query["filters"]["min_score"] == 0.0
        assert m.queries.search_sighting(subject.id, Filters(min_probability=0.99)).ranked() == []  # P tops at 0.95
        entry = m.watchlist.add("person 3", m.queries.sighting_subject(subject.id))
        assert (entry.min_probability, entry.min_similarity) == (0.9, pytest.approx(cal.cosine_at(0.9)))
    finally:
        m.stop()


def _seen_at_once(hit, camera: str, first: float, last: float) -> bool:
    return hit.camera == camera and hit.first_ts <= last and first <= hit.last_ts


def test_watch_and_alerts_from_the_command_line(tmp_path, capsys, caplog, monkeypatch):
    from crossview.cli import main

    rng = np.random.default_rng(3)
    person = unit_vectors(rng, 1, 64)[0]
    m = start(tmp_path)
    server = serve(m, m.cfg.http)
    url = server.url.rstrip("/")
    monkeypatch.setenv("CROSSVIEW_TOKEN", TOKEN)
    try:
        feed(m, walk(person, "gate", 1, 3, rng, T0))
        assert main(["watch", "--url", url, "--name", "visitor", "--track", "edge-1:gate:1", "--min-similarity", "0.9",
                     "--camera", "hall"]) == 0
        assert "alert at similarity >= 0.9 (uncalibrated model" in capsys.readouterr().out
        assert main(["watch", "--url", url, "--name", "x", "--sighting", "999999"]) == 1
        assert "not found" in caplog.text
        assert main(["watch", "--url", url, "--name", "x", "--sighting", "1", "--min-probability", "0.9"]) == 2
        assert "no calibration" in caplog.text
        caplog.clear()
        assert main(["query", "--url", url, "--sighting", "1", "--min-probability", "0.9"]) == 2
        assert "has no score calibration" in caplog.text
        feed(m, walk(person, "hall", 4, 3, rng, T0 + 10) + walk(person, "lobby", 5, 3, rng, T0 + 20))
        assert main(["alerts", "--url", url]) == 0
        [line] = capsys.readouterr().out.splitlines()  # hall only: the entry watches no other camera
        assert line.startswith("alert 1: visitor on hall at ") and "(uncalibrated)" in line and "track 4" in line
        assert main(["alerts", "--url", url, "--after", "1", "--json"]) == 0 and capsys.readouterr().out == ""
    finally:
        server.stop()
        m.stop()


def test_retention_deletes_old_alerts_with_the_sightings(tmp_path, store_section):
    rng = np.random.default_rng(4)
    person = unit_vectors(rng, 1, 64)[0]
    m = start(tmp_path, retention={"max_age_hours": 1}, store=store_section)
    try:
        feed(m, walk(person, "gate", 1, 3, rng, T0))
        m.watchlist.add("visitor", m.queries.track_subject("edge-1", "gate", 1))
        feed(m, walk(person, "hall", 4, 3, rng, T0 + 10))
        assert len(m.watchlist.alerts()) == 1
        m.enforce_retention(now=T0 + 10 + 1800)  # half an hour after the alert's sighting: kept
        assert len(m.watchlist.alerts()) == 1
        m.enforce_retention(now=T0 + 20 + 3600)
        assert m.watchlist.alerts() == [] and m.store.recent(None, 10) == []
    finally:
        m.stop()


def test_watch_requests_are_bounded(tmp_path):
    m = start(tmp_path)
    server = serve(m, m.cfg.http)
    url, auth = server.url.rstrip("/"), {"Authorization": f"Bearer {TOKEN}"}
    try:
        for body in ({"name": "x" * 129, "sighting_id": 1}, {"name": "x", "sighting_id": 1, "cameras": ["c" * 65]},
                     {"name": "x", "sighting_id": 1, "cameras": ["c"] * 1001}, {"name": "x", "sighting_id": 1, "track": {
                         "node": "a", "camera": "b", "track": 1}}, {"name": "x", "sighting_id": 2**63}):
            r = requests.post(f"{url}/api/v1/watchlist", headers=auth, json=body, timeout=10)
            assert r.status_code == 422, (body, r.text)
        assert requests.get(f"{url}/api/v1/alerts?after=-1", headers=auth, timeout=10).status_code == 422
        assert requests.delete(f"{url}/api/v1/watchlist/{2**63}", headers=auth, timeout=10).status_code == 422
    finally:
        server.stop()
        m.stop()


def test_watch_filters_are_checked_as_the_wire_checks_camera_ids(tmp_path, caplog):
    """Before: cameras holding control characters were stored and logged raw (a newline split the log line), `[]` was
    stored as every camera while /query refused it, and NaN or a lone surrogate made a 400 naming no field."""
    m = start(tmp_path)
    feed(m, [make_sighting(unit_vectors(np.random.default_rng(4), 1, 8)[0])])
    server = serve(m, m.cfg.http)
    url, headers = server.url.rstrip("/"), {"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"}
    caplog.set_level(logging.INFO)
    try:
        for change, field in (({"cameras": ["nope", "a\nb"]}, "cameras.1"), ({"cameras": ["\x1b[2K"]}, "cameras.0"),
                              ({"cameras": [".."]}, "cameras.0"), ({"cameras": []}, "cameras"),
                              ({"min_similarity": float("nan")}, "min_similarity"), ({"name": "\ud800"}, "name")):
            r = requests.post(f"{url}/api/v1/watchlist", headers=headers, timeout=10,
                              data=json.dumps({"sighting_id": 1, "name": "v", **change}))  # NaN as JSON parsers take it
            assert r.status_code == 422, (change, r.text)
            assert [".".join(map(str, e["loc"][1:])) for e in r.json()["detail"]] == [field], r.text
        r = requests.post(f"{url}/api/v1/watchlist", headers=headers, json={"sighting_id": 1, "name": "v",
                                                                            "cameras": ["gate", "hall"]}, timeout=10)
        assert r.status_code == 200 and r.json()["cameras"] == ["gate", "hall"], r.text
        assert [e.cameras for e in m.watchlist.entries()] == [["gate", "hall"]]
    finally:
        server.stop()
        m.stop()
    assert not any(c in r.getMessage() for r in caplog.records for c in "\n\x1b")
