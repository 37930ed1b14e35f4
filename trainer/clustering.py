"""Pseudo labels of the unlabelled target: clusters, their centres and the per-sample loss weights.

| what                        | how                                                                          |
|-----------------------------|------------------------------------------------------------------------------|
| DAAM (Eq. 7)                | `kmeans_labels`: sklearn KMeans, k-means++ seeding, labels = nearest centre   |
| DAAL clusters               | `dbscan_labels` on `trainer.kreciprocal.jaccard_distance` (sparse, precomputed) |
| DBSCAN radius               | `eps_from_percentile`: mean of the smallest p share of all pairwise distances |
| DAAM sample weights (Eq. 9) | `daam_weights`: w_i = 1 / (1 + exp(‖f_i − C_yi‖²)), in (0, 0.5]              |
| DAAL soft labels (Eq. 4)    | `daal_soft_labels`: w_ik = 1 / (K ‖f_i − C_k‖²), + ε for k = y_i              |
| label agreement             | `nmi`: sklearn NMI, each outlier its own singleton cluster                   |
| cluster sizes               | `size_summary`: min / median / max crops a cluster, for the training log     |
| one call for the trainer    | `cluster(features, method="kmeans" or "dbscan", soft=...)` → `PseudoLabels`   |

Outliers (DBSCAN label −1) get weight 0 and an all-zero soft-label row: they add nothing to the loss,
as UDAP/SSG leave them out of training.

Four tight groups of five 8-d features, k-means with DAAL's soft labels:

    >>> features = np.repeat(np.eye(4, 8), 5, axis=0) + 0.01 * np.random.default_rng(0).standard_normal((20, 8))
    >>> pl = cluster(features, method="kmeans", k=4, soft=True)
    >>> pl.n_clusters, pl.labels.shape, pl.centers.shape, pl.weights.shape
    (4, (20,), (4, 8), (20, 4))
    >>> [len(set(pl.labels[i:i + 5])) for i in range(0, 20, 5)]  # each group is one cluster
    [1, 1, 1, 1]

DAAL's own call is `cluster(features, method="dbscan", p=0.0016, min_samples=4, soft=True)`.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import numpy as np
from scipy import sparse
from scipy.special import expit
from sklearn.cluster import DBSCAN, KMeans
from sklearn.metrics import normalized_mutual_info_score

from crossview.trainer.kreciprocal import jaccard_distance

log = logging.getLogger("crossview.trainer")


@dataclass
class PseudoLabels:
    """One clustering of the target: what the training loop needs until the next one.

    `weights` is (N,) DAAM Eq. 9 weights, or (N, K) DAAL Eq. 4 soft labels when clustered with soft=True.
    Every field is a constructor argument, so `PseudoLabels(**dataclasses.asdict(pl))` restores one.
    """

    labels: np.ndarray  # (N,) int64, 0..K-1, -1 = outlier
    centers: np.ndarray  # (K, d) float32
    weights: np.ndarray  # (N,) or (N, K) float32
    n_clusters: int
    outlier_share: float
    eps: float | None = None  # the DBSCAN radius used; None for k-means
    method: str = "kmeans"
    seconds: float = 0.0


def cluster(
    features: np.ndarray,
    method: str = "kmeans",
    *,
    k: int = 650,
    k1: int = 20,
    k2: int = 6,
    p: float = 0.0016,
    min_samples: int = 4,
    soft: bool = False,
    epsilon: float = 0.9,
    seed: int = 0,
) -> PseudoLabels:
    """Cluster target features (N, d) with k-means++ (DAAM: k) or DBSCAN on the k-reciprocal distance (DAAL:
    k1, k2, p, min_samples), then weight the samples: Eq. 9 weights, or Eq. 4 soft labels when `soft`."""
    t0 = time.perf_counter()
    features = np.asarray(features, dtype=np.float32)
    eps = None
    if method == "kmeans":
        labels, centers = kmeans_labels(features, k, seed)
    elif method == "dbscan":
        dist = jaccard_distance(features, k1, k2)
        eps = eps_from_percentile(dist, p)
        labels = dbscan_labels(dist, eps, min_samples)
        centers = centers_of(features, labels)
    else:
        raise ValueError(f"unknown clustering method {method!r}: use 'kmeans' or 'dbscan'")
    weights = daal_soft_labels(features, labels, centers, epsilon) if soft else daam_weights(features, labels, centers)
    n_clusters = len(centers)
    outliers = float(np.mean(labels < 0)) if len(labels) else 0.0
    seconds = time.perf_counter() - t0
    log.info(
        "pseudo labels: %s on %d samples -> %d clusters, %.1f%% outliers%s, %s, %.1f s",
        method, len(labels), n_clusters, 100 * outliers, f", eps {eps:.4f} (p {p})" if eps is not None else "",
        "DAAL soft labels" if soft else "DAAM weights", seconds,
    )
    return PseudoLabels(labels, centers, weights, n_clusters, outliers, eps, method, seconds)


def kmeans_labels(features: np.ndarray, k: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """DAAM Eq. 7: k-means with k-means++ seeding; (labels (N,) int64, centres (k, d) float32).

    Run in float64: sklearn's seeding upcasts float32 chunk by chunk, which is about twice as slow.
    """
    x = np.asarray(features, dtype=np.float64)
    if not 1 <= k <= len(x):
        raise ValueError(f"k-means needs 1 <= k <= N samples, got k={k}, N={len(x)}")
    km = KMeans(n_clusters=k, init="k-means++", n_init=1, random_state=seed).fit(x)
    return km.labels_.astype(np.int64), km.cluster_centers_.astype(np.float32)


def eps_from_percentile(dist: sparse.spmatrix, p: float) -> float:
    """DBSCAN eps as UDAP/SSG/DAAL choose it: sort the upper triangle of the pairwise distances and average
    the smallest round(p · N(N−1)/2).

    Absent entries of the sparse matrix are distance 1, so they fill the share when the stored ones run
    out; the result equals the dense computation. Unlike UDAP's `np.nonzero` filter, pairs at distance
    exactly 0 (duplicate images) count.
    """
    n = dist.shape[0]
    pairs = n * (n - 1) // 2
    if pairs == 0 or not 0 < p <= 1:
        raise ValueError(f"need at least 2 samples and 0 < p <= 1, got N={n}, p={p}")
    coo = dist.tocoo()
    upper = coo.data[coo.row < coo.col].astype(np.float64)
    top = max(1, int(np.round(p * pairs)))
    if top <= len(upper):
        return float(np.partition(upper, top - 1)[:top].mean())
    return float((upper.sum() + (top - len(upper))) / top)


def dbscan_labels(dist: sparse.spmatrix, eps: float, min_samples: int) -> np.ndarray:
    """DBSCAN on a sparse precomputed distance whose absent entries mean 1; labels (N,) int64, −1 = outlier.

    sklearn reads only the stored entries of a sparse matrix, which is exact for eps < 1; at eps >= 1
    every pair is within reach, so all samples form one cluster (or are all outliers if N < min_samples).
    """
    n = dist.shape[0]
    if eps >= 1.0:
        return np.full(n, 0 if n >= min_samples else -1, dtype=np.int64)
    labels = DBSCAN(eps=eps, min_samples=min_samples, metric="precomputed").fit_predict(sparse.csr_matrix(dist))
    return labels.astype(np.int64)


def centers_of(features: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Mean feature of each cluster 0..max(labels), outliers ignored; (K, d) float32 (an empty cluster is 0)."""
    x = np.asarray(features, dtype=np.float64)
    labels = np.asarray(labels)
    k = int(labels.max()) + 1 if labels.size else 0
    inside = np.flatnonzero(labels >= 0)
    member = sparse.csr_matrix((np.ones(len(inside)), (labels[inside], inside)), shape=(k, len(x)))
    counts = np.maximum(np.asarray(member.sum(axis=1)), 1.0)
    return np.asarray(member @ x / counts, dtype=np.float32).reshape(k, x.shape[1])


