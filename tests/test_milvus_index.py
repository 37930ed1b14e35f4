"""The matcher's vectors in Milvus (`index.engine: milvus`): Milvus Lite for behaviour, one test on the real server.

The index on its own: a collection per model version, search, camera filters, removal, and recovery that backfills
from the store what a killed matcher committed but never inserted; retention's max age as each collection's TTL (on
Milvus Lite and on the server). Then the matcher's query tests of
`test_matcher_query` (imported, so they run here on this module's `matcher`: the same assertions over Milvus Lite).
Last, the standalone server of the `milvus` package (a session fixture, ~10 s to start): ingest, a query, and a
restart that backfills.
"""

from __future__ import annotations

import numpy as np
import pytest
from helpers import Pusher, free_port, make_sighting, matcher_config, person_world, store_insert, unit_vectors, wait_until
from test_matcher_query import (  # noqa: F401  collected here, on this module's `matcher`
    started,
    test_a_track_finds_the_same_person_on_the_other_cameras,
    test_clear_errors,
    test_filters,
    test_query_by_sighting_and_by_embedding,
    test_results_are_grouped_per_camera_and_ordered_by_time,
    test_selective_filters_scanned_exactly_agree_with_over_fetching,
    world,
)

from crossview.kernel.config import IndexConfig
from crossview.matcher.query import Filters
from crossview.matcher.service import Matcher
from crossview.matcher.store import Store

pytest.importorskip("pymilvus", reason="the milvus extra is not installed")
from crossview.matcher.milvus_index import TTL_KEY, MilvusIndex, collection_name, upserts_by_key  # noqa: E402

CAMERAS = ("gate", "hall", "street")


def lite(tmp_path, **milvus) -> dict:
    """The matcher config's `index` section for a Milvus Lite file in `tmp_path`."""
    return {"engine": "milvus", "milvus": {"lite_file": str(tmp_path / "milvus.db"), **milvus}}


def _stored(store: Store, vecs: np.ndarray, model: str = "m1") -> np.ndarray:
    sightings = [make_sighting(v, camera=CAMERAS[i % 3], ts=1000.0 + i, track=i, model=model) for i, v in enumerate(vecs)]
    return np.asarray(store_insert(store, sightings), np.int64)


def test_a_collection_per_version_searched_by_camera_with_removal(tmp_path):
    store = Store(tmp_path / "sightings.db")
    index = MilvusIndex(IndexConfig(**lite(tmp_path)), store)
    try:
        index.recover()
        vecs = unit_vectors(np.random.default_rng(0), 60, 16)
        ids = _stored(store, vecs)
        index.add("m1", ids, vecs)
        scores, found = index.search("m1", vecs[4], 5)
        assert found[0] == ids[4] and scores[0] == pytest.approx(1.0, abs=1e-5) and list(scores) == sorted(scores, reverse=True)
        _, hall = index.search("m1", vecs[4], 100, cameras=["hall"])
        assert sorted(hall) == sorted(ids[1::3]), "all of hall's sightings, and only those"
        assert set(index.search("m1", vecs[4], 100, cameras=["gate", "street"])[1]) == set(ids) - set(ids[1::3])

        by_model, pos = store.delete([int(ids[4]), int(ids[5])])
        index.remove(by_model, pos)
        assert not {ids[4], ids[5]} & set(index.search("m1", vecs[4], 100)[1])
        assert index.stats()["m1"] == {"size": 58, "kind": "milvus", "dim": 16, "rebuilding": False}

        other = unit_vectors(np.random.default_rng(1), 5, 8)
        other_ids = _stored(store, other, "m2:v2/β")
        index.add("m2:v2/β", other_ids, other)  # any version string makes a valid name
        assert {collection_name("crossview", "m1"), collection_name("crossview", "m2:v2/β")} <= set(index.client.list_collections())
        assert {m: s["size"] for m, s in index.stats().items()} == {"m1": 58, "m2:v2/β": 5}
        with pytest.raises(ValueError, match="query embedding has 16 dimensions, model version 'm2:v2/β' has 8"):
            index.query_vector("m2:v2/β", vecs[0])
        with pytest.raises(LookupError, match=r"indexed versions: m1, m2:v2/β"):
            index.search("m3", vecs[0], 5)
        for model, vec, sighting in (("m2:v2/β", other[2], other_ids[2]), ("m1", vecs[7], ids[7])):
            index.production(model)  # the alias follows the production version
            [[hit]] = index.client.search("crossview_production", data=[vec.tolist()], limit=1, anns_field="vec")
            assert hit["id"] == sighting
        assert index.drop("m2:v2/β") and not index.drop("m2:v2/β")
        assert collection_name("crossview", "m2:v2/β") not in index.client.list_collections()
    finally:
        index.close()
        store.close()


