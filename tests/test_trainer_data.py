"""The trainer's data layer on real files: dataset layouts, MOT crops, harvested crops, transforms, PK batches.

Labelled datasets are tiny trees in tmp_path with the releases' own file names; MOT uses the real
TUD-Campus sequence from ../shared/data; the harvest folder is written by the edge's own Harvester.
"""

from __future__ import annotations

import json
import logging
import os
from collections import Counter
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from PIL import Image

from crossview.edge.harvest import Harvester
from crossview.kernel.config import HarvestConfig
from crossview.trainer.data.datasets import build_dataset, parse_market1501
from crossview.trainer.data.harvest import build_target, harvest_samples, image_folder_samples
from crossview.trainer.data.loader import (
    ImageDataset,
    ImageReadError,
    PKSampler,
    filter_readable,
    make_eval_loader,
    make_train_loader,
    read_image,
)
from crossview.trainer.data.mot import MANIFEST, mot_crops, time_split
from crossview.trainer.data.samples import Sample, relabel, with_labels
from crossview.trainer.data.transforms import build_transforms
from tests.helpers import shared_data

RNG = np.random.default_rng(0)


def write_image(path: Path, h: int = 24, w: int = 12) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    assert cv2.imwrite(str(path), RNG.integers(0, 256, (h, w, 3), dtype=np.uint8))
    return path


def write_tree(root: Path, files: dict[str, list[str]]) -> Path:
    for folder, names in files.items():
        for name in names:
            write_image(root / folder / name)
    return root


def truncate(path: Path) -> Path:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


def ids(samples) -> set[int]:
    return {s.pid for s in samples}


def cams(samples) -> set[int]:
    return {s.camid for s in samples}


# -- labelled datasets -----------------------------------------------------------------------------

MARKET = {
    "bounding_box_train": ["0002_c1s1_000451_03.jpg", "0002_c2s1_000551_01.jpg", "0007_c1s1_000101_01.jpg",
                           "0007_c3s2_000201_02.jpg", "0007_c3s2_000301_01.jpg", "0010_c6s3_000010_01.jpg"],
    "query": ["0002_c1s1_001000_00.jpg", "0007_c2s1_000999_00.jpg"],
    "bounding_box_test": ["0002_c2s1_001100_01.jpg", "0007_c1s1_001200_01.jpg", "0000_c1s1_000000_00.jpg",
                          "-1_c1s1_000000_00.jpg", "-1_c3s1_000010_00.jpg"],
}


def test_market1501_counts_relabelling_junk_and_release_folder(tmp_path):
    write_tree(tmp_path / "Market-1501-v15.09.15", MARKET)  # as the zip unpacks: one folder down
    (tmp_path / "Market-1501-v15.09.15" / "bounding_box_train" / "Thumbs.db").write_bytes(b"not an image")
    split = build_dataset("market1501", tmp_path)
    assert (len(split.train), len(split.query), len(split.gallery)) == (6, 2, 3)
    assert ids(split.train) == {0, 1, 2} and cams(split.train) == {0, 1, 2, 5}
    by_name = {s.path.name: s for s in split.train}
    assert by_name["0002_c1s1_000451_03.jpg"] == Sample(by_name["0002_c1s1_000451_03.jpg"].path, 0, 0, 451)
    assert by_name["0010_c6s3_000010_01.jpg"].pid == 2 and by_name["0010_c6s3_000010_01.jpg"].camid == 5
    assert ids(split.query) == {2, 7}  # evaluation keeps the release's pids
    assert ids(split.gallery) == {0, 2, 7}  # distractors (0) stay, junk (-1) is gone
    assert "train" in split.summary() and "3 ids" in split.summary()


def test_market1501_drops_unreadable_images_before_relabelling(tmp_path):
    write_tree(tmp_path, MARKET)
    truncate(tmp_path / "bounding_box_train" / "0010_c6s3_000010_01.jpg")  # the only image of 0010
    (tmp_path / "bounding_box_train" / "0007_c1s1_000101_01.jpg").write_text("not a jpeg")
    split = build_dataset("market1501", tmp_path)
    assert len(split.train) == 4 and ids(split.train) == {0, 1}  # dense labels although 0010 vanished
    assert len(build_dataset("market1501", tmp_path, verify=False).train) == 6


