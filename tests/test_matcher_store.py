"""The store on its own: files written by an older matcher open and read, and ids are never reused.

| test                       | what                                                                    |
|----------------------------|-------------------------------------------------------------------------|
| old `det_score` column     | a store from before the detector score was named `score` (as on the wire): |
|                            | read-only it reads as is; a writable open renames the column, keeping rows |
| ids                        | `next_id()` after deletions, also after a reopen: the deleted ids are not given out |
|                            | again (both backends: SQLite and PostgreSQL)                            |
"""

from __future__ import annotations

import sqlite3

import numpy as np
import pytest
from helpers import make_sighting, store_insert, unit_vectors

from crossview.matcher import store as store_module
from crossview.matcher.store import Store


def _old_store(path) -> None:
    """A store file as the matcher wrote it before the rename: the same schema, the score column `det_score`."""
    old = store_module.SCHEMA.replace("    score REAL NOT NULL,", "    det_score REAL NOT NULL,")
    assert old != store_module.SCHEMA
    db = sqlite3.connect(path)
    db.executescript(old)
    db.execute("INSERT INTO sightings (node, camera, ts, frame, track, track_id, x1, y1, x2, y2, det_score, model, has_thumb)"
               " VALUES ('edge-1', 'gate', 1.5, 3, 7, 1, 10, 20, 50, 140, 0.75, 'm1', 0)")
    db.execute("INSERT INTO vectors (id, vec) VALUES (1, ?)", (np.ones(4, np.float32).tobytes(),))
    db.execute("INSERT INTO models (model, dim) VALUES ('m1', 4)")
    db.commit()
    db.close()


def _columns(path) -> set[str]:
    db = sqlite3.connect(path)
    try:
        return {r[1] for r in db.execute("PRAGMA table_info(sightings)")}
    finally:
        db.close()


@pytest.mark.parametrize("read_only", [True, False])
def test_a_store_with_the_old_score_column_opens_and_reads(tmp_path, read_only):
    path = tmp_path / "sightings.db"
    _old_store(path)
    store = Store(path, read_only=read_only)
    try:
        [rec] = store.recent()
        assert (rec.id, rec.camera, rec.track, rec.score) == (1, "gate", 7, 0.75)
        assert store.records([1])[1] == rec == store.latest_in_track("edge-1", "gate", 7)
        if not read_only:
            store_insert(store, [make_sighting(unit_vectors(np.random.default_rng(0), 1, 4)[0])])
            assert [r.score for r in store.recent()] == [0.9, 0.75]
    finally:
        store.close()
    assert ("det_score" in _columns(path)) == read_only  # renamed only where the store may write
    if not read_only:
        reader = Store(path, read_only=True)
        assert reader.record(1).score == 0.75
        reader.close()


def test_ids_are_never_reused_after_a_deletion(open_test_store):
    store = open_test_store()
    vecs = unit_vectors(np.random.default_rng(1), 3, 8)
    ids = store_insert(store, [make_sighting(v, frame=k) for k, v in enumerate(vecs)])
    assert store.delete(ids[1:]) == ({"m1": [2, 3]}, 2)
    assert ids == [1, 2, 3] and store.next_id() == 4
    store.close()
    again = open_test_store()  # the highest id taken is stored, not derived from the rows left
    assert again.next_id() == 4 and again.last_deletion() == 2 and [r.id for r in again.recent()] == [1]
    assert store_insert(again, [make_sighting(vecs[0], frame=9)]) == [4]
