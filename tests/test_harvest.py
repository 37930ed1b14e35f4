"""The harvest format (crossview.kernel.harvest): a stored v1 sidecar still decodes, what the edge writes the
trainer reads, and every defect in a name or sidecar is refused with the file and field named."""

from __future__ import annotations

import json
import logging
import re
import time
from pathlib import Path

import numpy as np
import pytest

from crossview.edge import harvest as edge_harvest
from crossview.edge.harvest import Harvester
from crossview.kernel.config import HarvestConfig
from crossview.kernel.harvest import (
    MAX_SIDECAR_BYTES,
    CropName,
    HarvestError,
    Sidecar,
    decode,
    encode,
    read_sidecar,
    sidecar_path,
)
from crossview.trainer.data.harvest import harvest_samples

FIXTURE = Path(__file__).parent / "fixtures" / "harvest_v1"
V1_CROP = FIXTURE / "back_door" / "edge-1_back_door_t7_f1234.jpg"
V1_SIDECAR = Sidecar("edge-1", "back_door", 1714000000.4, 1234, 7, (101.3, 50.0, 117.3, 82.6), 0.8765,
                     "mobilenetv2-imagenet-1", schema=1)
VALID = json.loads(encode(V1_SIDECAR))


def test_a_stored_v1_sidecar_without_a_version_field_decodes():
    """Written by the edge before the format had an owner (and a `v` key): read as version 1."""
    assert "v" not in json.loads(sidecar_path(V1_CROP).read_bytes())
    assert read_sidecar(V1_CROP) == V1_SIDECAR
    assert CropName.parse(V1_CROP) == V1_SIDECAR.name
    assert V1_SIDECAR.name.path(FIXTURE) == V1_CROP
    target = harvest_samples(FIXTURE)
    assert target.cameras == ("back_door",) and [(s.path, s.camid, s.frame) for s in target.samples] == [(V1_CROP, 0, 1234)]


@pytest.mark.parametrize("node, camera", [("edge-1", "gate"), ("edge_1", "back_door"), ("site.a", "cam.1"), ("n" * 64, "c" * 64)])
def test_names_and_sidecars_round_trip(node, camera, tmp_path):
    name = CropName(node, camera, 0, 2**40)
    assert CropName.parse(name.path(tmp_path)) == name
    sidecar = Sidecar(node, camera, 1.7e9, 2**40, 0, (0.0, 1.5, 2.5, 3.0), 1.0, "m" * 128)
    assert decode(encode(sidecar)) == sidecar
    assert json.loads(encode(sidecar))["v"] == 1


def test_what_the_edge_writes_the_trainer_reads(tmp_path):
    """A dotted camera id once cut the file names short ("edge-1_cam.json"); the names now come from the format."""
    harvester = Harvester(HarvestConfig(enabled=True, dir=tmp_path), node_id="edge-1")
    crop = np.full((64, 32, 3), 128, np.uint8)
    box = np.array([10.04, 20.0, 42.26, 84.0], np.float32)
    assert harvester.save("cam.1", 3, 10, 1.7e9, crop, box, np.float32(0.91237), "m-1")
    [jpg] = tmp_path.rglob("*.jpg")
    assert jpg == tmp_path / "cam.1" / "edge-1_cam.1_t3_f10.jpg" and sidecar_path(jpg).is_file()
    assert read_sidecar(jpg) == Sidecar("edge-1", "cam.1", 1.7e9, 10, 3, (10.0, 20.0, 42.3, 84.0), 0.9124, "m-1")


def test_unknown_keys_are_ignored():
    """A later version may add optional keys; a reader of this version keeps working."""
    assert decode(json.dumps({**VALID, "extra": [1, 2]}).encode()) == V1_SIDECAR


@pytest.mark.parametrize("change, error", [
    ({"v": 2}, r"schema version 2 not supported"),
    ({"v": "1"}, r"schema version '1' not supported"),
    ({"v": True}, r"schema version True not supported"),
    ({"node": None}, r"field 'node' must be 1..64 of \[A-Za-z0-9_.-\], not only dots, got None"),
    ({"node": "../etc"}, r"field 'node'"),
    ({"node": "."}, r"field 'node' must be .*, not only dots, got '\.'"),
    ({"camera": ".."}, r"field 'camera' must be .*, not only dots, got '\.\.'"),
    ({"camera": "c" * 65}, r"field 'camera'"),
    ({"camera": ""}, r"field 'camera'"),
    ({"ts": "1.7e9"}, r"field 'ts' must be a number in \[0, 7\.3e\+09\]"),
    ({"ts": 1e308}, r"field 'ts'"),  # the wire's bound: retention would never delete it
    ({"ts": float("nan")}, r"field 'ts'"),
    ({"ts": -1.0}, r"field 'ts'"),
    ({"frame": True}, r"field 'frame' must be an integer"),
    ({"frame": -1}, r"field 'frame'"),
    ({"frame": 1.0}, r"field 'frame'"),
    ({"track": 2**63}, r"field 'track'"),
    ({"box": [1, 2, 3]}, r"field 'box' must be \[x1, y1, x2, y2\]"),
    ({"box": [5, 2, 3, 4]}, r"field 'box'"),
    ({"box": [1, 2, 3, float("inf")]}, r"field 'box'"),
    ({"box": [-1e308, 2, 1e308, 4]}, r"field 'box' must be \[x1, y1, x2, y2\]: numbers within ±1048576"),
    ({"box": "1,2,3,4"}, r"field 'box'"),
    ({"score": 1.5}, r"field 'score' must be a number in \[0, 1\]"),
    ({"score": float("nan")}, r"field 'score'"),
    ({"model": ""}, r"field 'model' must be 1..128 printable characters"),
    ({"model": "m" * 129}, r"field 'model'"),
    ({"model": "m-1\nforged"}, r"field 'model' must be 1..128 printable characters"),
    ({"model": "m-1\x1b[2K"}, r"field 'model'"),
    ({"score": None, "frame": None}, r"field 'frame'"),  # the first bad field, in schema order
])
def test_bad_fields_are_refused_with_the_file_and_field_named(change, error, tmp_path):
    crop = tmp_path / "gate" / "edge-1_gate_t1_f2.jpg"
    crop.parent.mkdir()
    sidecar_path(crop).write_text(json.dumps({**VALID, **change}))
    with pytest.raises(HarvestError, match=rf"^{re.escape(str(sidecar_path(crop)))}: {error}"):
        read_sidecar(crop)


