"""Pseudo-label maths: the sparse k-reciprocal distance against the dense public-code computation, DBSCAN and
k-means++ on planted clusters, the eps rule, DAAM weights (Eq. 9), DAAL soft labels (Eq. 4), NMI."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from reference.kreciprocal_dense import dense_jaccard, dense_rerank, squared_distances
from scipy import sparse

from crossview.trainer.clustering import (
    PseudoLabels,
    centers_of,
    cluster,
    daal_soft_labels,
    daam_weights,
    dbscan_labels,
    eps_from_percentile,
    kmeans_labels,
    nmi,
)
from crossview.trainer.kreciprocal import jaccard_distance, rerank


def blobs(n_ids: int, per_id: int, dim: int, noise: float, n_outliers: int = 0, seed: int = 0):
    """Unit vectors around `n_ids` random directions (noise norm ≈ `noise`) plus uniform outliers (label −1)."""
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(n_ids, dim))
    centers /= np.linalg.norm(centers, axis=1, keepdims=True)
    labels = np.repeat(np.arange(n_ids), per_id)
    x = centers[labels] + noise * rng.normal(size=(len(labels), dim)) / np.sqrt(dim)
    x = np.vstack([x, rng.normal(size=(n_outliers, dim))])
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x.astype(np.float32), np.concatenate([labels, np.full(n_outliers, -1)])


def as_dense(dist: sparse.spmatrix) -> np.ndarray:
    """The sparse Jaccard matrix with its absent entries filled in as distance 1."""
    out = np.ones(dist.shape)
    coo = dist.tocoo()
    out[coo.row, coo.col] = coo.data
    return out


# ------------------------------------------------------------------ k-reciprocal distance


@pytest.mark.parametrize(
    "n, dim, k1, k2, seed",
    [(200, 16, 20, 6, 0), (150, 8, 10, 3, 1), (60, 4, 5, 1, 2), (30, 8, 40, 6, 3), (240, 32, 20, 6, 4), (80, 8, 3, 6, 5)],
)
def test_sparse_jaccard_equals_dense_reference(n, dim, k1, k2, seed):
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(max(n // 10, 1), dim))
    x = (centers[rng.integers(0, len(centers), n)] + 0.5 * rng.normal(size=(n, dim))).astype(np.float32)
    got = jaccard_distance(x, k1, k2)
    want = dense_jaccard(x, k1, k2)
    assert isinstance(got, sparse.csr_matrix) and got.dtype == np.float32 and got.shape == (n, n)
    np.testing.assert_allclose(as_dense(got), want, atol=1e-5, rtol=0)
    stored = np.zeros((n, n), dtype=bool)
    stored[got.tocoo().row, got.tocoo().col] = True
    assert np.array_equal(stored, want < 1), "stored entries must be exactly the pairs with distance < 1"


def test_jaccard_is_a_symmetric_distance_with_zero_diagonal():
    x, _ = blobs(8, 15, 32, 0.6, n_outliers=10, seed=5)
    d = as_dense(jaccard_distance(x))
    np.testing.assert_allclose(d, d.T, atol=1e-6)
    np.testing.assert_allclose(np.diag(d), 0, atol=1e-6)
    assert d.min() >= 0 and d.max() <= 1


def test_duplicate_features_are_at_distance_zero():
    x, _ = blobs(5, 10, 16, 0.6, seed=6)
    x = np.vstack([x, x[:3]])  # three exact duplicates: self must still be each row's first neighbour
    d = as_dense(jaccard_distance(x))
    n = len(x)
    for i in range(3):
        assert d[i, n - 3 + i] == pytest.approx(0, abs=1e-6)


def test_rerank_equals_dense_reranking():
    rng = np.random.default_rng(7)
    centers = rng.normal(size=(12, 24))
    q = (centers[rng.integers(0, 12, 40)] + 0.6 * rng.normal(size=(40, 24))).astype(np.float32)
    g = (centers[rng.integers(0, 12, 130)] + 0.6 * rng.normal(size=(130, 24))).astype(np.float32)
    got = rerank(q, g, k1=20, k2=6, lambda_value=0.3)
    assert got.shape == (40, 130) and got.dtype == np.float32
    np.testing.assert_allclose(got, dense_rerank(q, g, 20, 6, 0.3), atol=1e-5, rtol=0)
    np.testing.assert_allclose(rerank(q, g, lambda_value=1.0), squared_distances(np.vstack([q, g]))[:40, 40:], atol=1e-5)


# ------------------------------------------------------------------ eps and DBSCAN


def test_eps_from_percentile_on_a_known_matrix():
    # upper triangle stored: 0.1, 0.3, 0.2, 0.4; (0, 3) and (1, 3) absent = 1; 6 pairs in all
    rows, cols, vals = [0, 0, 1, 2], [1, 2, 2, 3], [0.1, 0.3, 0.2, 0.4]
    m = sparse.coo_matrix((vals + vals, (rows + cols, cols + rows)), shape=(4, 4)).tocsr()
    assert eps_from_percentile(m, 0.5) == pytest.approx((0.1 + 0.2 + 0.3) / 3)
    assert eps_from_percentile(m, 5 / 6) == pytest.approx((0.1 + 0.2 + 0.3 + 0.4 + 1.0) / 5)
    assert eps_from_percentile(m, 0.01) == pytest.approx(0.1)  # at least one pair
    with pytest.raises(ValueError):
        eps_from_percentile(m, 0)


def test_eps_equals_the_dense_udap_computation():
    x, _ = blobs(10, 12, 32, 0.7, n_outliers=5, seed=8)
    dense = dense_jaccard(x)
    upper = np.sort(dense[np.triu_indices(len(x), 1)])
    for p in (0.001, 0.02, 0.3, 0.9):  # the last ones reach into the absent (distance 1) pairs
        top = int(np.round(p * len(upper)))
        assert eps_from_percentile(jaccard_distance(x), p) == pytest.approx(upper[:top].mean(), abs=1e-6)


def test_dbscan_finds_planted_clusters_and_marks_outliers():
    x, truth = blobs(12, 20, 64, 0.5, n_outliers=15, seed=1)
    n = len(x)
    intra_share = 12 * 20 * 19 / 2 / (n * (n - 1) / 2)  # p ≈ the share of same-identity pairs, as UDAP sets it
    pl = cluster(x, "dbscan", p=intra_share, min_samples=4)
    assert nmi(truth, pl.labels) > 0.95
    assert np.all(pl.labels[truth < 0] == -1), "uniform outliers must stay unclustered"
    assert np.mean(pl.labels[truth >= 0] >= 0) > 0.9
    assert pl.n_clusters == pl.labels.max() + 1 and pl.eps is not None and 0 < pl.eps < 1
    assert pl.outlier_share == pytest.approx(np.mean(pl.labels < 0))


def test_dbscan_radius_of_one_or_more_joins_everything():
    x, _ = blobs(3, 5, 8, 0.5, seed=2)
    d = jaccard_distance(x)
    assert np.all(dbscan_labels(d, 1.0, 4) == 0)
    assert np.all(dbscan_labels(d, 1.0, 100) == -1)


# ------------------------------------------------------------------ k-means++ (DAAM Eq. 7)


def test_kmeans_recovers_planted_blobs():
    x, truth = blobs(30, 20, 32, 0.8, seed=3)
    labels, centers = kmeans_labels(x, 30, seed=0)
    assert labels.shape == (600,) and centers.shape == (30, 32) and centers.dtype == np.float32
    assert nmi(truth, labels) > 0.9
    # Eq. 7: each label is the nearest centre
    d = ((x[:, None, :] - centers[None]) ** 2).sum(-1)
    assert np.array_equal(labels, d.argmin(1))
    again, _ = kmeans_labels(x, 30, seed=0)
    assert np.array_equal(labels, again), "same seed, same clustering"
    with pytest.raises(ValueError):
        kmeans_labels(x, 601)


def test_centers_of_are_the_member_means_and_skip_outliers():
    x = np.array([[0, 0], [2, 0], [10, 10], [0, 4]], dtype=np.float32)
    np.testing.assert_allclose(centers_of(x, np.array([0, 0, -1, 1])), [[1, 0], [0, 4]])


# ------------------------------------------------------------------ DAAM Eq. 9, DAAL Eq. 4


def test_daam_weights_in_open_zero_half_and_decreasing_with_distance():
    rng = np.random.default_rng(4)
    centers = np.zeros((1, 8), np.float32)
    radii = np.linspace(0, 6, 50)
    x = (rng.normal(size=(50, 8)) * (radii / np.sqrt(8))[:, None]).astype(np.float32)
    labels = np.zeros(50, np.int64)
    w = daam_weights(x, labels, centers)
    d = (x.astype(np.float64) ** 2).sum(1)
    np.testing.assert_allclose(w, 1 / (1 + np.exp(d)), rtol=1e-6)
    assert w[0] == pytest.approx(0.5) and np.all(w > 0) and np.all(w <= 0.5)
    assert np.all(np.diff(w[np.argsort(d)]) <= 0)
    far = daam_weights(np.full((1, 8), 100, np.float32), np.array([0]), centers)
    assert far[0] == 0 and np.isfinite(far).all()  # exp(80000) would overflow; the weight is just 0
    assert daam_weights(x[:2], np.array([0, -1]), centers)[1] == 0  # outlier


def test_daal_soft_labels_hand_computed():
    f = np.array([[0, 0], [3, 0], [5, 5]], dtype=np.float32)
    c = np.array([[1, 0], [0, 2]], dtype=np.float32)
    # squared distances: f0 → 1, 4; f1 → 4, 13; K = 2; f2 is an outlier
    w = daal_soft_labels(f, np.array([0, 1, -1]), c, epsilon=0.9)
    want = [[0.9 + 1 / (2 * 1), 1 / (2 * 4)], [1 / (2 * 4), 0.9 + 1 / (2 * 13)], [0, 0]]
    assert w.dtype == np.float32 and w.shape == (3, 2)
    np.testing.assert_allclose(w, want, rtol=1e-6)


def test_daal_soft_labels_guard_zero_distance():
    f = np.array([[1, 0], [0, 1]], dtype=np.float32)
    w = daal_soft_labels(f, np.array([0, 1]), f.copy(), epsilon=0.9)  # each sample is its own centre
    assert np.isfinite(w).all()
    np.testing.assert_allclose(np.diag(w), 0.9 + 1.0)  # the term is capped at 1
    np.testing.assert_allclose(w[0, 1], 1 / (2 * 2))


# ------------------------------------------------------------------ NMI and the one call


def test_nmi():
    a = np.array([0, 0, 1, 1, 2, 2])
    assert nmi(a, a) == pytest.approx(1.0)
    assert nmi(a, np.array([5, 5, 3, 3, 9, 9])) == pytest.approx(1.0)  # renaming does not matter
    with_outliers = np.array([0, 0, 1, 1, -1, -1])
    assert nmi(with_outliers, with_outliers) == pytest.approx(1.0)
    # two outliers are two singletons, not a cluster: calling them a pair is a disagreement
    assert nmi(with_outliers, np.array([0, 0, 1, 1, 2, 2])) < 1.0


@pytest.mark.parametrize("method", ["kmeans", "dbscan"])
@pytest.mark.parametrize("soft", [False, True])
def test_cluster_returns_restorable_pseudo_labels(method, soft):
    x, _ = blobs(10, 20, 32, 0.5, n_outliers=5, seed=9)
    pl = cluster(x, method, k=10, p=0.05, min_samples=4, soft=soft, seed=0)
    n = len(x)
    assert pl.method == method and pl.labels.shape == (n,) and pl.centers.shape == (pl.n_clusters, 32)
    assert pl.weights.shape == ((n, pl.n_clusters) if soft else (n,)) and pl.weights.dtype == np.float32
    assert pl.n_clusters >= 2 and pl.seconds >= 0
    assert (pl.eps is None) == (method == "kmeans")
    back = PseudoLabels(**dataclasses.asdict(pl))
    assert np.array_equal(back.labels, pl.labels) and back.n_clusters == pl.n_clusters


def test_cluster_rejects_an_unknown_method():
    with pytest.raises(ValueError, match="unknown clustering method"):
        cluster(np.zeros((4, 2), np.float32), "hdbscan")
