"""Re-embedding the gallery when a new model version becomes production (`matcher.migration`), on real footage.

TUD-Campus people are stored as sightings of the default embedder (version `mobilenetv2-imagenet-1`) with their
thumbnails, as an edge sends them (`live_matcher.tud_sightings`: persons 2-5 walk from `gate` to `hall`). The new
version `site-2` is a real other model: the same backbone at a 192x96 input, so its vectors differ from the old ones.

| test                | what                                                                                |
|---------------------|-------------------------------------------------------------------------------------|
| across the switch   | promote: every thumbnailed sighting gets a `site-2` vector under its id; during the run |
|                     | queries carry their coverage; a deletion leaves no vector; a person seen before the switch |
|                     | is found by a `site-2` query; the old partition goes only once no edge reports it     |
| kill -9             | a `crossview matcher` killed mid-migration resumes where it stopped, without duplicates, |
|                     | on both deployments (SQLite + FAISS, PostgreSQL + Milvus)                            |
| page                | the progress line while it runs, and a search's note of how far back it covers       |
| older store         | a store from before re-embedding opens read-only as it is, and gains its table when writable |
"""

from __future__ import annotations

import dataclasses
import shutil
import sqlite3
import time

import numpy as np
import pytest
import requests
import yaml
from helpers import (
    CrossviewProcess,
    Pusher,
    held_ids,
    index_ids,
    jpeg_declaring,
    jpeg_of_scans,
    make_sighting,
    matcher_config,
    store_insert,
    unit_vectors,
    wait_until,
)
from live_matcher import person_crop, thumbnail, tud_sightings

from crossview.kernel.embedder import Embedder
from crossview.kernel.wire import CameraStatus, Heartbeat, Sighting, encode_heartbeat
from crossview.matcher import store as store_module
from crossview.matcher.api import serve
from crossview.matcher.query import Filters
from crossview.matcher.service import Matcher, open_data
from crossview.matcher.store import Store
from crossview.trainer.export import build_default_embedder, write_metadata

NEW = "site-2"
TOKEN = "test-token-0123456789"
PERSON = 3  # walks from gate to hall


@pytest.fixture(scope="module")
def new_model(tmp_path_factory):
    """`site-2`: the default backbone at another input size, so another embedding of the same crops."""
    out = tmp_path_factory.mktemp("site-2")
    meta = build_default_embedder(out / "raw.onnx", input_size=(192, 96))
    write_metadata(out / "raw.onnx", out / "site-2.onnx", dataclasses.replace(meta, version=NEW))
    return out / "site-2.onnx"


@pytest.fixture(scope="module")
def history(default_model, tud_frames):
    """The site's sightings before the switch: TUD people on gate and hall, and three without a thumbnail."""
    sightings = tud_sightings(Embedder(default_model, device="cpu"), tud_frames, t0=time.time() - 600)
    bare = [dataclasses.replace(s, camera="lobby", thumbnail=None) for s in sightings[:3]]
    return sightings + bare


def heartbeat(node: str, model: str) -> bytes:
    cam = CameraStatus("gate", "streaming", 5.0, 5.0, 100)
    return encode_heartbeat(Heartbeat(node, time.time(), 0.5, model, 0, 0.0, 0, (cam,)))


def started(tmp_path, default_model, history, sections: dict | None = None, **migration) -> Matcher:
    """A matcher whose production version is the old one, holding `history` (in the `store` and `index` of `sections`,
    SQLite and FAISS without)."""
    m = Matcher(matcher_config(tmp_path / "matcher", migration={"poll_s": 0.2, "batch": 8, **migration},
                               http={"port": 0, "token": TOKEN}, **(sections or {})))
    m.registry.promote(m.registry.register(default_model).version)
    m.start()
    with Pusher(m.ingest.endpoint) as push:
        push.send(history)
    wait_until(lambda: m.ingest.accepted == len(history), 30, f"{len(history)} sightings accepted")
    return m


