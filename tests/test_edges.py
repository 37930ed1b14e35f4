"""Operator status: edges' heartbeats, the matcher's view of every edge and camera (`matcher.edges`), `/api/v1/edges`,
`crossview status --url`, and a real edge node reporting to a real matcher."""

from __future__ import annotations

import json
import threading

import msgpack
import pytest
import requests
from helpers import Pusher, edge_config, free_port, matcher_config, shared_data, wait_until

from crossview.cli import main
from crossview.edge.node import EdgeNode
from crossview.kernel.config import StoreConfig
from crossview.kernel.wire import CameraStatus, Heartbeat, Reason, encode_heartbeat
from crossview.matcher.api import serve
from crossview.matcher.edges import MAX_EDGES, Edges, report_text
from crossview.matcher.service import Matcher

T = 1_800_000_000.0
TOKEN = "test-token-0123456789"


def beat(node: str = "edge-1", *cams: CameraStatus, every_s: float = 5.0, spooled: int = 0) -> Heartbeat:
    return Heartbeat(node, T, every_s, "m1", spooled, 0.0, 0, cams or (CameraStatus("gate", "streaming", 5.0, 5.0, 100),))


def cam(state: str = "streaming", cid: str = "gate", fps: float = 5.0, **kw) -> CameraStatus:
    return CameraStatus(cid, state, fps, 5.0, 100, **kw)


def states(report: dict) -> dict:
    """{node: (state, since, {camera: (state, since)})}"""
    return {e["node"]: (e["state"], e["since"], {c["id"]: (c["state"], c["since"]) for c in e["cameras"]})
            for e in report["edges"]}


def test_an_edge_is_offline_after_three_missed_heartbeats_and_online_again_from_its_next():
    edges = Edges()
    edges.heard(beat(), now=T)
    edges.heard(beat(), now=T + 5)
    assert states(edges.report(now=T + 19)) == {"edge-1": ("online", T, {"gate": ("online", T)})}
    # 3 x 5 s without a word: offline since the last heartbeat, and its cameras with it
    assert states(edges.report(now=T + 21)) == {"edge-1": ("offline", T + 5, {"gate": ("offline", T + 5)})}
    assert edges.report(now=T + 21)["summary"] == {"edges": {"online": 0, "offline": 1},
                                                   "cameras": {"online": 0, "stalled": 0, "offline": 1}}
    edges.heard(beat(), now=T + 60)
    assert states(edges.report(now=T + 61)) == {"edge-1": ("online", T + 60, {"gate": ("online", T)})}


def test_camera_states_change_with_their_sources_and_keep_their_since_otherwise():
    edges = Edges()
    edges.heard(beat("edge-1", cam(), cam("connecting", "lobby")), now=T)
    edges.heard(beat("edge-1", cam(), cam("reconnecting", "lobby", error="no frame for 10 s")), now=T + 5)
    edges.heard(beat("edge-1", cam("failed", error="cannot open"), cam("streaming", "lobby")), now=T + 10)
    edges.heard(beat("edge-1", cam("failed", error="cannot open"), cam("streaming", "lobby")), now=T + 15)
    report = edges.report(now=T + 16)
    assert states(report)["edge-1"][2] == {"gate": ("offline", T + 10), "lobby": ("online", T + 10)}
    gate = report["edges"][0]["cameras"][0]
    assert (gate["source_state"], gate["error"]) == ("failed", "cannot open")
    # a camera the edge no longer runs leaves the list
    edges.heard(beat("edge-1", cam("streaming", "lobby")), now=T + 20)
    assert list(states(edges.report(now=T + 21))["edge-1"][2]) == ["lobby"]


def test_the_last_heartbeats_survive_a_restart_and_a_damaged_file_only_empties_the_list(tmp_path):
    path = tmp_path / "edges.msgpack"
    edges = Edges(path)
    edges.heard(beat("edge-1", cam(), cam("reconnecting", "lobby")), now=T)
    edges.heard(beat("edge-2", every_s=1.0), now=T + 1)
    edges.save()
    again = Edges(path)
    assert states(again.report(now=T + 2)) == states(edges.report(now=T + 2))
    assert states(again.report(now=T + 100))["edge-2"][:2] == ("offline", T + 1)  # gone while we were down
    for junk in (b"", b"\x93garbage", msgpack.packb({"v": 1, "edges": [{"hb": b"junk", "seen": 1, "since": 1, "cams": {}}]})):
        path.write_bytes(junk)
        assert Edges(path).report()["edges"] == []


def test_matchers_on_one_postgres_list_the_edges_each_hears_and_the_newest_heartbeat_wins(pg_server):
    store = StoreConfig(**pg_server.store_section(pg_server.fresh_db()))
    one, other = Edges(store=store), Edges(store=store)
    one.heard(beat("edge-1"), now=T)
    other.heard(beat("edge-2"), now=T + 1)
    one.save(), other.save(), one.save()
    assert [e["node"] for e in one.report(T + 2)["edges"]] == [e["node"] for e in other.report(T + 2)["edges"]] == \
        ["edge-1", "edge-2"]
    other.heard(beat("edge-1", cam("connecting")), now=T + 5)  # edge-1 now sends to the other matcher
    stale = Edges(store=store)
    stale.heard(beat("edge-1"), now=T + 3)
    other.save(), stale.save(), one.save()
    for edges in (one, other, stale, Edges(store=store)):  # the last: a restart
        assert states(edges.report(T + 6)) == {"edge-1": ("online", T, {"gate": ("stalled", T + 5)}),
                                                "edge-2": ("online", T + 1, {"gate": ("online", T + 1)})}
    for edges in (one, other, stale):
        edges.close()


