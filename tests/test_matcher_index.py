"""Index partitions: exact → IVF/HNSW in the background while ingest and queries go on; removal; recall."""

from __future__ import annotations

import logging
import re
import threading
import time

import faiss
import numpy as np
import pytest
from helpers import Pusher, index_ids, make_sighting, matcher_config, person_world, store_insert, unit_vectors, wait_until

from crossview.kernel.config import IndexConfig
from crossview.matcher import index as matcher_index
from crossview.matcher.index import Index, Partition, build_index, nlist_for
from crossview.matcher.query import Filters
from crossview.matcher.service import Matcher


def _paced_push(endpoint: str, sightings: list, per_step: int = 100, pause: float = 0.01) -> None:
    """Send like busy edges do: a steady stream rather than one burst, so ingest overlaps the rebuilds."""
    with Pusher(endpoint) as push:
        for i in range(0, len(sightings), per_step):
            push.send(sightings[i:i + per_step])
            time.sleep(pause)


class _Prober(threading.Thread):
    """Queries without pause while ingest runs; records partition state and the accepted count."""

    def __init__(self, m: Matcher, centers: np.ndarray):
        super().__init__(daemon=True)
        self.m, self.centers, self.done = m, centers, threading.Event()
        self.samples: list[tuple[bool, int]] = []  # (rebuilding throughout, accepted)

    def run(self) -> None:
        rng = np.random.default_rng(0)
        while not self.done.is_set():
            before = self.m.index.rebuilding("m1")
            try:
                self.m.queries.search_embedding(self.centers[rng.integers(len(self.centers))], "m1", Filters(top_k=5))
            except LookupError:  # nothing ingested yet
                continue
            self.samples.append((before and self.m.index.rebuilding("m1"), self.m.ingest.accepted))


@pytest.mark.timeout(120)
def test_exact_to_ivf_in_the_background_while_ingest_and_queries_continue(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="crossview.matcher.index")
    world = person_world(persons=400, cameras=("a", "b", "c", "d", "e"), dim=128, per_track=6)  # 12000 sightings
    m = Matcher(matcher_config(tmp_path, index={"exact_max": 2000, "nprobe": 16}))
    m.start()
    prober = _Prober(m, world.centers)
    prober.start()
    try:
        _paced_push(m.ingest.endpoint, world.sightings)
        wait_until(lambda: m.ingest.accepted == 12000, 60, "12000 sightings accepted")
        assert m.index.wait_rebuilds(60)
    finally:
        prober.done.set()
        prober.join()
    p = m.index.partition("m1")
    assert (p.kind, p.size, p.index.ntotal) == ("ivf", 12000, 12000)
    # Two rebuilds: past exact_max, then again at 4x the first training size (more IVF lists).
    rebuilt = [int(n) for n in re.findall(r"rebuilt in [\d.]+ s \((\d+) changes replayed\)", caplog.text)]
    assert len(rebuilt) == 2 and sum(rebuilt) > 0, "ingest went on during the rebuilds"
    during = [n for busy, n in prober.samples if busy]
    # A query that waited on a rebuild would end after it, so it would not count as "during": several
    # queries finishing inside the rebuild windows is the proof they did not wait (no wall-clock bound).
    assert len(during) >= 3, f"only {len(during)} queries finished while a rebuild was in progress"
    assert max(during) > min(during), "ingest stalled during a rebuild"

    _check_recall(m, world)
    _remove_a_track(m, world, person=7)
    # Retention-sized removals shrink it below exact_max / 2: back to exact search.
    m.remove(list(range(1, 11001)))  # the removed track's ids are among these
    assert m.index.wait_rebuilds(30) and p.kind == "flat" and p.size == 1000
    m.stop()


