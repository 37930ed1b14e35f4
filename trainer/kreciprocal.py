"""k-reciprocal encoding Jaccard distance (Zhong et al. 2017), sparse: the distance DAAL clusters with DBSCAN.

| what                      | how                                                                            |
|---------------------------|--------------------------------------------------------------------------------|
| features                  | L2-normalised here; d(i, j) = ‖f_i − f_j‖² = 2 − 2 cos, as SpCL/MMT's code       |
| kNN                       | exact, FAISS `IndexFlatIP`; the point itself is rank 0, then its k1 neighbours  |
| k-reciprocal sets R(i, k) | j in i's top k+1 and i in j's top k+1, for all i at once from the kNN table      |
| expansion                 | R(i, k1) ∪ R(c, round(k1/2)) for c in R(i, k1) sharing > 2/3 of it (sparse products) |
| encoding V                | V[i, j] = exp(−d(i, j)) over the expanded set, rows sum to 1 (Gaussian kernel)  |
| query expansion           | V[i] ← mean of V over i's k2 nearest neighbours (a sparse product)              |
| Jaccard                   | J(i, j) = 1 − Σ_k min(V_ik, V_jk) / (2 − Σ_k min(V_ik, V_jk)), by row blocks      |
| result                    | CSR N x N: only pairs sharing support are stored (< 1); absent entries mean 1   |
| re-ranking                | `rerank(q, g)`: (1 − λ) J + λ d on the stacked features, q x g, dense           |

Nothing N x N is ever dense: 13,000 x 256-d features take seconds and a few hundred MB, where the public
code's dense loop takes minutes and several GB. Results equal that dense computation
(tests/reference/kreciprocal_dense.py) to 1e-5.

    jaccard = jaccard_distance(features)              # scipy.sparse.csr_matrix, float32
    final = rerank(query_features, gallery_features)  # (nq, ng) float32
"""

from __future__ import annotations

import faiss
import numpy as np
from scipy import sparse

# Bounds for the blocked Jaccard pass: (row, column) contributions gathered at once, and the dense row block.
_PAIR_BUDGET = 1_000_000
_BLOCK_CELLS = 4_000_000
_DOT_CHUNK = 8_192


def jaccard_distance(features: np.ndarray, k1: int = 20, k2: int = 6) -> sparse.csr_matrix:
    """The k-reciprocal Jaccard distance between all rows of `features` (N, d), as a sparse N x N matrix.

    Stored entries are the pairs whose encodings overlap (distance < 1, the diagonal is 0); an absent
    entry means distance 1. Clustering with a radius below 1 therefore only needs the stored ones.
    """
    x = l2_normalise(features)
    n = len(x)
    if n == 0:
        return sparse.csr_matrix((0, 0), dtype=np.float32)
    if k1 < 1 or k2 < 1:
        raise ValueError(f"k1 and k2 must be >= 1, got k1={k1}, k2={k2}")
    rank = knn_self_first(x, max(k1 + 1, k2))
    k_half = int(np.around(k1 / 2))
    expanded = expanded_sets(reciprocal_sets(rank, k1), reciprocal_sets(rank, k_half))
    v = gaussian_encoding(x, expanded)
    if k2 > 1:
        v = query_expansion(v, rank[:, :k2])
    return sparse_jaccard(v)


def rerank(q: np.ndarray, g: np.ndarray, k1: int = 20, k2: int = 6, lambda_value: float = 0.3) -> np.ndarray:
    """k-reciprocal re-ranking for evaluation: (1 − λ) Jaccard + λ d, query x gallery, float32 (nq, ng).

    The Jaccard part is `jaccard_distance` on the stacked query and gallery features (queries are
    neighbours too, as in Zhong et al.'s code); d is the same ‖q − g‖² of L2-normalised features that
    weights the encoding. Only the (nq, ng) result is dense.
    """
    qn, gn = l2_normalise(q), l2_normalise(g)
    nq = len(qn)
    jac = jaccard_distance(np.vstack([qn, gn]), k1, k2).tocoo()
    inside = (jac.row < nq) & (jac.col >= nq)
    out = np.ones((nq, len(gn)), dtype=np.float32)
    out[jac.row[inside], jac.col[inside] - nq] = jac.data[inside]
    d = np.clip(2.0 - 2.0 * (qn @ gn.T), 0.0, None)
    return ((1.0 - lambda_value) * out + lambda_value * d).astype(np.float32)


