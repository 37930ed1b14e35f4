"""Two matcher replicas on one PostgreSQL (FAISS each, following the store, or one Milvus), fed by two edges, one
replica `kill -9`ed.

| test                                   | what is checked                                                       |
|----------------------------------------|-----------------------------------------------------------------------|
| replica killed mid-ingest, restarted   | every sighting stored exactly once (count, distinct (node, seq), each seq |
|                                        | the edge spooled), every one acknowledged, one track id per edge track |
|                                        | though its sightings reached both replicas; both answer a query alike, |
|                                        | with tracks each of them ingested only in part. With FAISS, and with  |
|                                        | the Milvus standalone server (`milvus_server`, Strong consistency)    |
| the lease                              | one holder at a time, taken over once the holder's expired            |
| the edge's `publisher.endpoint`        | one string or a list of replicas; each checked, the key named         |
| a sighting both replicas were sent     | the second to commit skips it inside its transaction, ids consecutive |
| the deletion log                       | kept until every replica's index has applied it                       |
| two replicas on one Milvus (Lite)      | a version only the other ingested: the same answer from both; one it  |
|                                        | dropped: forgotten within a second, and not made again                |
| a replaced version dropped             | the migrating replica re-embeds and drops the old partition; the other |
|                                        | drops it too within a poll, and both answer the new version alike     |
| a drop in the deletion log             | the other replica's tail drops the partition at the logged drop, while |
|                                        | the store still holds the vectors, and keeps what was sent after it   |
| the watchlist across a lease handover  | the holder checks what the other replica ingested; after it stops, the |
|                                        | other takes the lease and checks on from the shared cursor: one alert |
|                                        | per track, every sighting checked                                     |

Real processes (`crossview matcher` twice), real edges' publishers (spool, DEALER connected to both replicas), the
session's PostgreSQL server (`pgserver.py`), the replicas' HTTP API; the handover, Milvus and drop tests run two
`Matcher`s in process (the drop's migration with tiny real ONNX models re-embedding real JPEG thumbnails).
"""

from __future__ import annotations

import dataclasses
import json
import time
import urllib.request

import cv2
import numpy as np
import pytest
import yaml
from helpers import CrossviewProcess, Pusher, free_port, make_sighting, matcher_config, store_insert, unit_vectors, wait_until

from crossview.edge.publisher import Publisher
from crossview.kernel.config import ConfigError, PublisherConfig, StoreConfig, load_edge_config
from crossview.matcher.lease import Lease
from crossview.matcher.pgstore import PgStore
from crossview.matcher.query import Subject
from crossview.matcher.service import Matcher

TOKEN = "test-token-0123456789abcdef"
NODES = ("edge-a", "edge-b")
PER_TRACK = 20  # sightings of each edge track
DIM = 32


