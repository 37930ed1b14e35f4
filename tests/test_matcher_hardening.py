"""What an independent test of the matcher broke (issue 9, "Hardening"), each through a real matcher and socket.

| test                                    | what held                                                          |
|-----------------------------------------|--------------------------------------------------------------------|
| integers past SQLite's                  | 3 among 3,000 valid: the 3,000 stored, the 3 refused by the schema |
| a row the store refuses                 | its batch is committed one by one: only that row is lost, ids and index agree |
| oversized messages                      | 20 of 1 MiB+1 among 1,000 valid: all 1,000 stored, 20 counted and logged with their sender |
| reason codes                            | 100,000 varied bad messages: the reason keys stay the fixed set, /metrics and the status line small, log lines rate-limited |
| log injection                           | control characters in ids are refused; the logged detail is escaped |
| absurd times                            | the schema bounds `ts`; `crossview query` refuses absurd --since/--until and shows an old store's 1e308 |
| model versions                          | past index.max_models a new version is refused; an expired one makes room |
| refused sightings                       | take no model slot and fix no dimension                            |
| thumbnails                              | bounded by what their header declares: pixels and scans           |
"""

from __future__ import annotations

import logging
import sqlite3
import time
from contextlib import closing, contextmanager

import cv2
import msgpack
import numpy as np
import pytest
from helpers import (
    T0,
    Pusher,
    index_ids,
    jpeg_declaring,
    jpeg_of_scans,
    make_sighting,
    matcher_config,
    store_insert,
    unit_vectors,
    wait_until,
)
from prometheus_client import generate_latest

from crossview import cli
from crossview.kernel.wire import MAX_MESSAGE_BYTES, MAX_TS, REASONS, Reason, WireError, decode, encode
from crossview.matcher import ingest
from crossview.matcher.service import Matcher

RNG = np.random.default_rng(9)
FIELDS = msgpack.unpackb(encode(make_sighting(unit_vectors(RNG, 1, 64)[0])))


def _with(**changes) -> bytes:
    return msgpack.packb({**FIELDS, **changes}, use_bin_type=True)


def _good(n: int, **fields) -> list[bytes]:
    return [encode(make_sighting(v, frame=k, track=k % 50, **fields)) for k, v in enumerate(unit_vectors(RNG, n, 64))]


@contextmanager
def running(tmp_path, **sections):
    m = Matcher(matcher_config(tmp_path, **sections))
    m.start()
    try:
        with Pusher(m.ingest.endpoint) as push:
            yield m, push
    finally:
        m.stop()


def _stored(m: Matcher) -> int:
    return sum(c["sightings"] for c in m.store.cameras())


def _deliver(m: Matcher, push: Pusher, messages: list[bytes]) -> None:
    """Send, then wait until every message is accepted or counted as rejected."""
    before = m.ingest.accepted + sum(m.ingest.rejected.values())
    push.send_raw(*messages)
    wait_until(lambda: m.ingest.accepted + sum(m.ingest.rejected.values()) == before + len(messages), 60,
               f"{len(messages)} messages accepted or rejected")


def _ingest_lines(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == ingest.__name__]


def test_integers_past_sqlites_cost_only_their_own_message(tmp_path):
    """Before: frame or track at 2^64-1 passed the schema, SQLite raised OverflowError and 1,073 of 3,000 were lost."""
    messages = _good(3000)
    for pos, bad in zip((500, 1500, 2500), (_with(frame=2**64 - 1), _with(track=2**64 - 1), _with(frame=2**63))):
        messages.insert(pos, bad)
    with running(tmp_path) as (m, push):
        _deliver(m, push, messages)
        assert m.ingest.accepted == 3000 and _stored(m) == 3000
        assert m.ingest.rejected == {Reason.FIELD_RANGE: 3}


