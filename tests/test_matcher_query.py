"""Matcher ingest and queries on synthetic people, through a real ZeroMQ socket.

Twenty people walk past three cameras (one edge track per person and camera); model version m2
(32-d) holds other people, and m3 holds exact copies of m1's vectors on a camera of its own, to show
that versions are never compared. The tests run on both deployments (SQLite + FAISS, PostgreSQL + Milvus).
"""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import yaml
from helpers import TINY_JPEG, PersonWorld, Pusher, make_sighting, matcher_config, person_world, unit_vectors, wait_until
from pgserver import DEPLOYMENTS, deployment_sections

from crossview.kernel.config import QueryConfig
from crossview.matcher.query import Filters, QueryEngine
from crossview.matcher.service import Matcher

PERSON = 3


@pytest.fixture(scope="module")
def world():
    return person_world()


def started(m: Matcher, world: PersonWorld) -> Matcher:
    """`m` started and fed the module's sightings: `world` (m1), other people (m2) and the mirror (m3)."""
    m.start()
    other = person_world(persons=5, cameras=("lobby", "yard", "dock"), dim=32, model="m2", seed=1)
    mirror = [make_sighting(s.embedding, "edge-3", "mirror", s.ts, s.frame, s.track, "m3") for s in world.sightings]
    with Pusher(m.ingest.endpoint) as push:
        push.send(world.sightings + other.sightings + mirror)
    total = 2 * len(world.sightings) + len(other.sightings)
    wait_until(lambda: m.ingest.accepted == total, 20, f"{total} sightings accepted")
    return m


@pytest.fixture(scope="module", params=DEPLOYMENTS)
def matcher(request, tmp_path_factory, world):
    m = started(Matcher(matcher_config(tmp_path_factory.mktemp("matcher"), **deployment_sections(request))), world)
    yield m
    m.stop()


def test_everything_sent_is_accepted_and_partitioned_by_model(matcher, world):
    s = matcher.stats()
    assert s["accepted"] == 2 * 360 + 5 * 3 * 6 and s["rejected"] == {}
    assert s["cameras"] == {"gate": 120, "hall": 120, "street": 120, "mirror": 360, "lobby": 30, "yard": 30, "dock": 30}
    kind = {"faiss": "flat", "milvus": "milvus"}[matcher.cfg.index.engine]
    assert {m: (p["size"], p["dim"], p["kind"]) for m, p in s["partitions"].items()} == {
        "m1": (360, 64, kind), "m2": (90, 32, kind), "m3": (360, 64, kind)}


def test_a_track_finds_the_same_person_on_the_other_cameras(matcher, world):
    node, camera, track = world.track(PERSON, "gate")
    result = matcher.queries.search_track(node, camera, track, None, Filters(top_k=5))
    ranked = result.ranked()
    assert result.model == "m1" and result.query["by"] == "track"
    assert {(h.camera, h.track) for h in ranked[:2]} == {("hall", PERSON + 1), ("street", PERSON + 1)}
    assert ranked[1].score > 0.8 > 0.5 > ranked[2].score  # the same person scores far above anyone else
    assert all((h.camera, h.track) != ("gate", PERSON + 1) for h in ranked), "the query's own track is excluded"
    for hit in ranked[:2]:  # a track's frames are one hit: all six stored, the five best shown, by time
        assert hit.n_sightings == 6 and len(hit.sightings) == 5
        assert [s.ts for s in hit.sightings] == sorted(s.ts for s in hit.sightings)
        assert hit.best in hit.sightings and hit.best.track == hit.track == PERSON + 1
        assert (hit.first_ts, hit.last_ts) == (world.ts(PERSON, world.cameras.index(hit.camera)),
                                               world.ts(PERSON, world.cameras.index(hit.camera), 5))
    # The edge sends running means, so a track's later sightings match best.
    assert ranked[0].best.ts == ranked[0].last_ts


def test_results_are_grouped_per_camera_and_ordered_by_time(matcher, world):
    result = matcher.queries.search_track(*world.track(PERSON, "gate"), None, Filters(top_k=30, min_score=-1))
    assert sum(len(h) for h in result.cameras.values()) == 30
    firsts = []
    for camera, hits in result.cameras.items():
        assert {h.camera for h in hits} == {camera}
        assert [h.first_ts for h in hits] == sorted(h.first_ts for h in hits)
        firsts.append(hits[0].first_ts)
    assert firsts == sorted(firsts), "cameras come in the order they first saw a match"
    assert "mirror" not in result.cameras and all(h.model == "m1" for h in result.ranked())


