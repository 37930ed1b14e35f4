"""Harvested crops reach the matcher (issue 14): an edge node on a real clip uploads what it harvests over HTTP with the
edge token, deletes each crop only once the matcher has it, and keeps them while the matcher is away; the matcher's
harvest store keeps each crop once, refuses hostile uploads crop by crop, and deletes files by its quota and by
retention; `download_harvest` writes the store back out in the layout the trainer reads.

| test                                   | what is real                                  | checked exactly                      |
|----------------------------------------|-----------------------------------------------|--------------------------------------|
| matcher away, then back                | an edge node on TUD-Stadtmitte, the matcher's HTTP server started late | every crop made is stored once, none left on the edge |
| matcher `kill -9` mid-upload           | a `crossview matcher` process, killed and restarted | 400 crops stored once each, none left |
| hostile uploads                        | HTTP requests to a served matcher             | each refused with its reason, the rest stored; tokens |
| refusals on the edge                   | the uploader against a served matcher, and a 503 server | refused ones moved to .refused, counted, the others deleted; a 503 or a wrong token keeps all |
| quota and retention                    | the store's files on disk                     | oldest gone from disk and index       |
| download round trip                    | `MatcherClient.download_harvest`, the trainer's loader | same crops and sidecars; resumable |
"""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import cv2
import numpy as np
import pytest
import requests
import yaml
from helpers import CrossviewProcess, edge_config, free_port, jpeg_of_scans, matcher_config, wait_until

from crossview.edge.node import EdgeNode
from crossview.edge.uploader import REFUSED_DIR, Uploader
from crossview.kernel.config import ConfigError, EdgeConfig, HarvestConfig, MatcherConfig, parse_config
from crossview.kernel.harvest import Sidecar, encode, read_sidecar, sidecar_path
from crossview.kernel.multipart import encode_multipart
from crossview.matcher.api import serve
from crossview.matcher.client import MatcherClient
from crossview.matcher.harvest import HarvestStore
from crossview.matcher.service import Matcher
from crossview.trainer.data.harvest import harvest_samples

REPO = Path(__file__).resolve().parents[1]
CLIP = REPO / "data" / "demo" / "tud-stadtmitte.mp4"  # 7 s of large pedestrians: HOG finds them without upscaling
TOKEN = "test-token-0123456789"
EDGE_TOKEN = "edge-token-0123456789"


def crop_jpeg(seed: int, h: int = 96, w: int = 48) -> bytes:
    return cv2.imencode(".jpg", np.random.default_rng(seed).integers(0, 255, (h, w, 3), np.uint8))[1].tobytes()


def sidecar(frame: int, ts: float | None = None, node: str = "edge-1", camera: str = "gate", track: int = 1) -> Sidecar:
    return Sidecar(node, camera, time.time() if ts is None else ts, frame, track, (10.0, 20.0, 58.0, 116.0), 0.9, "m-1")


def harvest_folder(root: Path, sidecars: list[Sidecar]) -> list[Path]:
    """Crops as the edge's harvester leaves them: sidecar, then JPEG, oldest first."""
    paths = []
    for i, s in enumerate(sidecars):
        path = s.name.path(root)
        path.parent.mkdir(parents=True, exist_ok=True)
        sidecar_path(path).write_bytes(encode(s))
        path.write_bytes(crop_jpeg(i))
        paths.append(path)
    return paths


def files(root: Path, pattern: str = "*/*.jpg") -> set[Path]:
    return set(root.glob(pattern))


@pytest.fixture
def site(tmp_path):
    """A matcher with its HTTP API on a free port and an edge token, and `serve()` to start the API (late if wanted)."""
    (tmp_path / "edge-token").write_text(EDGE_TOKEN)
    port = free_port()

    def make(start: bool = True, **sections) -> tuple[Matcher, MatcherConfig]:
        cfg = matcher_config(tmp_path / "matcher", http={"port": port, "token": TOKEN,
                                                         "edge_token_file": str(tmp_path / "edge-token")}, **sections)
        m = Matcher(cfg)
        m.start()
        made.append(m)
        if start:
            servers.append(serve(m, cfg.http))
        return m, cfg

    made, servers = [], []
    make.url, make.servers = f"http://127.0.0.1:{port}", servers
    yield make
    for s in servers:
        s.stop()
    for m in made:
        m.stop()