def test_a_row_the_store_refuses_costs_only_itself(tmp_path, caplog):
    """The schema cannot foresee every refusal (here a trigger, as a constraint of a later store might be): the
    batch holding it is committed one by one, the others keep consecutive ids and reach the index."""
    good, refused = _good(3000), _good(3, camera="refused")
    messages = good[:1000] + [refused[0]] + good[1000:2000] + [refused[1]] + good[2000:] + [refused[2]]
    with running(tmp_path, ingest={"batch_wait_ms": 50}) as (m, push):
        with closing(sqlite3.connect(m.store.path, isolation_level=None)) as db:
            db.execute("CREATE TRIGGER refuse BEFORE INSERT ON sightings WHEN NEW.camera = 'refused' "
                       "BEGIN SELECT RAISE(ABORT, 'refused by the test'); END")
        caplog.set_level(logging.WARNING, ingest.__name__)
        _deliver(m, push, messages)
        assert m.ingest.accepted == 3000 and _stored(m) == 3000
        assert m.ingest.rejected == {Reason.STORE_REFUSED: 3}
        assert any("one by one" in line for line in _ingest_lines(caplog))  # a refusal inside a batch of others
        stored_ids, _ = m.index.stored_vectors("m1")
        assert index_ids(m.index.partition("m1").index) == set(stored_ids.tolist())
        assert stored_ids.tolist() == list(range(1, 3001))


def test_oversized_messages_are_counted_and_logged_and_cost_no_valid_one(tmp_path, caplog, monkeypatch):
    """Before: ZeroMQ's MAXMSGSIZE (the schema's 1 MiB) dropped the connection, uncounted: 750 of 1,000 were stored."""
    good = _good(1000)
    messages = []
    for k in range(40):  # 40 runs of 25 valid messages, every other one after a message of 1 MiB + 1
        messages += ([b"\x00" * (MAX_MESSAGE_BYTES + 1)] if k % 2 == 0 else []) + good[25 * k:25 * (k + 1)]
    caplog.set_level(logging.WARNING, ingest.__name__)
    monkeypatch.setattr(ingest, "_LOG_EVERY_S", 1000.0)  # however slow the machine: one line for the 20
    with running(tmp_path) as (m, push):
        _deliver(m, push, messages)
        assert m.ingest.accepted == 1000 and _stored(m) == 1000
        assert m.ingest.rejected == {Reason.OVERSIZED: 20}
    [line] = [line for line in _ingest_lines(caplog) if "oversized" in line]
    assert "from 127.0.0.1" in line and f"{MAX_MESSAGE_BYTES + 1} bytes" in line


def _varied_junk(rng: np.random.Generator, n: int) -> list[bytes]:
    """Bad messages whose every detail differs: before, each made a counter key of its own."""
    makers = [
        lambda k: _with(score=1 + float(rng.random()) * 1e6),
        lambda k: _with(frame=-1 - k),
        lambda k: _with(ts=MAX_TS + k),
        lambda k: _with(dt=f"f{k}"),
        lambda k: _with(v=100 + k),
        lambda k: _with(emb=b"\x01" * (k % 4000 * 4 + 1)),
        lambda k: _with(box=[float(k), 0.0, float(k), 5.0]),
        lambda k: _with(node=f"edge\x1b{k}"),
        lambda k: _with(cam="c" * (65 + k % 100)),
        lambda k: _with(frame=f"frame {k}"),
        lambda k: msgpack.packb({**{f: v for f, v in FIELDS.items() if f != "cam"}, f"cam{k}": "gate"}),
        lambda k: rng.bytes(1 + k % 200),
    ]
    return [makers[k % len(makers)](k) for k in range(n)]


def test_reasons_are_a_fixed_set_and_their_log_lines_are_rate_limited(tmp_path, caplog, monkeypatch):
    """Before: 100,000 varied messages made 40,230 counter keys, /metrics of 4 MB and a status line of 4.4 MB."""
    monkeypatch.setattr(ingest, "_LOG_EVERY_S", 0.5)  # the test runs for seconds, not minutes
    junk = _varied_junk(np.random.default_rng(3), 100_000)
    caplog.set_level(logging.INFO)
    with running(tmp_path) as (m, push):
        t0 = time.monotonic()
        for k in range(0, len(junk), 10_000):  # in slices, so the sending spans several rate-limit periods
            _deliver(m, push, junk[k:k + 10_000])
        elapsed = time.monotonic() - t0
        reasons = m.ingest.rejected
        assert sum(reasons.values()) == 100_000 and m.ingest.accepted == 0
        assert set(reasons) <= REASONS and len(reasons) >= 6
        assert len(generate_latest(m.metrics.registry)) < 4000
    [status] = [r.getMessage() for r in caplog.records if r.getMessage().startswith("ingest: ")][-1:]  # the one at stop
    assert len(status) < 400 and "100000 rejected" in status
    refused = [line for line in _ingest_lines(caplog) if line.startswith("dropped ")]
    assert len(reasons) <= len(refused) <= len(reasons) * (elapsed / 0.5 + 1)  # a line per reason per 0.5 s at most
    assert any("not logged since the last line" in line for line in refused)