def test_dukemtmc_names_and_wrong_kind(tmp_path):
    write_tree(tmp_path, {
        "bounding_box_train": ["0001_c2_f0046182.jpg", "0001_c5_f0051210.jpg", "0003_c8_f0000123.jpg"],
        "query": ["0005_c1_f0100000.jpg"],
        "bounding_box_test": ["0005_c2_f0100500.jpg", "0005_c3_f0100900.jpg", "0000_c4_f0000001.jpg"],
    })
    split = build_dataset("dukemtmc", tmp_path)
    assert (len(split.train), len(split.query), len(split.gallery)) == (3, 1, 3)
    assert ids(split.train) == {0, 1} and cams(split.train) == {1, 4, 7}
    assert sorted(s.frame for s in split.train) == [123, 46182, 51210]
    with pytest.raises(ValueError, match="not a market1501 file name"):
        parse_market1501(tmp_path)


def test_msmt17_v1_lists(tmp_path):
    root = tmp_path / "MSMT17_V1"
    train = {"0000/0000_000_01_0303morning_0015_0.jpg": 0, "0000/0000_001_05_0303morning_0036_1.jpg": 0,
             "0001/0001_000_15_0303noon_0120_0.jpg": 1}
    val = {"0002/0002_000_03_0303noon_0300_0.jpg": 2}
    query = {"0000/0000_000_07_0113morning_0001_0.jpg": 0}
    gallery = {"0000/0000_001_08_0113noon_0020_1.jpg": 0, "0004/0004_000_02_0113noon_0030_0.jpg": 4}
    for folder, listed, name in (("train", train, "train"), ("train", val, "val"), ("test", query, "query"),
                                 ("test", gallery, "gallery")):
        for rel in listed:
            write_image(root / folder / rel)
        (root / f"list_{name}.txt").write_text("".join(f"{rel} {pid}\n" for rel, pid in listed.items()))
    split = build_dataset("msmt17", tmp_path)
    assert (len(split.train), len(split.query), len(split.gallery)) == (3, 1, 2)
    assert ids(split.train) == {0, 1} and cams(split.train) == {0, 4, 14}
    assert cams(split.query) == {6} and ids(split.gallery) == {0, 4}
    combined = build_dataset("msmt17", tmp_path, combine_val=True)
    assert len(combined.train) == 4 and ids(combined.train) == {0, 1, 2}
    (root / "list_gallery.txt").unlink()
    with pytest.raises(FileNotFoundError, match="list_gallery.txt"):
        build_dataset("msmt17", tmp_path)


def test_cuhk03_np_variants(tmp_path):
    for variant, n_train in (("detected", 4), ("labeled", 2)):
        write_tree(tmp_path / "cuhk03-np" / variant, {
            "bounding_box_train": [f"{pid:04d}_c{c}_{i}.png" for pid, c, i in ((1, 1, 1), (1, 2, 6), (3, 1, 2), (3, 2, 7))][:n_train],
            "query": ["0002_c1_1.png"],
            "bounding_box_test": ["0002_c2_6.png", "0004_c1_1.png"],
        })
    detected = build_dataset("cuhk03", tmp_path)
    assert (len(detected.train), len(detected.query), len(detected.gallery)) == (4, 1, 2)
    assert ids(detected.train) == {0, 1} and cams(detected.train) == {0, 1}
    assert all(s.path.suffix == ".png" and "detected" in s.path.parts for s in detected.train)
    labeled = build_dataset("cuhk03", tmp_path, variant="labeled")
    assert len(labeled.train) == 2 and all("labeled" in s.path.parts for s in labeled.train)
    direct = build_dataset("cuhk03", tmp_path / "cuhk03-np" / "labeled")  # pointing at the variant folder works too
    assert len(direct.train) == 2