def _check_recall(m: Matcher, world) -> None:
    """IVF's top 10 sightings against brute force over the stored vectors."""
    ids, vecs = m.index.stored_vectors("m1")
    rng = np.random.default_rng(1)
    queries = world.centers[rng.choice(len(world.centers), 100, replace=False)]
    queries = queries + 0.3 * rng.standard_normal(queries.shape).astype(np.float32) / np.sqrt(queries.shape[1])
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    exact = ids[np.argsort(-(queries @ vecs.T), axis=1)[:, :10]]
    found = [m.index.search("m1", q, 10)[1] for q in queries]
    recall = np.mean([len(set(f) & set(e)) / 10 for f, e in zip(found, exact)])
    assert recall >= 0.9, f"IVF recall@10 {recall:.2f} against exact search"


def _remove_a_track(m: Matcher, world, person: int) -> None:
    before = m.queries.search_embedding(world.centers[person], "m1", Filters(min_score=0.7))
    assert len(before.ranked()) == 5  # this person's track on each of the five cameras
    gone = [s.id for s in before.ranked()[0].sightings]
    size = m.index.partition("m1").size
    assert m.remove(gone) == len(gone) and m.remove(gone) == 0
    after = m.queries.search_embedding(world.centers[person], "m1", Filters(min_score=0.7, top_k=20))
    assert not {s.id for h in after.ranked() for s in h.sightings} & set(gone)
    assert m.index.partition("m1").size == size - len(gone)
    assert not index_ids(m.index.partition("m1").index) & set(gone)
    assert all(m.store.record(i) is None and m.store.thumbnail(i) is None for i in gone)


@pytest.mark.timeout(120)
def test_hnsw_tombstones_removed_ids_and_a_rebuild_purges_them(tmp_path):
    world = person_world(persons=60, cameras=("a", "b", "c", "d"), dim=64, per_track=5)  # 1200
    cfg = matcher_config(tmp_path, index={"exact_max": 300, "kind": "hnsw", "hnsw_m": 16})
    m = Matcher(cfg)
    m.start()
    _paced_push(m.ingest.endpoint, world.sightings)
    wait_until(lambda: m.ingest.accepted == 1200, 30, "1200 sightings accepted")
    assert m.index.wait_rebuilds(60)
    p = m.index.partition("m1")
    assert p.kind == "hnsw" and p.size == 1200

    track = m.queries.search_embedding(world.centers[5], "m1", Filters(min_score=0.7)).ranked()
    assert len(track) == 4
    gone = [s.id for s in track[0].sightings]
    m.remove(gone)
    assert p.kind == "hnsw" and p.tombstones == set(gone) and p.size == 1200 - len(gone)
    again = m.queries.search_embedding(world.centers[5], "m1", Filters(min_score=0.7)).ranked()
    assert [h.track_id for h in again] == [h.track_id for h in track[1:]]  # filtered out, the rest still found

    m.remove(list(range(1, 201)))  # past 10% tombstones: a rebuild drops them from the graph
    assert m.index.wait_rebuilds(30)
    assert p.kind == "hnsw" and not p.tombstones and p.index.ntotal == p.size == 1200 - len(set(gone) | set(range(1, 201)))
    final = [h.track_id for h in m.queries.search_embedding(world.centers[5], "m1", Filters(min_score=0.7)).ranked()]
    assert len(final) == 2  # ids 1-200 held person 5's track on camera a too
    m.stop()

    restarted = Matcher(cfg)
    q = restarted.index.partition("m1")
    assert (q.kind, q.size) == ("hnsw", p.size)
    assert [h.track_id for h in restarted.queries.search_embedding(world.centers[5], "m1", Filters(min_score=0.7)).ranked()] == final
    restarted.stop()