def test_filters(matcher, world):
    query = world.track(PERSON, "gate")
    only_street = matcher.queries.search_track(*query, None, Filters(cameras=["street"], top_k=3))
    assert list(only_street.cameras) == ["street"] and only_street.ranked()[0].track == PERSON + 1
    assert len(only_street.cameras["street"]) == 3  # over-fetching still fills top_k from one camera

    window = matcher.queries.search_track(*query, None, Filters(since=world.ts(0, 1), until=world.ts(19, 1, 5), top_k=4))
    assert list(window.cameras) == ["hall"] and window.ranked()[0].track == PERSON + 1

    sure = matcher.queries.search_track(*query, None, Filters(min_score=0.7, top_k=10))
    assert {(h.camera, h.track) for h in sure.ranked()} == {("hall", PERSON + 1), ("street", PERSON + 1)}
    assert all(s_.ts for h in sure.ranked() for s_ in h.sightings)

    one = matcher.queries.search_track(*query, None, Filters(top_k=1))
    assert len(one.ranked()) == 1 and one.ranked()[0].track == PERSON + 1

    for empty in (Filters(cameras=["nowhere"]), Filters(since=world.ts(19, 2, 6)), Filters(cameras=["gate"], min_score=0.9999)):
        assert matcher.queries.search_track(*query, None, empty).cameras == {}

    late = matcher.queries.search_track(*query, None, Filters(since=world.ts(PERSON, 2, 3), min_score=0.7))
    [hit] = late.ranked()
    assert hit.camera == "street" and all(s.ts >= world.ts(PERSON, 2, 3) for s in hit.sightings)
    assert late.query["filters"]["since"] == world.ts(PERSON, 2, 3)


@pytest.mark.parametrize("filters", [
    Filters(cameras=["street"], top_k=3),
    Filters(cameras=["hall", "street"], min_score=0.2, top_k=4),
    Filters(since=PersonWorld.ts(5, 1), until=PersonWorld.ts(12, 2, 5), top_k=6),
    Filters(until=PersonWorld.ts(0, 1), top_k=2),
])
def test_selective_filters_scanned_exactly_agree_with_over_fetching(matcher, world, filters):
    """Few sightings left by a filter are scored straight from the store; the index path must agree."""
    over_fetching = QueryEngine(matcher.store, matcher.index, {}, QueryConfig(filter_scan_mb=0))
    query = world.track(PERSON, "gate")
    scanned, fetched = (q.search_track(*query, None, filters).ranked() for q in (matcher.queries, over_fetching))
    assert len(scanned) == filters.top_k
    assert [(h.track_id, h.best.id, round(h.score, 5)) for h in scanned] == [(h.track_id, h.best.id, round(h.score, 5))
                                                                             for h in fetched]


def test_query_by_sighting_and_by_embedding(matcher, world):
    gate = [r for r in matcher.store.recent("gate", limit=200) if r.track == PERSON + 1]
    by_sighting = matcher.queries.search_sighting(gate[0].id, Filters(min_score=0.7))
    assert {(h.camera, h.track) for h in by_sighting.ranked()} == {("hall", PERSON + 1), ("street", PERSON + 1)}
    by_vector = matcher.queries.search_embedding(world.centers[PERSON], "m1", Filters(min_score=0.7))
    assert {(h.camera, h.track) for h in by_vector.ranked()} == {(c, PERSON + 1) for c in world.cameras}
    assert list(by_vector.cameras) == list(world.cameras)  # visited in this order
    mirrored = matcher.queries.search_embedding(world.centers[PERSON], "m3", Filters(min_score=0.7))
    assert [(h.camera, h.model) for h in mirrored.ranked()] == [("mirror", "m3")] * 3


def test_clear_errors(matcher):
    with pytest.raises(LookupError, match="sighting 999999 not found"):
        matcher.queries.search_sighting(999999)
    with pytest.raises(LookupError, match="no track edge-1:gate:777"):
        matcher.queries.search_track("edge-1", "gate", 777)
    with pytest.raises(LookupError, match=r"no sightings of embedding model version 'nope' \(indexed versions: m1, m2, m3\)"):
        matcher.queries.search_embedding(np.ones(64), "nope")
    with pytest.raises(ValueError, match="query embedding has 64 dimensions, model version 'm2' has 32"):
        matcher.queries.search_embedding(np.ones(64), "m2")
    with pytest.raises(ValueError, match="finite and non-zero"):
        matcher.queries.search_embedding(np.zeros(64), "m1")
    with pytest.raises(ValueError, match="no embedding model loaded for version 'm1'"):
        matcher.queries.search_image(np.zeros((128, 64, 3), np.uint8), "m1")
    with pytest.raises(ValueError, match="top_k"):
        Filters(top_k=0)
    with pytest.raises(ValueError, match="since"):
        Filters(since=2.0, until=1.0)


def test_lookups_for_a_picker(matcher, world):
    newest = matcher.store.recent("street", limit=3)
    assert [r.ts for r in newest] == sorted((s.ts for s in world.sightings if s.camera == "street"), reverse=True)[:3]
    assert matcher.store.record(newest[0].id) == newest[0] and newest[0].has_thumbnail
    assert matcher.store.thumbnail(newest[0].id) == TINY_JPEG and matcher.store.record(10**9) is None
    cams = {c["camera"]: c for c in matcher.store.cameras()}
    assert cams["street"] == {"camera": "street", "node": "edge-2", "sightings": 120, "tracks": 20,
                              "first_ts": world.ts(0, 2), "last_ts": world.ts(19, 2, 5)}
    assert newest[0].to_dict()["box"] == [10.0, 20.0, 50.0, 140.0]


