"""Durability: what the matcher accepted survives a clean stop, a damaged snapshot and `kill -9`.

The restart and `kill -9` tests run on both deployments (SQLite + FAISS, PostgreSQL + Milvus); the deletion-log one
on both store backends with FAISS; the WAL and damaged-snapshot ones on SQLite.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import yaml
from helpers import (
    Pusher,
    held_ids,
    index_ids,
    make_sighting,
    matcher_config,
    person_world,
    store_insert,
    unit_vectors,
    wait_until,
)

from crossview.kernel.config import StoreConfig, load_matcher_config
from crossview.matcher.query import Filters
from crossview.matcher.service import Matcher
from crossview.matcher.store import Store


def _stored(data_dir: Path, store: dict | None = None) -> dict[int, float]:
    """Sighting id -> ts as another reader of the store sees them (the SQLite file, or the `store` section's
    PostgreSQL database): committed ones only."""
    if store:
        import psycopg

        with psycopg.connect(StoreConfig(**store).conninfo()) as db:
            return dict(db.execute("SELECT id, ts FROM sightings").fetchall())
    db = sqlite3.connect(f"{(data_dir / 'sightings.db').as_uri()}?mode=ro", uri=True)
    try:
        return dict(db.execute("SELECT id, ts FROM sightings"))
    finally:
        db.close()


def _store_ids(data_dir: Path, store: dict | None = None) -> set[int]:
    return set(_stored(data_dir, store))


def _ingest(m: Matcher, sightings: list) -> None:
    target = m.ingest.accepted + len(sightings)
    with Pusher(m.ingest.endpoint) as push:
        push.send(sightings)
    wait_until(lambda: m.ingest.accepted == target, 20, f"{target} sightings accepted")


def _filled(cfg, sightings: list) -> None:
    """A matcher that ingested `sightings` and stopped cleanly."""
    m = Matcher(cfg)
    m.start()
    _ingest(m, sightings)
    m.stop()


def _ranked(m: Matcher, world, person: int) -> list[tuple]:
    result = m.queries.search_track(*world.track(person, "gate"), None, Filters(top_k=5))
    return [(h.camera, h.track, round(h.score, 5), h.n_sightings) for h in result.ranked()]


def test_restart_after_a_clean_stop_keeps_everything_and_never_reuses_ids(tmp_path, deployment):
    world = person_world()
    cfg = matcher_config(tmp_path, **deployment)
    store = deployment["store"]
    m = Matcher(cfg)
    m.start()
    _ingest(m, world.sightings)
    last = max(_store_ids(tmp_path, store))
    assert m.remove([last, 1, 2]) == 3
    before = {p: _ranked(m, world, p) for p in (0, 3, 19)}
    m.stop()
    if cfg.index.engine == "faiss":  # Milvus keeps the vectors itself: the matcher writes no snapshot
        assert list((tmp_path / "index").glob("*.json")), "a final snapshot is written at stop"

    again = Matcher(cfg)
    assert {p: _ranked(again, world, p) for p in (0, 3, 19)} == before
    assert held_ids(again.index, "m1") == _store_ids(tmp_path, store)
    again.start()
    _ingest(again, [make_sighting(world.centers[0], camera="yard", track=99)])
    [new] = _store_ids(tmp_path, store) - set(range(1, last + 1))
    assert new == last + 1, "the deleted highest id is not handed out again"
    again.stop()


def test_a_damaged_snapshot_is_rebuilt_from_the_store(tmp_path, caplog):
    world = person_world(persons=5)
    cfg = matcher_config(tmp_path)
    _filled(cfg, world.sightings)
    [faiss_file] = (tmp_path / "index").glob("*.faiss")
    faiss_file.write_bytes(faiss_file.read_bytes()[:100])
    again = Matcher(cfg)
    assert "unusable" in caplog.text and "rebuilt from the store" in caplog.text
    assert again.index.partition("m1").size == len(world.sightings)
    assert len(again.queries.search_track(*world.track(2, "gate"), None, Filters(min_score=0.7)).ranked()) == 2
    again.stop()


def test_a_snapshot_older_than_the_pruned_deletion_log_is_not_trusted(tmp_path, caplog, store_section):
    # FAISS on both stores: the snapshot and the deletion log it is checked against are FAISS's (Milvus has no snapshot).
    world = person_world(persons=5)
    cfg = matcher_config(tmp_path, store=store_section)
    _filled(cfg, world.sightings)
    shutil.copytree(tmp_path / "index", tmp_path / "old-index")  # e.g. a backup of the index folder
    m = Matcher(cfg)
    m.remove(list(range(1, 31)))
    m.stop()  # snapshot, then the deletion log is pruned past the old snapshot
    shutil.rmtree(tmp_path / "index")
    (tmp_path / "old-index").rename(tmp_path / "index")
    again = Matcher(cfg)
    assert "does not fit the store" in caplog.text
    assert index_ids(again.index.partition("m1").index) == _store_ids(tmp_path, store_section) == set(range(31, 91))
    again.stop()


def test_background_checkpoints_restart_the_wal(tmp_path):
    """With checkpoints off the commit path, `checkpoint()` must still let the next commit write the WAL from its
    start: a WAL under steady ingest would otherwise grow without end."""
    store = Store(tmp_path / "sightings.db")
    store.checkpoint_in_background()
    rng, wal = np.random.default_rng(4), tmp_path / "sightings.db-wal"
    sizes = []
    for k in range(6):
        store_insert(store, [make_sighting(v, frame=k) for v in unit_vectors(rng, 300, 64)])
        sizes.append(wal.stat().st_size)
        store.checkpoint()
    store.close()
    assert max(sizes) < 1.5 * sizes[0], sizes  # without the checkpoints: 6x
    assert len(_stored(tmp_path)) == 1800


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _Sender(threading.Thread):
    """An edge pushing sightings without pause; every 10th is 10 days old, for retention to delete."""

    def __init__(self, endpoint: str, n: int):
        super().__init__(daemon=True)
        rng, now = np.random.default_rng(3), time.time()
        self.old = {i for i in range(n) if i % 10 == 0}
        self.sightings = [make_sighting(v, camera=f"cam{i % 4}", ts=now - 10 * 86400 if i in self.old else now + i * 1e-3,
                                        frame=i, track=i // 20) for i, v in enumerate(unit_vectors(rng, n, 64))]
        self.endpoint, self.stop = endpoint, threading.Event()

    def run(self) -> None:
        with Pusher(self.endpoint) as push:
            for i in range(0, len(self.sightings), 200):
                if self.stop.is_set():
                    return
                push.send(self.sightings[i:i + 200])
                time.sleep(0.01)


@pytest.mark.timeout(120)
def test_kill_9_mid_ingest_loses_no_accepted_sighting(tmp_path, caplog, deployment):
    caplog.set_level(logging.INFO, logger="crossview.matcher.index")
    port, store, faiss = _free_port(), deployment["store"], not deployment["index"]
    raw = {
        "data_dir": "data",
        "ingest": {"endpoint": f"tcp://127.0.0.1:{port}", "security": {"mode": "plain"}, "batch_max": 500},
        "index": {"snapshot_interval_s": 0.3, **deployment["index"]},
        "retention": {"max_age_hours": 24, "check_interval_s": 0.1},
        "http": {"token": "test-token-0123456789"},
        "metrics": {"log_interval_s": 1},
        "store": store,
    }
    config = tmp_path / "matcher.yaml"
    config.write_text(yaml.safe_dump(raw))
    data = tmp_path / "data"
    log_file = open(tmp_path / "matcher.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "crossview.cli", "matcher", "--config", str(config)],
                            stdout=log_file, stderr=subprocess.STDOUT)
    sender = _Sender(f"tcp://127.0.0.1:{port}", 40000)
    sender.start()
    try:
        wait_until(lambda: "matcher ingesting on" in (tmp_path / "matcher.log").read_text(), 30, "the matcher ingesting")
        if faiss:
            wait_until(lambda: list((data / "index").glob("*.json")), 30, "a first snapshot")
        wait_until(lambda: len(_store_ids(data, store)) >= 8000, 30, "8000 sightings committed")
        acknowledged = _stored(data, store)  # committed, so counted as accepted by the service
        os.kill(proc.pid, signal.SIGKILL)
        assert proc.wait(10) == -signal.SIGKILL
    finally:
        sender.stop.set()
        proc.kill()
        log_file.close()
    assert len(acknowledged) < 40000, "the kill came mid-ingest"
    sender.join()

    left = _store_ids(data, store)  # what the killed one left; the restart's retention may delete its old rows
    if faiss:  # what its last snapshot held, read before the restart can write a new one
        snapped = max(json.loads(f.read_text())["max_id"] for f in (data / "index").glob("*.json"))
    m = Matcher(load_matcher_config(config))  # restart: FAISS's snapshot + replay of the store, or Milvus's reconciling
    stored = _store_ids(data, store)
    fresh = {i for i, ts in acknowledged.items() if ts > time.time() - 86400}  # the rest retention may delete
    assert len(fresh) >= 0.9 * 8000 - 1 and fresh <= stored, "an acknowledged sighting was lost"
    assert held_ids(m.index, "m1") == stored, "index and store disagree after recovery"
    assert m.index.partition("m1").size == len(stored), "the index counts rows it does not hold, or holds some twice"
    if faiss:
        replayed = re.search(r"snapshot of (\d+) \(flat\) \+ (\d+) replayed, (\d+) deletions replayed", caplog.text)
        assert replayed, "recovery did not start from a snapshot"
        assert int(replayed[2]) == sum(i > snapped for i in left), "the replay is not what the store holds beyond the snapshot"
    rng = np.random.default_rng(0)
    for sid in rng.choice(sorted(fresh), 100, replace=False).tolist():  # findable by query, not just stored
        scores, ids = m.index.search("m1", m.store.vector(sid), 1)
        assert ids[0] == sid and scores[0] > 0.999
    m.stop()