def test_recovery_backfills_what_was_committed_but_never_inserted(tmp_path):
    """A matcher killed between the store's commit and Milvus's insert (or between a store deletion and Milvus's)."""
    store = Store(tmp_path / "sightings.db")
    cfg = IndexConfig(**lite(tmp_path))
    vecs = unit_vectors(np.random.default_rng(2), 40, 16)
    ids = _stored(store, vecs)
    first = MilvusIndex(cfg, store)
    first.recover()  # the store's 40 go in: recovery of a collection that never was
    later = unit_vectors(np.random.default_rng(3), 10, 16)
    later_ids = _stored(store, later)  # committed, then the kill: never inserted
    store.delete([int(ids[0])])  # deleted from the store, the kill before Milvus heard
    first.close()

    again = MilvusIndex(cfg, store)
    try:
        again.recover()
        assert again.stats()["m1"]["size"] == 49
        _, found = again.search("m1", later[3], 1)
        assert found[0] == later_ids[3]
        assert ids[0] not in again.search("m1", vecs[0], 100)[1]
        held = set(again._ids(collection_name("crossview", "m1")))
        assert held == set(ids[1:]) | set(later_ids)
    finally:
        again.close()
        store.close()


def test_upserts_where_the_server_places_partition_key_rows_right():
    assert [upserts_by_key(v) for v in ("milvus_lite-3.2.2", "v2.4.0", "v2.5.4", "2.10.1", "v2.3.5", "v2.3.20", "")] == [
        True, True, True, True, False, False, False]


@pytest.fixture(params=["lite", pytest.param("server", marks=pytest.mark.milvus_server)])
def milvus_section(request, tmp_path) -> dict:
    """An `index.milvus` section: Milvus Lite in tmp_path, or the standalone server (collections prefixed `ttl`)."""
    if request.param == "lite":
        return {"lite_file": str(tmp_path / "milvus.db")}
    return {"uri": request.getfixturevalue("milvus_server"), "collection_prefix": "ttl"}


