"""Where Milvus's query tail comes from: latencies of `MilvusIndex.search` by phase, on the `milvus` package's server.

    python bench/milvus_tail.py [--n 200000] [--dim 256] [--queries 300] [--out docs/benchmarks.md]

| phase        | what runs                                                                                  |
|--------------|--------------------------------------------------------------------------------------------|
| ingest       | inserts of 5000 vectors, 3 searches at each consistency level after each: growing segments, |
|              | sealing, index builds                                                                       |
| after insert | searches right after the last insert, while Milvus seals and builds indexes in the background |
| indexed      | after flush and every segment indexed (`wait_for_index_building_complete`): the steady state |

Every phase at the three consistency levels `index.milvus.consistency` offers: Strong, Session, Bounded.

The collection is the matcher's own (`MilvusIndex._create`: camera partition key, IP), IVF_FLAT with nlist
1024 and nprobe 32 as in issue 15; unit vectors, k=10, one query at a time. A thread samples the query nodes'
segments (`utility.get_query_segment_info`) every 0.2 s, so each slow query (over 5x the phase's median) is
shown beside what the segments were doing then. Other processes' CPU use is recorded beside each phase.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from docsection import machine, write_section  # noqa: E402
from otherload import OtherLoad  # noqa: E402

from crossview.kernel.config import IndexConfig  # noqa: E402
from crossview.matcher.milvus_index import Collection, MilvusIndex, collection_name  # noqa: E402

HEADING = "## Milvus query tail (bench/milvus_tail.py)"
CAMERAS = [f"cam-{i}" for i in range(16)]


class Segments(threading.Thread):
    """(t, growing, sealed, sealed rows with an index) of the loaded collection, every 0.2 s."""

    def __init__(self, using: str, name: str):
        super().__init__(daemon=True)
        self.using, self.name, self.samples, self.stop = using, name, [], threading.Event()

    def run(self) -> None:
        from pymilvus import utility

        while not self.stop.wait(0.2):
            try:
                segs = utility.get_query_segment_info(self.name, using=self.using)
            except Exception as e:  # the server is busy: a gap in the samples, said so
                self.samples.append((time.monotonic(), None, None, str(e)[:60]))
                continue
            growing = sum(1 for s in segs if s.state == 2)  # commonpb.SegmentState.Growing
            sealed = [s for s in segs if s.state != 2]
            self.samples.append((time.monotonic(), growing, len(sealed), sum(s.num_rows for s in sealed if s.index_name)))

    def at(self, t: float) -> str:
        before = [s for s in self.samples if s[0] <= t]
        if not before:
            return "no sample yet"
        _, growing, sealed, indexed = before[-1]
        return f"{growing} growing, {sealed} sealed ({indexed} rows indexed)" if growing is not None else f"sample failed: {indexed}"


LEVELS = ("Strong", "Session", "Bounded")


def timed(index: MilvusIndex, queries: np.ndarray, level: str) -> list[tuple[float, float]]:
    """(start, seconds) of each search, as `MilvusIndex.search` makes it, at one consistency level."""
    out = []
    for q in queries:
        t0 = time.monotonic()
        index.client.search(index.partitions["bench"].name, data=[q.tolist()], limit=10, anns_field="vec",
                            search_params=index._search_params(10), consistency_level=level)
        out.append((t0, time.monotonic() - t0))
    return out


def measured(phase: str, index: MilvusIndex, queries: np.ndarray, level: str) -> tuple[str, list, float]:
    with OtherLoad() as load:
        lat = timed(index, queries, level)
    return phase, lat, load.cores


def summary(phase: str, lat: list[tuple[float, float]], segs: Segments, load: float) -> tuple[str, list[str]]:
    ms = np.array([d for _, d in lat]) * 1000
    p50, p90, p99 = np.percentile(ms, [50, 90, 99])
    row = f"| {phase} | {len(ms)} | {p50:.1f} | {p90:.1f} | {p99:.1f} | {ms.max():.0f} | {load:.1f} |"
    slow = [f"- {phase}: {d * 1000:.0f} ms at t={t - segs.t0:.1f} s: {segs.at(t)}" for t, d in lat if d * 1000 > 5 * p50]
    return row, slow[:8]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=200000)
    ap.add_argument("--dim", type=int, default=256)
    ap.add_argument("--queries", type=int, default=300)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()

    from milvus import MilvusServer
    from pymilvus import connections, utility

    root = tempfile.mkdtemp(prefix="milvus-bench-")
    server = MilvusServer()
    server.set_base_dir(root)
    t0 = time.monotonic()
    server.start()
    started = time.monotonic() - t0
    uri = f"http://127.0.0.1:{server.listen_port}"
    try:
        cfg = IndexConfig(engine="milvus", milvus={"uri": uri, "index_type": "IVF_FLAT", "nlist": 1024}, nprobe=32)
        index = MilvusIndex(cfg, store=None)
        name = collection_name("bench", "bench")
        index._create(name, "bench", args.dim)
        index.client.load_collection(name)
        index.partitions["bench"] = Collection("bench", args.dim, name)
        connections.connect(alias="bench", uri=uri)
        segs = Segments("bench", name)
        segs.t0 = time.monotonic()
        segs.start()

        rng = np.random.default_rng(0)
        vecs = rng.standard_normal((args.n, args.dim)).astype(np.float32)
        vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
        queries = vecs[rng.choice(args.n, args.queries)] + 0.05 * rng.standard_normal((args.queries, args.dim)).astype(np.float32)
        rows, slow = [], []
        lat: dict[str, list] = {level: [] for level in LEVELS}
        with OtherLoad() as load:
            t = time.monotonic()
            for at in range(0, args.n, 5000):
                index.client.insert(name, [{"id": at + i, "camera": CAMERAS[(at + i) % 16], "vec": v}
                                           for i, v in enumerate(vecs[at: at + 5000].tolist())])
                for level in LEVELS:
                    lat[level] += timed(index, queries[:3], level)
            rate = args.n / (time.monotonic() - t)
        phases = [(f"ingest ({level})", lat[level], load.cores) for level in LEVELS]
        # Right after the last insert the server seals and indexes: Bounded first, as the matcher would search then.
        for level in reversed(LEVELS):
            phases.append(measured(f"after insert ({level})", index, queries, level))
        t = time.monotonic()
        index.client.flush(name)
        utility.wait_for_index_building_complete(name, using="bench", timeout=600)
        built = time.monotonic() - t
        time.sleep(2)  # the query nodes load the built indexes
        for level in LEVELS:
            phases.append(measured(f"indexed ({level})", index, queries, level))
        segs.stop.set()
        for phase, lat, cores in phases:
            row, s = summary(phase, lat, segs, cores)
            rows.append(row)
            slow += s
        index.close()
    finally:
        server.stop()
        shutil.rmtree(root, ignore_errors=True)

    import pymilvus

    text = "\n".join([
        HEADING, "",
        f"`python bench/milvus_tail.py --n {args.n} --dim {args.dim} --queries {args.queries}`, "
        f"{time.strftime('%Y-%m-%d')}; {machine(f'pymilvus {pymilvus.__version__}', 'milvus 2.3.5 (standalone)')}.",
        f"Server started in {started:.1f} s; {args.n} vectors inserted at {rate:,.0f}/s (with the searches between); "
        f"flush and index build {built:.1f} s. IVF_FLAT nlist 1024, nprobe 32, k=10, one query at a time.", "",
        "| phase | queries | p50 ms | p90 ms | p99 ms | max ms | other CPU (cores) |",
        "|---|---|---|---|---|---|---|", *rows, "",
        "Slow queries (over 5x their phase's median) and the segments then:", "", *(slow or ["- none"]), "",
    ])
    print(text)
    if args.out:
        write_section(args.out, HEADING, text)


if __name__ == "__main__":
    main()
