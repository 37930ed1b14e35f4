"""The wire format: round trips, validation of every field, and compatibility with stored messages."""

from pathlib import Path

import msgpack
import numpy as np
import pytest
from helpers import jpeg_declaring, jpeg_of_scans

from crossview.kernel.wire import (
    MAX_CAMERAS,
    MAX_MESSAGE_BYTES,
    SCHEMA_VERSION,
    CameraStatus,
    Heartbeat,
    Sighting,
    WireError,
    decode,
    decode_ack,
    decode_many,
    encode,
    encode_ack,
    encode_heartbeat,
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
        (_raw(cam=".."), "field 'cam' is only dots: '..'"),  # a harvested crop's folder: it would leave its root
        (_raw(node="."), "field 'node' is only dots"),
        (_raw(model="..."), "field 'model' is only dots"),
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
        (_raw(thumb=jpeg_declaring(np.zeros((16, 8, 3), np.uint8), 16000, 16000)), "'thumb' is a 16000 x 16000 JPEG"),
        (_raw(thumb=jpeg_of_scans(101)), "'thumb' is a JPEG of 101 scans; the limit is 100"),
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


def test_encode_rejects_other_dtypes():
    with pytest.raises(WireError, match="float32 or float16"):
        encode(sighting(embedding=np.zeros(4, np.float64)))


# -- heartbeats --------------------------------------------------------------------------------


def heartbeat(**kw) -> Heartbeat:
    cams = (CameraStatus("gate", "streaming", 4.9, 5.0, 1200),
            CameraStatus("clip", "streaming", 12.5, 0.0, 120, position=(120, 795), eta_s=54.0),
            CameraStatus("lobby", "reconnecting", 0.0, 5.0, 30, error="no frame for 10 s"))
    base = dict(node="edge-1", ts=1700000000.5, every_s=5.0, model="mobilenetv2-imagenet-1", spooled=12, spool_age_s=3.5,
                dropped=0, cameras=cams)
    return Heartbeat(**{**base, **kw})


def _raw_beat(cam: dict | None = None, **fields) -> bytes:
    m = msgpack.unpackb(encode_heartbeat(heartbeat()))
    m.update(fields)
    if cam is not None:
        m["cams"][0].update(cam)
    return msgpack.packb({k: v for k, v in m.items() if v is not None})


def test_a_heartbeat_round_trips_and_takes_its_place_among_sightings():
    out = decode_many([encode(sighting(frame=1)), encode_heartbeat(heartbeat()), encode(sighting(frame=2))])
    assert [type(o).__name__ for o in out] == ["Sighting", "Heartbeat", "Sighting"]
    assert out[1] == heartbeat() and out[1].cameras[1].position == (120, 795)
    assert decode(encode_heartbeat(heartbeat(cameras=()))).cameras == ()


def test_falling_behind_needs_a_paced_streaming_camera_and_a_settled_estimate():
    c = CameraStatus("gate", "streaming", 0.6, 5.0, 100)
    assert c.behind
    assert not CameraStatus("gate", "streaming", 4.5, 5.0, 100).behind  # 0.9 of its target
    assert not CameraStatus("gate", "streaming", 0.6, 5.0, 2).behind  # too few frames to say
    assert not CameraStatus("clip", "streaming", 0.6, 0.0, 100).behind  # a file read as fast as it decodes
    assert not CameraStatus("gate", "reconnecting", 0.0, 5.0, 100).behind


@pytest.mark.parametrize(
    "buf, needle",
    [
        (_raw_beat(cams=[{"id": f"c{i}", "state": "streaming", "fps": 1.0, "target": 1.0, "frames": 1}
                         for i in range(MAX_CAMERAS + 1)]), "at most 256"),
        (_raw_beat(cam={"state": "dancing"}), "is not one of"),
        (_raw_beat(cam={"id": "gate\nERROR forged"}), "control characters"),
        (_raw_beat(cam={"error": "x" * 257}), "at most 256 characters"),
        (_raw_beat(cam={"error": "bad\x1b[31m"}), "control characters"),
        (_raw_beat(cam={"fps": float("nan")}), "not finite"),
        (_raw_beat(cam={"fps": 1e9}), "outside"),
        (_raw_beat(cam={"pos": 5}), "missing field 'len'"),
        (_raw_beat(cam={"frames": 2**63}), "must be in [0, 2^63-1]"),
        (_raw_beat(every=0.0), "'every'"),
        (_raw_beat(spool=[1, 2]), "'spool' must be"),
        (_raw_beat(spool=[-1, 0.0, 0]), "'spooled'"),
        (_raw_beat(cams="gate"), "'cams' has type str"),
        (_raw_beat(cams=[7]), "must hold maps"),
        (_raw_beat(node=None), "missing field 'node'"),
    ],
)
def test_malformed_heartbeats_are_rejected_with_the_reason(buf, needle):
    with pytest.raises(WireError) as e:
        decode(buf)
    assert needle in str(e.value)


@pytest.mark.parametrize("good", [encode(sighting()), encode_heartbeat(heartbeat())], ids=["sighting", "heartbeat"])
def test_random_bytes_never_escape_as_other_errors(good):
    rng = np.random.default_rng(0)
    for i in range(2000):
        buf = bytearray(good)
        for pos in rng.integers(0, len(buf), size=1 + i % 8):
            buf[pos] = rng.integers(0, 256)
        try:
            decode(bytes(buf))
        except WireError:
            pass
