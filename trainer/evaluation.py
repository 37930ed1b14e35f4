"""Re-ID evaluation: CMC rank-k and mAP, single query, the Market-1501 protocol, as torchreid computes them.

| what                 | how                                                                                 |
|----------------------|-------------------------------------------------------------------------------------|
| protocol             | per query, gallery samples of the same identity *and* camera are removed; queries     |
|                      | with no remaining true match are skipped                                             |
| CMC                  | share of valid queries whose first true match is within rank r (r = 1..max_rank)      |
| AP                   | mean over the true matches of precision at their rank (torchreid's formula)          |
| equal to torchreid   | `evaluate_rank` returns what `torchreid.metrics.rank.evaluate_rank(...,              |
|                      | use_metric_cuhk03=False)` does, same argsort, vectorised over blocks of queries       |
| distances            | `pairwise_distance(qf, gf, "cosine" or "euclidean")`; re-ranking via                  |
|                      | `trainer.kreciprocal.rerank`                                                          |
| for the trainer      | `evaluate_features(qf, gf, query, gallery)` → {"rank1", "rank5", "rank10", "mAP", ...} |

Two queries, two gallery images from the other camera, each query nearest its own identity:

    >>> dist = np.array([[0.1, 0.9], [0.8, 0.2]])
    >>> cmc, mAP = evaluate_rank(dist, np.array([1, 2]), np.array([1, 2]), np.array([0, 0]), np.array([1, 1]))
    >>> float(cmc[0]), float(mAP)
    (1.0, 1.0)

With `Sample`s and features the trainer calls
`evaluate_features(qf, gf, query_samples, gallery_samples, rerank=True)["rank1"]`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from crossview.trainer.kreciprocal import rerank as kreciprocal_rerank

# Query rows handled at once: a few (rows x gallery) int64 arrays live per block.
_BLOCK_CELLS = 4_000_000


@dataclass(frozen=True)
class RankResult:
    """CMC curve (max_rank,), mAP, and how many queries had a valid match (the others were skipped)."""

    cmc: np.ndarray
    mAP: float
    valid_queries: int
    skipped_queries: int = 0

    def rank(self, k: int) -> float:
        """CMC at rank k; past the curve's end (tiny galleries) the last value, every valid query is matched."""
        return float(self.cmc[min(k, len(self.cmc)) - 1])

    def as_dict(self) -> dict[str, float | int]:
        """Plain numbers for logs and JSON."""
        return {"rank1": self.rank(1), "rank5": self.rank(5), "rank10": self.rank(10), "mAP": float(self.mAP),
                "valid_queries": self.valid_queries, "skipped_queries": self.skipped_queries}


def evaluate_rank(distmat, q_pids, g_pids, q_camids, g_camids, max_rank: int = 50) -> tuple[np.ndarray, float]:
    """(cmc float32 (max_rank,), mAP) exactly as torchreid's `evaluate_rank` with the Market-1501 metric.

    max_rank is cut to the gallery size. Raises ValueError when no query has a valid match.
    """
    result = evaluate(distmat, q_pids, g_pids, q_camids, g_camids, max_rank)
    return result.cmc, result.mAP


