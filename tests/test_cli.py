"""First run as the README's reader meets it: `crossview init`, `crossview keys`, options after the verb."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import yaml
from helpers import CrossviewProcess, free_port, wait_for

from crossview.cli import build_parser
from crossview.kernel.config import load_edge_config, load_matcher_config
from crossview.kernel.transport import KeyFileError, secure_client
from crossview.site import init_site, parse_camera

REPO = Path(__file__).resolve().parents[1]
CLIP = REPO / "data" / "demo" / "tud-campus.mp4"


def crossview(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "crossview.cli", *args], capture_output=True, text=True, timeout=timeout)


def test_log_level_goes_before_or_after_the_verb():
    parse = build_parser().parse_args
    assert parse(["edge", "--log-level", "DEBUG"]).log_level == "DEBUG"
    assert parse(["--log-level", "ERROR", "matcher"]).log_level == "ERROR"
    assert parse(["query", "--sighting", "1"]).log_level == "INFO"


def test_keys_never_replaces_a_pair_without_force(tmp_path):
    assert crossview("keys", "--out", str(tmp_path), "--name", "matcher").returncode == 0
    before = (tmp_path / "matcher.key_secret").read_bytes()
    again = crossview("keys", "--out", str(tmp_path), "--name", "matcher")
    assert again.returncode == 2 and "exists already" in again.stderr and "--force" in again.stderr
    assert (tmp_path / "matcher.key_secret").read_bytes() == before
    assert crossview("keys", "--out", str(tmp_path), "--name", "matcher", "--force").returncode == 0
    assert (tmp_path / "matcher.key_secret").read_bytes() != before


def test_a_missing_key_file_says_not_found_and_how_to_make_one(tmp_path):
    import zmq

    from crossview.kernel.config import CurveConfig

    with zmq.Context() as ctx, ctx.socket(zmq.PUSH) as sock:
        with pytest.raises(KeyFileError, match=r"security\.secret_key: .*nope\.key_secret: not found; .*crossview init"):
            secure_client(sock, CurveConfig(secret_key=tmp_path / "nope.key_secret", server_key=tmp_path / "m.key"))


def test_init_refuses_bad_arguments_and_an_existing_site(tmp_path):
    r = crossview("init", str(tmp_path / "s"), "--edges", "edge-1,edge-2", "--camera", "edge-1:gate=x.mp4")
    assert r.returncode == 2 and "no --camera for edge-2" in r.stderr and not (tmp_path / "s").exists()
    r = crossview("init", str(tmp_path / "s"), "--edges", "edge-1", "--camera", "gate")
    assert r.returncode == 2 and "[EDGE:]ID=SOURCE" in r.stderr
    r = crossview("init", str(tmp_path / "s"), "--edges", "edge-1", "--camera", "..=x.mp4")  # a folder name upwards
    assert r.returncode == 2 and "[EDGE:]ID=SOURCE" in r.stderr and not (tmp_path / "s").exists()
    r = crossview("init", str(tmp_path / "s"), "--edges", "..", "--camera", "gate=x.mp4")
    assert r.returncode == 2 and "--edges: distinct node ids" in r.stderr
    (tmp_path / "s").mkdir()
    (tmp_path / "s" / "notes").write_text("mine")
    r = crossview("init", str(tmp_path / "s"), "--edges", "edge-1", "--camera", "gate=x.mp4")
    assert r.returncode == 2 and "not empty" in r.stderr and (tmp_path / "s" / "notes").read_text() == "mine"


def test_init_makes_a_site_whose_edge_and_matcher_talk_over_curve(tmp_path, default_model):
    site, port, http_port = tmp_path / "site", free_port(), free_port()
    r = crossview("init", str(site), "--edges", "edge-1,edge-2", "--camera", f"gate={CLIP}",
                  "--camera", "edge-2:dock=rtsp://cam.invalid/stream", "--port", str(port), "--http-port", str(http_port))
    assert r.returncode == 0, r.stderr
    matcher_cfg = load_matcher_config(site / "matcher" / "matcher.yaml")
    edge_cfg = load_edge_config(site / "edge-1" / "edge.yaml")
    assert matcher_cfg.ingest.security.mode == edge_cfg.publisher.security.mode == "curve"
    assert sorted(p.name for p in matcher_cfg.ingest.security.allowed_clients.iterdir()) == ["edge-1.key", "edge-2.key"]
    assert [c.id for c in load_edge_config(site / "edge-2" / "edge.yaml").cameras] == ["gate", "dock"]
    assert (site / "matcher" / "keys" / "http-token").stat().st_mode & 0o077 == 0
    assert "crossview edge --config" in r.stdout and "crossview adapt --config" in r.stdout

    (site / "models").mkdir()
    shutil.copy(default_model, site / "models" / "mobilenetv2-imagenet.onnx")
    matcher = CrossviewProcess(tmp_path / "matcher.log", "matcher", "--config", str(site / "matcher" / "matcher.yaml"))
    try:
        token = (site / "matcher" / "keys" / "http-token").read_text().strip()
        stats = _stats(http_port, token)
        assert wait_for(lambda: stats() is not None, 60), matcher.text()
        edge = crossview("edge", "--config", str(site / "edge-1" / "edge.yaml"), "--max-seconds", "90", timeout=150)
        assert edge.returncode == 0, edge.stderr
        assert wait_for(lambda: (stats() or {}).get("cameras", {}).get("gate", 0) > 0, 30), (edge.stderr[-2000:], stats())
        # The edges' token reads the registry (nothing is production yet) and nothing else.
        edge_token = (site / "edge-1" / "keys" / "edge-token").read_text().strip()
        assert _http_status(http_port, "/api/v1/models/production", edge_token) == 404
        assert _http_status(http_port, "/api/v1/stats", edge_token) == 403
    finally:
        matcher.stop()


def _request(port: int, path: str, token: str) -> urllib.request.Request:
    return urllib.request.Request(f"http://127.0.0.1:{port}{path}", headers={"Authorization": f"Bearer {token}"})


def _stats(port: int, token: str):
    def get() -> dict | None:
        try:
            with urllib.request.urlopen(_request(port, "/api/v1/stats", token), timeout=5) as resp:
                return json.load(resp)
        except OSError:
            return None

    return get


def _http_status(port: int, path: str, token: str) -> int:
    try:
        with urllib.request.urlopen(_request(port, path, token), timeout=5) as resp:
            return resp.status
    except urllib.error.HTTPError as e:
        return e.code


def test_init_gives_the_edges_the_registry_and_a_read_only_token_of_their_own(tmp_path):
    """A site from `init` rolls out the models `crossview adapt` promotes, and uploads harvest, without editing."""
    site = tmp_path / "site"
    init_site(site, ["edge-1", "edge-2"], [parse_camera("gate=rtsp://10.0.0.5/stream")], matcher_host="10.0.0.2",
              http_port=8081)
    matcher = load_matcher_config(site / "matcher" / "matcher.yaml")
    api_token, edge_token = matcher.http.token_file, matcher.http.edge_token_file
    assert edge_token == site / "matcher" / "keys" / "edge-token"
    assert matcher.http.host == "0.0.0.0", "edges on other machines must reach the registry"
    secret = [api_token, edge_token]
    for edge in ("edge-1", "edge-2"):
        cfg = load_edge_config(site / edge / "edge.yaml")
        own = site / edge / "keys" / "edge-token"
        assert cfg.embedder.registry.url == cfg.harvest.upload.url == "http://10.0.0.2:8081"
        assert cfg.embedder.registry.token_file == cfg.harvest.upload.token_file == own
        assert own.read_text() == edge_token.read_text()
        assert not (site / edge / "keys" / "http-token").exists(), "an edge never holds the API token"
        assert "&" not in (site / edge / "edge.yaml").read_text(), "plain YAML: no anchors"
        secret.append(own)
    assert all(p.stat().st_mode & 0o777 == 0o600 for p in secret), {p: oct(p.stat().st_mode) for p in secret}
    assert api_token.read_text() != edge_token.read_text() and len(edge_token.read_text().strip()) >= 32


def test_init_configs_are_plain_yaml_a_person_can_edit(tmp_path):
    assert crossview("init", str(tmp_path / "s"), "--edges", "e1", "--camera", f"gate={CLIP}").returncode == 0
    text = (tmp_path / "s" / "e1" / "edge.yaml").read_text()
    assert text.startswith("# Made by `crossview init`")
    assert yaml.safe_load(text)["cameras"] == [{"id": "gate", "source": str(CLIP), "fps": 5}]


def test_an_edge_without_its_embedder_names_the_key_and_the_fix(tmp_path):
    """Straight after `init`, before `build-embedder`: the first thing a new user may run into."""
    assert crossview("init", str(tmp_path / "s"), "--edges", "e1", "--camera", f"gate={CLIP}").returncode == 0
    r = crossview("edge", "--config", str(tmp_path / "s" / "e1" / "edge.yaml"), "--max-seconds", "1")
    model = tmp_path / "s" / "models" / "mobilenetv2-imagenet.onnx"
    assert r.returncode == 2
    assert f"embedder.model: {model}: model file not found; `crossview build-embedder --out {model}`" in r.stderr


def test_a_busy_port_names_the_config_key_and_the_address(tmp_path, default_model):
    assert crossview("init", str(tmp_path / "s"), "--edges", "e1", "--camera", f"gate={CLIP}").returncode == 0
    config = tmp_path / "s" / "e1" / "edge.yaml"
    raw = yaml.safe_load(config.read_text())
    (tmp_path / "s" / "models").mkdir()
    (tmp_path / "s" / "models" / "mobilenetv2-imagenet.onnx").symlink_to(default_model)
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        config.write_text(yaml.safe_dump({**raw, "metrics": {"port": port}}))
        r = crossview("edge", "--config", str(config), "--max-seconds", "1")
    assert r.returncode == 2, r.stderr
    assert f"metrics.port: 127.0.0.1:{port} is already in use" in r.stderr
    assert "Traceback" not in r.stderr


def test_hostile_arguments_get_one_line_and_exit_2(tmp_path):
    """Wrong files and out-of-range numbers on the command line: a message naming them, never a traceback."""
    (tmp_path / "text.pt").write_text("not a checkpoint")
    cases = [
        (("export-detector", str(tmp_path / "text.pt"), "--out", str(tmp_path / "d.onnx")), "not loadable YOLO weights"),
        (("export-detector", str(CLIP), "--out", str(tmp_path / "d.onnx")), "not a PyTorch checkpoint"),
        (("keys", "--name", "../../x", "--out", str(tmp_path / "keys")), "key name: an id is letters"),
        (("query", "--data-dir", str(tmp_path), "--track", "edge-1:gate:99999999999999999999"), "the track a number up to"),
        (("edge", "--config", "configs/demo.yaml", "--max-seconds", "-1"), "a positive number of seconds"),
        (("calibrate", str(tmp_path / "m.onnx"), "--harvest", str(tmp_path), "--min-gap", "nan"), "a positive number"),
    ]
    for args, needle in cases:
        r = crossview(*args)
        assert r.returncode == 2 and needle in r.stderr and "Traceback" not in r.stderr, (args, r.stderr[-2000:])
    assert not (tmp_path.parent / "x.key").exists() and not Path("/tmp/x.key").exists()
