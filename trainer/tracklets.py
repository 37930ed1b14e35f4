"""Pseudo labels over tracklets: a site's tracker ids as within-camera identities, its frames as negatives.

| step                  | how                                                                              |
|-----------------------|----------------------------------------------------------------------------------|
| tracklets             | `tracklets_of(cams, tracks, frames)`: crops of one (camera, track), in frame order; a crop without a track is its own |
| tracker swaps         | `split_at_swaps`: cut a tracklet where the mean embeddings before and after a point differ most (binary segmentation), while they differ by more than the site's own `swap_threshold`: Youden's J between its tracklets' best cuts and co-occurring pairs laid end to end (a swap made on purpose) |
| co-occurrence         | `cooccurring(segments)`: pairs of segments of one camera whose frame spans overlap: two people |
| distance              | `trainer.kreciprocal.jaccard_distance` of the segments' mean embeddings; co-occurring pairs set to 1 |
| radius                | `eps_from_profile`: Otsu's threshold on every segment's k-NN Jaccard distances (absent = 1): the valley between "same person" and "someone else"; or `eps_from_tracklets` (`eps_by_halves`): segments cut into `halves`, the radius that best tells two halves of one tracklet (one person) from co-occurring ones (two people) |
| clusters              | DBSCAN with each segment weighted by its crop count (a tracklet of M crops is a core point alone), then `separate_cannot_links` re-links a cluster that joined co-occurring segments closest pairs first, never across a co-occurrence |
| one call              | `tracklet_labels(features, cams, tracks, frames, ...)` → `TrackletLabels` (per crop) |

Unlike single-crop clustering, a person seen once by the tracker is one point however many crops it
left, so the clusters count people rather than poses, and DBSCAN's radius is read off the tracklets'
own neighbour distances instead of a fixed share of all pairs (DAAL's p over-splits small sites).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from scipy import sparse
from sklearn.cluster import DBSCAN

from crossview.trainer.kreciprocal import jaccard_distance, l2_normalise

log = logging.getLogger("crossview.trainer")


@dataclass
class TrackletLabels:
    """One clustering of the target by tracklet segments; every field is a constructor argument (checkpointable)."""

    labels: np.ndarray  # (N crops,) int64 cluster, -1 = outlier
    segments: np.ndarray  # (N crops,) int64 segment of each crop (a tracklet, or one piece of a split one)
    cannot_link: np.ndarray  # (M, 2) int64 pairs of co-occurring segments
    n_clusters: int
    n_segments: int
    n_splits: int  # cuts made at appearance jumps
    eps: float


def tracklets_of(cams: np.ndarray, tracks: np.ndarray, frames: np.ndarray) -> list[np.ndarray]:
    """Crop indices of each tracklet, in frame order: one per (camera, track >= 0), one per crop without a track."""
    cams, tracks, frames = (np.asarray(a, np.int64) for a in (cams, tracks, frames))
    known = np.flatnonzero(tracks >= 0)
    order = known[np.lexsort((frames[known], tracks[known], cams[known]))]
    keys = np.stack([cams[order], tracks[order]], 1)
    starts = np.flatnonzero(np.r_[True, (keys[1:] != keys[:-1]).any(1)]) if len(order) else np.zeros(0, np.int64)
    groups = np.split(order, starts[1:]) if len(order) else []
    return groups + [np.array([i]) for i in np.flatnonzero(tracks < 0)]


def cut_distances(features: np.ndarray, min_side: int) -> tuple[np.ndarray, np.ndarray]:
    """(cuts, distances): for each cut c with at least `min_side` crops either side, the cosine distance between the
    mean embedding of the crops before c and that of the crops from c on (a swap shows as one person, then another)."""
    x = np.asarray(features, np.float64)
    n = len(x)
    cuts = np.arange(min_side, n - min_side + 1)
    csum = np.vstack([np.zeros((1, x.shape[1])), np.cumsum(x, 0)])
    before = l2_normalise(csum[cuts].astype(np.float32))
    after = l2_normalise((csum[n] - csum[cuts]).astype(np.float32))
    return cuts, 1.0 - np.einsum("ij,ij->i", before, after)


def best_cut(features: np.ndarray, min_side: int) -> tuple[float, int | None]:
    """The cut whose two sides differ most, and that distance; (0, None) when too short for two sides."""
    cuts, d = cut_distances(features, min_side)
    if not len(cuts):
        return 0.0, None
    i = int(np.argmax(d))
    return float(d[i]), int(cuts[i])


def swap_threshold(features: np.ndarray, tracklets: list[np.ndarray], pairs: np.ndarray, min_side: int,
                   max_pairs: int = 2000) -> float | None:
    """The site's own line between one person and a swap: the best-cut distance that best tells the site's tracklets
    (nearly all one person) from co-occurring pairs laid end to end (two people, as a swap joins them), by Youden's J.
    Both sides go through the same `best_cut`, so its bias (the largest of many cuts) is the same on each. None
    without both kinds (no pair co-occurs, or no tracklet is long enough)."""
    whole = [best_cut(features[t], min_side)[0] for t in tracklets if len(t) >= 2 * min_side]
    pairs = [(i, j) for i, j in pairs if len(tracklets[i]) >= min_side and len(tracklets[j]) >= min_side]
    if len(pairs) > max_pairs:  # a crowded site: a fixed sample bounds the cost
        pairs = [pairs[k] for k in np.random.default_rng(0).choice(len(pairs), max_pairs, replace=False)]
    joined = [best_cut(features[np.r_[tracklets[i], tracklets[j]]], min_side)[0] for i, j in pairs]
    return youden_threshold(np.array(whole), np.array(joined)) if whole and joined else None


def split_at_swaps(features: np.ndarray, tracklets: list[np.ndarray], pairs: np.ndarray,
                   min_side: int) -> tuple[list[np.ndarray], int]:
    """(segments, cuts): each tracklet cut at its `best_cut` while the two sides differ by more than `swap_threshold`
    (binary segmentation: each side is tried again), no piece shorter than `min_side`. `pairs` are the co-occurring
    tracklets the threshold is learnt from; without them nothing is cut."""
    threshold = swap_threshold(features, tracklets, pairs, min_side)
    if threshold is None:
        log.info("tracker swaps: no co-occurring tracklets to learn a threshold from; no tracklet is cut")
        return tracklets, 0
    segments, todo = [], list(reversed(tracklets))
    while todo:
        t = todo.pop()
        distance, cut = best_cut(features[t], min_side)
        if cut is None or distance <= threshold:
            segments.append(t)
        else:
            todo += [t[cut:], t[:cut]]  # the earlier side first: segments stay in tracklet and frame order
    return segments, len(segments) - len(tracklets)


def cooccurring(cams: np.ndarray, frames: np.ndarray, segments: list[np.ndarray]) -> np.ndarray:
    """(M, 2) pairs i < j of segments of one camera whose frame spans [first, last] overlap; frame -1 never overlaps."""
    seg_cam = np.array([cams[s[0]] for s in segments], np.int64)
    first = np.array([frames[s].min() for s in segments], np.int64)
    last = np.array([frames[s].max() for s in segments], np.int64)
    pairs = []
    for cam in np.unique(seg_cam):
        idx = np.flatnonzero((seg_cam == cam) & (first >= 0))
        idx = idx[np.argsort(first[idx], kind="stable")]
        # Sorted by start: i's overlapping successors are those starting no later than i ends.
        reach = np.searchsorted(first[idx], last[idx], side="right")
        for a in range(len(idx)):
            pairs += [(min(idx[a], idx[b]), max(idx[a], idx[b])) for b in range(a + 1, reach[a])]
    return np.array(pairs, np.int64).reshape(-1, 2)


def eps_from_profile(dist: sparse.csr_matrix, k: int) -> float:
    """DBSCAN's radius from the target's own k-NN distance profile: pool every point's k nearest distances (absent
    entries are 1) and take Otsu's threshold, the cut with the largest between-class variance, between the near
    ones (the same person) and the far ones."""
    n = dist.shape[0]
    k = max(1, min(k, n - 1))
    profile = np.ones((n, k))
    for i in range(n):
        row = dist.getrow(i)
        d = np.sort(row.data[row.indices != i])[:k]
        profile[i, : len(d)] = d
    return otsu_threshold(profile.ravel())


def otsu_threshold(values: np.ndarray) -> float:
    """The midpoint between the two sorted neighbours where splitting `values` maximises the between-class variance."""
    v = np.sort(np.asarray(values, np.float64))
    if v[0] == v[-1]:
        return float(v[0])
    n = len(v)
    below = np.arange(1, n)
    csum = np.cumsum(v)[:-1]
    mean_lo, mean_hi = csum / below, (v.sum() - csum) / (n - below)
    score = below * (n - below) * (mean_hi - mean_lo) ** 2
    score[v[1:] == v[:-1]] = -1  # a threshold must fall between two different values
    i = int(np.argmax(score))
    return float((v[i] + v[i + 1]) / 2)


def halves(segments: list[np.ndarray], min_crops: int) -> tuple[list[np.ndarray], np.ndarray]:
    """(pieces, sibling pairs): every segment of at least 2·`min_crops` crops cut in time into its earlier and later
    half, the others kept whole; the pairs (i, i+1) of pieces that are two halves of one segment."""
    pieces, siblings = [], []
    for s in segments:
        if len(s) >= 2 * min_crops:
            siblings.append((len(pieces), len(pieces) + 1))
            pieces += np.array_split(s, 2)
        else:
            pieces.append(s)
    return pieces, np.array(siblings, np.int64).reshape(-1, 2)


def pair_distances(dist: sparse.csr_matrix, pairs: np.ndarray) -> np.ndarray:
    """dist[i, j] for each pair, 1 where the entry is absent (a stored 0 is a real 0: identical encodings)."""
    out = np.ones(len(pairs))
    for n, (i, j) in enumerate(pairs):
        lo, hi = dist.indptr[i], dist.indptr[i + 1]
        hit = np.flatnonzero(dist.indices[lo:hi] == j)
        if len(hit):
            out[n] = dist.data[lo + hit[0]]
    return out


def eps_from_tracklets(dist: sparse.csr_matrix, same: np.ndarray, different: np.ndarray) -> float | None:
    """DBSCAN's radius from the site's own labels: the distance that best tells the two halves of one tracklet (one
    person) from co-occurring tracklets (two people), by `youden_threshold`. None without pairs of both kinds: the
    caller falls back to the k-NN profile."""
    if not len(same) or not len(different):
        return None
    return youden_threshold(pair_distances(dist, same), pair_distances(dist, different), ceiling=1.0)


def youden_threshold(within: np.ndarray, across: np.ndarray, ceiling: float | None = None) -> float:
    """The distance that best separates `within` (one person) from `across` (two people) by Youden's J, the share of
    `within` at or below it minus the share of `across`, largest; midway to the next distance seen (to `ceiling`, or
    just above, past the last)."""
    cuts = np.unique(np.concatenate([within, across]))
    j = (within[None, :] <= cuts[:, None]).mean(1) - (across[None, :] <= cuts[:, None]).mean(1)
    best = int(np.argmax(j))
    nxt = cuts[best + 1] if best + 1 < len(cuts) else (ceiling if ceiling is not None else cuts[best])
    return float((cuts[best] + nxt) / 2)


def separate_cannot_links(labels: np.ndarray, dist: sparse.csr_matrix, eps: float, conflicts: np.ndarray) -> np.ndarray:
    """`labels` with every cluster holding a co-occurring pair re-linked: its members' links within `eps`, closest
    first, joined unless that would put two co-occurring segments in one cluster (union-find with cannot-links)."""
    labels = labels.copy()
    bad = {labels[i] for i, j in conflicts if labels[i] >= 0 and labels[i] == labels[j]}
    partner: dict[int, set[int]] = {}
    for i, j in conflicts:
        partner.setdefault(int(i), set()).add(int(j))
        partner.setdefault(int(j), set()).add(int(i))
    next_label = int(labels.max()) + 1 if len(labels) else 0
    coo = dist.tocoo()
    for c in sorted(bad):
        members = set(np.flatnonzero(labels == c).tolist())
        keep = (coo.row < coo.col) & (coo.data <= eps) & np.isin(coo.row, list(members)) & np.isin(coo.col, list(members))
        root = {m: m for m in members}
        group = {m: {m} for m in members}
        for a, b, _ in sorted(zip(coo.row[keep], coo.col[keep], coo.data[keep]), key=lambda e: e[2]):
            ra, rb = _find(root, int(a)), _find(root, int(b))
            if ra == rb or any(partner.get(m, set()) & group[rb] for m in group[ra]):
                continue
            root[rb] = ra
            group[ra] |= group.pop(rb)
        for g in group.values():
            labels[list(g)] = next_label
            next_label += 1
    return _renumber(labels)


def _find(root: dict[int, int], m: int) -> int:
    while root[m] != m:
        root[m] = root[root[m]]
        m = root[m]
    return m


def _renumber(labels: np.ndarray) -> np.ndarray:
    """Cluster ids 0..K-1 in order of first appearance, -1 kept."""
    out = np.full(len(labels), -1, np.int64)
    inside = labels >= 0
    _, first = np.unique(labels[inside], return_inverse=True)
    out[inside] = first
    return out


def tracklet_labels(features: np.ndarray, cams: np.ndarray, tracks: np.ndarray, frames: np.ndarray, *,
                    k1: int = 20, k2: int = 6, min_crops: int = 4, split: bool = True, cannot_link: bool = True,
                    eps_k: int = 5,
                    eps_by_halves: bool = False,
                    eps_rule: Callable[[sparse.csr_matrix], float] | None = None) -> TrackletLabels:
    """Cluster the target's crops by tracklet segment (see the module table); `eps_rule(distance)` gives the radius,
    by default `eps_from_profile` with `eps_k`. With `eps_by_halves` the points are the segments' `halves` and the
    radius is `eps_from_tracklets` (the profile where the site gives no pairs of both kinds).

    Segments with fewer than `min_crops` crops in all their cluster are outliers (-1), as DBSCAN's noise."""
    features = l2_normalise(np.asarray(features, np.float32))
    cams, frames = np.asarray(cams, np.int64), np.asarray(frames, np.int64)
    segments, cuts = tracklets_of(cams, tracks, frames), 0
    if split:
        segments, cuts = split_at_swaps(features, segments, cooccurring(cams, frames, segments), min_crops)
    siblings = np.zeros((0, 2), np.int64)
    if eps_by_halves:
        segments, siblings = halves(segments, min_crops)
    co = cooccurring(cams, frames, segments)
    conflicts = co if cannot_link else np.zeros((0, 2), np.int64)
    means = l2_normalise(np.stack([features[s].mean(0) for s in segments]))
    dist = jaccard_distance(means, min(k1, len(means) - 1) or 1, k2)
    radius = eps_from_tracklets(dist, siblings, co) if eps_by_halves else None  # before co-occurring pairs are set to 1
    dist = dist.tolil()
    for i, j in conflicts:  # "absent" is 1; a stored 1 also keeps the pair out of every eps-neighbourhood
        dist[i, j] = dist[j, i] = 1.0
    dist = dist.tocsr()
    if radius is None:
        radius = eps_rule(dist) if eps_rule is not None else eps_from_profile(dist, eps_k)
    radius = min(radius, 1 - 1e-6)
    sizes = np.array([len(s) for s in segments], np.float64)
    seg_labels = DBSCAN(eps=radius, min_samples=min_crops, metric="precomputed").fit_predict(dist, sample_weight=sizes)
    seg_labels = separate_cannot_links(seg_labels.astype(np.int64), dist, radius, conflicts)
    # A re-linked piece may be too small to stand alone: DBSCAN's own rule, applied after the repair.
    weight = np.bincount(seg_labels[seg_labels >= 0], weights=sizes[seg_labels >= 0]) if (seg_labels >= 0).any() else []
    seg_labels = _renumber(np.where((seg_labels >= 0) & (np.take(weight, seg_labels.clip(0)) >= min_crops), seg_labels, -1))
    crop_segment = np.empty(len(features), np.int64)
    for i, s in enumerate(segments):
        crop_segment[s] = i
    labels = seg_labels[crop_segment]
    n_clusters = int(labels.max()) + 1 if len(labels) and labels.max() >= 0 else 0
    log.info("tracklet pseudo labels: %d crops, %d segments (%d cuts), %d co-occurring pairs, eps %.4f -> %d clusters, "
             "%.1f%% outliers", len(labels), len(segments), cuts, len(conflicts), radius, n_clusters,
             100 * float(np.mean(labels < 0)))
    return TrackletLabels(labels, crop_segment, conflicts, n_clusters, len(segments), cuts, float(radius))
