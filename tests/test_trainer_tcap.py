"""TCAP: tracklet pseudo labels (co-occurrence, swap splits, eps from the tracklets or the k-NN profile), the memory losses on known
inputs, where their gradients go, and a run on a real harvest that is killed, resumed and exported."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import shared_data
from sklearn.metrics import adjusted_rand_score
from trainer_runs import crash_after, epochs, export_parity, records, resume, tiny_config

from crossview.kernel import checkpoint
from crossview.trainer.config import TrainConfig, load_train_config
from crossview.trainer.data.harvest import harvest_samples
from crossview.trainer.data.mot_harvest import mot_harvest
from crossview.trainer.engine import Trainer
from crossview.trainer.kreciprocal import jaccard_distance
from crossview.trainer.methods import METHODS
from crossview.trainer.modeling.losses import Batch
from crossview.trainer.modeling.memory import (
    cluster_nce,
    cooccurrence_margin,
    inter_camera_proxy,
    intra_camera_proxy,
    momentum_update,
)
from crossview.trainer.modeling.tcap import GeM
from crossview.trainer.tracklets import (
    best_cut,
    cooccurring,
    eps_from_profile,
    eps_from_tracklets,
    halves,
    otsu_threshold,
    pair_distances,
    split_at_swaps,
    swap_threshold,
    tracklet_labels,
    tracklets_of,
)

DIM = 16


def _people(n_people: int, rng, noise: float = 0.05) -> np.ndarray:
    return np.eye(n_people, DIM) + noise * rng.standard_normal((n_people, DIM))


def _track(center: np.ndarray, n: int, rng, noise: float = 0.05) -> np.ndarray:
    return center + noise * rng.standard_normal((n, DIM))


# ------------------------------------------------------------------------------------------- pseudo labels
def test_cooccurring_tracklets_never_share_a_label_even_when_they_look_alike():
    rng = np.random.default_rng(0)
    person = _people(1, rng)[0]
    # Tracks 0 and 1 of camera 0 overlap in frames 0-9: two people, however alike; track 2 (frames 50-59) may join.
    feats = np.vstack([_track(person, 10, rng) for _ in range(3)])
    cams, tracks = np.zeros(30), np.repeat([0, 1, 2], 10)
    frames = np.r_[np.arange(10), np.arange(10), np.arange(50, 60)]
    wide = {"k1": 2, "k2": 1, "split": False, "eps_rule": lambda d: 0.9}  # a radius that takes all three in
    tl = tracklet_labels(feats, cams, tracks, frames, **wide)
    assert tl.labels[0] != tl.labels[10] and min(tl.labels) >= 0
    assert tl.labels[20] in (tl.labels[0], tl.labels[10])  # the third is alike and co-occurs with neither
    assert len(tl.cannot_link) == 1
    merged = tracklet_labels(feats, cams, tracks, frames, **wide, cannot_link=False)
    assert len(set(merged.labels)) == 1  # without the constraint all three are one person


def _swapped_site(rng):
    """Track 0 follows person 0 for 8 frames, then (a swap) person 1; tracks 1 and 2 (persons 0 and 1) walk together
    later, as do tracks 3 and 4 (persons 2 and 3): two co-occurring pairs to learn what two people look like."""
    people = _people(4, rng)
    feats = np.vstack([_track(people[0], 8, rng), _track(people[1], 8, rng)]
                      + [_track(people[p], 12, rng) for p in (0, 1, 2, 3)])
    tracks = np.r_[np.zeros(16), np.repeat([1, 2, 3, 4], 12)]
    frames = np.r_[np.arange(16), np.tile(np.arange(100, 112), 4) + np.repeat([0, 0, 100, 100], 12)]
    return feats, tracks, frames


def test_a_tracklet_whose_appearance_jumps_is_split_where_the_tracker_swapped():
    feats, tracks, frames = _swapped_site(np.random.default_rng(1))
    tl = tracklet_labels(feats, np.zeros(len(feats)), tracks, frames, k1=3, k2=1)
    assert tl.n_splits == 1 and tl.n_segments == 6
    assert len(set(tl.segments[:8])) == 1 and tl.segments[7] != tl.segments[8]  # cut exactly at the swap
    assert tl.labels[0] == tl.labels[16] and tl.labels[8] == tl.labels[28]  # each half joins its own person
    assert tl.labels[0] != tl.labels[8]
    whole = tracklet_labels(feats, np.zeros(len(feats)), tracks, frames, k1=3, k2=1, split=False)
    assert whole.n_splits == 0 and len(set(whole.segments[:16])) == 1


def test_the_swap_threshold_is_learnt_between_whole_tracklets_and_cooccurring_pairs_joined():
    feats, tracks, frames = _swapped_site(np.random.default_rng(3))
    feats = feats / np.linalg.norm(feats, axis=1, keepdims=True)
    tls = tracklets_of(np.zeros(len(feats)), tracks, frames)
    pairs = cooccurring(np.zeros(len(feats)), frames, tls)
    assert pairs.tolist() == [[1, 2], [3, 4]]
    threshold = swap_threshold(feats, tls, pairs, 4)
    clean = [best_cut(feats[t], 4)[0] for t in tls[1:]]
    swapped, at = best_cut(feats[tls[0]], 4)
    assert max(clean) < threshold < swapped and at == 8
    # Nothing co-occurs: nothing says what two people look like, so nothing is cut.
    alone = np.r_[np.arange(16), np.arange(100, 148)]
    assert swap_threshold(feats, tracklets_of(np.zeros(len(feats)), tracks, alone), np.zeros((0, 2), int), 4) is None
    segments, cuts = split_at_swaps(feats, tls, np.zeros((0, 2), int), 4)
    assert cuts == 0 and len(segments) == len(tls)


def test_a_street_of_alike_people_keeps_every_clean_tracklet_whole():
    feats, who, frames = _street(np.random.default_rng(5))
    tl = tracklet_labels(feats, np.zeros(len(feats)), who, frames, k1=4, k2=2)
    assert tl.n_splits == 0


def test_eps_from_the_knn_profile_recovers_tight_clusters():
    rng = np.random.default_rng(2)
    groups = np.repeat(np.arange(6), 5)  # 6 people of 5 single crops (no tracks): eps_k 5 sees into other people
    feats = _people(6, rng, 0.0)[groups] + 0.03 * rng.standard_normal((30, DIM))
    dist = jaccard_distance(feats, 6, 2)
    eps = eps_from_profile(dist, 5)
    within = dist[groups[:, None] == groups[None, :]].max()
    assert within < eps < 1
    tl = tracklet_labels(feats, np.zeros(30), np.full(30, -1), np.full(30, -1), k1=6, k2=2, min_crops=3)
    assert adjusted_rand_score(groups, tl.labels) == 1.0 and tl.n_clusters == 6


def _street(rng, n: int = 8):
    """`n` alike passers-by, each one tracklet of 12 crops; people 2k and 2k+1 walk past together, nobody comes back."""
    people = rng.standard_normal(DIM) + 0.6 * rng.standard_normal((n, DIM))
    feats = np.vstack([_track(people[p], 12, rng) for p in range(n)])
    who = np.repeat(np.arange(n), 12)
    frames = 100 * (who // 2) + np.tile(np.arange(12), n)
    return feats, who, frames


def test_eps_from_the_tracklets_keeps_people_seen_once_apart_where_the_profile_merges_them():
    """A street of people who each pass once has no "same person" mode in its k-NN profile: Otsu splits the "someone
    else" distances and merges strangers. The two halves of each tracklet show what one person looks like."""
    feats, who, frames = _street(np.random.default_rng(3))
    profile = tracklet_labels(feats, np.zeros(len(feats)), who, frames, k1=6, k2=2)
    learnt = tracklet_labels(feats, np.zeros(len(feats)), who, frames, k1=6, k2=2, eps_by_halves=True)
    assert profile.n_clusters < 8
    assert adjusted_rand_score(who, learnt.labels) == 1.0 and learnt.n_segments == 16  # every tracklet in halves