def test_identity_folders_with_and_without_camera_level(tmp_path):
    write_tree(tmp_path / "flat", {"bob": ["a.jpg", "b.png"], "alice": ["x.jpg"], "empty": []})
    (tmp_path / "flat" / "empty").mkdir(exist_ok=True)
    flat = build_dataset("folders", tmp_path / "flat")
    assert len(flat.train) == 3 and cams(flat.train) == {0} and not flat.query and not flat.gallery
    assert {s.path.name: s.pid for s in flat.train} == {"x.jpg": 0, "a.jpg": 1, "b.png": 1}  # sorted names
    write_tree(tmp_path / "cams", {"p1/north": ["1.jpg", "2.jpg"], "p1/south": ["3.jpg"], "p2/south": ["4.jpg"]})
    by_cam = build_dataset("folders", tmp_path / "cams", camera_folders=True)
    assert {s.path.name: (s.pid, s.camid) for s in by_cam.train} == {"1.jpg": (0, 0), "2.jpg": (0, 0), "3.jpg": (0, 1),
                                                                       "4.jpg": (1, 1)}


def test_clear_errors_for_missing_folders_and_unknown_kinds(tmp_path):
    with pytest.raises(FileNotFoundError, match=f"{tmp_path / 'nope'}.*does not exist"):
        build_dataset("market1501", tmp_path / "nope")
    write_tree(tmp_path / "half", {"bounding_box_train": ["0002_c1s1_000451_03.jpg"]})
    with pytest.raises(FileNotFoundError, match="lacks bounding_box_test, query"):
        build_dataset("market1501", tmp_path / "half")
    with pytest.raises(ValueError, match="unknown dataset kind 'viper'.*market1501"):
        build_dataset("viper", tmp_path)
    with pytest.raises(FileNotFoundError, match="no images"):
        build_dataset("folders", tmp_path / "half" / "bounding_box_train")
    with pytest.raises(ValueError, match="cache_dir is required"):
        build_dataset("mot", tmp_path)


# -- MOTChallenge ----------------------------------------------------------------------------------


def gt_rows(seq: Path) -> dict[tuple[int, int], tuple[float, float, float, float]]:
    rows = np.loadtxt(seq / "gt" / "gt.txt", delimiter=",", ndmin=2)
    return {(int(r[0]), int(r[1])): tuple(r[2:6]) for r in rows}


@pytest.fixture(scope="module")
def campus(tmp_path_factory):
    seq = shared_data("TUD-Campus")
    return seq, mot_crops(seq, tmp_path_factory.mktemp("mot-cache"))


def test_mot_crops_of_tud_campus_have_gt_box_sizes(campus):
    seq, crops = campus
    rows = gt_rows(seq)
    assert len(ids(crops)) == 8  # as ../shared/data/README.md says
    assert 300 < len(crops) <= len(rows) and cams(crops) == {0}
    inside = 0
    for s in crops:
        left, top, w, h = rows[s.frame, s.pid]  # every crop is a gt box of that frame
        assert s.path.parent.name == str(s.pid) and s.path.name == f"{s.frame}.jpg"
        img = cv2.imread(str(s.path))
        assert img is not None and img.shape[0] >= 32
        if left >= 0 and top >= 0 and left + w <= 640 and top + h <= 480:
            inside += 1
            assert abs(img.shape[0] - h) <= 1 and abs(img.shape[1] - w) <= 1
        else:  # clipped to the frame
            assert img.shape[0] <= h + 1 and img.shape[1] <= w + 1
    assert inside > 300


def test_mot_cache_reused_then_rebuilt_without_manifest(tmp_path):
    seq, cache = shared_data("TUD-Campus"), tmp_path / "cache"
    first = mot_crops(seq, cache)
    manifest = cache / "TUD-Campus" / MANIFEST
    assert manifest.is_file()
    for s in first:
        os.utime(s.path, (1, 1))  # an old mtime that only a rewrite changes
    assert mot_crops(seq, cache) == first
    assert all(s.path.stat().st_mtime == 1 for s in first)  # nothing decoded or written again
    manifest.unlink()  # as if the first run died half way
    assert mot_crops(seq, cache) == first and manifest.is_file()
    assert all(s.path.stat().st_mtime > 1 for s in first)
    first[0].path.unlink()  # a crop lost after the manifest was written: incomplete, rebuilt too
    assert mot_crops(seq, cache) == first and first[0].path.is_file()
    assert mot_crops(seq, cache, min_height=250) != first  # other options, fewer crops
    assert len(list((cache / "TUD-Campus").glob("*/*.jpg"))) == len(mot_crops(seq, cache, min_height=250)) < len(first)