def post(url: str, items: list[tuple[bytes, bytes]], token: str = EDGE_TOKEN, names: list[str] | None = None):
    names = names or [f"c{i}.jpg" for i in range(len(items))]
    body, content_type = encode_multipart({}, {"crops": [(n, jpeg, "image/jpeg") for n, (_, jpeg) in zip(names, items)],
                                               "sidecars": [(n + ".json", sc, "application/json")
                                                            for n, (sc, _) in zip(names, items)]})
    return requests.post(f"{url}/api/v1/harvest", data=body, headers={"Content-Type": content_type,
                                                                       "Authorization": f"Bearer {token}"}, timeout=30)


def test_an_edge_uploads_every_crop_once_and_keeps_them_while_the_matcher_is_away(site, default_model, tmp_path):
    m, cfg = site(start=False)  # the matcher's HTTP API is not up yet
    (tmp_path / "edge-token-file").write_text(EDGE_TOKEN)
    harvest = tmp_path / "edge-harvest"
    node = EdgeNode(edge_config(default_model, [{"id": "street", "source": str(CLIP), "fps": 3, "realtime": True}],
                                endpoint=m.ingest.endpoint, harvest={
                                    "enabled": True, "dir": str(harvest), "every_k": 2, "min_height": 48, "upload": {
                                        "url": site.url, "token_file": str(tmp_path / "edge-token-file"),
                                        "interval_s": 0.2, "batch": 4, "drain_s": 30}}))
    runner = threading.Thread(target=node.run, daemon=True)
    runner.start()
    try:
        wait_until(lambda: node.uploader.away_since is not None and len(files(harvest)) >= 4, 30,
                   "crops waiting on the edge while the matcher is away")
        assert node.uploader.uploaded == 0 and "matcher away since" in node.uploader.status()
        site.servers.append(serve(m, cfg.http))  # the matcher is back
        wait_until(lambda: m.harvest.count >= 4, 30, "the waiting crops delivered")
    finally:
        runner.join(60)  # the clip ends; the node stops and uploads what is left
    assert not runner.is_alive()
    made = node.harvester.saved
    assert made >= 8 and node.uploader.uploaded == made and node.uploader.refused == 0
    assert not list(harvest.rglob("*.jpg")) and not list(harvest.rglob("*.json")), "crops left on the edge"
    stored = requests.get(f"{site.url}/api/v1/harvest?limit=1000", headers={"Authorization": f"Bearer {TOKEN}"},
                          timeout=10).json()
    assert len(stored) == len({c["path"] for c in stored}) == m.harvest.count == made
    assert {c["node"] for c in stored} == {"test-edge"} and all(c["path"].startswith("street/") for c in stored)
    assert len(files(m.harvest.crops)) == made
    assert node.metrics.value("crossview_edge_harvest_uploaded") == made
    assert node.metrics.value("crossview_edge_harvest_pending") == 0