@pytest.mark.parametrize("field", ["node", "cam", "model"])
def test_control_characters_in_identifiers_cannot_forge_log_lines(tmp_path, caplog, field):
    """Before: a node id holding a newline forged an ERROR line in the matcher log."""
    forged = "edge-1\n2026-12-01 21:00:00 ERROR crossview.matcher: forged\r\u2028\x1b[2K"
    caplog.set_level(logging.INFO)
    with running(tmp_path) as (m, push):
        _deliver(m, push, [_with(**{field: forged}), *_good(1)])
        assert m.ingest.accepted == 1 and m.ingest.rejected == {Reason.IDENTIFIER: 1}
    lines = [r.getMessage() for r in caplog.records]
    assert not any(c in line for line in lines for c in "\n\r\u2028\x1b")
    assert any("edge-1\\n2026-12-01 21:00:00 ERROR" in line for line in lines)  # escaped, still readable


@pytest.mark.parametrize("ts", [1e308, -1.0, MAX_TS * 1.01])
def test_the_schema_bounds_times(ts):
    with pytest.raises(WireError) as e:
        decode(_with(ts=ts))
    assert e.value.code == Reason.FIELD_RANGE
    assert decode(_with(ts=MAX_TS)).ts == MAX_TS


@pytest.mark.parametrize("flag", ["--since", "--until"])
@pytest.mark.parametrize("value", ["1e308", "-5", "nan", "inf", "9999-12-31"])
def test_query_refuses_absurd_times_with_a_message(tmp_path, capsys, flag, value):
    with pytest.raises(SystemExit) as e:
        cli.main(["query", "--data-dir", str(tmp_path), "--sighting", "1", flag, value])
    assert e.value.code == 2
    assert "outside 1970 .. 2200" in capsys.readouterr().err


def test_query_shows_a_time_stored_before_the_bound(tmp_path, capsys):
    """Before: `crossview query` crashed formatting ts=1e308 (a store written before the schema bounded it)."""
    with running(tmp_path) as (m, _):
        vec = unit_vectors(RNG, 1, 64)[0]
        [first, _] = store_insert(m.store, [make_sighting(vec, camera="gate", ts=T0),
                                            make_sighting(vec, camera="hall", ts=1e308, track=2)])
    assert cli.main(["query", "--data-dir", str(tmp_path), "--sighting", str(first)]) == 0
    assert "1e+308" in capsys.readouterr().out