def l2_normalise(features: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length (zero rows stay zero), float32 C-contiguous as FAISS wants."""
    x = np.ascontiguousarray(features, dtype=np.float32)
    if x.ndim != 2:
        raise ValueError(f"features must be (N, d), got shape {x.shape}")
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return np.ascontiguousarray(x / np.maximum(norms, 1e-12), dtype=np.float32)


def knn_self_first(x: np.ndarray, k: int) -> np.ndarray:
    """(N, min(k, N)) int64 exact nearest neighbours by inner product, each row's own index first.

    Forcing self to rank 0 keeps duplicates (identical crops) from displacing it, which the dense
    argsort leaves to chance.
    """
    n = len(x)
    index = faiss.IndexFlatIP(x.shape[1])
    index.add(x)
    _, found = index.search(x, min(k + 1, n))
    is_self = found == np.arange(n)[:, None]
    # Non-self neighbours first, in rank order (stable); rows without self just lose their last one.
    others = np.take_along_axis(found, np.argsort(is_self, axis=1, kind="stable"), axis=1)[:, : found.shape[1] - 1]
    return np.hstack([np.arange(n, dtype=np.int64)[:, None], others.astype(np.int64)])[:, : min(k, n)]


def reciprocal_sets(rank: np.ndarray, k: int) -> sparse.csr_matrix:
    """R(i, k) = {j in i's top k+1 : i in j's top k+1} as a 0/1 CSR matrix (row i = the set of i)."""
    n = len(rank)
    top = rank[:, : k + 1]
    back = top[top]  # (N, k+1, k+1): the top lists of i's neighbours
    mutual = (back == np.arange(n)[:, None, None]).any(axis=2)
    rows = np.broadcast_to(np.arange(n)[:, None], top.shape)[mutual]
    return _indicator(rows, top[mutual], n)


def expanded_sets(r_full: sparse.csr_matrix, r_half: sparse.csr_matrix) -> sparse.csr_matrix:
    """R*(i) = R(i, k1) ∪ R(c, k1/2) for every c in R(i, k1) whose half set shares more than 2/3 with R(i, k1).

    The overlap counts |R(c, k1/2) ∩ R(i, k1)| come from one sparse product instead of a loop of
    intersections; the 2/3 test is done in integers (3·overlap > 2·|R(c, k1/2)|).
    """
    overlap = r_full.multiply(r_full @ r_half.T).tocoo()  # at (i, c) with c in R(i, k1)
    half_size = np.diff(r_half.indptr)
    ok = 3 * np.rint(overlap.data).astype(np.int64) > 2 * half_size[overlap.col]
    chosen = _indicator(overlap.row[ok], overlap.col[ok], r_full.shape[0])
    merged = (r_full + chosen @ r_half).tocsr()
    merged.data[:] = 1.0
    return merged


def gaussian_encoding(x: np.ndarray, support: sparse.csr_matrix) -> sparse.csr_matrix:
    """V[i, j] = exp(−‖x_i − x_j‖²) / Σ_j' exp(−‖x_i − x_j'‖²) over each row's support (float64)."""
    support = support.tocsr()
    support.sort_indices()
    rows = np.repeat(np.arange(support.shape[0]), np.diff(support.indptr))
    cols = support.indices
    dots = np.empty(len(cols), dtype=np.float64)
    for s in range(0, len(cols), _DOT_CHUNK):
        r, c = rows[s : s + _DOT_CHUNK], cols[s : s + _DOT_CHUNK]
        dots[s : s + _DOT_CHUNK] = np.einsum("ij,ij->i", x[r].astype(np.float64), x[c].astype(np.float64))
    weight = np.exp(-np.clip(2.0 - 2.0 * dots, 0.0, None))
    weight /= np.add.reduceat(weight, support.indptr[:-1])[rows]
    return sparse.csr_matrix((weight, cols.copy(), support.indptr.copy()), shape=support.shape)