def test_after_a_promotion_queries_span_the_switch_and_the_old_partition_goes_once_no_edge_runs_it(
        tmp_path, default_model, new_model, history, tud_frames, store_section):
    m = started(tmp_path, default_model, history, {"store": store_section}, enabled=False)  # steps driven here, to look between two batches
    old = history[0].model
    server = serve(m, m.cfg.http)
    try:
        with Pusher(m.ingest.endpoint) as push:
            push.send_raw(heartbeat("edge-1", old))  # an edge still on the old version
        wait_until(lambda: m.edges.report()["edges"], 10, "edge-1's heartbeat")
        m.registry.register(new_model)
        m.registry.promote(NEW)
        thumbnailed = sorted(r.id for r in m.store.recent(limit=1000) if r.has_thumbnail)
        newest = max(m.store.records(thumbnailed).values(), key=lambda r: r.ts)

        assert m.migration.step()  # the switch and a first batch, newest first
        progress = m.migration.progress()
        assert (progress["model"], progress["state"], progress["migrated"]) == (NEW, "migrating", 8)
        assert (progress["total"], progress["without_thumbnail"]) == (len(thumbnailed), 3)
        assert m.store.vector(newest.id, NEW) is not None
        answer = requests.post(f"{server.url}api/v1/query", json={"sighting_id": newest.id},
                               headers={"Authorization": f"Bearer {TOKEN}"}, timeout=10).json()
        assert answer["model"] == NEW, "a re-embedded sighting is searched by the production version"
        coverage = answer["coverage"]
        assert (coverage["model"], coverage["migrated"], coverage["total"]) == (NEW, 8, len(thumbnailed))
        assert coverage["oldest_ts_covered"] <= newest.ts
        assert "history: site-2 became production; 8 of" in m.queries.search_sighting(newest.id).to_text()
        stats = requests.get(f"{server.url}api/v1/stats", headers={"Authorization": f"Bearer {TOKEN}"}, timeout=10).json()
        assert stats["migration"]["migrated"] == 8
        assert m.metrics.value("crossview_matcher_migration_sightings", model=NEW, state="migrated") == 8
        assert m.metrics.value("crossview_matcher_migration_running", model=NEW) == 1

        # A snapshot now, two batches more: a restart finds the snapshot's and replays the rest by their store seq.
        assert m.index.save() and m.migration.step() and m.migration.step()
        reader = open_data(m.cfg.data_dir, m.cfg.index, m.cfg.query, [], read_only=True, store_cfg=m.cfg.store)
        recovered = reader.index.partition(NEW).index
        assert recovered.ntotal == 24 and index_ids(recovered) == {i for i in thumbnailed if m.store.vector(i, NEW) is not None}
        reader.store.close()

        migrated, pending = newest.id, min(thumbnailed)  # deleted now: one re-embedded already, one not yet
        assert m.remove([migrated, pending]) == 2
        while m.migration.step():
            pass
        assert m.migration.progress()["state"] == "done" and m.migration.coverage() is None
        left = [i for i in thumbnailed if i not in (migrated, pending)]
        assert all(m.store.vector(i, NEW) is not None for i in left), "every thumbnailed sighting has a site-2 vector"
        assert index_ids(m.index.partition(NEW).index) == set(left)
        for gone in (migrated, pending):
            assert m.store.vector(gone, NEW) is None and m.store.vector(gone) is None and m.store.record(gone) is None

        # A person seen before the switch, asked about with the new model: their earlier tracks are found.
        later = Embedder(new_model, device="cpu")
        crop = person_crop(tud_frames, 62, PERSON)  # a frame no stored sighting came from
        asked = Sighting("edge-3", "street", time.time(), 1, 99, (0.0, 0.0, 10.0, 20.0), 0.9, later.embed([crop])[0], NEW,
                         thumbnail(crop))
        with Pusher(m.ingest.endpoint) as push:
            push.send([asked])
        wait_until(lambda: m.store.latest_in_track("edge-3", "street", 99), 10, "the new sighting stored")
        hits = m.queries.search_track("edge-3", "street", 99, None, Filters(top_k=3)).ranked()
        assert {("gate", PERSON), ("hall", PERSON)} <= {(h.camera, h.track) for h in hits}, hits
        on_hall = m.queries.search_track("edge-3", "street", 99, None, Filters(cameras=["hall"], top_k=1)).ranked()
        assert on_hall[0].track == PERSON  # a selective filter scores the re-embedded vectors from the store exactly
        by_image = m.queries.search_image(crop, NEW, Filters(cameras=["gate", "hall"], top_k=3)).ranked()
        assert PERSON in {h.track for h in by_image}, "the registry's file serves image queries by the new version"

        assert not m.migration.step() and old in m.index.partitions, "kept: edge-1 still reports the old version"
        assert m.migration.progress()["kept"] == {old: ["edge-1"]}
        assert m.index.save() and list((tmp_path / "matcher" / "index").glob(f"{old}*"))
        late = dataclasses.replace(history[5], frame=999, ts=time.time())  # edge-1, still on the old version, sends more
        with Pusher(m.ingest.endpoint) as push:
            push.send([late])
        wait_until(lambda: m.store.latest_in_track(late.node, late.camera, late.track, old).frame == 999, 10, "it stored")
        late_id = m.store.latest_in_track(late.node, late.camera, late.track, old).id
        assert m.migration.step() and m.migration.progress()["state"] == "migrating"
        while m.migration.step():
            pass
        assert m.store.vector(late_id, NEW) is not None and m.migration.progress()["state"] == "done"
        left.append(late_id)
        with Pusher(m.ingest.endpoint) as push:
            push.send_raw(heartbeat("edge-1", NEW))
        wait_until(lambda: m.edges.report()["edges"][0]["model"] == NEW, 10, "edge-1 on site-2")
        assert not m.migration.step()
        assert old not in m.index.partitions and old not in m.store.models() and m.store.vector(left[0]) is None
        bare = [r.id for r in m.store.recent(camera="lobby")]
        with pytest.raises(LookupError, match="no thumbnail to re-embed"):
            m.queries.search_sighting(bare[0])
        assert m.queries.search_sighting(left[0]).model == NEW
        reader = open_data(m.cfg.data_dir, m.cfg.index, m.cfg.query, [], read_only=True, store_cfg=m.cfg.store)  # as `crossview query` reads it
        assert reader.search_sighting(left[0]).model == NEW
        reader.store.close()
    finally:
        server.stop()
        m.stop()
    assert not list((tmp_path / "matcher" / "index").glob(f"{old}*")), "the old partition's snapshot went with it"


