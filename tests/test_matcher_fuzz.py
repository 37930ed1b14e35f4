"""Fuzzing the matcher's ingest through a real socket: junk is counted and dropped, good traffic still gets in.

Every message sent on one socket is either accepted or counted as rejected: nothing vanishes and
nothing stops the service.
"""

from __future__ import annotations

import msgpack
import numpy as np
import pytest
from helpers import Pusher, make_sighting, matcher_config, unit_vectors, wait_until
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from crossview.kernel.wire import MAX_MESSAGE_BYTES, Reason, encode
from crossview.matcher.service import Matcher

RNG = np.random.default_rng(11)
GOOD = encode(make_sighting(unit_vectors(RNG, 1, 64)[0]))
FIELDS = msgpack.unpackb(GOOD)


@pytest.fixture(scope="module")
def matcher(tmp_path_factory):
    m = Matcher(matcher_config(tmp_path_factory.mktemp("fuzz")))
    m.start()
    with Pusher(m.ingest.endpoint) as push:
        push.send_raw(GOOD)  # fixes model m1 at 64-d
        wait_until(lambda: m.ingest.accepted == 1, 10, "the first sighting")
        m.push = push
        yield m
    m.stop()


def _send_and_account(m: Matcher, junk: list[bytes]) -> tuple[int, int]:
    """Send junk then one good message; wait until every message is accounted for. Returns (accepted, rejected) deltas."""
    accepted, rejected = m.ingest.accepted, sum(m.ingest.rejected.values())
    m.push.send_raw(*junk, encode(make_sighting(unit_vectors(RNG, 1, 64)[0])))
    wait_until(lambda: m.ingest.accepted + sum(m.ingest.rejected.values()) == accepted + rejected + len(junk) + 1, 10,
               f"{len(junk) + 1} messages accepted or rejected")
    return m.ingest.accepted - accepted, sum(m.ingest.rejected.values()) - rejected


def _with(**changes) -> bytes:
    return msgpack.packb({**FIELDS, **changes}, use_bin_type=True)


