"""Score calibration: the kernel's monotone map and its metadata field, fitting from a real harvest, the CLI verbs.

The harvest is TUD-Campus's ground truth written in the edge's harvest format (crops + sidecars), so
the fitted map can be checked against the identities the fit never saw.
"""

from __future__ import annotations

import logging
import shutil
from dataclasses import replace

import numpy as np
import pytest
from helpers import shared_data

from crossview.cli import main
from crossview.kernel.calibration import UNCALIBRATED, Calibration
from crossview.kernel.embedder import Embedder
from crossview.kernel.modelmeta import KEY_CALIBRATION, KEY_PRECISION, ModelMeta
from crossview.trainer.calibration import make_pairs, read_tracklets
from crossview.trainer.data.mot_harvest import mot_harvest
from crossview.trainer.eval_onnx import embed_samples
from crossview.trainer.export import IMAGENET_MEAN, IMAGENET_STD


@pytest.fixture(scope="module")
def campus_harvest(tmp_path_factory):
    """TUD-Campus gt as a harvest: 8 tracks, every 3rd frame at 25 fps (2.8 s); {crop path: identity}."""
    root = tmp_path_factory.mktemp("campus")
    ids = mot_harvest(shared_data("TUD-Campus"), root / "cache", root / "harvest", frame_step=3)
    return root / "harvest", ids


def test_the_map_is_monotone_bounded_and_round_trips():
    cal = Calibration((0.3, 0.6, 0.75, 0.9), (0.02, 0.2, 0.7, 0.95), fitted={"harvest": "h"})
    cos = np.linspace(-1, 1, 401)
    p = cal.probability(cos)
    assert np.all(np.diff(p) >= 0) and p.min() == 0.02 and p.max() == 0.95
    assert Calibration.from_json(cal.to_json(), "m.onnx") == cal
    assert Calibration.from_json(cal.to_json(), "m.onnx").fitted == {"harvest": "h"}
    assert cal.probability(cal.cosine_at(0.5)) == pytest.approx(0.5)
    # A rarer base rate lowers every probability, keeps the order, and moves the threshold up.
    low = cal.probability(cos, prior=0.05)
    assert np.all(low <= p + 1e-12) and np.all(np.diff(low) >= 0)
    assert cal.cosine_at(0.5, prior=0.05) is None or cal.cosine_at(0.5, prior=0.05) > cal.cosine_at(0.5)


@pytest.mark.parametrize("knots, p, match", [
    ((0.5, 0.4), (0.1, 0.9), "strictly increasing"),
    ((0.4, 0.5), (0.9, 0.1), "monotone"),
    ((0.4, 0.5), (0.0, 0.9), "monotone"),
    ((0.4, 1.5), (0.1, 0.9), r"in \[-1, 1\]"),
    ((0.4,), (0.1, 0.9), "one P each"),
])
def test_a_bad_map_is_refused(knots, p, match):
    with pytest.raises(ValueError, match=match):
        Calibration(knots, p)


def test_metadata_carries_precision_and_calibration_and_old_models_still_load():
    cal = Calibration((0.5, 0.9), (0.1, 0.9))
    meta = ModelMeta("n", "n-1", 256, 128, IMAGENET_MEAN, IMAGENET_STD, 512, {"source": "s"}, "int8", cal)
    props = meta.to_props()
    assert props[KEY_PRECISION] == "int8"
    back = ModelMeta.from_props(props, "n.onnx")
    assert back == meta and back.extra == {"source": "s"}  # the typed keys do not leak into extra
    old = {k: v for k, v in props.items() if k not in (KEY_PRECISION, KEY_CALIBRATION)}
    assert ModelMeta.from_props(old, "old.onnx") == replace(meta, precision="fp32", calibration=None)
    with pytest.raises(ValueError, match=f"n.onnx: bad model metadata {KEY_PRECISION}='int4'"):
        ModelMeta.from_props({**props, KEY_PRECISION: "int4"}, "n.onnx")
    with pytest.raises(ValueError, match="n.onnx: calibration schema 9 not supported"):
        ModelMeta.from_props({**props, KEY_CALIBRATION: '{"v": 9}'}, "n.onnx")
    with pytest.raises(ValueError, match="n.onnx: bad calibration"):
        ModelMeta.from_props({**props, KEY_CALIBRATION: '{"v": 1, "cosine": [0.5], "p": [1.5]}'}, "n.onnx")