def test_eps_from_the_tracklets_lies_between_one_persons_halves_and_co_occurring_people():
    rng = np.random.default_rng(4)
    feats, who, frames = _street(rng)
    pieces, siblings = halves(tracklets_of(np.zeros(len(who)), who, frames), 4)
    assert len(pieces) == 16 and siblings.tolist() == [[2 * i, 2 * i + 1] for i in range(8)]
    means = np.stack([feats[p].mean(0) for p in pieces])
    dist = jaccard_distance(means, 6, 2)
    co = cooccurring(np.zeros(len(who)), frames, pieces)
    eps = eps_from_tracklets(dist, siblings, co)
    assert pair_distances(dist, siblings).max() < eps < pair_distances(dist, co).min()
    assert eps_from_tracklets(dist, siblings, np.zeros((0, 2), np.int64)) is None  # nobody ever beside anybody
    assert pair_distances(dist, np.array([[0, 0]]))[0] == 0.0  # a stored zero is not an absent entry


def test_otsu_threshold_falls_in_the_gap_of_two_modes():
    assert 0.2 < otsu_threshold(np.r_[np.full(10, 0.1), np.full(30, 0.9), 0.2]) < 0.9
    assert otsu_threshold(np.ones(4)) == 1.0


# ------------------------------------------------------------------------------------------------- losses
E = torch.eye(2)


