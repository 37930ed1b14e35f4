"""Retention is a privacy promise in every file the matcher writes (issue 9): thumbnails deleted by retention
were still readable in `sightings.db-wal` 120 s later, and after a `kill -9` (secure_delete covers the main
file only). Thumbnails live as blobs in the SQLite store; its files are all the data dir holds besides the
FAISS snapshots. A real matcher process, fed through real ZeroMQ, killed with SIGKILL."""

from __future__ import annotations

import re
import time
from pathlib import Path

import numpy as np
import yaml
from helpers import CrossviewProcess, Pusher, make_sighting, unit_vectors, wait_until

PURGE_BOUND_S = 3.0  # the README's bound: the next WAL checkpoint (every second) after the retention pass, plus slack
MAX_AGE_S = 12.0  # long enough for all 2,000 to be on disk before the first expires, on a loaded machine


def marker(i: int) -> bytes:
    return f"PERSONAL-DATA-{i:05d}-".encode()


def thumbnail(i: int) -> bytes:
    return b"\xff\xd8\xff\xe0" + marker(i) * 100 + b"\xff\xd9"  # ~2 KB, recognisable


def found(data_dir: Path, n: int) -> dict[str, int]:
    """file -> how many of the n markers it holds, for every file under the data dir."""
    out = {}
    for path in sorted(p for p in data_dir.rglob("*") if p.is_file()):
        raw = path.read_bytes()
        if hits := sum(marker(i) in raw for i in range(n)):
            out[str(path.relative_to(data_dir))] = hits
    return out


def test_thumbnails_deleted_by_retention_leave_every_file_within_the_bound(tmp_path):
    data = tmp_path / "data"
    cfg = {"data_dir": str(data), "ingest": {"endpoint": "tcp://127.0.0.1:*", "security": {"mode": "plain"}},
           "http": {"port": 0, "token": "test-token-0123456789abcdef"},
           "retention": {"max_age_hours": MAX_AGE_S / 3600, "check_interval_s": 0.5}}
    (tmp_path / "matcher.yaml").write_text(yaml.safe_dump(cfg))
    proc = CrossviewProcess(tmp_path / "matcher.log", "matcher", "--config", str(tmp_path / "matcher.yaml"))
    try:
        endpoint = proc.wait_for_line("matcher ingesting on").split("matcher ingesting on ")[1].split()[0]
        n, vecs, now = 2000, unit_vectors(np.random.default_rng(0), 2000, 64), time.time()
        with Pusher(endpoint) as push:
            push.send([make_sighting(vecs[i], ts=now + i / 1000, frame=i, track=i // 20, thumbnail=thumbnail(i))
                       for i in range(n)])
        wait_until(lambda: found(data, n).get("sightings.db", 0) + found(data, n).get("sightings.db-wal", 0) >= n, 30,
                   "the thumbnails on disk")
        wait_until(lambda: sum(map(int, re.findall(r"retention: deleted (\d+) sightings", proc.text()))) == n, 60,
                   "retention")
        time.sleep(PURGE_BOUND_S)
        assert found(data, n) == {}, "deleted thumbnails still readable while the matcher runs"
        proc.kill9()
        assert found(data, n) == {}, "deleted thumbnails readable after kill -9"
    finally:
        proc.stop()