def test_a_hostile_thumbnail_stored_before_the_wire_bounded_them_is_skipped_undecoded(tmp_path, default_model,
                                                                                       new_model, history, caplog):
    """A store written before thumbnails were bounded may hold a small JPEG declaring 16000 x 16000 (1.7 GB of BGR
    to decode) or one of thousands of scans: the migration refuses both from their headers and goes on."""
    m = started(tmp_path, default_model, history, enabled=False)
    try:
        bomb, slow = sorted(r.id for r in m.store.recent(limit=1000) if r.has_thumbnail)[:2]
        crop = np.full((96, 48, 3), 128, np.uint8)
        with sqlite3.connect(m.cfg.data_dir / "sightings.db") as db:
            db.execute("UPDATE thumbnails SET jpeg = ? WHERE id = ?", (jpeg_declaring(crop, 16000, 16000), bomb))
            db.execute("UPDATE thumbnails SET jpeg = ? WHERE id = ?", (jpeg_of_scans(5000), slow))
        m.registry.register(new_model)
        m.registry.promote(NEW)
        while m.migration.step():
            pass
        assert m.migration.progress()["unreadable"] == 2
        assert m.store.vector(bomb, NEW) is None and m.store.vector(slow, NEW) is None
        assert m.migration.progress()["migrated"] == sum(s.thumbnail is not None for s in history) - 2
        assert f"thumbnail of sighting {bomb}" in caplog.text and "16000 x 16000" in caplog.text
        assert f"thumbnail of sighting {slow}" in caplog.text and "5,000 scans" in caplog.text
    finally:
        m.stop()