def test_a_matcher_killed_mid_upload_loses_nothing_and_stores_nothing_twice(tmp_path):
    """`kill -9` of a real matcher process while crops stream in: after its restart every crop is stored exactly once
    (those whose acknowledgement was lost come again as duplicates) and none is left on the edge."""
    (tmp_path / "edge-token").write_text(EDGE_TOKEN)
    port = free_port()
    (tmp_path / "matcher.yaml").write_text(yaml.safe_dump({
        "data_dir": str(tmp_path / "matcher"), "ingest": {"endpoint": "tcp://127.0.0.1:*", "security": {"mode": "plain"}},
        "http": {"port": port, "token": TOKEN, "edge_token_file": str(tmp_path / "edge-token")}}))

    def start() -> CrossviewProcess:
        proc = CrossviewProcess(tmp_path / "matcher.log", "matcher", "--config", str(tmp_path / "matcher.yaml"))
        proc.wait_for_line(f"HTTP API and web page on http://127.0.0.1:{port}/")
        return proc

    root, n = tmp_path / "harvest", 400
    harvest_folder(root, [sidecar(i, camera=("gate", "hall")[i % 2]) for i in range(n)])
    up = Uploader(HarvestConfig(dir=root, upload={"url": f"http://127.0.0.1:{port}", "token_file": tmp_path / "edge-token",
                                                  "batch": 2, "interval_s": 0.1}))
    proc = start()
    try:
        up.start()
        wait_until(lambda: up.uploaded >= 40, 30, "crops streaming in")
        proc.kill9()
        assert up.uploaded < n
        proc = start()
        wait_until(lambda: up.uploaded == n, 60, "every crop acknowledged after the restart")
        up.stop()
        listed = MatcherClient(f"http://127.0.0.1:{port}", TOKEN).harvest(limit=1000)
        assert len(listed) == len({c["path"] for c in listed}) == n and up.refused == 0
        assert len(files(tmp_path / "matcher" / "harvest" / "crops")) == n and files(root) == set()
    finally:
        up.stop()
        proc.stop()


def test_hostile_uploads_are_refused_crop_by_crop_and_the_rest_is_stored(site):
    m, _ = site(harvest={"max_crop_bytes": 20_000, "max_crop_pixels": 1 << 20}, retention={"max_age_hours": 1})
    url, good = site.url, [(encode(sidecar(i)), crop_jpeg(i)) for i in range(3)]
    wide = cv2.imencode(".jpg", np.zeros((1100, 1000, 3), np.uint8))[1].tobytes()  # small file, 1.1 megapixels
    batch = [good[0],
             (b'{"v": 1, "node": "../../etc"}', crop_jpeg(9)),
             (encode(sidecar(10)), crop_jpeg(10, 400, 200)),  # > 20,000 bytes of noise
             (encode(sidecar(11)), wide),
             (encode(sidecar(12)), crop_jpeg(12)[:-200]),  # cut off
             (encode(sidecar(13)), cv2.imencode(".png", np.zeros((8, 8, 3), np.uint8))[1].tobytes()),
             (encode(sidecar(14, ts=time.time() - 7200)), crop_jpeg(14)),  # past retention: acknowledged, not kept
             good[1], good[2], good[0]]
    answer = post(url, batch)
    assert answer.status_code == 200, answer.text
    results = answer.json()["results"]
    assert [r["status"] for r in results] == ["stored", "refused", "refused", "refused", "refused", "refused", "expired",
                                              "stored", "stored", "duplicate"]
    reasons = [r["reason"] for r in results]
    assert "field 'node' must be" in reasons[1] and "'c1.jpg'" in reasons[1]
    assert "the limit is 20,000 (harvest.max_crop_bytes)" in reasons[2]
    assert "1000 x 1100 JPEG; the limit is 1,048,576 pixels (harvest.max_crop_pixels)" in reasons[3]
    assert "truncated or corrupt JPEG" in reasons[4] and "a PNG, not a JPEG" in reasons[5]
    assert "past retention.max_age_hours" in reasons[6]
    assert results[9]["id"] == results[0]["id"] and results[0]["path"] == "gate/edge-1_gate_t1_f0.jpg"
    assert post(url, good).json()["results"][1]["status"] == "duplicate"  # sent again: acknowledged, kept once
    assert m.harvest.count == 3 and len(files(m.harvest.crops)) == 3
    stats = requests.get(f"{url}/api/v1/stats", headers={"Authorization": f"Bearer {TOKEN}"}, timeout=10).json()["harvest"]
    assert (stats["crops"], stats["refused"], stats["expired"], stats["duplicate"]) == (3, 5, 1, 4)

    wrong = post(url, good, token="not-the-token-0123456789")
    assert wrong.status_code == 401 and "wrong token" in wrong.json()["detail"]
    mismatch = requests.post(f"{url}/api/v1/harvest", headers={"Authorization": f"Bearer {EDGE_TOKEN}"}, timeout=10,
                             files=[("crops", ("a.jpg", good[0][1], "image/jpeg"))] * 2 + [("sidecars", ("a.json", good[0][0]))])
    assert mismatch.status_code == 400 and "one sidecar per crop" in mismatch.json()["detail"]
    assert post(url, [good[0]] * 101).status_code == 400  # at most 100 crops at a time
    edge = {"Authorization": f"Bearer {EDGE_TOKEN}"}
    for path in ("/api/v1/harvest", f"/api/v1/harvest/{results[0]['id']}"):  # images of people: the edge token cannot read
        assert requests.get(f"{url}{path}", headers=edge, timeout=10).status_code in (401, 403), path
    main = {"Authorization": f"Bearer {TOKEN}"}
    jpeg = requests.get(f"{url}/api/v1/harvest/{results[0]['id']}", headers=main, timeout=10)
    assert jpeg.content == good[0][1] and jpeg.headers["cache-control"] == "no-store"
    assert requests.get(f"{url}/api/v1/harvest?limit=1001", headers=main, timeout=10).status_code == 422
    assert requests.get(f"{url}/api/v1/harvest/999", headers=main, timeout=10).status_code == 404


