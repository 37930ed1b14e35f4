"""The matcher's CURVE allow-list folder as an operator edits it (issue 9): a junk file in it must not take
CURVE login down (it killed the authenticator thread: 0 of 50 through, and SIGTERM no longer stopped the
matcher), and removing a key must cut off the edge's open connection, not only its next one."""

from __future__ import annotations

import json
import re
import shutil
import signal
import time
import urllib.request

import test_transport
import yaml
from helpers import CrossviewProcess, free_port, wait_until
from test_transport import edge, server, sighting

from crossview.kernel.transport import _REREAD_S

TOKEN = "test-token-0123456789abcdef"
keys = test_transport.keys  # the fixture: key pairs, and an allow-list holding edge-1


def send(publisher, node: str, frames: range) -> None:
    for f in frames:
        s = sighting(node)
        s.frame = f
        publisher.send(s)


def receive_frames(rx, want: int, timeout: float = 10.0) -> dict[str, set[int]]:
    """node -> frames received, until `want` distinct ones came in or `timeout` passed."""
    got: dict[str, set[int]] = {}
    deadline = time.monotonic() + timeout
    while sum(map(len, got.values())) < want and time.monotonic() < deadline:
        for s in rx.receive_batch(0.2, 1000):
            got.setdefault(s.node, set()).add(s.frame)
    return got


def junk_files(allowed) -> list:
    (allowed / "notes.key").write_text("")
    (allowed / "readme.key").write_bytes(b"\x00\xff not a certificate\n")
    return [allowed / "notes.key", allowed / "readme.key"]


def test_junk_files_are_skipped_once_logged_and_login_keeps_working(keys, caplog):
    notes, _ = junk_files(keys[1])
    rx = server(keys)
    try:
        for attempt in range(2):  # each connection re-reads the folder: the junk is logged once all the same
            pub = edge(rx.endpoint, keys, "edge-1")
            send(pub, "edge-1", range(attempt * 50, attempt * 50 + 50))
            assert len(receive_frames(rx, 50).get("edge-1", ())) == 50
            pub.close()
        notes.unlink()
        pub = edge(rx.endpoint, keys, "edge-1")
        send(pub, "edge-1", range(100, 150))
        assert len(receive_frames(rx, 50).get("edge-1", ())) == 50
        pub.close()
    finally:
        rx.close()  # returns: the authenticator thread is alive to be stopped
    assert caplog.text.count("notes.key skipped: not a public key file") == 1
    assert caplog.text.count("readme.key skipped") == 1


def test_removing_a_key_cuts_off_its_open_connection(keys):
    folder, allowed = keys
    shutil.copy(folder / "edge-2.key", allowed)
    rx = server(keys)
    one, two = edge(rx.endpoint, keys, "edge-1"), edge(rx.endpoint, keys, "edge-2")
    try:
        send(one, "edge-1", range(20))
        send(two, "edge-2", range(20))
        got = receive_frames(rx, 40)
        assert len(got["edge-1"]) == 20 and len(got["edge-2"]) == 20

        (allowed / "edge-2.key").unlink()
        time.sleep(_REREAD_S)  # one re-read of the folder
        send(one, "edge-1", range(20, 120))
        send(two, "edge-2", range(20, 120))  # the same open connection as before
        got = receive_frames(rx, 200, timeout=3.0)
        assert len(got["edge-1"] & set(range(20, 120))) == 100
        assert "edge-2" not in got, sorted(got.get("edge-2", ()))
        assert rx.guard.cut_off >= 1
    finally:
        one.close()
        two.close()
        rx.close()


def test_a_matcher_with_junk_in_its_allow_list_takes_edges_and_stops_on_sigterm(keys, tmp_path):
    folder, allowed = keys
    notes, _ = junk_files(allowed)
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    cfg = {"data_dir": str(tmp_path / "data"),
           "ingest": {"endpoint": endpoint, "security": {"secret_key": str(folder / "matcher.key_secret"),
                                                         "allowed_clients": str(allowed)}},
           "http": {"port": 0, "token": TOKEN}}
    (tmp_path / "matcher.yaml").write_text(yaml.safe_dump(cfg))
    proc = CrossviewProcess(tmp_path / "matcher.log", "matcher", "--config", str(tmp_path / "matcher.yaml"))
    try:
        url = re.search(r"HTTP API and web page on (\S+)", proc.wait_for_line("HTTP API and web page on"))[1]

        def accepted() -> int:
            req = urllib.request.Request(f"{url}api/v1/stats", headers={"Authorization": f"Bearer {TOKEN}"})
            with urllib.request.urlopen(req, timeout=10) as res:
                return json.load(res)["accepted"]

        for n, frames in ((50, range(50)), (100, range(50, 100))):
            pub = edge(endpoint, keys, "edge-1")
            send(pub, "edge-1", frames)
            wait_until(lambda: accepted() >= n, 20, f"{n} sightings accepted")
            assert accepted() == n
            pub.close()
            notes.unlink(missing_ok=True)  # the second edge connects with the junk file gone
        proc.p.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0, proc.text()
    finally:
        proc.stop()
    assert "notes.key skipped" in proc.text()