def test_mot_img1_frames_or_any_video_and_box_filters(tmp_path):
    frames = [np.full((120, 100, 3), 40 * i, np.uint8) for i in range(1, 4)]
    gt = "\n".join([
        "1,1,10,20,30,60,1,-1,-1,-1", "2,1,12,20,30,60,1,-1,-1,-1", "3,1,14,20,30.6,60,1,-1,-1,-1",
        "1,2,50,20,30,60,0,-1,-1,-1",  # conf 0: ignored
        "2,3,50,20,30,20,1,-1,-1,-1",  # 20 px tall: too small
        "3,4,-50,20,60,60,1,-1,-1,-1",  # 10 of 60 px inside the frame
        "3,5,70,40,40,90,1,-1,-1,-1",  # clipped to 30x80, 2/3 inside
    ])
    seq = tmp_path / "SEQ-01"
    for i, img in enumerate(frames, 1):
        write_image(seq / "img1" / f"{i:06d}.jpg").write_bytes(cv2.imencode(".jpg", img)[1].tobytes())
    (seq / "gt").mkdir()
    (seq / "gt" / "gt.txt").write_text(gt)
    crops = mot_crops(seq, tmp_path / "cache", min_height=32)
    assert sorted((s.pid, s.frame) for s in crops) == [(1, 1), (1, 2), (1, 3), (5, 3)]
    assert [cv2.imread(str(s.path)).shape[:2] for s in sorted(crops, key=lambda s: (s.pid, s.frame))] == [
        (60, 30), (60, 30), (60, 31), (80, 30)]
    assert len(mot_crops(seq, tmp_path / "cache2", frame_step=2)) == 3  # frames 1 and 3

    video = tmp_path / "SEQ-02"
    (video / "gt").mkdir(parents=True)
    (video / "gt" / "gt.txt").write_text(gt)
    writer = cv2.VideoWriter(str(video / "clip.avi"), cv2.VideoWriter_fourcc(*"MJPG"), 25, (100, 120))
    for img in frames:
        writer.write(img)
    writer.release()
    from_video = mot_crops(video, tmp_path / "cache")
    assert sorted((s.pid, s.frame) for s in from_video) == [(1, 1), (1, 2), (1, 3), (5, 3)]
    brightness = [cv2.imread(str(s.path)).mean() for s in sorted(from_video, key=lambda s: s.frame) if s.pid == 1]
    assert brightness == sorted(brightness) and abs(brightness[0] - 40) < 5  # frame 1 is the first decoded
    (video / "other.mp4").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match="found 2 videos"):
        mot_crops(video, tmp_path / "cache3")


def test_time_split_properties(campus):
    _, crops = campus
    query, gallery = time_split(crops)
    assert ids(gallery) == ids(crops) and ids(query) <= ids(gallery)
    assert cams(query) == {0} and cams(gallery) == {1}
    assert len(query) + len(gallery) == len(crops)
    for pid in ids(query):
        assert max(s.frame for s in query if s.pid == pid) < min(s.frame for s in gallery if s.pid == pid)
    strided, _ = time_split(crops, query_stride=5)
    assert ids(strided) == ids(query) and len(strided) < len(query) / 4
    one = [Sample(Path("a.jpg"), 1, 0, 5), Sample(Path("b.jpg"), 2, 0, 1), Sample(Path("c.jpg"), 2, 0, 9),
           Sample(Path("d.jpg"), -1, 0, 3)]
    q, g = time_split(one)
    assert [(s.path.name, s.camid) for s in q] == [("b.jpg", 0)]
    assert [(s.path.name, s.camid) for s in g] == [("a.jpg", 1), ("c.jpg", 1)]


