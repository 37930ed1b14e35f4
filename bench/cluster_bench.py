"""Trainer benchmark: DAAL's pseudo labels (k-reciprocal Jaccard distance + DBSCAN) at N target features.

    python bench/cluster_bench.py [--sizes 1000 5000 13000] [--dim 256] [--dense-sizes 1000 5000] [--out docs/benchmarks.md]

| part    | what is measured                                                                                  |
|---------|---------------------------------------------------------------------------------------------------|
| sparse  | `trainer.kreciprocal.jaccard_distance` (k1 20, k2 6), `eps_from_percentile`, `dbscan_labels`        |
|         | (min_samples 4), then centres and DAAL soft labels: what `cluster(method="dbscan", soft=True)`      |
|         | does, stage by stage; seconds (median of --repeats) and peak RSS                                   |
| dense   | the public code's computation (tests/reference/kreciprocal_dense.py: N x N distances, argsort,     |
|         | per-sample loops, dense V and Jaccard), UDAP's dense eps and sklearn DBSCAN on the dense matrix,  |
|         | at --dense-sizes; the ratio to the sparse median, and max |sparse − dense| of the distances        |
| k-means | DAAM's `kmeans_labels` (k-means++, K = N/20) at each size                                          |

Every measurement runs in a fresh Python process (peak RSS = its `ru_maxrss`, so peaks do not mix; the
process's own start-up, numpy/FAISS/sklearn and the features are included, "RSS before" shows that part).
Data: N/20 identities (sizes drawn from a gamma distribution) as noisy clusters on the unit sphere, each
sample also shifted by one of 6 shared camera directions (cameras make strangers look alike), plus 5%
uniform distractors; 87% of a sample's 20 nearest neighbours share its identity. p is the planted share of
same-identity pairs (0.0020 at 13,000, close to UDAP's 0.0016 on Market-1501). The machine may be shared:
the load average is recorded at the start and end, and "other load" is the CPU other processes used during
each measurement (/proc/stat minus this process tree), in cores of the 2.
"""

from __future__ import annotations

import argparse
import datetime
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

from docsection import machine, write_section
from otherload import OtherLoad

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

import numpy as np  # noqa: E402

SECTION = "## Trainer: k-reciprocal + clustering (bench/cluster_bench.py)"
PER_ID = 20
NOISE = 1.0  # noise norm relative to the unit identity direction
CAMERA_BIAS = 0.4
CAMERAS = 6
DISTRACTORS = 0.05
K1, K2, MIN_SAMPLES = 20, 6, 4


# ------------------------------------------------------------------ data