def daam_weights(features: np.ndarray, labels: np.ndarray, centers: np.ndarray) -> np.ndarray:
    """DAAM Eq. 9: w_i = 1 / (1 + exp(‖f_i − C_yi‖²)), in (0, 0.5], smaller the farther from the centre; 0 for
    outliers. Computed as expit(−d) so large distances underflow to 0 instead of overflowing."""
    labels = np.asarray(labels)
    w = np.zeros(len(labels), dtype=np.float32)
    inside = labels >= 0
    diff = np.asarray(features, np.float64)[inside] - np.asarray(centers, np.float64)[labels[inside]]
    w[inside] = expit(-np.einsum("ij,ij->i", diff, diff))
    return w


def daal_soft_labels(
    features: np.ndarray, labels: np.ndarray, centers: np.ndarray, epsilon: float = 0.9, max_term: float = 1.0
) -> np.ndarray:
    """DAAL Eq. 4: w_ik = 1 / (K ‖f_i − C_k‖²) for every cluster k, plus ε for the sample's own; (N, K) float32.

    The weights are not normalised, as in the paper. A sample on a centre (a one-member cluster) would get
    an infinite weight, so each 1/(K d) term is capped at `max_term` (the weight of a hard label), i.e. d is
    floored at 1/(K · max_term); above that floor the formula is the paper's. Outlier rows are all zero.
    """
    x = np.asarray(features, np.float64)
    c = np.asarray(centers, np.float64)
    labels = np.asarray(labels)
    k = len(c)
    out = np.zeros((len(x), k), dtype=np.float32)
    inside = np.flatnonzero(labels >= 0)
    if k == 0 or len(inside) == 0:
        return out
    xi = x[inside]
    w = xi @ c.T  # becomes ‖f − C‖², then the weights, in place: one (N, K) float64 array at a time
    w *= -2.0
    w += (xi * xi).sum(1)[:, None]
    w += (c * c).sum(1)[None, :]
    np.maximum(w, 1.0 / (k * max_term), out=w)
    w *= k
    np.reciprocal(w, out=w)
    w[np.arange(len(inside)), labels[inside]] += epsilon
    out[inside] = w
    return out


def size_summary(labels: np.ndarray, n_clusters: int) -> dict:
    """Cluster sizes (outliers -1 left out) as the training log records them: min, median, max crops a cluster."""
    sizes = np.bincount(labels[labels >= 0], minlength=n_clusters) if n_clusters else np.zeros(1, np.int64)
    return {"size_min": int(sizes.min()), "size_median": float(np.median(sizes)), "size_max": int(sizes.max())}


def nmi(a: np.ndarray, b: np.ndarray) -> float:
    """Normalised mutual information of two labelings (1 = the same partition up to renaming).

    Outliers (−1) are unassigned, not one big cluster: each becomes its own singleton, so two labelings
    agree on an outlier only by both leaving it alone.
    """
    return float(normalized_mutual_info_score(_outliers_as_singletons(a), _outliers_as_singletons(b)))


def _outliers_as_singletons(labels: np.ndarray) -> np.ndarray:
    labels = np.array(labels, dtype=np.int64)
    out = labels < 0
    if out.any():
        labels[out] = max(int(labels.max()) + 1, 0) + np.arange(int(out.sum()))
    return labels