def _flipped(model: str, k: int) -> str:
    """The model version with one bit flipped, as a damaged message would carry it."""
    raw = bytearray(model.encode())
    raw[k // 7 % len(raw)] ^= 1 << (k % 7)
    return raw.decode()


def test_new_model_versions_past_the_limit_are_refused(tmp_path):
    """Before: each bit-flipped version made a partition and a snapshot file (68 of them)."""
    flipped = {_flipped("mobilenet-1", k) for k in range(40)} - {"mobilenet-1"}
    versions = ["mobilenet-1", *sorted(v for v in flipped if v.isprintable())]  # the others: `identifier`
    with running(tmp_path, index={"max_models": 3}) as (m, push):
        _deliver(m, push, [b for v in versions for b in _good(2, model=v)])
        assert sorted(m.index.partitions) == sorted(versions[:3])
        assert m.ingest.accepted == 6 and m.ingest.rejected == {Reason.UNKNOWN_MODEL: 2 * (len(versions) - 3)}
        _deliver(m, push, _good(5, model=versions[0]))  # known versions still get in
        assert m.ingest.accepted == 11
        # A version whose sightings all expired no longer counts: a retrained model gets in.
        m.remove(m.index.stored_vectors(versions[1])[0].tolist())
        _deliver(m, push, _good(2, model="mobilenet-2"))
        assert m.ingest.accepted == 13 and "mobilenet-2" in m.index.partitions
        assert m.index.save() == 4
    assert len(list((tmp_path / "index").glob("*.json"))) == 4


def test_refused_sightings_take_no_model_slot_and_fix_no_dimension(tmp_path):
    """Before: a zero 4-d embedding of a new version was refused, yet fixed the version's dimension at 4, so its genuine
    64-d sightings were refused after it; 8 refused sightings under new names used up index.max_models."""
    def zero(model: str) -> bytes:
        return _with(emb=np.zeros(4, "<f4").tobytes(), model=model)

    with running(tmp_path, index={"max_models": 3}) as (m, push):
        _deliver(m, push, [zero("site-v2"), *(zero(f"junk-{k}") for k in range(8))])
        assert m.ingest.rejected == {Reason.ZERO_EMBEDDING: 9} and m.ingest.accepted == 0
        _deliver(m, push, _good(2, model="site-v2") + _good(2, model="m1") + [zero("site-v3"), *_good(1, model="site-v3")])
        assert m.ingest.accepted == 5 and m.ingest.rejected == {Reason.ZERO_EMBEDDING: 10}
        assert sorted(m.index.partitions) == ["m1", "site-v2", "site-v3"]
        assert m.index.partition("site-v2").dim == 64


def test_thumbnails_are_bounded_by_what_their_header_declares(tmp_path, caplog, monkeypatch):
    """Before: only their first two bytes were checked. A 631-byte thumbnail declaring 16000 x 16000 pixels was stored
    and a model promotion's gallery migration decoded it (peak memory 220 MB -> 1.7 GB); one of 10,000 scans took 13 s
    of CPU to decode."""
    huge = jpeg_declaring(np.zeros((16, 8, 3), np.uint8), 16000, 16000)
    progressive = cv2.imencode(".jpg", np.zeros((512, 2048, 3), np.uint8), [cv2.IMWRITE_JPEG_PROGRESSIVE, 1])[1].tobytes()
    caplog.set_level(logging.WARNING, ingest.__name__)
    monkeypatch.setattr(ingest, "_LOG_EVERY_S", 0.0)  # a line for each
    with running(tmp_path) as (m, push):
        _deliver(m, push, [_with(thumb=huge), _with(thumb=jpeg_of_scans(1000)), *_good(1, thumbnail=progressive)])
        assert m.ingest.accepted == 1 and m.ingest.rejected == {Reason.FIELD_RANGE: 2}
        [stored] = m.store.recent(None, 10)
        assert m.store.thumbnail(stored.id) == progressive  # 512 x 2048 and ~10 scans: what an edge may send
    lines = _ingest_lines(caplog)
    assert any("field 'thumb' is a 16000 x 16000 JPEG: over 2,097,152 pixels" in line for line in lines)
    assert any("field 'thumb' is a JPEG of 1,000 scans; the limit is 100" in line for line in lines)


@pytest.mark.parametrize("name", ["sightings.db", "watchlist.db", "users.db"])
def test_an_unreadable_database_file_stops_the_matcher_naming_it_and_is_left_as_it_was(tmp_path, caplog, name):
    """Garbage in one of the matcher's SQLite files: it may hold what was accepted, so nothing is moved or deleted;
    the matcher stops with exit code 2 and a line naming the file and what to do, not a traceback."""
    tmp_path.mkdir(exist_ok=True)
    junk = b"\x00not sqlite" * 700
    (tmp_path / name).write_bytes(junk)
    cfg = tmp_path / "matcher.yaml"
    cfg.write_text(f"data_dir: {tmp_path}\ningest: {{endpoint: 'tcp://127.0.0.1:*', security: {{mode: plain}}}}\n"
                   "http: {token: test-token-0123456789, port: 0}\nmetrics: {port: 0}\n")
    assert cli.main(["matcher", "--config", str(cfg)]) == 2
    assert f"{tmp_path / name}: not a readable SQLite database" in caplog.text and "move it aside" in caplog.text
    assert (tmp_path / name).read_bytes() == junk