def test_cluster_nce_is_infonce_against_the_centroids():
    f = torch.tensor([[2.0, 0.0]])  # normalised to e0
    assert cluster_nce(f, torch.tensor([0]), E, tau=1.0).item() == pytest.approx(math.log(1 + math.exp(-1)))
    assert cluster_nce(f, torch.tensor([1]), E, tau=1.0).item() == pytest.approx(math.log(1 + math.exp(1)))


def test_camera_proxies_intra_sees_only_its_camera_inter_pulls_every_camera_of_the_cluster():
    proxies = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 1.0]])  # cluster 0 in cams 0 and 1, cluster 1 in cam 1
    cluster, cam = torch.tensor([0, 0, 1]), torch.tensor([0, 1, 1])
    f = torch.tensor([[1.0, 0.0]])
    # Proxy 0 is the only one of camera 0: the intra-camera softmax is certain.
    assert intra_camera_proxy(f, proxies, torch.tensor([0]), cam, tau=1.0).item() == pytest.approx(0.0, abs=1e-6)
    # Camera 1 holds proxies 1 and 2, both at cosine 0 from f: log 2.
    assert intra_camera_proxy(f, proxies, torch.tensor([1]), cam, tau=1.0).item() == pytest.approx(math.log(2))
    # Positives {0, 1} (logits 1, 0), one negative (logit 0): mean of (lse - 1, lse - 0), lse = log(e + 2).
    lse = math.log(math.e + 2)
    got = inter_camera_proxy(f, proxies, torch.tensor([0]), cluster, tau=1.0, hard=5).item()
    assert got == pytest.approx(((lse - 1) + lse) / 2)


def test_cooccurrence_margin_only_counts_the_marked_clusters():
    f = torch.tensor([[1.0, 0.0]])
    centroids = torch.tensor([[1.0, 0.0], [0.8, 0.6], [0.0, 1.0]])
    # Own 1.0; cluster 1 at 0.8 is inside the margin 0.3 by 0.1; cluster 2 at 0 is not.
    conflict = torch.tensor([[0.0, 1.0, 1.0]])
    got = cooccurrence_margin(f, torch.tensor([0]), centroids, conflict, margin=0.3).item()
    assert got == pytest.approx(0.1 / 2)
    assert cooccurrence_margin(f, torch.tensor([0]), centroids, torch.zeros(1, 3)).item() == 0.0


def test_momentum_update_moves_each_row_in_batch_order_into_a_new_tensor():
    memory = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    new = momentum_update(memory, torch.tensor([0, 0]), torch.tensor([[0.0, 3.0], [0.0, 1.0]]), momentum=0.5)
    once = torch.tensor([0.5, 0.5]) / math.sqrt(0.5)
    twice = torch.nn.functional.normalize(0.5 * once + torch.tensor([0.0, 0.5]), dim=0)
    assert torch.allclose(new[0], twice) and torch.equal(new[1], memory[1])
    assert torch.equal(memory, torch.tensor([[1.0, 0.0], [0.0, 1.0]]))  # the loss graph's copy is untouched


