"""ZeroMQ CURVE between edge publisher and matcher receiver: encryption, allow-list, plain only on request."""

import shutil
import subprocess
import sys
import time

import numpy as np
import pytest
from helpers import wait_until

from crossview.edge.publisher import Publisher
from crossview.kernel.config import CurveConfig, PublisherConfig
from crossview.kernel.transport import KeyFileError
from crossview.kernel.wire import Sighting
from crossview.matcher.ingest import Receiver


def sighting(node: str) -> Sighting:
    emb = np.full(8, 8 ** -0.5, np.float32)
    return Sighting(node, "cam", time.time(), 1, 1, (0, 0, 10, 20), 0.9, emb, "m-1")


@pytest.fixture
def keys(tmp_path):
    """Key pairs made by the real command, and a matcher allow-list holding edge-1 only."""
    for name in ("matcher", "edge-1", "edge-2"):
        r = subprocess.run([sys.executable, "-m", "crossview.cli", "keys", "--out", str(tmp_path / "keys"), "--name", name],
                           capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stderr
    allowed = tmp_path / "allowed"
    allowed.mkdir()
    shutil.copy(tmp_path / "keys" / "edge-1.key", allowed)
    return tmp_path / "keys", allowed


def server(keys) -> Receiver:
    folder, allowed = keys
    return Receiver("tcp://127.0.0.1:*", CurveConfig(secret_key=folder / "matcher.key_secret", allowed_clients=allowed))


def edge(endpoint: str, keys, name: str) -> Publisher:
    folder, _ = keys
    sec = CurveConfig(secret_key=folder / f"{name}.key_secret", server_key=folder / "matcher.key")
    return Publisher(PublisherConfig(endpoint=endpoint, security=sec, spool_dir=folder.parent / "spool" / name))


def test_allowed_edge_gets_through_and_unknown_edge_gets_nothing(keys):
    rx = server(keys)
    good, bad = edge(rx.endpoint, keys, "edge-1"), edge(rx.endpoint, keys, "edge-2")
    plain = Publisher(PublisherConfig(endpoint=rx.endpoint, security=CurveConfig(mode="plain"),
                                      spool_dir=keys[0].parent / "spool" / "plain"))
    try:
        for _ in range(5):
            bad.send(sighting("edge-2"))
            plain.send(sighting("plain"))
            good.send(sighting("edge-1"))
        got = list(rx.iter(timeout=2.0))
        assert [s.node for s in got] == ["edge-1"] * 5
        assert rx.denied >= 1  # edge-2's handshake was refused and counted
    finally:
        for p in (good, bad, plain):
            p.close()
        rx.close()


def test_an_edge_key_cannot_write_as_another_node(keys):
    """edge-2 is on the allow-list too, but edge-1's key may write only as edge-1: sightings naming edge-2 over its
    connection are refused (told to the edge, counted, logged), its own go through; bind_nodes: false lets them."""
    folder, allowed = keys
    shutil.copy(folder / "edge-2.key", allowed)
    for bind in (True, False):
        rx = Receiver("tcp://127.0.0.1:*", CurveConfig(secret_key=folder / "matcher.key_secret", allowed_clients=allowed,
                                                       bind_nodes=bind))
        one = edge(rx.endpoint, keys, "edge-1")
        try:
            for _ in range(5):
                one.send(sighting("edge-2"))
                one.send(sighting("edge-1"))
            got = [s.node for s in rx.iter(timeout=2.0)]
            if bind:
                assert got == ["edge-1"] * 5
                assert rx.rejected["node_key"] == 5
                wait_until(lambda: one.refused_sightings == 5, 10, "the refusals told to the edge")
            else:
                assert sorted(got) == ["edge-1"] * 5 + ["edge-2"] * 5 and not rx.rejected
        finally:
            one.close(drain_s=0)
            rx.close()
            shutil.rmtree(folder.parent / "spool")


def test_an_edge_added_to_the_allow_list_needs_no_restart(keys):
    rx = server(keys)
    late = edge(rx.endpoint, keys, "edge-2")
    try:
        late.send(sighting("edge-2"))
        assert rx.receive(timeout=1.0) is None
        shutil.copy(keys[0] / "edge-2.key", keys[1])
        # ZeroMQ retries the refused handshake on its own reconnect timer.
        deadline = time.monotonic() + 15
        while (s := rx.receive(timeout=0.5)) is None and time.monotonic() < deadline:
            late.send(sighting("edge-2"))
        assert s is not None and s.node == "edge-2"
    finally:
        late.close()
        rx.close()


def test_bad_key_files_are_named(keys, tmp_path):
    folder, allowed = keys
    with pytest.raises(KeyFileError, match="security.secret_key: .*matcher.key holds no secret key"):
        Receiver("tcp://127.0.0.1:*", CurveConfig(secret_key=folder / "matcher.key", allowed_clients=allowed))
    junk = tmp_path / "junk.key"
    junk.write_text("hello")
    with pytest.raises(KeyFileError, match="security.server_key: .*junk.key"):
        edge("tcp://127.0.0.1:9", (folder, allowed), "edge-1").close()  # sanity: a good edge builds
        Publisher(PublisherConfig(endpoint="tcp://127.0.0.1:9", spool_dir=tmp_path / "spool",
                                  security=CurveConfig(secret_key=folder / "edge-1.key_secret", server_key=junk)))