def query_expansion(v: sparse.csr_matrix, neighbours: np.ndarray) -> sparse.csr_matrix:
    """V[i] ← mean of V[j] over j in `neighbours[i]` (i's k2 nearest, itself included)."""
    n, k2 = neighbours.shape
    rows = np.repeat(np.arange(n), k2)
    mean = sparse.csr_matrix((np.full(n * k2, 1.0 / k2), (rows, neighbours.ravel())), shape=(n, n))
    return (mean @ v).tocsr()


def sparse_jaccard(v: sparse.csr_matrix) -> sparse.csr_matrix:
    """1 − m/(2 − m) with m(i, j) = Σ_k min(V_ik, V_jk), computed only where rows i and j share a column.

    Rows of V sum to 1, so 2 − m is the size of the union. Rows are handled in blocks: each block's
    (row, shared column, other row) triples are gathered through V's columns and summed with bincount.
    """
    v = v.tocsr()
    v.sort_indices()
    n = v.shape[0]
    by_col = v.tocsc()
    col_nnz = np.diff(by_col.indptr)
    entry_rows = np.repeat(np.arange(n), np.diff(v.indptr))
    row_work = np.cumsum(np.bincount(entry_rows, weights=col_nnz[v.indices], minlength=n))  # pairs gathered
    max_rows = max(1, _BLOCK_CELLS // n)
    cols, dists, row_nnz = [], [], []
    start = 0
    while start < n:
        before = row_work[start - 1] if start else 0.0
        stop = int(np.searchsorted(row_work, before + _PAIR_BUDGET, side="right"))
        stop = min(max(stop, start + 1), start + max_rows, n)
        c, d, counts = _block_jaccard(v, by_col, col_nnz, start, stop)
        cols.append(c)
        dists.append(d)
        row_nnz.append(counts)
        start = stop
    indptr = np.concatenate([[0], np.cumsum(np.concatenate(row_nnz))])
    return sparse.csr_matrix((np.concatenate(dists), np.concatenate(cols), indptr), shape=(n, n))


def _indicator(rows: np.ndarray, cols: np.ndarray, n: int) -> sparse.csr_matrix:
    """A 0/1 float CSR matrix with ones at (rows, cols); duplicates collapse to one."""
    m = sparse.csr_matrix((np.ones(len(rows)), (rows, cols)), shape=(n, n))
    m.data[:] = 1.0
    return m


def _block_jaccard(v: sparse.csr_matrix, by_col: sparse.csc_matrix, col_nnz: np.ndarray, start: int, stop: int):
    """Rows start..stop−1 of the Jaccard matrix: (int32 columns, float32 distances, entries per row).

    Only pairs with m > 0 are returned, columns ascending within a row, 8 bytes an entry.
    """
    n = v.shape[0]
    lo, hi = v.indptr[start], v.indptr[stop]
    entry_rows = np.repeat(np.arange(stop - start), np.diff(v.indptr[start : stop + 1]))
    entry_cols = v.indices[lo:hi]
    counts = col_nnz[entry_cols]
    # Positions in the CSC arrays of every (entry of these rows, other row sharing its column) pair.
    pos = np.repeat(by_col.indptr[entry_cols] - np.cumsum(counts) + counts, counts) + np.arange(int(counts.sum()))
    mins = np.minimum(np.repeat(v.data[lo:hi], counts), by_col.data[pos])
    keys = np.repeat(entry_rows * n, counts) + by_col.indices[pos]
    m = np.bincount(keys, weights=mins, minlength=(stop - start) * n)
    flat = np.flatnonzero(m)
    m = m[flat]
    dist = np.clip(1.0 - m / (2.0 - m), 0.0, 1.0).astype(np.float32)
    return (flat % n).astype(np.int32), dist, np.bincount(flat // n, minlength=stop - start)
