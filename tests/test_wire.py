"""The wire format: round trips, validation of every field, and compatibility with stored messages."""

from pathlib import Path

import msgpack
import numpy as np
import pytest

from crossview.kernel.wire import (
    MAX_MESSAGE_BYTES,
    SCHEMA_VERSION,
    Sighting,
    WireError,
    decode,
    decode_ack,
    decode_many,
    encode,
    encode_ack,
)

FIXTURE_V1 = Path(__file__).parent / "fixtures" / "sighting-v1.msgpack"
FIXTURE_V2 = Path(__file__).parent / "fixtures" / "sighting-v2.msgpack"
JPEG = b"\xff\xd8\xff\xe0fakejpeg"


def sighting(**kw) -> Sighting:
    emb = np.linspace(-1, 1, 16, dtype=np.float32)
    base = dict(node="edge-1", camera="gate", ts=1700000000.25, frame=42, track=7, box=(10.0, 20.0, 40.0, 100.0),
                score=0.9, embedding=emb / np.linalg.norm(emb), model="mobilenetv2-imagenet-1", thumbnail=JPEG)
    return Sighting(**{**base, **kw})


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_round_trip(dtype):
    s = sighting(embedding=sighting().embedding.astype(dtype))
    out = decode(encode(s))
    assert out == s and out.embedding.dtype == dtype and out.schema == SCHEMA_VERSION


def test_no_thumbnail():
    assert decode(encode(sighting(thumbnail=None))).thumbnail is None


def test_decodes_a_stored_v1_message():
    """A message written by schema version 1 must keep decoding to the same sighting in later versions."""
    s = decode(FIXTURE_V1.read_bytes())
    assert (s.node, s.camera, s.frame, s.track, s.model, s.schema) == ("edge-1", "gate", 42, 7, "mobilenetv2-imagenet-1", 1)
    assert s.embedding.shape == (16,) and abs(np.linalg.norm(s.embedding) - 1) < 1e-5


def test_decodes_a_stored_v2_message():
    """Version 2 adds the edge's sequence number; a v1 message has none, so the matcher never deduplicates it."""
    s = decode(FIXTURE_V2.read_bytes())
    assert (s.node, s.camera, s.frame, s.track, s.model, s.schema, s.seq) == (
        "edge-1", "gate", 42, 7, "mobilenetv2-imagenet-1", 2, 1_796_160_000_000_042)
    assert s == sighting(seq=1_796_160_000_000_042) and decode(FIXTURE_V1.read_bytes()).seq is None


@pytest.mark.parametrize("seq, needle", [(-1, "'seq' must be in"), (2**63, "'seq' must be in"), ("7", "'seq' has type str"),
                                         (True, "'seq' has type bool")])
def test_seq_is_bounded(seq, needle):
    with pytest.raises(WireError, match=needle):
        decode(_raw(seq=seq))


def test_acknowledgements_round_trip_as_ranges_and_refuse_junk():
    assert decode_ack(encode_ack([9, 3, 4, 5, 5, 11, 10])) == ([(3, 5), (9, 11)], False)
    assert decode_ack(encode_ack([])) == ([], False)
    assert decode_ack(encode_ack([4, 5], refused=True)) == ([(4, 5)], True)
    for junk in (b"", b"\x01", msgpack.packb({"v": 2, "ack": [[5, 4]]}), msgpack.packb({"v": 2, "ack": [[0, 2**63]]}),
                 msgpack.packb({"v": 2, "ack": [[0, 1 << 30]]}), msgpack.packb({"v": 1, "ack": []}),
                 msgpack.packb({"v": 2, "ack": [[1, 2]] * 5000}), msgpack.packb({"v": 2, "ack": [["1", 2]]}),
                 msgpack.packb({"v": 2, "ack": [], "refused": 1}),
                 encode(sighting())):
        with pytest.raises(WireError):
            decode_ack(junk)


def _raw(**override) -> bytes:
    m = msgpack.unpackb(encode(sighting()), raw=False)
    m.update(override)
    for k, v in list(m.items()):
        if v == "DELETE":
            del m[k]
    return msgpack.packb(m, use_bin_type=True)


@pytest.mark.parametrize(
    "buf, needle",
    [
        (b"", "not a MessagePack"),
        (msgpack.packb([1, 2]), "not a map"),
        (encode(sighting())[:-5], "not a MessagePack"),
        (_raw(v=99), "version 99 not supported"),
        (_raw(v="1"), "'v' has type str"),
        (_raw(node="DELETE"), "missing field 'node'"),
        (_raw(cam=""), "'cam' must be"),
        (_raw(cam="x" * 65), "'cam' must be"),
        (_raw(ts=float("nan")), "'ts' is not finite"),
        (_raw(score=1.5), "outside [0, 1]"),
        (_raw(frame=-1), "must be in [0, 2^63-1]"),
        (_raw(box=[1, 2, 3]), "'box' must be 4"),
        (_raw(box=[5, 5, 1, 1]), "'box' is empty"),
        (_raw(emb=b"\x00\x00\xc0\x7f" * 4), "NaN"),
        (_raw(emb=b"abc"), "'emb' has 3 bytes"),
        (_raw(emb=b""), "'emb' has 0 bytes"),
        (_raw(dt="f8"), "'dt' must be one of"),
        (_raw(thumb=b"GIF89a"), "not a JPEG"),
        (_raw(frame=True), "'frame' has type bool"),
        (b"\x00" * (MAX_MESSAGE_BYTES + 1), "exceeds"),
    ],
)
def test_malformed_messages_are_rejected_with_the_reason(buf, needle):
    with pytest.raises(WireError) as e:
        decode(buf)
    assert needle in str(e.value)


def test_a_batch_keeps_its_good_messages_in_order():
    """One numpy pass per (dtype, dimension) checks the embeddings: a bad row must not cost its neighbours."""
    good = [sighting(frame=1), sighting(frame=2, embedding=sighting().embedding.astype(np.float16)),
            sighting(frame=3, embedding=np.full(8, 0.25, np.float32)), sighting(frame=4)]
    nan, inf16 = _raw(emb=b"\x00\x00\xc0\x7f" * 16), _raw(emb=np.full(16, np.inf, "<f2").tobytes(), dt="f2")
    out = decode_many([encode(good[0]), nan, encode(good[1]), b"junk", inf16, encode(good[2]), memoryview(encode(good[3]))])
    assert [type(o).__name__ for o in out] == ["Sighting", "WireError", "Sighting", "WireError", "WireError", "Sighting",
                                               "Sighting"]
    assert [o for o in out if isinstance(o, Sighting)] == good
    assert "NaN" in str(out[1]) and "NaN" in str(out[4]) and "not a MessagePack" in str(out[3])
    assert decode_many([]) == []


def test_random_bytes_never_escape_as_other_errors():
    rng = np.random.default_rng(0)
    good = encode(sighting())
    for i in range(2000):
        buf = bytearray(good)
        for pos in rng.integers(0, len(buf), size=1 + i % 8):
            buf[pos] = rng.integers(0, 256)
        try:
            decode(bytes(buf))
        except WireError:
            pass


def test_encode_rejects_other_dtypes():
    with pytest.raises(WireError, match="float32 or float16"):
        encode(sighting(embedding=np.zeros(4, np.float64)))