def test_build_dataset_mot(campus, tmp_path):
    seq, _ = campus
    split = build_dataset("mot", seq, cache_dir=tmp_path, query_stride=3)
    assert ids(split.train) == set(range(8)) and split.name == "mot/TUD-Campus"
    assert ids(split.gallery) == ids(split.train) and cams(split.query) == {0}


# -- unlabelled target -----------------------------------------------------------------------------


def test_harvest_folder_from_the_edge_harvester(tmp_path, caplog):
    harvester = Harvester(HarvestConfig(enabled=True, dir=tmp_path / "harvest"), node_id="edge-1")
    crop = RNG.integers(0, 256, (80, 40, 3), dtype=np.uint8)
    for camera, track, frame in (("gate", 3, 10), ("gate", 3, 20), ("hall", 5, 7), ("back_door", 1, 99), ("gate", 9, 50)):
        assert harvester.save(camera, track, frame, 1.7e9 + frame, crop, (1, 2, 41, 82), 0.9, "m1")
    root = tmp_path / "harvest"
    truncate(root / "gate" / "edge-1_gate_t9_f50.jpg")  # the disk filled up mid-write
    (root / "hall" / "edge-1_hall_t6_f8.jpg").write_text("<html>not an image</html>")  # no sidecar either
    (root / "hall" / "notes.txt").write_text("ignored: not an image file name")
    (root / "back_door" / "edge-1_back_door_t1_f99.json").unlink()  # the crop survives without its sidecar
    with caplog.at_level(logging.WARNING):
        target = harvest_samples(root)
    assert target.cameras == ("back_door", "gate", "hall") and target.skipped == 2
    assert sorted((s.path.name, s.camid, s.frame, s.pid) for s in target.samples) == [
        ("edge-1_back_door_t1_f99.jpg", 0, 99, -1), ("edge-1_gate_t3_f10.jpg", 1, 10, -1),
        ("edge-1_gate_t3_f20.jpg", 1, 20, -1), ("edge-1_hall_t5_f7.jpg", 2, 7, -1)]
    warning = next(r.getMessage() for r in caplog.records if "unreadable" in r.getMessage())
    assert "skipped 2 unreadable" in warning and str(root) in warning
    assert build_target("harvest", root).samples == target.samples
    with pytest.raises(FileNotFoundError, match="does not exist"):
        build_target("harvest", tmp_path / "nope")
    with pytest.raises(ValueError, match="unknown target kind"):
        build_target("market1501", root)


def test_any_image_folder_recursive(tmp_path):
    write_tree(tmp_path, {"a": ["1.jpg"], "a/b/c": ["2.png", "3.jpeg"], ".": ["4.jpg"]})
    truncate(write_image(tmp_path / "a" / "5.jpg"))
    (tmp_path / "a" / "readme.md").write_text("x")
    target = image_folder_samples(tmp_path)
    assert sorted(s.path.name for s in target.samples) == ["1.jpg", "2.png", "3.jpeg", "4.jpg"]
    assert target.skipped == 1 and cams(target.samples) == {0} and ids(target.samples) == {-1}


# -- transforms ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def person() -> Image.Image:
    return Image.fromarray(np.random.default_rng(1).integers(0, 256, (160, 70, 3), dtype=np.uint8))


def test_transform_shapes_and_deterministic_test_transform(person):
    test = build_transforms((256, 128), train=False)
    out = test(person)
    assert type(out) is torch.Tensor and out.shape == (3, 256, 128) and out.dtype == torch.float32
    assert torch.equal(out, test(person))
    assert -2.2 < out.min() < out.max() < 2.7  # ImageNet-normalised range
    torch.manual_seed(0)
    train = build_transforms((64, 32), train=True)
    assert train(person).shape == (3, 64, 32)