def test_a_matcher_killed_mid_migration_resumes_where_it_stopped_without_duplicates(tmp_path, default_model, new_model,
                                                                                   history, deployment):
    m = started(tmp_path, default_model, history, deployment, enabled=False)
    m.stop()
    m.registry.register(new_model)
    m.registry.promote(NEW)
    total = sum(s.thumbnail is not None for s in history)
    cfg = m.cfg.model_dump(mode="json")
    cfg["migration"] = {"batch": 1, "log_every_pct": 5}  # one thumbnail a commit: slow enough to be killed part way
    cfg["index"]["snapshot_interval_s"] = 0.2
    (tmp_path / "matcher.yaml").write_text(yaml.safe_dump(cfg))
    proc = CrossviewProcess(tmp_path / "matcher.log", "matcher", "--config", str(tmp_path / "matcher.yaml"))
    try:
        proc.wait_for_line("re-embedded (2", 60)  # 20% or more
        proc.kill9()
    finally:
        proc.stop()

    m = Matcher(m.cfg.model_copy(update={"migration": m.cfg.migration.model_copy(update={"enabled": True})}))
    try:
        before = m.store.migration_counts(NEW, 0)["reembedded"]
        assert 0 < before < total, "killed part way"
        assert len(held_ids(m.index, NEW)) == m.index.partition(NEW).size == before
        m.start()
        wait_until(lambda: (m.migration.progress() or {}).get("state") == "done", 60, "the migration resumed and done")
        assert m.migration.progress()["migrated"] == total
        assert len(held_ids(m.index, NEW)) == m.index.partition(NEW).size == total, "no sighting re-embedded twice"
    finally:
        m.stop()
    text = proc.text()
    assert "gallery migration to site-2" in text and "newest first" in text


@pytest.mark.skipif(shutil.which("chromium") is None, reason="Debian chromium is not installed: `make browser`")
def test_the_page_shows_the_migration_and_what_a_search_covers(tmp_path, default_model, new_model, history):
    from playwright.sync_api import sync_playwright

    m = started(tmp_path, default_model, history, enabled=False)
    server = serve(m, m.cfg.http)
    try:
        m.registry.register(new_model)
        m.registry.promote(NEW)
        assert m.migration.step()  # one batch of the newest: migrating
        newest = max(m.store.recent(limit=1000), key=lambda r: (r.ts, r.id))
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=shutil.which("chromium"), args=["--headless", "--no-sandbox"])
            page = browser.new_page()
            page.set_default_timeout(15000)
            page.goto(server.url)
            page.fill("#token", TOKEN)
            page.click("#login-form button")
            page.wait_for_selector("#migration:has-text('Re-embedding the gallery by site-2: 8 of')")
            page.click(f".pick[data-id='{newest.id}']")
            note = page.wait_for_selector("#query .coverage")
            assert "site-2 became production: 8 of" in note.inner_text() and "does not cover the rest yet" in note.inner_text()
            browser.close()
    finally:
        server.stop()
        m.stop()


@pytest.mark.parametrize("read_only", [True, False])
def test_a_store_from_before_re_embedding_opens(tmp_path, read_only):
    old = store_module.SCHEMA[:store_module.SCHEMA.index("-- Sightings re-embedded")] + \
        store_module.SCHEMA[store_module.SCHEMA.index("CREATE TABLE IF NOT EXISTS deletions"):]
    assert "reembedded" not in old
    db = sqlite3.connect(tmp_path / "sightings.db")
    db.executescript(old)
    db.close()
    writer = Store(tmp_path / "sightings.db")  # as a matcher from before wrote it: one sighting
    [sid] = store_insert(writer, [make_sighting(unit_vectors(np.random.default_rng(0), 1, 4)[0])])
    writer.close()
    db = sqlite3.connect(tmp_path / "sightings.db")
    db.execute("DROP TABLE reembedded")  # the writable open made it: gone again, as in the old file
    db.commit()
    db.close()
    store = Store(tmp_path / "sightings.db", read_only=read_only)
    try:
        assert store.count("m1", None, None, None, 10) == 1 and list(store.reembedded_vectors("m1")) == []
        assert store.vector(sid, "m1") is not None and store.vector(sid, NEW) is None
        if not read_only:
            added, seq = store.add_reembedded(NEW, [sid], unit_vectors(np.random.default_rng(1), 1, 8))
            assert added == [sid] and seq == 1 and store.vector(sid, NEW).shape == (8,)
    finally:
        store.close()