def test_a_collection_carries_retentions_max_age_as_its_ttl_and_follows_it_when_changed(milvus_section, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    store = Store(data / "sightings.db")
    _stored(store, unit_vectors(np.random.default_rng(0), 3, 8), "aged")
    index_cfg = {"engine": "milvus", "milvus": milvus_section}

    def ttl(index, model: str) -> str | None:
        name = collection_name(milvus_section.get("collection_prefix", "crossview"), model)
        return index.client.describe_collection(name).get("properties", {}).get(TTL_KEY)

    def started(max_age_hours: float | None, model: str = "aged") -> str | None:
        """The version's TTL once a matcher with this retention opened its collection."""
        m = Matcher(matcher_config(data, index=index_cfg, retention={"max_age_hours": max_age_hours}))
        try:
            return ttl(m.index, model)
        finally:
            m.stop()

    try:
        assert started(1.5) == "5400"  # made with retention's max age
        assert started(2) == "7200"  # retention changed: the next start follows
        reader = MilvusIndex(IndexConfig(**index_cfg), store, read_only=True)
        reader.recover()
        assert ttl(reader, "aged") == "7200"  # a reader (`crossview query`) changes nothing
        reader.close()
        assert started(None) == "0"  # no max age any more: no expiry
        _stored(store, unit_vectors(np.random.default_rng(1), 3, 8), "ageless")
        assert started(None, "ageless") is None  # made without retention: no property
    finally:
        store.close()


def test_a_collection_its_maker_was_killed_before_indexing_is_indexed_at_the_next_start(milvus_section, tmp_path):
    """Creating a collection with its index is create, then index, then load: a kill between them leaves a collection
    Milvus refuses to load."""
    from pymilvus import DataType, MilvusClient

    store = Store(tmp_path / "sightings.db")
    vecs = unit_vectors(np.random.default_rng(4), 12, 8)
    ids = _stored(store, vecs, "torn")
    cfg = IndexConfig(engine="milvus", milvus={**milvus_section, "collection_prefix": "torn"})
    first = MilvusIndex(cfg, store)
    name = collection_name("torn", "torn")
    schema = MilvusClient.create_schema(auto_id=False, enable_dynamic_field=False)
    schema.add_field("id", DataType.INT64, is_primary=True)
    schema.add_field("camera", DataType.VARCHAR, max_length=64, is_partition_key=True)
    schema.add_field("vec", DataType.FLOAT_VECTOR, dim=8)
    first.client.create_collection(name, schema=schema)  # what the killed one got as far as
    assert not first.client.list_indexes(name)
    first.close()
    reader = MilvusIndex(cfg, store, read_only=True)
    try:
        reader.recover()  # a reader (`crossview query`) neither indexes nor fails
        assert not reader.client.list_indexes(name)
    finally:
        reader.close()
    again = MilvusIndex(cfg, store)
    try:
        again.recover()
        assert again.client.list_indexes(name) and again.stats()["torn"]["size"] == 12
        assert again.search("torn", vecs[5], 1)[1][0] == ids[5]
    finally:
        again.drop("torn")
        again.close()
        store.close()


def test_an_unreachable_milvus_is_a_clear_error(tmp_path):
    cfg = IndexConfig(engine="milvus", milvus={"uri": f"http://127.0.0.1:{free_port()}", "timeout_s": 2})
    store = Store(tmp_path / "sightings.db")
    try:
        with pytest.raises(ConnectionError, match=r"index.milvus: http://127.0.0.1:\d+: "):
            MilvusIndex(cfg, store).recover()
    finally:
        store.close()


@pytest.fixture(scope="module")
def matcher(tmp_path_factory, world):  # noqa: F811  (test_matcher_query's fixture)
    """`test_matcher_query`'s matcher, on Milvus Lite (exact search, so scores agree with the store's exact scan)."""
    tmp = tmp_path_factory.mktemp("matcher")
    m = started(Matcher(matcher_config(tmp, index=lite(tmp, index_type="FLAT"))), world)
    yield m
    m.stop()


def test_the_matcher_on_milvus_partitions_by_model(matcher):
    assert isinstance(matcher.index, MilvusIndex)
    assert {m: (p["size"], p["dim"], p["kind"]) for m, p in matcher.stats()["partitions"].items()} == {
        "m1": (360, 64, "milvus"), "m2": (90, 32, "milvus"), "m3": (360, 64, "milvus")}


@pytest.mark.milvus_server
def test_the_matcher_on_a_milvus_server_restarts_and_backfills(milvus_server, tmp_path):
    cfg = matcher_config(tmp_path, index={"engine": "milvus", "milvus": {"uri": milvus_server, "collection_prefix": "restart"}})
    people = person_world(persons=6)
    m = Matcher(cfg)
    m.start()
    try:
        with Pusher(m.ingest.endpoint) as push:
            push.send(people.sightings)
        wait_until(lambda: m.ingest.accepted == len(people.sightings), 30, "every sighting accepted")
        [first, *_] = m.queries.search_track(*people.track(2, "gate"), None, Filters(top_k=2, min_score=0.7)).ranked()
        assert first.track == 3 and first.camera in ("hall", "street")
        m.index.production("m1")
        [[hit]] = m.index.client.search("restart_production", data=[people.centers[2].tolist()], limit=1, anns_field="vec")
        assert m.store.record(hit["id"]).track == 3
    finally:
        m.stop()
    # Committed while no Milvus insert followed (the matcher was killed after its store commit): a new person.
    late = unit_vectors(np.random.default_rng(9), 1, 64)[0]
    store = Store(tmp_path / "sightings.db")
    store_insert(store, [make_sighting(late, camera="yard", ts=2e9, track=99)])
    store.close()
    m = Matcher(cfg)
    try:
        assert m.stats()["partitions"]["m1"]["size"] == len(people.sightings) + 1
        [hit] = m.queries.search_embedding(late, "m1", Filters(min_score=0.99)).ranked()
        assert (hit.camera, hit.track) == ("yard", 99)
    finally:
        m.stop()


@pytest.mark.milvus_server
def test_on_a_milvus_2_3_server_the_index_inserts_so_camera_filters_find_the_rows(milvus_server, tmp_path):
    """Milvus 2.3's upsert misplaces partition-key rows (a camera filter finds none), so there the index inserts:
    rows written twice are held twice, each returned once, counted twice."""
    store = Store(tmp_path / "sightings.db")
    index = MilvusIndex(IndexConfig(engine="milvus", milvus={"uri": milvus_server, "collection_prefix": "twice",
                                                             "consistency": "Strong"}), store)
    try:
        assert index.client.get_server_version().startswith("v2.3.")
        vecs = unit_vectors(np.random.default_rng(5), 30, 16)
        ids = _stored(store, vecs)
        index.add("m1", ids, vecs)
        index.add("m1", ids[:20], vecs[:20])
        name = collection_name("twice", "m1")
        assert sorted(index._ids(name)) == sorted(ids.tolist()) and index._count(name) == 50
        _, hall = index.search("m1", vecs[1], 100, cameras=["hall"])
        assert sorted(hall) == sorted(ids[1::3])
    finally:
        index.close()
        store.close()
