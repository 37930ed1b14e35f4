"""The adapt job's gate: tracklet re-ID on held-out tracklets of a real harvest, and the promotion decision."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
from helpers import shared_data

from crossview.trainer.calibration import read_tracklets
from crossview.trainer.data.mot_harvest import mot_harvest
from crossview.trainer.gate import GateRule, Scores, Source, decide, score_model, split_tracklets, tracklet_map


@pytest.fixture(scope="module")
def stadtmitte(tmp_path_factory):
    """TUD-Stadtmitte's ground truth written as an edge harvest: 10 people, every 4th frame."""
    root = tmp_path_factory.mktemp("stadtmitte")
    mot_harvest(shared_data("TUD-Stadtmitte"), root / "cache", root / "harvest", frame_step=4)
    return root / "harvest"


def test_tracklets_split_whole_and_deterministically(stadtmitte):
    _, tracklets = read_tracklets(stadtmitte)
    train, held = split_tracklets(tracklets, 0.3, seed=4)
    assert len(held) == round(0.3 * len(tracklets)) and len(train) + len(held) == len(tracklets)
    assert not {(t.camera, t.track) for t in train} & {(t.camera, t.track) for t in held}
    assert split_tracklets(tracklets, 0.3, seed=4) == (train, held)
    with pytest.raises(ValueError, match="1 tracklet"):
        split_tracklets(tracklets[:1], 0.3)


def test_tracklet_map_is_perfect_for_identity_features_and_chance_for_noise(stadtmitte):
    crops, tracklets = read_tracklets(stadtmitte)
    one_hot = np.zeros((len(crops), len(tracklets)), np.float32)
    for label, t in enumerate(tracklets):
        one_hot[t.rows, label] = 1
    assert tracklet_map(one_hot, tracklets, 2.0)["mAP"] == pytest.approx(1.0)
    noise = np.random.default_rng(0).standard_normal((len(crops), 64)).astype(np.float32)
    assert tracklet_map(noise, tracklets, 2.0)["mAP"] < 0.4
    with pytest.raises(ValueError, match="spans more than 1000 s"):
        tracklet_map(one_hot, tracklets, 1000.0)


def test_a_real_model_scores_above_a_random_one_and_the_gate_says_so(stadtmitte, default_model, make_tiny_model,
                                                                      tmp_path):
    _, tracklets = read_tracklets(stadtmitte)
    fit, held = split_tracklets(tracklets, 0.5, seed=1)
    make_tiny_model(tmp_path / "tiny.onnx", "tiny-1")
    source = Source("mot", shared_data("TUD-Campus"), tmp_path / "cache")
    imagenet = score_model(default_model, stadtmitte, held, fit, source)
    tiny = score_model(tmp_path / "tiny.onnx", stadtmitte, held, fit, source)
    assert imagenet.site_mAP > tiny.site_mAP + 0.05 and imagenet.source_mAP > tiny.source_mAP
    assert imagenet.site_queries == tiny.site_queries > 0
    assert decide(imagenet, tiny, GateRule()).passed
    refused = decide(tiny, imagenet, GateRule(max_source_drop=0.01))
    assert not refused.passed and "site mAP" in refused.reasons[0] and "source mAP fell" in refused.reasons[1]
    assert "**refused**" in refused.to_markdown() and refused.to_dict()["candidate"]["model"] == "tiny-1"


def test_the_gate_names_every_reason_it_refuses():
    cur = Scores("m-1", 0.50, 0.7, 40, 0.05, 0.60)
    assert decide(replace(cur, model="m-2", site_mAP=0.56), cur, GateRule(min_gain=0.05)).passed
    worse = replace(cur, model="m-2", site_mAP=0.56, source_mAP=0.50, site_ece=0.20)
    report = decide(worse, cur, GateRule(min_gain=0.05, max_source_drop=0.05, max_ece_rise=0.1))
    assert not report.passed and [r.split()[0] for r in report.reasons] == ["source", "calibration"]
    small = decide(replace(cur, model="m-2", site_mAP=0.52), cur, GateRule(min_gain=0.05))
    assert small.reasons == ["site mAP 52.0 vs 50.0: gain +2.0 < 5.0 points"]
    # Scores that could not be computed (no source, too few pairs) do not block a clear site gain.
    assert decide(replace(cur, site_mAP=0.9, source_mAP=None, site_ece=None), cur, GateRule()).passed