def test_gem_is_average_pooling_at_p_1_and_keeps_a_constant_map():
    x = torch.rand(2, 3, 4, 4)
    assert torch.allclose(GeM(1.0)(x), x.mean((2, 3)), atol=1e-6)
    assert torch.allclose(GeM(3.0)(torch.full((1, 2, 3, 3), 0.5)), torch.full((1, 2), 0.5), atol=1e-6)


def _method(**tcap):
    cfg = TrainConfig.model_validate({
        "method": "tcap", "name": "t", "source": {"kind": "folders", "root": "s"},
        "target": {"kind": "images", "root": "t"}, "input": {"height": 64, "width": 32},
        "model": {"backbone": "mobilenet_v2", "pretrained": "none"}, "tcap": tcap,
    })
    method = METHODS["tcap"](cfg)
    net = method.build(2).train()
    k, proxies, dim = 2, 3, net.dim
    method.memory = {
        "centroids": torch.nn.functional.normalize(torch.randn(k, dim), dim=1),
        "proxies": torch.nn.functional.normalize(torch.randn(proxies, dim), dim=1),
        "proxy_cluster": torch.tensor([0, 0, 1]), "proxy_cam": torch.tensor([0, 1, 1]),
        "sample_proxy": torch.tensor([0, 1, 2, 2]), "segment": torch.tensor([0, 1, 2, 2]),
        "conflict": torch.tensor([[0.0, 1.0], [0.0, 1.0], [1.0, 0.0]]),
    }
    return method, net


def test_every_parameter_gets_a_gradient_and_the_memories_move_without_one():
    torch.manual_seed(0)
    method, net = _method()
    x = torch.randn(8, 3, 64, 32)
    before = {k: v.clone() for k, v in method.memory.items()}
    batch = Batch(x, 4, torch.tensor([0, 0, 1, 1]), torch.tensor([0, 0, 1, 1]), torch.tensor([0, 1, 2, 3]))
    total, terms = method.losses(net(x), batch)
    assert set(terms) == {"source_ce", "source_triplet", "memory", "proxy_intra", "proxy_inter", "cooccur"}
    total.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for n, p in net.named_parameters()), "a dead parameter"
    assert net.pool.p.grad is not None  # GeM's p learns
    assert not any(v.requires_grad for v in method.memory.values())
    assert not torch.equal(before["centroids"], method.memory["centroids"])
    assert torch.equal(before["conflict"], method.memory["conflict"])


def test_a_source_only_batch_and_the_ablations_reach_every_parameter():
    x = torch.randn(4, 3, 64, 32)
    for over in ({}, {"pool": "avg", "neck": False}, {"memory": 0.0, "proxy_inter": 0.0, "cooccur": 0.0}):
        method, net = _method(**over)
        total, terms = method.losses(net(x), Batch(x, 4, torch.tensor([0, 0, 1, 1])))
        total.backward()
        assert set(terms) == {"source_ce", "source_triplet"}
        assert all(p.grad is not None for p in net.parameters())
    method, net = _method(memory=0.0, cooccur=0.0)
    xx = torch.randn(8, 3, 64, 32)
    _, terms = method.losses(net(xx), Batch(xx, 4, torch.tensor([0, 0, 1, 1]), torch.tensor([0, 0, 1, 1]),
                                            torch.tensor([0, 1, 2, 3])))
    assert set(terms) == {"source_ce", "source_triplet", "proxy_intra", "proxy_inter"}


# ---------------------------------------------------------------------------------------- a real run
@pytest.fixture(scope="module")
def site(tmp_path_factory):
    """TUD-Campus's ground truth written as an edge harvest (every 3rd frame): crops with camera, track and frame."""
    tmp = tmp_path_factory.mktemp("tcap")
    mot_harvest(shared_data("TUD-Campus"), tmp / "cache", tmp / "harvest", frame_step=3)
    return tmp


def test_a_harvest_gives_every_crop_its_track(site):
    target = harvest_samples(site / "harvest")
    assert all(s.track >= 0 and s.frame >= 1 for s in target.samples)
    assert len({s.track for s in target.samples}) > 3