def test_pairs_are_same_track_far_apart_and_co_occurring_tracks(campus_harvest):
    harvest, ids = campus_harvest
    crops, tracklets = read_tracklets(harvest)
    assert len(tracklets) == 8 and len(crops) == len(ids)
    pairs = make_pairs(tracklets, min_gap_s=1.0)
    pid = np.array([ids[c.path] for c in crops])
    frame = np.array([int(c.path.stem.rpartition("_f")[2]) for c in crops])
    pos, neg = pairs.label == 1, pairs.label == 0
    assert np.all(pid[pairs.i[pos]] == pid[pairs.j[pos]])
    assert np.all(np.abs(frame[pairs.i[pos]] - frame[pairs.j[pos]]) >= 25)  # 1 s at 25 fps
    assert np.all(pid[pairs.i[neg]] != pid[pairs.j[neg]])  # co-occurring tracks really are different people
    # Each class weighs 1 in all, so the fit is balanced whatever the pair counts.
    assert pairs.weight[pos].sum() == pytest.approx(1) and pairs.weight[neg].sum() == pytest.approx(1)


def test_too_few_tracklets_say_how_many_were_found_and_needed(campus_harvest, tmp_path):
    harvest, ids = campus_harvest
    longest = max(set(ids.values()), key=list(ids.values()).count)
    one = tmp_path / "one"
    for crop in (c for c, pid in ids.items() if pid == longest):  # one track only
        (one / crop.parent.name).mkdir(parents=True, exist_ok=True)
        for f in (crop, crop.with_suffix(".json")):
            shutil.copy(f, one / crop.parent.name / f.name)
    _, tracklets = read_tracklets(one)
    with pytest.raises(ValueError, match=r"1 tracklet\(s\) with crops >= 1 s apart \(need 3\) and 0 pair\(s\) of "
                                         r"co-occurring tracks \(need 3\), from 1 tracklet\(s\)"):
        make_pairs(tracklets, min_gap_s=1.0)


def test_calibrate_cli_writes_a_calibration_that_separates_the_labelled_people(campus_harvest, default_model, tmp_path,
                                                                               capsys):
    harvest, ids = campus_harvest
    out = tmp_path / "calibrated.onnx"
    assert main(["model-info", str(default_model)]) == 0
    assert f"score: {UNCALIBRATED}" in capsys.readouterr().out
    assert main(["calibrate", str(default_model), "--harvest", str(harvest), "--out", str(out), "--min-gap", "1"]) == 0
    assert "calibrated (isotonic" in capsys.readouterr().out
    assert main(["model-info", str(out)]) == 0
    assert "score: calibrated (isotonic" in capsys.readouterr().out

    fp32, calibrated = Embedder(default_model, device="cpu"), Embedder(out, device="cpu")
    assert calibrated.version == fp32.version  # same vectors, same partition
    assert fp32.meta.calibration is None
    cal = calibrated.meta.calibration
    assert cal.fitted["tracklets"] == 8 and cal.fitted["model"] == fp32.version
    crops, _ = read_tracklets(harvest)
    features = embed_samples(calibrated, crops)
    pid = np.array([ids[c.path] for c in crops])
    p = cal.probability(features @ features.T)
    same = pid[:, None] == pid[None, :]
    np.fill_diagonal(same, False)
    different = pid[:, None] != pid[None, :]
    assert p[same].mean() > p[different].mean() + 0.1  # ImageNet features: 0.59 vs 0.41


def test_calibrate_cli_on_too_small_a_harvest_fails_with_the_counts(campus_harvest, default_model, tmp_path, caplog):
    harvest, _ = campus_harvest
    before = default_model.read_bytes()
    with caplog.at_level(logging.ERROR, logger="crossview"):
        rc = main(["calibrate", str(default_model), "--harvest", str(harvest), "--min-gap", "60"])
    assert rc == 2
    assert "0 tracklet(s) with crops >= 60 s apart (need 3)" in caplog.text
    assert default_model.read_bytes() == before  # a failed fit leaves the model alone
    with caplog.at_level(logging.ERROR, logger="crossview"):
        assert main(["calibrate", str(default_model), "--harvest", str(tmp_path / "nowhere")]) == 2
    assert "does not exist" in caplog.text