@pytest.mark.parametrize("kind", ["flat", "ivf", "hnsw"])
def test_a_rebuild_replays_what_changed_while_it_ran(kind):
    """The swap step on its own: adds and removals recorded during a rebuild reach the new index."""
    cfg = IndexConfig(nprobe=64)
    rng = np.random.default_rng(0)
    vecs = rng.standard_normal((2100, 16)).astype(np.float32)
    vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
    ids = np.arange(1, 2101, dtype=np.int64)
    p = Partition("m", 16, build_index("flat", 16, ids[:2000], vecs[:2000], cfg), "flat", max_id=2000)
    p.pending = []  # as Index.maybe_rebuild does before its thread reads the store up to max_id
    p.add(ids[2000:], vecs[2000:])
    p.remove(np.array([5, 2050, 99999], np.int64))  # one from the snapshot, one from meanwhile, one unknown
    snapshot_ids = np.setdiff1d(ids[:2000], [5])  # what the store held: 5 was deleted before the read
    replayed = p.swap(build_index(kind, 16, snapshot_ids, vecs[snapshot_ids - 1], cfg), kind, snapshot_ids)
    assert replayed == 2 and p.pending is None and p.kind == kind
    assert p.size == 2100 - 2
    found = {int(p.search(vecs[i - 1], 1)[1][0]) for i in (1, 2000, 2001, 2100)}
    assert found == {1, 2000, 2001, 2100}
    assert 2050 not in p.search(vecs[2049], 5)[1] and 5 not in p.search(vecs[4], 5)[1]
    if kind == "hnsw":
        assert p.tombstones == {2050}  # 5 was never in the new graph, 99999 never anywhere


def test_a_removal_waits_for_committed_batches_to_be_indexed(tmp_path, monkeypatch):
    """Batches are indexed after their commit, by another thread: a removal in between must not be undone by the add."""
    add = Index.add
    monkeypatch.setattr(Index, "add", lambda self, *args: (time.sleep(1.0), add(self, *args)))
    m = Matcher(matcher_config(tmp_path))
    m.start()
    try:
        with Pusher(m.ingest.endpoint) as push:
            push.send([make_sighting(v, frame=i) for i, v in enumerate(unit_vectors(np.random.default_rng(3), 20, 64))])
        wait_until(lambda: len(m.store.recent(limit=100)) == 20, 10, "20 sightings committed")
        assert m.ingest.accepted < 20, "some committed sightings are not indexed yet"
        ids = sorted(r.id for r in m.store.recent(limit=100))
        assert m.remove(ids[:10]) == 10
        assert m.ingest.accepted == 20 and index_ids(m.index.partition("m1").index) == set(ids[10:])
    finally:
        m.stop()


def test_the_faiss_thread_count_holds_on_every_thread(tmp_path):
    """OpenMP's thread count is a per-thread setting: the index applies `threads` on whichever thread calls it."""
    m = Matcher(matcher_config(tmp_path))  # index.threads 1
    seen = []

    def ingest_thread() -> None:
        m.index.add("m1", np.arange(1, 4), unit_vectors(np.random.default_rng(0), 3, 64))
        seen.append(faiss.omp_get_max_threads())

    t = threading.Thread(target=ingest_thread)
    t.start()
    t.join()
    assert seen == [1]
    m.index.close()
    m.store.close()


def test_a_partition_that_outgrew_its_rebuild_is_rebuilt_again(tmp_path, monkeypatch):
    """Ingest goes on during a rebuild: when the rebuild ends, the partition may already want more IVF lists."""
    build = matcher_index.build_index
    monkeypatch.setattr(matcher_index, "build_index", lambda *a: (time.sleep(1.0), build(*a))[1])
    m = Matcher(matcher_config(tmp_path, index={"exact_max": 100}))
    vecs = unit_vectors(np.random.default_rng(4), 4101, 64)

    def ingest(rows: np.ndarray) -> None:
        ids = store_insert(m.store, [make_sighting(v, frame=i) for i, v in enumerate(rows)])
        m.index.add("m1", np.array(ids), rows)

    ingest(vecs[:101])  # past exact_max: an IVF is trained on these 101
    assert m.index.rebuilding("m1")
    ingest(vecs[101:])  # 40x that, while it trains
    assert m.index.wait_rebuilds(30)
    p = m.index.partition("m1")
    assert p.kind == "ivf" and faiss.extract_index_ivf(p.index).nlist == nlist_for(4101, IndexConfig().nlist_max)
    m.index.close()
    m.store.close()