@pytest.fixture(scope="module")
def resumed(site):
    """Pre-train 1 epoch, then 2 iterations of 2 epochs on the harvest, scored on the footage's ground truth
    (`target.evaluate_on`), BatchNorm per domain (`adapt.domain_bn`) and a mean teacher (`adapt.ema`); killed after
    iteration 1's first epoch and resumed."""
    campus = {"kind": "mot", "root": str(shared_data("TUD-Campus")), "frame_step": 3}  # the harvest's own crop cache
    path = tiny_config(site, "tcap", target={"kind": "harvest", "root": str(site / "harvest"), "evaluate_on": campus},
                       clustering={"k1": 6, "k2": 2}, tcap={"min_crops": 2},
                       pretrain={"epochs": 1, "lr": 3.5e-4, "warmup_epochs": 0},
                       adapt={"iterations": 2, "epochs": 2, "lr": 3.5e-4, "nmi_stop": 1.0, "domain_bn": True,
                              "ema": 0.9})
    crash_after(path, "adapt", 1)
    saved = checkpoint.load(site / "run" / "last.pt")
    restored = Trainer(load_train_config(path), resume=True)
    assert all(np.array_equal(restored.method.memory[k].numpy(), v) for k, v in saved.method["memory"].items())
    teacher = restored.teacher.state_dict()
    assert all(torch.equal(teacher[k], v) for k, v in saved.ema.items())  # the teacher resumes as it was
    assert not all(torch.equal(saved.model[k], v) for k, v in saved.ema.items())  # and is not the student
    return site, path, resume(path)


def test_resume_goes_on_with_the_saved_memory_and_reclusters_only_at_the_next_iteration(resumed):
    tmp, _, _ = resumed
    run = tmp / "run"
    assert epochs(run) == [("pretrain", 0, 1), ("adapt", 1, 1), ("adapt", 1, 2), ("adapt", 2, 1), ("adapt", 2, 2)]
    clusters = [r for r in records(run) if r["event"] == "cluster"]
    assert [r["iteration"] for r in clusters] == [1, 2]  # the resumed epoch kept iteration 1's labels
    crops = len(harvest_samples(tmp / "harvest").samples)
    adabn = [r for r in records(run) if r["event"] == "adabn"]  # before each target step, over every target crop
    assert [(r["iteration"], r["images"]) for r in adabn] == [(1, crops), (2, crops)]
    assert [r["label"] for r in records(run) if r["event"] == "eval"] == ["direct transfer", "iteration 1", "iteration 2"]
    assert all(r["clusters"] >= 2 and 0 < r["eps"] < 1 and r["cannot_link_pairs"] > 0 for r in clusters)
    adapt = [r for r in records(run) if r["event"] == "epoch" and r["stage"] == "adapt"]
    assert all({"memory", "proxy_intra", "proxy_inter", "cooccur"} <= set(r) and np.isfinite(r["loss"]) for r in adapt)
    # adapt.epoch_of "target" (TCAP's default): an epoch is one pass over the target's inliers, not over the larger
    # source (193 crops), so a big labelled source does not multiply the passes over a small site.
    for c in clusters:
        inliers = round(crops * (1 - c["outlier_share"]))
        steps = -(-inliers // 16)  # P x K = 4 x 4
        assert steps < -(-193 // 16) and all(r["images"] == 32 * steps for r in adapt if r["iteration"] == c["iteration"])


def test_export_is_trunk_pool_neck_and_the_edge_embedder_matches_torch(resumed):
    tmp, _, onnx_path = resumed
    diff, dim = export_parity(onnx_path, tmp / "run" / "last.pt", tmp / "harvest")
    assert dim == 1280 and diff <= 1e-4


@pytest.mark.parametrize("name", ["tcap.yaml", "tcap-gpu.yaml"])
def test_shipped_configs_load_with_every_switch_on(name):
    cfg = load_train_config(Path(__file__).resolve().parents[1] / "configs" / "train" / name)
    t = cfg.tcap
    assert cfg.method == "tcap" and cfg.target.kind == "harvest" and cfg.optim.kind == "adam"
    assert t.tracklets and t.split and t.cannot_link and t.eps == "tracklets" and t.pool == "gem" and t.neck
    assert cfg.adapt.epoch_of == "target"  # TCAP's default, under the files' own adapt keys
    assert min(t.memory, t.proxy_intra, t.proxy_inter, t.cooccur) > 0
    assert cfg.model.backbone == ("resnet50" if name == "tcap-gpu.yaml" else "mobilenet_v2")
