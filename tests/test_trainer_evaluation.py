"""CMC / mAP: equal to torchreid's own `evaluate_rank` on random distance matrices, plus hand-worked cases.

torchreid 0.2.5 (PyPI) packages deep-person-reid under `torchreid.reid`; its Python path
(`use_cython=False`, the Market-1501 metric) is the reference.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
import pytest
from scipy.spatial.distance import cdist

from crossview.trainer.evaluation import evaluate, evaluate_features, evaluate_rank, pairwise_distance

with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # "Cython evaluation ... unavailable": the Python path is the one we want
    from torchreid.reid.metrics.rank import evaluate_rank as torchreid_evaluate_rank


def random_case(seed: int):
    """Random ids/cameras (some query identities absent from the gallery, some only under the query's
    camera); every third seed uses integer distances, so ties are everywhere."""
    rng = np.random.default_rng(seed)
    nq, ng = int(rng.integers(5, 60)), int(rng.integers(80, 300))
    n_ids, n_cams = int(rng.integers(3, 30)), int(rng.integers(2, 6))
    q_pids = rng.integers(0, n_ids + 3, nq)  # ids n_ids.. never appear in the gallery
    g_pids = rng.integers(0, n_ids, ng)
    q_cams, g_cams = rng.integers(0, n_cams, nq), rng.integers(0, n_cams, ng)
    dist = rng.integers(0, 5, (nq, ng)).astype(np.float32) if seed % 3 == 0 else rng.random((nq, ng))
    return dist, q_pids, g_pids, q_cams, g_cams


@pytest.mark.parametrize("seed", range(24))
@pytest.mark.parametrize("max_rank", [1, 10, 50])
def test_equals_torchreid_evaluate_rank(seed, max_rank):
    case = random_case(seed)
    want_cmc, want_map = torchreid_evaluate_rank(*case, max_rank=max_rank, use_metric_cuhk03=False, use_cython=False)
    cmc, mAP = evaluate_rank(*case, max_rank=max_rank)
    assert cmc.dtype == want_cmc.dtype and np.array_equal(cmc, want_cmc)
    assert mAP == pytest.approx(want_map, abs=1e-12)  # only the summation order differs


def test_random_cases_include_skipped_queries_and_ties():
    skipped = [evaluate(*random_case(s)).skipped_queries for s in range(24)]
    assert sum(s > 0 for s in skipped) >= 5
    dist = random_case(0)[0]
    assert len(np.unique(dist)) <= 5


def test_hand_worked_query():
    # gallery by distance: same id+camera (removed), another id, the id from cam 1, the id from cam 2
    dist = np.array([[0.1, 0.2, 0.3, 0.4]])
    result = evaluate(dist, [1], [1, 2, 1, 1], [0], [0, 0, 1, 2], max_rank=3)
    np.testing.assert_array_equal(result.cmc, [0, 1, 1])
    assert result.mAP == pytest.approx((1 / 2 + 2 / 3) / 2)
    assert result.as_dict()["rank1"] == 0 and result.as_dict()["rank5"] == 1  # past the curve's end: matched


def test_queries_without_a_valid_match_are_skipped_and_none_at_all_is_an_error():
    dist = np.array([[0.1, 0.2], [0.2, 0.1]])
    # query 0's only match is under its own camera: skipped; query 1 matches at rank 2
    result = evaluate(dist, [5, 7], [5, 7], [0, 0], [0, 1], max_rank=2)
    assert (result.valid_queries, result.skipped_queries) == (1, 1)
    np.testing.assert_array_equal(result.cmc, [1, 1])
    with pytest.raises(ValueError, match="no query"):
        evaluate(dist, [5, 7], [5, 7], [0, 1], [0, 1])


def test_pairwise_distance():
    rng = np.random.default_rng(0)
    q, g = rng.normal(size=(7, 16)), rng.normal(size=(9, 16))
    np.testing.assert_allclose(pairwise_distance(q, g, "cosine"), cdist(q, g, "cosine"), atol=1e-5)
    np.testing.assert_allclose(pairwise_distance(q, g, "euclidean"), cdist(q, g), atol=1e-4)
    with pytest.raises(ValueError):
        pairwise_distance(q, g, "manhattan")


@dataclass(frozen=True)
class S:
    pid: int
    camid: int


@pytest.mark.parametrize("rerank", [False, True])
def test_evaluate_features_on_separable_identities(rerank):
    rng = np.random.default_rng(1)
    ids = rng.normal(size=(20, 32))
    g_pids, q_pids = np.repeat(np.arange(20), 6), np.arange(20)
    gf = ids[g_pids] + 0.1 * rng.normal(size=(120, 32))
    qf = ids[q_pids] + 0.1 * rng.normal(size=(20, 32))
    gallery = [S(int(p), 1 + i % 3) for i, p in enumerate(g_pids)]
    query = [S(int(p), 0) for p in q_pids]
    out = evaluate_features(qf, gf, query, gallery, rerank=rerank)
    assert out["rank1"] == 1.0 and out["mAP"] == pytest.approx(1.0) and out["valid_queries"] == 20
    assert set(out) == {"rank1", "rank5", "rank10", "mAP", "valid_queries", "skipped_queries"}