def features(n: int, dim: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(n, dim) float32 unit vectors and their planted identities (−1 = distractor)."""
    rng = np.random.default_rng(seed)
    n_out = int(n * DISTRACTORS)
    n_in, n_ids = n - n_out, max(1, n // PER_ID)
    ids = _unit(rng.normal(size=(n_ids, dim)))
    cams = _unit(rng.normal(size=(CAMERAS, dim)))
    size = rng.gamma(2.0, 1.0, n_ids)
    label = rng.choice(n_ids, n_in, p=size / size.sum())
    x = ids[label] + CAMERA_BIAS * cams[rng.integers(0, CAMERAS, n_in)] + NOISE * rng.normal(size=(n_in, dim)) / np.sqrt(dim)
    x = np.vstack([x, rng.normal(size=(n_out, dim))])
    return _unit(x).astype(np.float32), np.concatenate([label, np.full(n_out, -1)])


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def same_identity_share(labels: np.ndarray) -> float:
    """Share of all pairs that are the same planted identity: the p that fits this data."""
    counts = np.bincount(labels[labels >= 0])
    n = len(labels)
    return float((counts * (counts - 1) / 2).sum() / (n * (n - 1) / 2))


# ------------------------------------------------------------------ workers (one fresh process each)


def peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def work_sparse(n: int, dim: int) -> dict:
    from crossview.trainer.clustering import centers_of, daal_soft_labels, dbscan_labels, eps_from_percentile, nmi
    from crossview.trainer.kreciprocal import jaccard_distance

    x, truth = features(n, dim)
    p = same_identity_share(truth)
    before = peak_mb()
    t = [time.perf_counter()]
    dist = jaccard_distance(x, K1, K2)
    t.append(time.perf_counter())
    eps = eps_from_percentile(dist, p)
    t.append(time.perf_counter())
    labels = dbscan_labels(dist, eps, MIN_SAMPLES)
    t.append(time.perf_counter())
    soft = daal_soft_labels(x, labels, centers_of(x, labels))
    t.append(time.perf_counter())
    stages = np.diff(t)
    return {"jaccard": stages[0], "eps": stages[1], "dbscan": stages[2], "soft": stages[3], "total": t[-1] - t[0],
            "rss_before": before, "peak": peak_mb(), "nnz_row": dist.nnz / n, "p": p, "eps_value": eps,
            "clusters": int(labels.max()) + 1, "outliers": float(np.mean(labels < 0)), "nmi": nmi(truth, labels),
            "soft_shape": list(soft.shape)}


def work_dense(n: int, dim: int) -> dict:
    from reference.kreciprocal_dense import dense_jaccard
    from sklearn.cluster import DBSCAN

    from crossview.trainer.kreciprocal import jaccard_distance

    x, truth = features(n, dim)
    p = same_identity_share(truth)
    before = peak_mb()
    t = [time.perf_counter()]
    dist = dense_jaccard(x, K1, K2)
    t.append(time.perf_counter())
    upper = np.sort(dist[np.triu_indices(n, 1)])  # UDAP: upper triangle, sorted, mean of the first round(p·len)
    eps = upper[: int(np.round(p * len(upper)))].mean()
    del upper
    t.append(time.perf_counter())
    labels = DBSCAN(eps=eps, min_samples=MIN_SAMPLES, metric="precomputed").fit_predict(dist)
    t.append(time.perf_counter())
    peak = peak_mb()
    sparse = jaccard_distance(x, K1, K2).tocoo()
    filled = np.ones_like(dist)
    filled[sparse.row, sparse.col] = sparse.data
    stages = np.diff(t)
    return {"jaccard": stages[0], "eps": stages[1], "dbscan": stages[2], "total": t[-1] - t[0], "rss_before": before,
            "peak": peak, "clusters": int(labels.max()) + 1, "max_diff": float(np.abs(filled - dist).max())}


def work_kmeans(n: int, dim: int) -> dict:
    from crossview.trainer.clustering import kmeans_labels, nmi

    x, truth = features(n, dim)
    k = max(2, n // PER_ID)
    before = peak_mb()
    t0 = time.perf_counter()
    labels, _ = kmeans_labels(x, k, seed=0)
    return {"total": time.perf_counter() - t0, "k": k, "rss_before": before, "peak": peak_mb(), "nmi": nmi(truth, labels)}


WORKERS = {"sparse": work_sparse, "dense": work_dense, "kmeans": work_kmeans}


# ------------------------------------------------------------------ driver


def measure(kind: str, n: int, dim: int) -> dict:
    """One worker in a fresh interpreter; its JSON result plus the other processes' CPU use meanwhile."""
    with OtherLoad() as load:
        proc = subprocess.run([sys.executable, __file__, "--worker", kind, "--n", str(n), "--dim", str(dim)],
                              capture_output=True, text=True, check=True)
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result["other"] = load.cores
    print(f"  {kind:6s} N={n:>6,}: {result['total']:.2f} s, peak {result['peak']:.0f} MB, other load {load.cores:.2f}",
          file=sys.stderr, flush=True)
    return result


def run(sizes: list[int], dense_sizes: list[int], dim: int, repeats: int) -> dict:
    r: dict = {"load_start": _loadavg(), "sizes": {}}
    for n in sizes:
        row = {"sparse": [measure("sparse", n, dim) for _ in range(repeats)], "kmeans": measure("kmeans", n, dim)}
        if n in dense_sizes:
            row["dense"] = measure("dense", n, dim)
        r["sizes"][n] = row
    r["load_end"] = _loadavg()
    return r


def _loadavg() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def versions() -> tuple[str, ...]:
    import faiss
    import scipy
    import sklearn

    return (f"numpy {np.__version__}", f"scipy {scipy.__version__}", f"scikit-learn {sklearn.__version__}",
            f"faiss {faiss.__version__}")


def report(r: dict, command: str, minutes: float, dim: int, repeats: int) -> str:
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    lines = [
        SECTION, "",
        f"`{command}`, {now}, {minutes:.0f} min.", "",
        f"- {machine(*versions())}",
        f"- Load average {r['load_start']} at the start, {r['load_end']} at the end (other sessions' tests and benchmarks "
        "share the 2 cores); \"other load\" is their CPU use during the measurement, in cores.",
        f"- {dim}-d features, N/{PER_ID} planted identities + {DISTRACTORS:.0%} distractors (see the script's docstring); "
        f"k1 {K1}, k2 {K2}, min_samples {MIN_SAMPLES}, p = the planted same-identity pair share. Each measurement is a fresh "
        f"process; sparse times are the median of {repeats} runs (the peak is their maximum).", "",
        "### k-reciprocal Jaccard + DBSCAN (`cluster(method=\"dbscan\")`)", "",
        "| N | Jaccard s | eps s | DBSCAN s | centres + soft labels s | **total s** | runs (total s) | peak RSS MB | "
        "RSS before MB | stored / row | clusters | outliers | NMI vs planted | other load (cores) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for n, row in r["sizes"].items():
        runs = row["sparse"]
        med = {k: statistics.median(x[k] for x in runs) for k in ("jaccard", "eps", "dbscan", "soft", "total")}
        s = runs[0]
        lines.append(
            f"| {n:,} | {med['jaccard']:.2f} | {med['eps']:.3f} | {med['dbscan']:.2f} | {med['soft']:.2f} | **{med['total']:.2f}** | "
            f"{' / '.join(format(x['total'], '.1f') for x in runs)} | **{max(x['peak'] for x in runs):,.0f}** | {s['rss_before']:,.0f} | "
            f"{s['nnz_row']:.0f} | {s['clusters']:,} | {s['outliers']:.1%} | {s['nmi']:.3f} | "
            f"{statistics.mean(x['other'] for x in runs):.2f} |")
    dense_rows = [(n, row) for n, row in r["sizes"].items() if "dense" in row]
    if dense_rows:
        lines += ["", "### Against the dense reference computation (same data, same run)", "",
                  "| N | dense Jaccard s | dense eps s | dense DBSCAN s | **dense total s** | sparse total s (median) | "
                  "**dense / sparse** | dense peak RSS MB | sparse peak RSS MB | max abs difference | other load (cores) |",
                  "|---|---|---|---|---|---|---|---|---|---|---|"]
        for n, row in dense_rows:
            d = row["dense"]
            sparse_total = statistics.median(x["total"] - x["soft"] for x in row["sparse"])
            sparse_peak = max(x["peak"] for x in row["sparse"])
            lines.append(f"| {n:,} | {d['jaccard']:.2f} | {d['eps']:.3f} | {d['dbscan']:.2f} | **{d['total']:.1f}** | "
                         f"{sparse_total:.2f} | **{d['total'] / sparse_total:.0f}x** | {d['peak']:,.0f} | {sparse_peak:,.0f} | "
                         f"{d['max_diff']:.1e} | {d['other']:.2f} |")
        lines += ["", "Sparse total here is Jaccard + eps + DBSCAN (without the soft labels), what the dense column times. The dense "
                  "reference is tests/reference/kreciprocal_dense.py: the public code's algorithm (Zhong et al.'s `re_ranking`, "
                  "SpCL's `compute_jaccard_distance`) in numpy float64 with a full argsort; the public code itself, quoted at "
                  "about 200 s for 13,000 on CPU, is not run here."]
    lines += ["", "### k-means++ (DAAM, `kmeans_labels`, K = N/20)", "",
              "| N | K | seconds | peak RSS MB | NMI vs planted | other load (cores) |", "|---|---|---|---|---|---|"]
    for n, row in r["sizes"].items():
        k = row["kmeans"]
        lines.append(f"| {n:,} | {k['k']:,} | **{k['total']:.1f}** | {k['peak']:,.0f} | {k['nmi']:.3f} | {k['other']:.2f} |")
    big = max(r["sizes"])
    runs = r["sizes"][big]["sparse"]
    total, peak = statistics.median(x["total"] for x in runs), max(x["peak"] for x in runs)
    lines += ["", "### Targets", "", "| target | measured | result |", "|---|---|---|",
              f"| {big:,} features clustered (Jaccard + DBSCAN + soft labels) ≤ 60 s | {total:.1f} s | "
              f"**{'met' if total <= 60 else 'missed'}** |",
              f"| the same ≤ 4 GB peak RSS | {peak / 1024:.2f} GB | **{'met' if peak <= 4096 else 'missed'}** |"]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[1000, 5000, 13000])
    ap.add_argument("--dim", type=int, default=256)
    ap.add_argument("--dense-sizes", type=int, nargs="*", default=[1000, 5000],
                    help="sizes at which the dense reference also runs (O(N²) memory, minutes at 5000)")
    ap.add_argument("--repeats", type=int, default=3, help="sparse runs per size (fresh process each)")
    ap.add_argument("--out", type=Path, default=None, help="markdown file whose section is replaced")
    ap.add_argument("--worker", choices=sorted(WORKERS), help=argparse.SUPPRESS)
    ap.add_argument("--n", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(WORKERS[args.worker](args.n, args.dim), default=float))
        return
    t0 = time.time()
    results = run(args.sizes, args.dense_sizes, args.dim, args.repeats)
    command = "python " + " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]])
    text = report(results, command, (time.time() - t0) / 60, args.dim, args.repeats)
    print(text)
    if args.out:
        write_section(args.out, SECTION, text)


if __name__ == "__main__":
    main()