def _where(matcher, tmp_path) -> list[str]:
    """`crossview query`'s arguments for the matcher's data: its data dir, or a config naming its PostgreSQL store and
    Milvus collections."""
    if matcher.cfg.store.kind == "sqlite":
        return ["--data-dir", str(matcher.cfg.data_dir)]
    config = tmp_path / "matcher.yaml"
    config.write_text(yaml.safe_dump({**matcher.cfg.model_dump(mode="json", include={"data_dir", "ingest", "http"}),
                                      **matcher.cfg.model_dump(mode="json", include={"store", "index"}, exclude_none=True)}))
    return ["--config", str(config)]


def test_query_cli_reads_the_live_data_dir(matcher, world, tmp_path):
    cmd = [sys.executable, "-m", "crossview.cli", "query", *_where(matcher, tmp_path),
           "--track", "edge-1:gate:%d" % (PERSON + 1), "--min-score", "0.7"]
    out = json.loads(subprocess.run([*cmd, "--json"], capture_output=True, text=True, check=True, timeout=60).stdout)
    assert {cam: [h["track"] for h in hits] for cam, hits in out["cameras"].items()} == {"hall": [4], "street": [4]}
    assert out["cameras"]["hall"][0]["best"]["has_thumbnail"] is True
    table = subprocess.run(cmd, capture_output=True, text=True, check=True, timeout=60).stdout
    assert "edge-1:hall:4" in table and "edge-2:street:4" in table
    missing = subprocess.run([*cmd[:-4], "--sighting", "999999"], capture_output=True, text=True, timeout=60)
    assert missing.returncode == 1 and "sighting 999999 not found" in missing.stderr


def test_wrong_dimension_and_zero_embeddings_are_counted_and_dropped(tmp_path, caplog):
    m = Matcher(matcher_config(tmp_path))
    m.start()
    try:
        rng = np.random.default_rng(5)
        with Pusher(m.ingest.endpoint) as push:
            push.send([make_sighting(unit_vectors(rng, 1, 64)[0], track=1)])  # fixes m1 at 64-d
            wait_until(lambda: m.ingest.accepted == 1, 10, "the first sighting")
            push.send([make_sighting(v, node="edge-9", track=2) for v in unit_vectors(rng, 3, 32)])
            push.send([make_sighting(np.zeros(64), track=3)])
            push.send([make_sighting(unit_vectors(rng, 1, 64)[0], track=4)])
            wait_until(lambda: m.ingest.accepted == 2, 10, "good traffic after the bad")
        assert m.ingest.rejected == {"dimension": 3, "zero_embedding": 1}
        assert m.stats()["partitions"]["m1"]["size"] == 2
        assert {r.track for r in m.store.recent()} == {1, 4}
        assert "dropped sighting from node edge-9 camera gate: model version 'm1' has 64-d embeddings, got 32" in caplog.text
    finally:
        m.stop()


def test_an_edge_track_id_reused_after_a_gap_is_a_new_track(tmp_path, deployment):
    m = Matcher(matcher_config(tmp_path, **deployment, query={"track_gap_s": 30}))
    m.start()
    try:
        v = unit_vectors(np.random.default_rng(1), 2, 64)
        first = [make_sighting(v[0], ts=1000 + i, track=7) for i in range(3)]
        again = [make_sighting(v[1], ts=1100 + i, track=7) for i in range(2)]  # the edge restarted: id 7 is someone else
        other = [make_sighting(v[0], camera="hall", ts=1200, track=7)]
        with Pusher(m.ingest.endpoint) as push:
            push.send(first + again + other)
            wait_until(lambda: m.ingest.accepted == 6, 10, "six sightings")
        assert {c["camera"]: c["tracks"] for c in m.store.cameras()} == {"gate": 2, "hall": 1}  # gate: one edge id, two tracks
        result = m.queries.search_track("edge-1", "gate", 7, "m1", Filters(min_score=0.9))  # the latest one: v[1]
        assert result.ranked() == [] and result.query["track_id"] == m.store.recent("gate")[0].track_id
        [hit] = m.queries.search_sighting(m.store.recent("gate")[-1].id, Filters(min_score=0.9)).ranked()  # the first one: v[0]
        assert (hit.camera, hit.n_sightings) == ("hall", 1)
    finally:
        m.stop()


def test_a_track_continues_across_a_matcher_restart(tmp_path, deployment):
    cfg = matcher_config(tmp_path, **deployment, query={"track_gap_s": 30})
    v = unit_vectors(np.random.default_rng(2), 1, 64)[0]
    for times in ([1000, 1001], [1010, 1100]):  # 9 s after the restart, then a 90 s gap
        m = Matcher(cfg)
        m.start()
        with Pusher(m.ingest.endpoint) as push:
            push.send([make_sighting(v, ts=t, track=7) for t in times])
            wait_until(lambda: m.ingest.accepted == 2, 10, "two sightings")
        tracks = [r.track_id for r in sorted(m.store.recent(limit=10), key=lambda r: r.ts)]
        m.stop()
    assert tracks == [1, 1, 1, 4]