def evaluate(distmat, q_pids, g_pids, q_camids, g_camids, max_rank: int = 50) -> RankResult:
    """`evaluate_rank` with the counts of valid and skipped queries."""
    distmat = np.asarray(distmat)
    q_pids, g_pids = np.asarray(q_pids), np.asarray(g_pids)
    q_camids, g_camids = np.asarray(q_camids), np.asarray(g_camids)
    num_q, num_g = distmat.shape
    if (len(q_pids), len(q_camids), len(g_pids), len(g_camids)) != (num_q, num_q, num_g, num_g):
        raise ValueError(f"distmat is {distmat.shape} but got {len(q_pids)}/{len(q_camids)} query and "
                         f"{len(g_pids)}/{len(g_camids)} gallery ids/cameras")
    max_rank = min(max_rank, num_g)
    first_counts = np.zeros(max_rank + 1, dtype=np.int64)  # last bin: first match beyond max_rank
    aps = []
    step = max(1, _BLOCK_CELLS // max(num_g, 1))
    for s in range(0, num_q, step):
        first, ap = _rank_block(distmat[s : s + step], q_pids[s : s + step], g_pids, q_camids[s : s + step], g_camids)
        first_counts += np.bincount(np.minimum(first, max_rank), minlength=max_rank + 1)
        aps.append(ap)
    all_ap = np.concatenate(aps) if aps else np.zeros(0)
    valid = len(all_ap)
    if valid == 0:
        raise ValueError("no query has a true match in the gallery outside its own camera")
    cmc = np.cumsum(first_counts[:max_rank]).astype(np.float32) / float(valid)
    return RankResult(cmc, float(np.mean(all_ap)), valid, num_q - valid)


def _rank_block(distmat, q_pids, g_pids, q_camids, g_camids) -> tuple[np.ndarray, np.ndarray]:
    """For the valid queries of a block: 0-based rank of the first true match among the kept gallery, and AP."""
    order = np.argsort(distmat, axis=1)  # the same call torchreid makes, so ties break the same way
    match = g_pids[order] == q_pids[:, None]
    keep = ~(match & (g_camids[order] == q_camids[:, None]))
    good = match & keep
    num_rel = good.sum(axis=1)
    valid = num_rel > 0
    good, keep, num_rel = good[valid], keep[valid], num_rel[valid]
    kept_rank = np.cumsum(keep, axis=1)  # 1-based rank among the kept gallery, at kept positions
    rows = np.arange(len(good))
    first = kept_rank[rows, np.argmax(good, axis=1)] - 1
    precision = np.divide(np.cumsum(good, axis=1), kept_rank, out=np.zeros(good.shape), where=good)
    return first, precision.sum(axis=1) / num_rel


def pairwise_distance(qf: np.ndarray, gf: np.ndarray, metric: str = "cosine") -> np.ndarray:
    """(nq, ng) float32 distances: "cosine" = 1 − cos (features L2-normalised here), "euclidean" = ‖q − g‖."""
    q, g = np.asarray(qf, np.float32), np.asarray(gf, np.float32)
    if metric == "cosine":
        q = q / np.maximum(np.linalg.norm(q, axis=1, keepdims=True), 1e-12)
        g = g / np.maximum(np.linalg.norm(g, axis=1, keepdims=True), 1e-12)
        return (1.0 - q @ g.T).astype(np.float32)
    if metric == "euclidean":
        sq = (q * q).sum(1)[:, None] + (g * g).sum(1)[None, :] - 2.0 * (q @ g.T)
        return np.sqrt(np.maximum(sq, 0.0)).astype(np.float32)
    raise ValueError(f"unknown metric {metric!r}: use 'cosine' or 'euclidean'")


def evaluate_features(
    qf: np.ndarray,
    gf: np.ndarray,
    query: Sequence,
    gallery: Sequence,
    metric: str = "cosine",
    rerank: bool = False,
    k1: int = 20,
    k2: int = 6,
    lambda_value: float = 0.3,
    max_rank: int = 50,
) -> dict[str, float | int]:
    """rank-1/5/10 and mAP of query features against gallery features; `query`/`gallery` are the samples
    (anything with `.pid` and `.camid`). With `rerank`, the k-reciprocal re-ranked distance replaces `metric`."""
    distmat = kreciprocal_rerank(qf, gf, k1, k2, lambda_value) if rerank else pairwise_distance(qf, gf, metric)
    q_pids, q_camids = _ids(query)
    g_pids, g_camids = _ids(gallery)
    return evaluate(distmat, q_pids, g_pids, q_camids, g_camids, max_rank).as_dict()


def _ids(samples: Sequence) -> tuple[np.ndarray, np.ndarray]:
    return (np.array([s.pid for s in samples], dtype=np.int64), np.array([s.camid for s in samples], dtype=np.int64))