class Replica:
    """A `crossview matcher` process on the shared database, on ports it keeps across a restart."""

    def __init__(self, tmp, name: str, store: dict, index: dict):
        self.tmp, self.name, self.port, self.http = tmp, name, free_port(), free_port()
        self.config = tmp / f"{name}.yaml"
        self.config.write_text(yaml.safe_dump({
            "data_dir": str(tmp / name), "store": store, "index": index,
            "ingest": {"endpoint": f"tcp://127.0.0.1:{self.port}", "security": {"mode": "plain"}, "batch_wait_ms": 2},
            "http": {"token": TOKEN, "port": self.http}, "metrics": {"log_interval_s": 1},
        }))
        self.endpoint, self.url, self.proc = f"tcp://127.0.0.1:{self.port}", f"http://127.0.0.1:{self.http}", None

    def start(self) -> Replica:
        self.proc = CrossviewProcess(self.tmp / f"{self.name}.log", "matcher", "--config", str(self.config))
        wait_until(self._healthy, 60, f"{self.name} serving")
        return self

    def _healthy(self) -> bool:
        assert self.proc.p.poll() is None, self.proc.text()[-3000:]
        try:
            return urllib.request.urlopen(f"{self.url}/api/v1/health", timeout=1).status == 200
        except OSError:
            return False

    def _call(self, path: str, body: dict | None = None) -> dict:
        req = urllib.request.Request(f"{self.url}{path}", None if body is None else json.dumps(body).encode(),
                                     {"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=10) as r:
            return json.load(r)

    def stats(self) -> dict:
        return self._call("/api/v1/stats")

    def query(self, sighting_id: int) -> list[tuple[str, int, int, float]]:
        """(camera, track id, best matching sighting, its score) of every matching track, as this replica answers."""
        out = self._call("/api/v1/query", {"sighting_id": sighting_id, "top_k": 50})
        return sorted((camera, t["track_id"], t["best"]["id"], round(t["score"], 5)) for camera, tracks in out["cameras"].items()
                      for t in tracks)


def walk(rng, people: np.ndarray, node: str, track: int, t0: float) -> list:
    """One edge track: a person's vector with noise, PER_TRACK frames 0.2 s apart."""
    vecs = people[track % len(people)] + 0.15 * unit_vectors(rng, PER_TRACK, DIM)
    return [make_sighting(v / np.linalg.norm(v), node=node, camera=f"cam-{node}", ts=t0 + f * 0.2, frame=f, track=track,
                          thumbnail=None) for f, v in enumerate(vecs)]


def send(pubs: dict[str, Publisher], sent: dict[str, list[int]], tracks: range, rng, people, t0: float,
         pace_s: float = 0.004, during=None) -> None:
    """Both edges' tracks, interleaved, paced like cameras; `during()` once half is sent."""
    batches = {node: [s for k in tracks for s in walk(rng, people, node, k, t0 + k)] for node in pubs}
    total = sum(map(len, batches.values()))
    for n, pair in enumerate(zip(*batches.values())):
        for node, s in zip(pubs, pair):
            sent[node].append(pubs[node].send(s))
        if during is not None and 2 * len(pubs) * (n + 1) >= total:
            during()
            during = None
        time.sleep(pace_s)


def stored(store: dict) -> list[tuple[str, int, int, int]]:
    import psycopg

    with psycopg.connect(StoreConfig(**store).conninfo()) as db:
        return db.execute("SELECT node, seq, track, track_id FROM sightings").fetchall()


@pytest.fixture(params=["faiss", pytest.param("milvus", marks=pytest.mark.milvus_server)])
def index_section(request) -> dict:
    """The replicas' `index` section: a FAISS index each, or one Milvus standalone server for both (Strong: a search
    sees the other replica's inserts too, so both answer alike at once)."""
    if request.param == "faiss":
        return {}
    return {"engine": "milvus", "milvus": {"uri": request.getfixturevalue("milvus_server"), "collection_prefix": "killed",
                                           "consistency": "Strong"}}


@pytest.mark.timeout(120)
def test_a_replica_killed_mid_ingest_loses_nothing_and_both_answer_alike(tmp_path, pg_server, index_section):
    store = pg_server.store_section(pg_server.fresh_db())
    one, two = (Replica(tmp_path, name, store, index_section).start() for name in ("one", "two"))
    rng, people, t0 = np.random.default_rng(7), unit_vectors(np.random.default_rng(1), 6, DIM), time.time() - 600
    pubs = {node: Publisher(PublisherConfig(endpoint=[one.endpoint, two.endpoint], security={"mode": "plain"}, hwm=64,
                                            spool_dir=tmp_path / f"spool-{node}")) for node in NODES}
    sent: dict[str, list[int]] = {node: [] for node in NODES}
    try:
        wait_until(lambda: all(p.reachable for p in pubs.values()), 10, "edges connected")
        send(pubs, sent, range(0, 12), rng, people, t0, during=one.proc.kill9)  # 480 sightings, the kill halfway
        wait_until(lambda: all(p.spooled == 0 for p in pubs.values()), 30, "every sighting acknowledged by the survivor")
        one.start()  # on the same port: the edges reconnect to it
        wait_until(lambda: all(len(p.connected) == 2 for p in pubs.values()), 15, "edges connected to both again")
        send(pubs, sent, range(12, 16), rng, people, t0)
        wait_until(lambda: all(p.spooled == 0 for p in pubs.values()), 30, "every sighting acknowledged")
        rows = stored(store)
        for node in NODES:
            seqs = [seq for n, seq, _, _ in rows if n == node]
            assert len(seqs) == len(set(seqs)) == len(sent[node]) and sorted(seqs) == sorted(sent[node])
            assert pubs[node].acknowledged == len(sent[node]) and pubs[node].dropped == 0
        track_ids = {}
        for node, _, track, track_id in rows:
            track_ids.setdefault((node, track), set()).add(track_id)
        assert all(len(ids) == 1 for ids in track_ids.values()), track_ids  # not split between the replicas
        total = sum(map(len, sent.values()))
        assert 0 < two.stats()["accepted"] < total and one.stats()["accepted"] > 0  # each stored a share
        assert two.stats()["partitions"]["m1"]["kind"] == ("milvus" if index_section else "flat")
        subject = min(track_id for node, _, track, track_id in rows if node == "edge-a" and track == 3)
        wait_until(lambda: one.query(subject) == two.query(subject), 10, "both replicas to answer alike")
        answer = one.query(subject)
        assert {camera for camera, *_ in answer} == {"cam-edge-a", "cam-edge-b"}
        same_person = {track_id for (node, track), ids in track_ids.items() for track_id in ids if track % 6 == 3}
        assert same_person - {subject} <= {track_id for _, track_id, *_ in answer}  # the query's own track is left out
    finally:
        for p in pubs.values():
            p.close(drain_s=0)
        for r in (one, two):
            r.proc.stop()


def test_a_lease_has_one_holder_and_passes_on_when_it_runs_out(pg_server):
    store = StoreConfig(**pg_server.store_section(pg_server.fresh_db()))
    first, second = Lease("job", store, ttl_s=0.6, holder="first"), Lease("job", store, ttl_s=0.6, holder="second")
    try:
        assert first.held() and not second.held()
        time.sleep(0.25)
        assert first.held() and not second.held()  # renewed: a third of the ttl had passed
        time.sleep(0.3)
        assert not second.held()  # renewed 0.3 s ago: still the first's
        wait_until(second.held, 5, "the other to take the lease once the first stopped renewing it")
        assert not first.held()  # its next renewal finds the lease taken
        second.release()
        wait_until(first.held, 2, "a released lease taken at the next try")
    finally:
        first.release()
        second.release()


def test_the_watchlist_checks_every_replicas_sightings_once_across_a_lease_handover(tmp_path, pg_server):
    store = pg_server.store_section(pg_server.fresh_db())
    rng = np.random.default_rng(3)
    person = unit_vectors(rng, 1, DIM)[0]
    first = Matcher(matcher_config(tmp_path / "first", store=store))
    first.start()
    second = None
    try:
        wait_until(first.leases["watchlist"].held, 5, "the first replica to take the watchlist lease")
        second = Matcher(matcher_config(tmp_path / "second", store=store))
        second.start()
        assert not second.leases["watchlist"].held()
        first.watchlist.add("visitor", Subject(person, "m1", {"by": "embedding"}), min_similarity=0.8)
        with Pusher(second.ingest.endpoint) as p:  # the replica not holding the lease ingests it
            p.send(walk(rng, person[None], "edge-a", 1, time.time() - 60))
        wait_until(lambda: len(first.watchlist.alerts()) == 1, 10, "the lease holder to check the other's sightings")
        assert (first.watchlist.alerted, second.watchlist.alerted) == (1, 0)  # raised by the holder alone
        first.stop()  # releases the lease: the other takes it at its next try
        with Pusher(second.ingest.endpoint) as p:
            p.send(walk(rng, person[None], "edge-a", 2, time.time() - 30))
        wait_until(lambda: len(second.watchlist.alerts()) == 2, 15, "the new holder to check from the shared cursor")
        alerts = second.watchlist.alerts()
        assert second.watchlist.alerted == 1
        assert sorted(a.track for a in alerts) == [1, 2] and len({a.track_id for a in alerts}) == 2
        assert second.watchlist._db.one("SELECT upto FROM checked")[0] == second.store.next_id() - 1  # all checked
    finally:
        first.stop()
        if second is not None:
            second.stop()


def test_the_edges_endpoint_is_one_matcher_or_a_list_of_replicas_each_checked(tmp_path):
    raw = {"node_id": "n", "cameras": [{"id": "a", "source": "x.mp4"}], "publisher": {"security": {"mode": "plain"}}}
    path = tmp_path / "edge.yaml"

    def publisher(endpoint):
        path.write_text(yaml.safe_dump({**raw, "publisher": {**raw["publisher"], "endpoint": endpoint}}))
        return load_edge_config(path).publisher

    assert publisher("tcp://m:5555").endpoints == ["tcp://m:5555"]
    assert publisher(["tcp://m1:5555", "tcp://m2:5555"]).endpoints == ["tcp://m1:5555", "tcp://m2:5555"]
    for bad, why in (([], "at least one endpoint"), (["tcp://m:1", "tcp://m:1"], "listed twice"),
                     (["tcp://m:1", "m2:5555"], "'m2:5555': not a ZeroMQ endpoint")):
        with pytest.raises(ConfigError, match=rf"publisher.endpoint: .*{why}"):
            publisher(bad)


def test_the_deletion_log_is_kept_until_every_replica_has_applied_it(pg_server):
    store = PgStore(StoreConfig(**pg_server.store_section(pg_server.fresh_db())))
    try:
        ids = store_insert(store, [make_sighting(v, frame=k) for k, v in enumerate(unit_vectors(np.random.default_rng(0), 4, DIM))])
        _, pos = store.delete(ids[:2])
        store.report_position("host:/a", pos)
        store.report_position("host:/b", 0)  # its index has not applied the deletions yet
        store.prune_deletions(pos)
        assert store.pruned_upto() == 0 and [i for _, i, _ in store.deletions_after(0)] == ids[:2]
        store.report_position("host:/b", pos)
        store.prune_deletions(pos)
        assert store.pruned_upto() == pos and store.deletions_after(0) == []
    finally:
        store.close()


def test_a_sighting_another_replica_stored_meanwhile_is_skipped_in_the_transaction_not_refused(pg_server):
    cfg = StoreConfig(**pg_server.store_section(pg_server.fresh_db()))
    one, two = PgStore(cfg), PgStore(cfg)
    try:
        vecs = list(unit_vectors(np.random.default_rng(0), 3, DIM))
        a, b, c = (dataclasses.replace(make_sighting(v, frame=k, track=1, ts=1000.0 + k), seq=k + 1) for k, v in enumerate(vecs))
        assert one.insert_new([a, b], vecs[:2], lambda stored, ids, ends: ids[:1] * len(ids)) == (1, set())
        # `two` was sent b and c before `one` stored b: b is skipped, c takes the next id and continues b's track
        first, skipped = two.insert_new([b, c], vecs[1:], lambda stored, ids, ends: [ends[("edge-1", "gate", 1, "m1")][0]] * len(ids))
        assert (first, skipped) == (3, {("edge-1", 2)})
        assert {r.id: (r.frame, r.track_id) for r in two.records([1, 2, 3]).values()} == {1: (0, 1), 2: (1, 1), 3: (2, 1)}
    finally:
        one.close()
        two.close()


def test_two_replicas_on_one_milvus_answer_alike_and_follow_each_others_collections(tmp_path, pg_server):
    pytest.importorskip("milvus_lite", reason="the milvus extra's Milvus Lite is not installed")
    from crossview.matcher.milvus_index import collection_name
    store = pg_server.store_section(pg_server.fresh_db())
    index = {"engine": "milvus", "milvus": {"lite_file": str(tmp_path / "milvus.db"), "index_type": "FLAT",
                                            "consistency": "Strong"}}
    first = Matcher(matcher_config(tmp_path / "first", store=store, index=index))
    first.start()
    second = Matcher(matcher_config(tmp_path / "second", store=store, index=index))
    second.start()  # before any sighting: the version's collection is made by the first's ingest
    try:
        rng = np.random.default_rng(5)
        people = unit_vectors(rng, 3, DIM)
        with Pusher(first.ingest.endpoint) as p:
            p.send([s for k in range(6) for s in walk(rng, people, "edge-a", k, time.time() - 60)])
        wait_until(lambda: first.ingest.accepted == 6 * PER_TRACK, 20, "the first replica to ingest")
        wait_until(lambda: "m1" in second.index.partitions, 5, "the second replica to open the version's collection")
        answers = [[(h.track_id, round(h.score, 5)) for h in m.queries.search_sighting(1).ranked()] for m in (first, second)]
        assert answers[0] == answers[1] and len(answers[0]) == 5  # every other track, from either replica
        first.index.drop("m1")  # as the migration drops a replaced version, which the store lists until its vectors go
        wait_until(lambda: "m1" not in second.index.partitions, 5, "the other replica to forget the dropped collection")
        first.index.open_stored()
        assert "m1" not in first.index.partitions and collection_name("crossview", "m1") not in first.index.client.list_collections()
    finally:
        first.stop()
        second.stop()


def thumbnailed(rng, n: int, model: str, t0: float) -> list:
    """n sightings of `model` (8-d), each its own track, with a JPEG of noise that a new version can re-embed."""
    return [make_sighting(v, ts=t0 + k, frame=k, track=k, model=model,
                          thumbnail=cv2.imencode(".jpg", rng.integers(0, 255, (32, 16, 3), np.uint8))[1].tobytes())
            for k, v in enumerate(unit_vectors(rng, n, 8))]


def answers(m: Matcher, sighting_id: int) -> list[tuple[int, float]]:
    return [(h.track_id, round(h.score, 5)) for h in m.queries.search_sighting(sighting_id).ranked()]


def test_a_version_the_migrating_replica_drops_goes_from_the_others_index_too(tmp_path, pg_server, make_tiny_model):
    store = pg_server.store_section(pg_server.fresh_db())
    files = {v: tmp_path / f"{v}.onnx" for v in ("tiny-1", "tiny-2")}
    for seed, (version, path) in enumerate(files.items()):
        make_tiny_model(path, version, seed=seed)
    first = Matcher(matcher_config(tmp_path / "first", store=store, migration={"poll_s": 0.2}))
    first.registry.promote(first.registry.register(files["tiny-1"]).version)
    first.start()
    second = None
    try:
        wait_until(first.leases["migration"].held, 5, "the first replica to take the migration lease")
        second = Matcher(matcher_config(tmp_path / "second", store=store, migration={"poll_s": 0.2}))
        second.start()
        with Pusher(second.ingest.endpoint) as p:  # the replica not migrating ingests them
            p.send(thumbnailed(np.random.default_rng(4), 40, "tiny-1", time.time() - 60))
        wait_until(lambda: all(m.index.stats().get("tiny-1", {}).get("size") == 40 for m in (first, second)), 10,
                   "both replicas to index the old version")
        first.registry.promote(first.registry.register(files["tiny-2"]).version)  # no edge reports tiny-1: it goes
        wait_until(lambda: "tiny-1" not in first.index.partitions, 30, "the migrating replica to drop the old version")
        wait_until(lambda: "tiny-1" not in second.index.partitions, 3, "the other replica to drop it too, within a poll")
        assert second.index.stats()["tiny-2"]["size"] == 40 and not second.migration.migrated  # re-embedded by the first
        assert answers(first, 1) == answers(second, 1) and len(answers(first, 1)) == 10  # top_k
        for m in (first, second):
            with pytest.raises(LookupError, match="no sightings of embedding model version 'tiny-1'"):
                m.index.search("tiny-1", np.ones(8, np.float32), 5)
    finally:
        first.stop()
        if second is not None:
            second.stop()


def test_a_drop_in_the_deletion_log_reaches_the_other_replica_before_the_vectors_are_gone(tmp_path, pg_server):
    store = pg_server.store_section(pg_server.fresh_db())
    first = Matcher(matcher_config(tmp_path / "first", store=store, migration={"enabled": False}))
    first.start()
    second = Matcher(matcher_config(tmp_path / "second", store=store))  # not started: its tail is polled here
    rng = np.random.default_rng(6)
    try:
        with Pusher(first.ingest.endpoint) as p:
            p.send(thumbnailed(rng, 30, "m1", time.time() - 60))
            wait_until(lambda: first.ingest.accepted == 30, 10, "the first replica to ingest")
            second.tail.poll()
            assert second.index.stats()["m1"]["size"] == 30
            with first.ingest.quiet():  # the migration's drop: the partition, then the entry in the log
                first.index.drop("m1")
                first.store.log_drop("m1", first.store.next_id() - 1)
            p.send(thumbnailed(rng, 5, "m1", time.time() - 30))  # an edge sending the dropped version still
            wait_until(lambda: first.ingest.accepted == 35, 10, "the sightings sent after the drop")
        second.tail.poll()  # reads the 5 new rows into the old partition, then the drop
        assert "m1" in second.store.models() and second.store.count("m1", None, None, None, 100) == 35  # all still stored
        assert first.index.stats()["m1"]["size"] == second.index.stats()["m1"]["size"] == 5
        later = second.store.vector(31)
        assert sorted(first.index.search("m1", later, 10)[1]) == sorted(second.index.search("m1", later, 10)[1]) == [31, 32, 33, 34, 35]
    finally:
        first.stop()
        second.stop()
