"""Dense reference of the k-reciprocal Jaccard distance and re-ranking, the way the public code computes it.

Written after Zhong et al. 2017 ("Re-ranking person re-identification with k-reciprocal encoding") and the
`re_ranking` / `compute_jaccard_distance` functions of their code and of UDAP/SpCL/MMT: a full N x N distance,
argsort for the ranks, per-sample Python loops, dense V and Jaccard matrices. The distance is the one
trainer/kreciprocal.py uses, ‖f_i − f_j‖² of L2-normalised features (SpCL's; Zhong's code further divides
each column by its maximum). Used by the tests as the ground truth and by bench/cluster_bench.py as the
"before" timing; O(N²) memory, so keep N small.
"""

from __future__ import annotations

import numpy as np


def k_reciprocal_neigh(initial_rank: np.ndarray, i: int, k1: int) -> np.ndarray:
    forward_k_neigh_index = initial_rank[i, : k1 + 1]
    backward_k_neigh_index = initial_rank[forward_k_neigh_index, : k1 + 1]
    fi = np.where(backward_k_neigh_index == i)[0]
    return forward_k_neigh_index[fi]


def squared_distances(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    x = x / np.linalg.norm(x, axis=1, keepdims=True)
    return np.clip(2.0 - 2.0 * x @ x.T, 0.0, None)


def dense_jaccard(features: np.ndarray, k1: int = 20, k2: int = 6) -> np.ndarray:
    original_dist = squared_distances(features)
    n = original_dist.shape[0]
    initial_rank = np.argsort(original_dist, axis=1)

    V = np.zeros((n, n), dtype=np.float64)
    for i in range(n):
        k_reciprocal_index = k_reciprocal_neigh(initial_rank, i, k1)
        k_reciprocal_expansion_index = k_reciprocal_index
        for candidate in k_reciprocal_index:
            candidate_k_reciprocal_index = k_reciprocal_neigh(initial_rank, candidate, int(np.around(k1 / 2)))
            if len(np.intersect1d(candidate_k_reciprocal_index, k_reciprocal_index)) > 2 / 3 * len(
                candidate_k_reciprocal_index
            ):
                k_reciprocal_expansion_index = np.append(k_reciprocal_expansion_index, candidate_k_reciprocal_index)
        k_reciprocal_expansion_index = np.unique(k_reciprocal_expansion_index)
        weight = np.exp(-original_dist[i, k_reciprocal_expansion_index])
        V[i, k_reciprocal_expansion_index] = weight / np.sum(weight)

    if k2 != 1:
        V_qe = np.zeros_like(V)
        for i in range(n):
            V_qe[i, :] = np.mean(V[initial_rank[i, :k2], :], axis=0)
        V = V_qe

    invIndex = [np.where(V[:, i] != 0)[0] for i in range(n)]
    jaccard_dist = np.zeros((n, n), dtype=np.float64)
    for i in range(n):
        temp_min = np.zeros((1, n), dtype=np.float64)
        indNonZero = np.where(V[i, :] != 0)[0]
        indImages = [invIndex[ind] for ind in indNonZero]
        for j in range(len(indNonZero)):
            temp_min[0, indImages[j]] = temp_min[0, indImages[j]] + np.minimum(
                V[i, indNonZero[j]], V[indImages[j], indNonZero[j]]
            )
        jaccard_dist[i] = 1 - temp_min / (2 - temp_min)
    jaccard_dist[jaccard_dist < 0] = 0.0
    return jaccard_dist


def dense_rerank(q: np.ndarray, g: np.ndarray, k1: int = 20, k2: int = 6, lambda_value: float = 0.3) -> np.ndarray:
    x = np.vstack([q, g])
    nq = len(q)
    jaccard = dense_jaccard(x, k1, k2)
    original = squared_distances(x)
    final = jaccard * (1 - lambda_value) + original * lambda_value
    return final[:nq, nq:]