NAMED_DEFECTS = {
    "empty": (b"", Reason.MALFORMED),
    "truncated": (GOOD[: len(GOOD) // 2], Reason.MALFORMED),
    "one byte short": (GOOD[:-1], Reason.MALFORMED),
    "a list, not a map": (msgpack.packb([1, 2, 3]), Reason.MALFORMED),
    "future version": (_with(v=99), Reason.SCHEMA_VERSION),
    "version as text": (_with(v="1"), Reason.FIELD_TYPE),
    "NaN embedding": (_with(emb=np.full(64, np.nan, "<f4").tobytes()), Reason.NOT_FINITE),
    "infinite float16": (_with(emb=np.full(64, np.inf, "<f2").tobytes(), dt="f2"), Reason.NOT_FINITE),
    "ragged embedding": (_with(emb=b"\x00" * 7), Reason.FIELD_RANGE),
    "unknown dtype": (_with(dt="f8"), Reason.FIELD_RANGE),
    "empty box": (_with(box=[5.0, 5.0, 5.0, 9.0]), Reason.FIELD_RANGE),
    "score above 1": (_with(score=1.5), Reason.FIELD_RANGE),
    "frame past SQLite's integers": (_with(frame=2**64 - 1), Reason.FIELD_RANGE),
    "time past 2200": (_with(ts=1e308), Reason.FIELD_RANGE),
    "newline in node id": (_with(node="edge-1\nERROR forged"), Reason.IDENTIFIER),
    "thumbnail not JPEG": (_with(thumb=b"GIF89a"), Reason.FIELD_TYPE),
    "missing camera": (msgpack.packb({k: v for k, v in FIELDS.items() if k != "cam"}), Reason.MISSING_FIELD),
    "oversized": (GOOD + b"\x00" * MAX_MESSAGE_BYTES, Reason.OVERSIZED),
    "wrong dimension": (_with(emb=unit_vectors(RNG, 1, 128)[0].tobytes()), Reason.DIMENSION),
    "zero embedding": (_with(emb=np.zeros(64, "<f4").tobytes()), Reason.ZERO_EMBEDDING),
}


@pytest.mark.parametrize("name", NAMED_DEFECTS)
def test_each_defect_is_counted_under_its_reason(matcher, name):
    message, reason = NAMED_DEFECTS[name]
    counts = dict(matcher.ingest.rejected)
    assert _send_and_account(matcher, [message]) == (1, 1)
    assert {r: n - counts.get(r, 0) for r, n in matcher.ingest.rejected.items() if n != counts.get(r, 0)} == {reason: 1}


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(junk=st.lists(st.binary(max_size=3000), min_size=1, max_size=5))
def test_random_bytes(matcher, junk):
    accepted, rejected = _send_and_account(matcher, junk)
    assert accepted >= 1 and accepted + rejected == len(junk) + 1


_ANY = st.one_of(st.none(), st.booleans(), st.integers(-2**63, 2**64 - 1), st.floats(), st.text(max_size=300),
                 st.binary(max_size=600), st.lists(st.floats(), max_size=6), st.dictionaries(st.text(max_size=3), st.integers()))


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(changes=st.dictionaries(st.sampled_from(sorted(FIELDS)), _ANY, min_size=1, max_size=4),
       cut=st.one_of(st.none(), st.integers(0, len(GOOD))))
def test_mutated_messages(matcher, changes, cut):
    """Real messages with fields replaced by anything, and sometimes cut short."""
    try:
        message = _with(**changes)
    except (OverflowError, ValueError, TypeError):  # msgpack cannot pack this value at all
        return
    accepted, rejected = _send_and_account(matcher, [message if cut is None else message[:cut]])
    assert accepted >= 1 and accepted + rejected == 2


def test_flipped_bytes_in_real_messages(matcher):
    rng = np.random.default_rng(5)
    junk = []
    for _ in range(300):
        buf = bytearray(GOOD)
        for pos in rng.integers(0, len(buf), rng.integers(1, 4)):
            buf[pos] ^= 1 << int(rng.integers(8))
        junk.append(bytes(buf))
    size = sum(p["size"] for p in matcher.stats()["partitions"].values())
    accepted, rejected = _send_and_account(matcher, junk)
    assert accepted + rejected == 301 and rejected > 0
    # What got in is usable (a flipped bit in the model name makes another version, so count them all):
    # unit vectors, even where a flipped exponent made huge values.
    stored = [matcher.index.stored_vectors(model) for model in matcher.store.models()]
    assert sum(len(ids) for ids, _ in stored) == size + accepted
    assert all(np.allclose(np.linalg.norm(vecs, axis=1), 1, atol=1e-4) for _, vecs in stored)


def test_huge_messages_cost_only_their_own_connection(matcher):
    """Far past the schema's limit, ZeroMQ's MAXMSGSIZE cuts a sender off mid-message; other edges go on."""
    size = matcher.index.partition("m1").size
    with Pusher(matcher.ingest.endpoint) as rogue:
        rogue.send_raw(b"\x00" * (8 * MAX_MESSAGE_BYTES))
        accepted, rejected = _send_and_account(matcher, [GOOD] * 3)
    assert accepted == 4 and rejected == 0
    assert matcher.index.partition("m1").size == size + 4


def test_a_burst_of_good_and_bad_messages_keeps_every_good_one_in_order(matcher):
    """The receiver decodes whatever is queued as one batch: a bad message in it costs only itself."""
    vecs = unit_vectors(RNG, 4, 64)
    good = [encode(make_sighting(v, track=100 + k)) for k, v in enumerate(vecs)]
    bad = [_with(emb=np.full(64, np.nan, "<f4").tobytes()), b"junk", _with(emb=unit_vectors(RNG, 1, 128)[0].tobytes()),
           _with(emb=np.zeros(64, "<f4").tobytes())]
    burst = [m for pair in zip(good, bad) for m in pair]
    assert _send_and_account(matcher, burst) == (5, 4)  # and the good message _send_and_account sends last
    ids = range(matcher.index.partition("m1").max_id - 4, matcher.index.partition("m1").max_id)
    records = matcher.store.records(ids)
    assert [records[i].track for i in ids] == [100, 101, 102, 103]
    assert all(np.allclose(matcher.store.vector(i), v, atol=1e-6) for i, v in zip(ids, vecs))