def test_sidecars_are_bounded_as_the_wire_bounds_sightings_and_crops_by_their_scans(site, tmp_path):
    """Before: camera `..` was stored as ../edge-1_.._t1_f2.jpg, outside crops/, and download_harvest failed on it for
    ever; ts 1e308 was never deleted by retention; boxes of ±1e308 and models holding control characters were stored;
    a crop of thousands of progressive scans passed, and took seconds of CPU to check."""
    m, _ = site()

    def changed(frame: int, **fields) -> bytes:
        return json.dumps({**json.loads(encode(sidecar(frame))), **fields}).encode()

    batch = [(changed(1, camera=".."), crop_jpeg(1)), (changed(2, node="."), crop_jpeg(2)),
             (changed(3, camera="..", node=".."), crop_jpeg(3)), (changed(4, ts=1e308), crop_jpeg(4)),
             (changed(5, box=[-1e308, 0, 1e308, 5]), crop_jpeg(5)), (changed(6, model="m-1\n\x1b[2K"), crop_jpeg(6)),
             (encode(sidecar(7)), jpeg_of_scans(1000)), (encode(sidecar(8)), crop_jpeg(8))]
    results = post(site.url, batch).json()["results"]
    assert [r["status"] for r in results] == ["refused"] * 7 + ["stored"], results
    for r, field in zip(results, ["camera", "node", "node", "ts", "box", "model"]):
        assert f"field '{field}' must be" in r["reason"] and r["path"] is None, r
    assert "is a JPEG of 1,000 scans; the limit is 100" in results[6]["reason"]
    assert set((tmp_path / "matcher").rglob("*.jpg")) == {m.harvest.crops / "gate" / "edge-1_gate_t1_f8.jpg"}
    assert MatcherClient(site.url, TOKEN).download_harvest(tmp_path / "dest")["downloaded"] == 1


def test_the_edge_moves_what_the_matcher_refuses_aside_and_deletes_what_it_stored(site, tmp_path):
    site(harvest={"max_crop_bytes": 20_000})
    (tmp_path / "token").write_text(EDGE_TOKEN)
    root = tmp_path / "harvest"
    paths = harvest_folder(root, [sidecar(i) for i in range(5)])
    paths[2].write_bytes(crop_jpeg(2, 400, 200))  # too large for the matcher
    sidecar_path(paths[3]).write_text("{not json")  # broken here: never sent
    freed = []
    up = Uploader(HarvestConfig(dir=root, upload={"url": site.url, "token_file": tmp_path / "token", "batch": 2}), freed.append)
    assert up.upload_pending()
    assert (up.uploaded, up.refused, up.pending) == (3, 2, 0)
    assert files(root) == set() and {p.name for p in (root / REFUSED_DIR / "gate").glob("*.jpg")} == {paths[2].name, paths[3].name}
    assert len(freed) == 6 and "3 crops uploaded, 0 pending, 2 refused" in up.status()

    later = harvest_folder(root, [sidecar(i) for i in range(10, 12)])
    with Overloaded() as busy:  # a matcher answering 503: nothing is deleted, nothing refused
        up = Uploader(HarvestConfig(dir=root, upload={"url": busy.url, "token_file": tmp_path / "token"}))
        assert not up.upload_pending() and (up.uploaded, up.refused) == (0, 0) and "HTTP 503: busy" in up.status()
    (tmp_path / "token").write_text("not-the-edge-token-0123")  # a token the matcher refuses: the same
    assert not Uploader(HarvestConfig(dir=root, upload={"url": site.url, "token_file": tmp_path / "token"})).upload_pending()
    assert files(root) == set(later)