def test_train_augmentations_change_the_image_reproducibly(person):
    ref = build_transforms((128, 64))(person)
    flipped = build_transforms((128, 64), train=True, flip_p=1, pad=0, erase_p=0)(person)
    assert torch.equal(flipped, ref.flip(-1))
    torch.manual_seed(3)
    erased = build_transforms((128, 64), train=True, flip_p=0, pad=0, erase_p=1)(person)
    changed = (erased != ref).any(0)
    assert 0.02 * 128 * 64 * 0.5 < changed.sum() <= 0.4 * 128 * 64 and (erased[:, changed] == 0).all()
    full = build_transforms((128, 64), train=True)
    runs = []
    for seed in (5, 5, 6):
        torch.manual_seed(seed)
        runs.append(torch.stack([full(person) for _ in range(4)]))
    assert torch.equal(runs[0], runs[1]) and not torch.equal(runs[0], runs[2])


# -- sampling and loading --------------------------------------------------------------------------

LABELS = [pid for pid, n in enumerate([1, 2, 3, 4, 5, 6, 7, 8, 2, 9]) for _ in range(n)] + [-1] * 6


def test_pk_sampler_batches():
    sampler = PKSampler(LABELS, p=4, k=3, seed=7)
    epochs = [list(sampler) for _ in range(5)]
    singleton = LABELS.index(0)
    seen_singleton = False
    for batches in epochs:
        assert batches
        for batch in batches:
            labels = [LABELS[i] for i in batch]
            assert len(batch) == 12 and -1 not in labels
            assert sorted(Counter(labels).values()) == [3, 3, 3, 3]
            if 0 in labels:
                seen_singleton = True
                assert batch.count(singleton) == 3  # one image, drawn with replacement
    assert seen_singleton
    twin = PKSampler(LABELS, 4, 3, seed=7)
    assert [list(twin) for _ in range(5)] == epochs  # deterministic per seed
    assert epochs[0] != epochs[1]  # epochs differ
    assert list(PKSampler(LABELS, 4, 3, seed=8)) != epochs[0]
    again = PKSampler(LABELS, 4, 3, seed=7)
    again.set_epoch(3)
    assert len(again) == len(epochs[3]) and list(again) == epochs[3]
    with pytest.raises(ValueError, match="at least p=11 identities"):
        PKSampler(LABELS, p=11, k=2)


def test_pk_sampler_on_pseudo_labels_with_outliers():
    samples = [Sample(Path(f"{i}.jpg"), -1, i % 3) for i in range(40)]
    pseudo = with_labels(samples, [i % 5 if i % 4 else -1 for i in range(40)])
    batches = list(PKSampler([s.pid for s in pseudo], p=5, k=2, seed=0))
    assert batches and all(pseudo[i].pid != -1 for b in batches for i in b)
    assert [s.pid for s in relabel([Sample(Path("x"), 7, 0), Sample(Path("y"), -1, 0), Sample(Path("z"), 3, 0)])] == [1, -1, 0]


def test_loaders_and_unreadable_images(tmp_path):
    split = build_dataset("folders", write_tree(tmp_path / "ids", {f"p{i}": [f"{j}.jpg" for j in range(3)] for i in range(4)}))
    transform = build_transforms((32, 16), train=True)
    loader = make_train_loader(split.train, transform, p=2, k=2, seed=1, num_workers=1, persistent_workers=False)
    batches = list(loader)
    assert len(batches) == len(loader) > 0
    images, pids, camids, index = batches[0]
    assert images.shape == (4, 3, 32, 16) and len(set(pids.tolist())) == 2
    assert [split.train[i].pid for i in index.tolist()] == pids.tolist()
    again = [b[3].tolist() for b in make_train_loader(split.train, transform, p=2, k=2, seed=1, num_workers=0)]
    assert again == [b[3].tolist() for b in batches]
    eval_batches = list(make_eval_loader(split.train, build_transforms((32, 16)), batch_size=5, num_workers=0))
    assert [b[3].tolist() for b in eval_batches] == [list(range(0, 5)), list(range(5, 10)), [10, 11]]

    bad = truncate(write_image(tmp_path / "bad.jpg", 200, 100))
    with pytest.raises(ImageReadError, match="bad.jpg"):
        read_image(bad)
    with pytest.raises(ImageReadError, match="missing.jpg"):
        ImageDataset([Sample(tmp_path / "missing.jpg", 0, 0)])[0]
    good, skipped = filter_readable([*split.train, Sample(bad, 0, 0)])
    assert good == list(split.train) and skipped == 1