@pytest.mark.parametrize("key", sorted(k for k in VALID if k != "v"))
def test_a_missing_field_is_named(key):
    with pytest.raises(HarvestError, match=rf"^sidecar: missing field '{key}'$"):
        decode(json.dumps({k: v for k, v in VALID.items() if k != key}).encode())


@pytest.mark.parametrize("buf, error", [
    (b"", r"not JSON"),
    (b"{'node': 1}", r"not JSON"),
    (b"\xff\xfe{}", r"not JSON"),
    (b"[" * 2000 + b"]" * 2000, r"not JSON"),
    (b"[1, 2]", r"sidecar is a JSON list, not an object"),
    (b'"text"', r"sidecar is a JSON str, not an object"),
    (b" " * MAX_SIDECAR_BYTES + b"{}", rf"sidecar of {MAX_SIDECAR_BYTES + 2} bytes exceeds {MAX_SIDECAR_BYTES}"),
])
def test_bad_documents_are_refused(buf, error):
    with pytest.raises(HarvestError, match=rf"^crop\.json: {error}"):
        decode(buf, "crop.json")


def test_a_missing_or_oversized_sidecar_file_names_the_file(tmp_path):
    crop = tmp_path / "gate" / "edge-1_gate_t1_f2.jpg"
    with pytest.raises(HarvestError, match=rf"^{re.escape(str(sidecar_path(crop)))}: cannot read the sidecar"):
        read_sidecar(crop)
    crop.parent.mkdir()
    sidecar_path(crop).write_bytes(b" " * 10**6)
    with pytest.raises(HarvestError, match=rf"sidecar of {MAX_SIDECAR_BYTES + 1} bytes exceeds"):
        read_sidecar(crop)


@pytest.mark.parametrize("path", [
    "edge-1_gate_t1_f2.jpg",  # no camera folder
    "gate/edge-1_hall_t1_f2.jpg",  # the name's camera is not its folder
    "gate/_gate_t1_f2.jpg",  # no node
    "gate/edge-1_gate_t1_f2.png",
    "gate/edge-1_gate_t1_f2.jpg.bak",
    "gate/edge-1_gate_t-1_f2.jpg",
    "gate/edge-1_gate_t1_f1234567890123456789.jpg",  # past int64
    "gate/edge 1_gate_t1_f2.jpg",
    "../edge-1_.._t1_f2.jpg",  # camera `..`: the crop would sit outside its root
    "gate/.._gate_t1_f2.jpg",  # node `..`
])
def test_bad_names_are_refused(path):
    with pytest.raises(HarvestError, match=rf"^{re.escape(path)}: not a harvested crop's name"):
        CropName.parse(path)


def test_the_trainer_falls_back_to_folder_and_name_and_says_why(tmp_path, caplog):
    crop = tmp_path / "gate" / "edge-1_gate_t4_f77.jpg"
    crop.parent.mkdir()
    crop.write_bytes(V1_CROP.read_bytes())
    sidecar_path(crop).write_text(json.dumps({**VALID, "frame": -5}))
    with caplog.at_level(logging.WARNING):
        target = harvest_samples(tmp_path)
    assert target.cameras == ("gate",) and [(s.camid, s.frame) for s in target.samples] == [(0, 77)]
    assert f"1 harvested crop(s) without a usable sidecar: camera taken from the folder name, e.g. {sidecar_path(crop)}: " \
           "field 'frame'" in caplog.text


def test_a_crop_that_cannot_be_written_pauses_harvesting_until_the_folder_is_usable_again(tmp_path, monkeypatch, caplog):
    """A file where the folder should be (it fails for root too; no permission or a full disk fail alike): logged with
    harvest.dir and the OS error, counted, nothing half-written left, and a retry after the pause saves again."""
    monkeypatch.setattr(edge_harvest, "_PAUSE_S", 0.3)
    folder = tmp_path / "harvest"
    folder.write_text("not a folder")
    h = Harvester(HarvestConfig(enabled=True, dir=folder, every_k=1, min_height=1, min_score=0), "edge-1")
    crop, box = np.full((120, 50, 3), 128, np.uint8), (10.0, 20.0, 60.0, 140.0)
    assert h.wants(1, 120, 0.9) and not h.save("gate", 4, 77, 1714000000.0, crop, box, 0.9, "m-1")
    assert (h.failed, h.saved, h.used) == (1, 0, 0) and not h.wants(1, 120, 0.9)  # paused: no retry at every crop
    assert f"cannot write crops into harvest.dir {folder} ([Errno 20] Not a directory" in caplog.text
    folder.unlink()
    time.sleep(0.3)
    assert h.wants(1, 120, 0.9) and h.save("gate", 4, 77, 1714000000.0, crop, box, 0.9, "m-1")
    [jpg] = folder.rglob("*.jpg")
    assert h.saved == 1 and read_sidecar(jpg).track == 4 and h.used == sum(p.stat().st_size for p in folder.rglob("*.*"))