class Overloaded(ThreadingHTTPServer):
    """An HTTP server answering every POST with 503, as a matcher behind an overloaded proxy."""

    def __init__(self):
        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                self.rfile.read(int(self.headers["Content-Length"]))
                body = b'{"detail": "busy"}'
                self.send_response(503)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        super().__init__(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server_address[1]}"

    def __enter__(self):
        threading.Thread(target=self.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc):
        self.shutdown()
        self.server_close()


def test_the_quota_and_retention_delete_crops_from_disk_and_index(tmp_path, store_section):
    cfg = parse_config({"data_dir": str(tmp_path), "ingest": {"security": {"mode": "plain"}}, "http": {"token": TOKEN},
                        "harvest": {"quota_mb": 0.05}, "store": store_section}, MatcherConfig)
    store = HarvestStore(tmp_path, cfg.harvest, max_age_s=3600, store=cfg.store)
    now = time.time()
    jpegs = [crop_jpeg(i) for i in range(10)]  # ~10 KB each: five fit in 50 KB
    answers = store.receive([(encode(sidecar(i, ts=now - 1000 + i)), jpegs[i]) + (f"c{i}.jpg",) for i in range(10)], now)
    assert all(a.status == "stored" for a in answers)
    kept = store.list(limit=100)
    assert store.bytes <= store.quota and store.counts["dropped"] == 10 - len(kept) > 0
    assert [c.sidecar.frame for c in kept] == list(range(10 - len(kept), 10))  # the oldest went first
    assert [store.jpeg(c.id) for c in kept] == jpegs[10 - len(kept):]
    # Where the JPEGs are (files; PostgreSQL: rows beside the index), only the kept ones are.
    if store_section:
        held = [bytes(j) for (j,) in store._db.all("SELECT jpeg FROM crop_jpegs")]
        assert files(store.crops) == set() and sorted(held) == sorted(jpegs[10 - len(kept):])
    else:
        assert files(store.crops) == {store.crops / c.to_dict()["path"] for c in kept}
        on_disk = b"".join(p.read_bytes() for p in tmp_path.rglob("*") if p.is_file())
        assert all((jpegs[i] in on_disk) == (i >= 10 - len(kept)) for i in range(10))

    assert store.expire(now - 1000 + 8) == len(kept) - 2  # retention: captured before that
    assert [c.sidecar.frame for c in store.list()] == [8, 9] and store.count == 2
    assert len(files(store.crops) if not store_section else store._db.all("SELECT id FROM crop_jpegs")) == 2
    assert store.jpeg(kept[0].id) is None
    store.close()
    if store_section:
        return  # no files to reconcile with the index

    (store.crops / "gate" / "edge-1_gate_t1_f77.jpg").write_bytes(jpegs[0])  # a stray file: a crash before the commit
    (store.crops / "gate" / "edge-1_gate_t1_f9.jpg").unlink()  # and a row whose file is gone
    store = HarvestStore(tmp_path, cfg.harvest)
    assert [c.sidecar.frame for c in store.list()] == [8] and files(store.crops) == {store.crops / "gate/edge-1_gate_t1_f8.jpg"}
    store.close()