# -- a run's data from its config ------------------------------------------------------------------


def test_load_train_data_from_config(tmp_path, campus):
    from crossview.trainer.config import TrainConfig
    from crossview.trainer.data.build import load_train_data

    write_tree(tmp_path / "source", {f"p{i}": ["1.jpg", "2.jpg"] for i in range(3)})
    base = {"name": "t", "cache_dir": str(tmp_path / "cache"), "source": {"kind": "folders", "root": str(tmp_path / "source")}}
    mot = load_train_data(TrainConfig.model_validate({**base, "target": {"kind": "mot", "root": str(campus[0])}}))
    assert mot.num_source_ids == 3 and ids(mot.source) == {0, 1, 2} and len(mot.source) == 6
    assert ids(mot.target) == {-1} and len(mot.target) == len(campus[1])  # the target's labels never reach training
    assert ids(mot.query) <= ids(mot.gallery) and len(ids(mot.gallery)) == 8
    silent = load_train_data(TrainConfig.model_validate({**base, "target": {"kind": "mot", "root": str(campus[0]), "evaluate": False}}))
    assert silent.query is None and silent.gallery is None
    write_tree(tmp_path / "harvest", {"gate": ["edge-1_gate_t1_f1.jpg"], "hall": ["edge-1_hall_t2_f5.jpg"]})
    site = load_train_data(TrainConfig.model_validate({**base, "target": {"kind": "harvest", "root": str(tmp_path / "harvest")}}))
    assert site.target_cameras == ("gate", "hall") and len(site.target) == 2 and site.query is None


def test_unreadable_files_are_skipped_even_with_ultralytics_loaded(tmp_path):
    """ultralytics wraps PIL's Image.open (HEIF plugin retry); a non-image must still count as unreadable."""
    from crossview.kernel.runtime import ultralytics
    from crossview.trainer.data.loader import ImageReadError, image_problem, read_image

    ultralytics()
    bad = tmp_path / "0001_c1_f0000001.jpg"
    bad.write_text("not a jpeg")
    assert image_problem(bad) == "not an image format PIL can identify"
    with pytest.raises(ImageReadError, match="0001_c1_f0000001.jpg"):
        read_image(bad)


def test_several_sources_train_as_one_with_identities_and_cameras_apart(tmp_path, campus):
    """`source.also`: TUD-Campus's real crops plus a camera-folder dataset; pids and cameras never collide."""
    from crossview.trainer.config import ConfigError, load_train_config
    from crossview.trainer.data.build import load_train_data

    write_tree(tmp_path / "pku", {"001/cam1": ["1.jpg", "2.jpg"], "001/cam2": ["3.jpg"], "004/cam2": ["4.jpg"]})
    cfg = {"name": "t", "cache_dir": str(tmp_path / "cache"), "target": {"kind": "mot", "root": str(campus[0])},
           "source": {"kind": "mot", "root": str(campus[0]),
                      "also": [{"kind": "folders", "root": "pku", "camera_folders": True}]}}
    path = tmp_path / "train.yaml"
    path.write_text(json.dumps(cfg))
    data = load_train_data(load_train_config(path))  # `also` roots are relative to the file, like every root
    tud = [s for s in data.source if "pku" not in s.path.parts]
    pku = {s.path.name: (s.pid, s.camid) for s in data.source if "pku" in s.path.parts}
    assert len(tud) == len(campus[1]) and ids(tud) == set(range(8)) and cams(tud) == {0}
    assert pku == {"1.jpg": (8, 1), "2.jpg": (8, 1), "3.jpg": (8, 2), "4.jpg": (9, 2)}
    assert data.num_source_ids == 10
    path.write_text(json.dumps({**cfg, "source": {**cfg["source"], "also": [cfg["source"]]}}))
    with pytest.raises(ConfigError, match="source.also.*list every dataset at one level"):
        load_train_config(path)