def test_the_edges_remembered_are_bounded_and_the_longest_quiet_goes_first():
    edges = Edges()
    for n in range(MAX_EDGES + 10):
        edges.heard(beat(f"edge-{n}"), now=T + n)
    nodes = {e["node"] for e in edges.report(now=T + MAX_EDGES)["edges"]}
    assert len(nodes) == MAX_EDGES and "edge-0" not in nodes and f"edge-{MAX_EDGES + 9}" in nodes


def test_the_terminal_view_says_what_each_camera_is_doing():
    edges = Edges()
    edges.heard(beat("edge-1", cam(fps=0.6), CameraStatus("clip", "streaming", 12.0, 0.0, 120, (120, 795), 54.0),
                     cam("reconnecting", "lobby", error="no frame for 10 s"), spooled=1234), now=T)
    text = report_text(edges.report(now=T + 3))
    assert text.splitlines()[0] == "1 edges: 1 online; 3 cameras: 2 online, 1 stalled"
    assert "edge-1  online since" in text and "last heartbeat 3s ago" in text and "spool 1,234" in text
    assert "falling behind: 0.6 of 5 fps" in text
    assert "frame 120 of 795 (15%), ETA 54s" in text
    assert "stalled" in text and "reconnecting: no frame for 10 s" in text
    assert report_text(Edges().report()) == "no edge has sent a heartbeat yet"


@pytest.fixture
def live(tmp_path):
    cfg = matcher_config(tmp_path / "matcher", http={"port": 0, "token": TOKEN})
    matcher = Matcher(cfg)
    matcher.start()
    server = serve(matcher, cfg.http)
    yield matcher, server.url.rstrip("/")
    server.stop()
    matcher.stop()


def _edges(url: str) -> dict:
    r = requests.get(f"{url}/api/v1/edges", headers={"Authorization": f"Bearer {TOKEN}"}, timeout=10)
    assert r.status_code == 200, r.text
    return r.json()


def test_a_real_edge_node_shows_on_the_api_and_in_crossview_status(live, default_model, tmp_path, capsys, monkeypatch):
    matcher, url = live
    clip = str(shared_data("TUD-Campus") / "TUD-Campus.mp4")
    cfg = edge_config(default_model, [{"id": "campus", "source": clip, "realtime": True, "loop": True, "fps": 50},
                                      {"id": "missing", "source": str(tmp_path / "nope.mp4")}],
                      endpoint=matcher.ingest.endpoint, publisher={"heartbeat_s": 0.5})
    node = EdgeNode(cfg)
    runner = threading.Thread(target=node.run, daemon=True)
    runner.start()
    try:
        wait_until(lambda: any(c["frames"] >= 10 for e in _edges(url)["edges"] for c in e["cameras"]), 60, "frames reported")
        [edge] = _edges(url)["edges"]
        assert (edge["node"], edge["state"], edge["heartbeat_s"], edge["model"]) == ("test-edge", "online", 0.5,
                                                                                       node.embedder.version)
        campus, missing = edge["cameras"]
        assert (campus["id"], campus["state"], campus["source_state"], campus["target_fps"]) == ("campus", "online",
                                                                                                  "streaming", 50)
        assert campus["behind"]  # a 25 fps file cannot give 50: the operator is told
        assert (missing["state"], missing["source_state"]) == ("offline", "failed") and "nope.mp4" in missing["error"]
        assert matcher.metrics.value("crossview_matcher_cameras", state="online") == 1

        monkeypatch.setenv("CROSSVIEW_TOKEN", TOKEN)
        assert main(["status", "--url", url]) == 0
        text = capsys.readouterr().out
        assert "1 edges: 1 online; 2 cameras: 1 online, 1 offline" in text
        assert "falling behind" in text and "failed: " in text and "nope.mp4" in text
        assert main(["status", "--url", url, "--json"]) == 0
        assert json.loads(capsys.readouterr().out)["summary"]["edges"] == {"online": 1, "offline": 0}
    finally:
        node.stop()
        runner.join(30)
    # its last heartbeat says the cameras stopped; three missed ones later the edge itself is offline
    wait_until(lambda: _edges(url)["edges"][0]["cameras"][0]["source_state"] == "stopped", 10, "the last heartbeat")
    wait_until(lambda: _edges(url)["edges"][0]["state"] == "offline", 10, "the edge offline")


def test_a_malformed_heartbeat_is_counted_and_costs_no_sighting(live):
    matcher, url = live
    good = encode_heartbeat(beat("edge-9"))
    bad = msgpack.unpackb(good)
    bad["cams"][0]["state"] = "x" * 10_000
    with Pusher(matcher.ingest.endpoint) as pusher:
        pusher.send_raw(msgpack.packb(bad), good)
    wait_until(lambda: _edges(url)["edges"], 10, "the good heartbeat")
    assert matcher.ingest.rejected[Reason.FIELD_RANGE] == 1 and matcher.ingest.accepted == 0


def test_status_without_a_matcher_or_with_a_wrong_token_says_so(live, tmp_path, caplog, monkeypatch):
    _, url = live
    (tmp_path / "token").write_text("wrong-token-0123456789")
    assert main(["status", "--url", url, "--token-file", str(tmp_path / "token")]) == 2
    assert "missing or wrong token" in caplog.text
    monkeypatch.setenv("CROSSVIEW_TOKEN", TOKEN)
    assert main(["status", "--url", "127.0.0.1:8080"]) == 2
    assert "--url needs a scheme: http://127.0.0.1:8080" in caplog.text
    assert main(["status", "--url", f"http://127.0.0.1:{free_port()}"]) == 2
    assert "cannot reach the matcher" in caplog.text