def test_two_matchers_on_one_postgres_share_the_harvest(tmp_path, pg_server):
    cfg = parse_config({"data_dir": str(tmp_path), "ingest": {"security": {"mode": "plain"}}, "http": {"token": TOKEN},
                        "store": pg_server.store_section(pg_server.fresh_db())}, MatcherConfig)
    one = HarvestStore(tmp_path / "one", cfg.harvest, store=cfg.store)
    [stored] = one.receive([(encode(sidecar(1)), crop_jpeg(1), "c1.jpg")])
    other = HarvestStore(tmp_path / "other", cfg.harvest, store=cfg.store)  # opening it deletes nothing of one's
    assert [c.id for c in other.list()] == [stored.id] and other.jpeg(stored.id) == crop_jpeg(1)
    assert other.receive([(encode(sidecar(1)), crop_jpeg(1), "c1.jpg")])[0].status == "duplicate"
    assert other.expire(time.time() + 60) == 1 and one.list() == [] and one.jpeg(stored.id) is None
    one.close()
    other.close()


def test_retention_in_the_matcher_deletes_harvested_crops(site):
    m, _ = site(retention={"max_age_hours": 1})
    now = time.time()
    post(site.url, [(encode(sidecar(i, ts=now - 600 * i)), crop_jpeg(i)) for i in range(4)])
    m.enforce_retention(now=now + 3600 - 900)  # an hour after frames 0 and 1 minus a quarter: 2 and 3 are too old
    assert [c.sidecar.frame for c in m.harvest.list()] == [0, 1] and len(files(m.harvest.crops)) == 2


def test_download_harvest_round_trips_into_the_layout_the_trainer_reads(site, tmp_path):
    site()
    t0 = time.time() - 100
    sent = [sidecar(i, ts=t0 + i, camera=cam, track=i % 3) for i, cam in enumerate(["gate", "hall", "gate.2"] * 4)]
    post(site.url, [(encode(s), crop_jpeg(i)) for i, s in enumerate(sent)], token=TOKEN)  # the main token may upload too
    client = MatcherClient(site.url, TOKEN)
    dest = tmp_path / "harvest"
    assert client.download_harvest(dest, since=t0 + 2, until=t0 + 9) == {"downloaded": 8, "skipped": 0, "gone": 0,
                                                                         "bytes": sum(len(crop_jpeg(i)) for i in range(2, 10))}
    counts = client.download_harvest(dest)  # resumed: only what is missing
    assert (counts["downloaded"], counts["skipped"]) == (4, 8)
    target = harvest_samples(dest)
    assert target.cameras == ("gate", "gate.2", "hall") and len(target.samples) == 12
    for i, s in enumerate(sent):
        path = s.name.path(dest)
        assert read_sidecar(path) == s and path.read_bytes() == crop_jpeg(i)
    with pytest.raises(PermissionError):  # the edges' token may upload, not read
        MatcherClient(site.url, EDGE_TOKEN).download_harvest(tmp_path / "other")


@pytest.mark.parametrize("raw, error", [
    ({"harvest": {"upload": {"url": "http://127.0.0.1:8080"}}}, "harvest.upload: Value error, an upload url needs token_file"),
    ({"harvest": {"upload": {"url": "ftp://x", "token_file": "t"}}}, "harvest.upload.url"),
    ({"harvest": {"upload": {"batch": 101}}}, "harvest.upload.batch"),
    ({"harvest": {"upload": {"interval_s": 0}}}, "harvest.upload.interval_s"),
    ({"harvest": {"upload": {"every": 3}}}, "harvest.upload.every: unknown key"),
])
def test_upload_config_mistakes_name_the_key(raw, error):
    with pytest.raises(ConfigError, match=error.replace(".", r"\.")):
        parse_config({"node_id": "e", "cameras": [{"id": "c", "source": "x.mp4"}], "publisher": {"security": {"mode": "plain"}},
                      **raw}, EdgeConfig)
    with pytest.raises(ConfigError, match=r"harvest\.quota_mb"):
        parse_config({"ingest": {"security": {"mode": "plain"}}, "http": {"token": TOKEN}, "harvest": {"quota_mb": 0}},
                     MatcherConfig)
