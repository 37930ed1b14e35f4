"""Retention: sightings past the maximum age or a camera's quota leave index, store and file, thumbnails too.

On both deployments (SQLite + FAISS, PostgreSQL + Milvus). SQLite: the deleted thumbnails' bytes are gone from the files (secure_delete, WAL truncated).
PostgreSQL: the rows are gone and VACUUM has pruned their dead row versions; it does not zero the bytes (see
`matcher.pgstore`), so the file check is SQLite's only.
"""

from __future__ import annotations

import sqlite3
import time

import numpy as np
from helpers import Pusher, held_ids, make_sighting, matcher_config, unit_vectors, wait_until

from crossview.matcher.query import Filters
from crossview.matcher.service import Matcher


def _marker(i: int) -> bytes:
    """A JPEG-looking thumbnail with recognisable bytes, to look for in the database file afterwards."""
    return b"\xff\xd8\xff\xe0" + f"PERSONAL-DATA-{i:04d}".encode() * 8


def test_age_and_per_camera_limits_are_enforced_continuously(tmp_path, deployment, request):
    now = time.time()
    vecs = unit_vectors(np.random.default_rng(2), 140, 64)
    old = [make_sighting(vecs[i], camera="gate", ts=now - 7200 + i, frame=i, track=900 + i // 10, thumbnail=_marker(i))
           for i in range(30)]  # two hours old
    fresh_gate = [make_sighting(vecs[30 + i], camera="gate", ts=now - 60 + i, frame=i, track=i // 10) for i in range(20)]
    busy_hall = [make_sighting(vecs[50 + i], camera="hall", ts=now - 600 + i, frame=i, track=i // 10, thumbnail=_marker(50 + i))
                 for i in range(80)]  # fresh, but 30 over the camera's quota
    cfg = matcher_config(tmp_path, **deployment, retention={"max_age_hours": 1, "max_per_camera": 50,
                                                            "check_interval_s": 0.1})
    m = Matcher(cfg)
    m.start()
    with Pusher(m.ingest.endpoint) as push:
        push.send(old + fresh_gate + busy_hall)
    wait_until(lambda: m.ingest.accepted == 130, 10, "130 sightings accepted")
    # The index, too: a deletion leaves the store first, so a reader can see it there a moment before the index.
    wait_until(lambda: {c["camera"]: c["sightings"] for c in m.store.cameras()} == {"gate": 20, "hall": 50}
               and m.index.partition("m1").size == 70, 10, "retention")

    kept = {r.id: r for r in m.store.recent(limit=1000)}
    assert sorted(r.ts for r in kept.values() if r.camera == "hall") == [s.ts for s in busy_hall[30:]]  # the newest 50
    assert sorted(r.ts for r in kept.values() if r.camera == "gate") == [s.ts for s in fresh_gate]
    assert held_ids(m.index, "m1") == set(kept)
    gone = set(range(1, 131)) - set(kept)
    assert len(gone) == 60 and all(m.store.record(i) is None and m.store.thumbnail(i) is None for i in gone)
    for s in old[:3] + busy_hall[:3]:  # their own embeddings no longer find them
        assert m.queries.search_embedding(s.embedding, "m1", Filters(min_score=0.99)).ranked() == []

    # New sightings keep being policed by the background thread.
    with Pusher(m.ingest.endpoint) as push:
        push.send([make_sighting(vecs[130 + i], camera="hall", ts=now + i, frame=100 + i, track=50) for i in range(10)])
    wait_until(lambda: m.ingest.accepted == 140, 10, "ten more")
    wait_until(lambda: m.store.cameras()[1]["sightings"] == 50 and m.index.partition("m1").size == 70, 10, "hall back to 50")
    if deployment["store"]:
        _vacuumed(request.getfixturevalue("pg_server"), deployment["store"]["dbname"], sorted(gone))
    m.stop()
    if not deployment["store"]:
        _wiped_from_files(tmp_path, gone)


def _vacuumed(pg, dbname: str, gone: list[int]) -> None:
    """PostgreSQL: no row of the deleted, and the background VACUUM has pruned their dead row versions."""
    with pg.connect(dbname) as db:
        for table in ("sightings", "vectors", "thumbnails"):
            assert db.execute(f"SELECT COUNT(*) FROM {table} WHERE id = ANY(%s)", (gone,)).fetchone() == (0,)
    wait_until(lambda: pg.dead_tuples(dbname, "thumbnails") == pg.dead_tuples(dbname, "vectors") == 0, 10, "VACUUM")


def _wiped_from_files(tmp_path, gone: set[int]) -> None:
    db = sqlite3.connect(tmp_path / "sightings.db")
    ids = ",".join(map(str, gone))
    assert db.execute(f"SELECT COUNT(*) FROM vectors WHERE id IN ({ids})").fetchone() == (0,)
    assert db.execute(f"SELECT COUNT(*) FROM thumbnails WHERE id IN ({ids})").fetchone() == (0,)
    db.close()
    # Not just unlinked: the deleted thumbnails' bytes are gone from the files (secure_delete, no VACUUM needed).
    raw = b"".join(p.read_bytes() for p in tmp_path.glob("sightings.db*"))
    assert not any(f"PERSONAL-DATA-{i:04d}".encode() in raw for i in [*range(30), *range(50, 90)])
    assert b"PERSONAL-DATA-0129" in raw  # a kept one: the search would find them if they were there
