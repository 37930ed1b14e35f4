"""`crossview matcher` on a port that is taken: exit code 2 and a line naming the config key and the address,
no traceback (issue 9: a raw ZMQError traceback before). A real subprocess against a real busy socket."""

from __future__ import annotations

import socket
import subprocess
import sys

import pytest
import yaml


@pytest.fixture
def busy_port():
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    sock.listen()
    yield sock.getsockname()[1]
    sock.close()


@pytest.mark.parametrize("key", ["ingest.endpoint", "http.port", "metrics.port"])
def test_a_busy_port_names_its_config_key(tmp_path, busy_port, key):
    endpoint = f"tcp://127.0.0.1:{busy_port}" if key == "ingest.endpoint" else "tcp://127.0.0.1:*"
    cfg = {"data_dir": str(tmp_path / "data"), "ingest": {"endpoint": endpoint, "security": {"mode": "plain"}},
           "http": {"port": busy_port if key == "http.port" else 0, "token": "test-token-0123456789abcdef"},
           "metrics": {"port": busy_port if key == "metrics.port" else 0}}
    path = tmp_path / "matcher.yaml"
    path.write_text(yaml.safe_dump(cfg))
    r = subprocess.run([sys.executable, "-m", "crossview.cli", "matcher", "--config", str(path), "--max-seconds", "20"],
                       capture_output=True, text=True, timeout=60)
    address = endpoint if key == "ingest.endpoint" else f"127.0.0.1:{busy_port}"
    assert r.returncode == 2, r.stderr
    assert f"{key}: {address} is already in use" in r.stderr
    assert "Traceback" not in r.stderr, r.stderr
