"""Matcher benchmark: 256-d synthetic sightings through the real service, at 1e5 and 1e6 sightings.

    python bench/matcher_bench.py [--sizes 100000 1000000] [--queries 1000] [--out docs/benchmarks.md] [--only ingest]
                                  [--sustained 200000]
    python bench/matcher_bench.py --backend sqlite+faiss postgres+milvus [--sizes 100000] [--queries 300] [--out ...]

| part     | what is measured                                                                            |
|----------|---------------------------------------------------------------------------------------------|
| ingest   | a sender process encodes all its wire messages first (edges encode on their own machines), |
|          | then pushes them over tcp://127.0.0.1 as fast as ZeroMQ takes them; the in-process `Matcher` |
|          | commits each batch to SQLite (WAL, synchronous=FULL) before it counts it, then indexes it;  |
|          | sightings/s from the first to the last accepted. Sustained: 200,000 sightings into an exact |
|          | partition (exact_max raised above that), without and with 4 KB thumbnails, and acknowledged: |
|          | v2 messages with `seq`, deduplicated by the store, each acknowledged after its commit, the   |
|          | sender keeping ACK_WINDOW in flight as an edge does; then the default config from 0 to each |
|          | size, with the rate while a background IVF (re)training runs apart                           |
| queries  | at each size, once background rebuilds are done: latency of the partition search (k=10) and |
|          | of the whole `search_embedding` (over-fetch, SQLite lookups, track grouping), recall@10 of   |
|          | the partition against exact brute force on the stored vectors, and FAISS `IndexFlatIP` one  |
|          | query at a time on the same vectors, in the same run, as the reference; for IVF, the same   |
|          | at other nprobe values                                                                       |
| memory   | process RSS growth and FAISS index bytes per sighting; SQLite bytes per sighting            |
| restart  | `Matcher(cfg)` on the largest data directory: from the final snapshot, and with no snapshot |
| HTTP     | at the largest size, `GET /api/v1/sightings/{id}` one request at a time over 127.0.0.1: on one |
|          | keep-alive connection, and on a fresh connection each                                     |

Data: identities with 50 sightings each (5 cameras x 10-sighting tracks); a sighting is its
identity's random unit vector plus Gaussian noise (cosine to the identity ≈ 0.86), like re-ID
embeddings of one person; queries are fresh noisy views of stored identities.
Other processes' CPU use (/proc/stat minus this process and its sender) is recorded for each measurement.
The results table is printed and replaces the "Matcher (bench/matcher_bench.py)" section of --out
(with `--only ingest`: its ingest subsection only).

With `--backend`: only ingest and queries, for each backend named, on the same sightings and queries, into a fresh
store: SQLite + FAISS (the default config), or PostgreSQL (a throwaway server, `tests/pgserver.py`) + Milvus (the
`milvus` package's standalone server, its default HNSW index and Session consistency), Milvus queried twice: right
after the last insert, and once flushed with every sealed segment indexed. The FAISS-only parts (the nprobe sweep,
the IndexFlatIP reference, index bytes, snapshot restart) and the sustained, memory and HTTP rows are not run; the
table replaces the "Matcher backends" section of --out.
"""

from __future__ import annotations

import argparse
import datetime
import http.client
import logging
import multiprocessing as mp
import os
import re
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import faiss  # noqa: E402
import numpy as np  # noqa: E402
import psutil  # noqa: E402
import zmq  # noqa: E402
from docsection import machine, write_section  # noqa: E402
from otherload import OtherLoad  # noqa: E402

from crossview.kernel.config import IndexConfig, MatcherConfig, parse_config  # noqa: E402
from crossview.kernel.wire import Sighting, decode_ack, encode  # noqa: E402
from crossview.matcher.api import serve  # noqa: E402
from crossview.matcher.query import Filters  # noqa: E402
from crossview.matcher.service import Matcher  # noqa: E402

DIM = 256
PER_ID = 50
NOISE = 0.6  # per-vector noise norm relative to the unit identity vector
MODEL = "bench-256"
NPROBES = (16, 32, 64, 128, 256)
SECTION = "## Matcher (bench/matcher_bench.py)"
INGEST_SECTION = "### Ingest over loopback ZeroMQ"
BACKENDS_SECTION = "## Matcher backends (bench/matcher_bench.py --backend)"
BACKENDS = ("sqlite+faiss", "postgres+milvus")
SUSTAINED = 200_000  # sightings per sustained-ingest row: ~10 s at the 20,000/s target
ACK_WINDOW = 2000  # sightings in flight unacknowledged: an edge's default `publisher.hwm`
log = logging.getLogger("bench")


def centers(n_ids: int) -> np.ndarray:
    v = np.random.default_rng(0).standard_normal((n_ids, DIM)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def noisy(rng: np.random.Generator, base: np.ndarray) -> np.ndarray:
    v = base + NOISE / DIM**0.5 * rng.standard_normal(base.shape, np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def _messages(start: int, stop: int, thumb: bytes | None, ids: np.ndarray, seq: bool) -> list[bytes]:
    """Wire messages of sightings start..stop-1: sighting i is identity i // 50, camera (i // 10) % 5; with `seq`,
    numbered i + 1 for the matcher to deduplicate and acknowledge."""
    rng = np.random.default_rng(start)
    idx = np.arange(start, stop)
    vecs = noisy(rng, ids[idx // PER_ID])
    return [encode(Sighting("bench-edge", f"cam{(i // 10) % 5}", 1.7e9 + i * 0.01, i, i // 10, (10.0, 20.0, 60.0, 180.0),
                            0.9, v, MODEL, thumb, seq=i + 1 if seq else None)) for i, v in zip(idx.tolist(), vecs)]


def _send(endpoint: str, start: int, stop: int, thumb_bytes: int, window: int, acked) -> None:
    """Sender process: encode everything, then send with blocking sends (nothing is dropped). With a `window`,
    at most that many unacknowledged, as an edge's publisher; `acked` gets (acknowledged, seconds first to last ack)."""
    ids = centers((stop + PER_ID - 1) // PER_ID)
    thumb = (b"\xff\xd8" + os.urandom(thumb_bytes - 2)) if thumb_bytes else None
    messages = [m for a in range(start, stop, 20000) for m in _messages(a, min(a + 20000, stop), thumb, ids, window > 0)]
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, -1)
    sock.connect(endpoint)
    if window:
        acked.put(_send_acknowledged(sock, messages, window))
    else:
        for m in messages:
            sock.send(m)
    sock.close()
    ctx.term()


def _send_acknowledged(sock: zmq.Socket, messages: list[bytes], window: int) -> tuple[int, float]:
    sent = done = 0
    first = last = 0.0
    while done < len(messages):
        while sent < len(messages) and sent - done < window:
            sock.send(messages[sent])
            sent += 1
        if sock.poll(5000):
            while True:
                try:
                    done += sum(b - a + 1 for a, b in decode_ack(sock.recv(zmq.NOBLOCK)).ranges)
                except zmq.Again:
                    break
            last = time.perf_counter()
            first = first or last
        else:
            raise RuntimeError(f"no acknowledgement for 5 s: {done} of {len(messages)} acknowledged")
    return done, last - first


def config(data_dir: Path, exact_max: int | None = None, store: dict | None = None, index: dict | None = None) -> MatcherConfig:
    """The bench's matcher config; `store` and `index` entries (another backend's) go over the defaults."""
    index = {"snapshot_interval_s": 3600, **({"exact_max": exact_max} if exact_max else {}), **(index or {})}
    return parse_config({"data_dir": str(data_dir), "http": {"token": "bench-token-0123456789", "port": 0},
                         "ingest": {"endpoint": "tcp://127.0.0.1:*", "security": {"mode": "plain"}},
                         "index": index, "store": store or {}, "metrics": {"log_interval_s": 30}}, MatcherConfig)


def ingest(m: Matcher, start: int, stop: int, thumb_bytes: int = 0, window: int = 0) -> dict:
    """Send sightings start..stop-1 from another process; sightings/s (accepted, so committed) once the first
    one is in, overall and while a partition rebuild (IVF training) runs. With a `window`: acknowledged sending,
    and the sender's own rate, first to last acknowledgement."""
    target = m.ingest.accepted + stop - start
    batches0 = _batch_seconds(m)
    spawn = mp.get_context("spawn")
    acked = spawn.Queue()
    sender = spawn.Process(target=_send, args=(m.ingest.endpoint, start, stop, thumb_bytes, window, acked))
    sender.start()
    while m.ingest.accepted <= target - (stop - start):
        _check(sender, 0.0005)
    me, samples = psutil.Process(), []  # (time, accepted, rebuilding) every 10 ms
    cpu0 = sum(me.cpu_times()[:2])
    with OtherLoad() as other:
        while not samples or samples[-1][1] < target:
            _check(sender, 0.01)
            samples.append((time.perf_counter(), m.ingest.accepted, m.index.rebuilding(MODEL)))
    matcher_cpu = sum(me.cpu_times()[:2]) - cpu0
    n_acked, ack_s = acked.get(timeout=60) if window else (None, None)
    sender.join()
    (t0, n0, _), (t1, n1, _) = samples[0], samples[-1]
    during = [(b[0] - a[0], b[1] - a[1]) for a, b in zip(samples, samples[1:]) if a[2] and b[2]]
    rebuild_s = sum(dt for dt, _ in during)
    batches, batch_s = (b - a for a, b in zip(batches0, _batch_seconds(m)))
    return {"n": stop - start, "rate": (n1 - n0) / (t1 - t0), "seconds": t1 - t0, "batch_ms": 1000 * batch_s / max(batches, 1),
            "rebuild_share": rebuild_s / (t1 - t0), "rebuild_rate": sum(n for _, n in during) / rebuild_s if rebuild_s else None,
            "cpu_us": 1e6 * matcher_cpu / (n1 - n0), "other": other.cores,
            "acked": n_acked, "acked_rate": n_acked / ack_s if window else None}


def _batch_seconds(m: Matcher) -> tuple[float, float]:
    """(batches committed, seconds spent committing and indexing them) since the matcher started."""
    return (m.metrics.value("crossview_matcher_ingest_batch_seconds_count"),
            m.metrics.value("crossview_matcher_ingest_batch_seconds_sum"))


def _check(sender: mp.Process, pause: float) -> None:
    if sender.exitcode not in (None, 0):
        raise RuntimeError(f"sender process failed (exit code {sender.exitcode})")
    time.sleep(pause)


def percentiles(seconds: list[float]) -> tuple[float, float]:
    ms = np.array(seconds) * 1000
    return float(np.percentile(ms, 50)), float(np.percentile(ms, 99))


def _queries(m: Matcher, n_queries: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(stored ids, their vectors, queries, each query's exact top 10 ids in any order): the same for every backend."""
    ids, vecs = m.index.stored_vectors(MODEL)
    order = np.argsort(ids)  # the store's order may differ between backends; the queries' exact answers may not
    ids, vecs = ids[order], vecs[order]
    rng = np.random.default_rng(7)
    queries = noisy(rng, centers(len(ids) // PER_ID)[rng.integers(0, len(ids) // PER_ID, n_queries)])
    chunks = np.array_split(queries, max(1, n_queries // 20))
    exact_ids = ids[np.concatenate([np.argpartition(-(q @ vecs.T), 10, axis=1)[:, :10] for q in chunks])]
    return ids, vecs, queries, exact_ids


def _full_search(m: Matcher, queries: np.ndarray) -> tuple[float, float]:
    """(p50, p99) ms of the whole `search_embedding`, one query at a time."""
    seconds = []
    for q in queries:
        t0 = time.perf_counter()
        m.queries.search_embedding(q, MODEL, Filters(top_k=10))
        seconds.append(time.perf_counter() - t0)
    return percentiles(seconds)


def query_bench(m: Matcher, n_queries: int) -> dict:
    p = m.index.partition(MODEL)
    ids, vecs, queries, exact_ids = _queries(m, n_queries)
    with OtherLoad() as other:
        index_ms, recall = _partition_search(m, queries, exact_ids)
    sweep = {}
    if p.kind == "ivf":  # the same queries at other nprobe values; the configured one is restored
        ivf = faiss.extract_index_ivf(p.index)
        configured = ivf.nprobe
        for nprobe in NPROBES:
            ivf.nprobe = nprobe
            sweep[nprobe] = _partition_search(m, queries, exact_ids)
        ivf.nprobe = configured
    full = _full_search(m, queries)
    flat = faiss.IndexFlatIP(DIM)
    flat.add(vecs)
    flat_s = []
    for q in queries[: min(200, n_queries)]:
        t0 = time.perf_counter()
        flat.search(q[None], 10)
        flat_s.append(time.perf_counter() - t0)
    del flat, vecs
    return {"n": len(ids), "kind": p.kind, "nlist": faiss.extract_index_ivf(p.index).nlist if p.kind == "ivf" else None,
            "index": index_ms, "full": full, "flat": percentiles(flat_s), "recall": recall, "sweep": sweep,
            "other": other.cores,
            "index_bytes": faiss.serialize_index(p.index).nbytes}


def _partition_search(m: Matcher, queries: np.ndarray, exact_ids: np.ndarray) -> tuple[tuple[float, float], float]:
    """((p50, p99) ms, recall@10 against exact_ids) of the partition search, one query at a time."""
    seconds, found = [], []
    for q in queries:
        t0 = time.perf_counter()
        _, got = m.index.search(MODEL, q, 10)
        seconds.append(time.perf_counter() - t0)
        found.append(got)
    recall = float(np.mean([len(set(f.tolist()) & set(e.tolist())) / 10 for f, e in zip(found, exact_ids)]))
    return percentiles(seconds), recall


def http_bench(m: Matcher, n: int = 200) -> dict:
    """(p50, p99) ms of a sighting lookup over the HTTP API: keep-alive (one connection) and fresh (one each)."""
    server = serve(m, m.cfg.http)
    headers = {"Authorization": f"Bearer {m.cfg.http.token}"}
    ids = m.store.older_than(float("inf"), n)

    def timed(conn: http.client.HTTPConnection, sighting_id: int) -> float:
        t0 = time.perf_counter()
        conn.request("GET", f"/api/v1/sightings/{sighting_id}", headers=headers)
        conn.getresponse().read()
        return time.perf_counter() - t0

    try:
        keep = http.client.HTTPConnection(server.host, server.port)
        kept = [timed(keep, i) for i in ids]
        keep.close()
        fresh = []
        for i in ids:
            conn = http.client.HTTPConnection(server.host, server.port)
            fresh.append(timed(conn, i))
            conn.close()
    finally:
        server.stop()
    return {"keep_alive": percentiles(kept), "fresh": percentiles(fresh), "n": len(ids)}


def rss_bytes() -> int:
    return int(re.search(r"VmRSS:\s+(\d+) kB", Path("/proc/self/status").read_text())[1]) * 1024


def store_bytes(data_dir: Path) -> int:
    return sum(f.stat().st_size for f in data_dir.glob("sightings.db*"))


def restart_bench(cfg: MatcherConfig) -> dict:
    t0 = time.perf_counter()
    m = Matcher(cfg)
    from_snapshot = time.perf_counter() - t0
    kind = m.index.partition(MODEL).kind
    m.index.close(timeout=0)
    m.store.close()
    shutil.rmtree(Path(cfg.data_dir) / "index")
    t0 = time.perf_counter()
    m = Matcher(cfg)
    rebuilt = time.perf_counter() - t0
    m.index.close(timeout=600)  # the background IVF retraining this starts, timed separately
    retrain = time.perf_counter() - t0
    m.store.close()
    return {"snapshot_s": from_snapshot, "snapshot_kind": kind, "store_s": rebuilt, "retrain_s": retrain}


def versions() -> tuple[str, ...]:
    return (f"faiss {faiss.__version__}", f"pyzmq {zmq.pyzmq_version()} (libzmq {zmq.zmq_version()})",
            f"SQLite {__import__('sqlite3').sqlite_version}")


def sustained(workdir: Path, n: int, thumb_bytes: int, window: int = 0) -> dict:
    """`n` sightings into a fresh matcher whose partition stays exact (exact_max above it): no IVF training."""
    data = workdir / f"sustained-{thumb_bytes}-{window}"
    m = Matcher(config(data, exact_max=2 * n))
    m.start()
    try:
        result = ingest(m, 0, n, thumb_bytes, window)
    finally:
        m.stop()
    if window and result["acked"] != n:
        raise RuntimeError(f"{result['acked']} of {n} sightings acknowledged")
    result["store_bytes"] = store_bytes(data) / n
    shutil.rmtree(data)
    return result


def run(sizes: list[int], n_queries: int, workdir: Path, only_ingest: bool = False, n_sustained: int = SUSTAINED) -> dict:
    results: dict = {"load_start": Path("/proc/loadavg").read_text().split()[:3]}
    results["sustained"] = [sustained(workdir, n_sustained, 0), sustained(workdir, n_sustained, 4000),
                            sustained(workdir, n_sustained, 0, ACK_WINDOW)]
    results["thumb_store_bytes"] = results["sustained"][1]["store_bytes"]

    data = workdir / "data"
    cfg = config(data)
    rss0 = rss_bytes()
    m = Matcher(cfg)
    m.start()
    results["ingest"], results["queries"], done = [], [], 0
    for size in sorted(sizes):
        log.info("ingesting up to %d sightings", size)
        results["ingest"].append(ingest(m, done, size))
        done = size
        m.index.wait_rebuilds()
        if not only_ingest:
            results["queries"].append(query_bench(m, n_queries))
            log.info("at %d: %s", size, results["queries"][-1])
    results["rss_per_sighting"] = (rss_bytes() - rss0) / done
    if not only_ingest:
        results["http"] = http_bench(m)
    m.stop()
    results["store_bytes"] = store_bytes(data) / done
    if not only_ingest:
        results["restart"] = restart_bench(cfg)
    results["load_end"] = Path("/proc/loadavg").read_text().split()[:3]
    return results


@contextmanager
def backend_sections(backend: str, root: Path) -> Iterator[dict]:
    """The `store` and `index` config sections of `backend`: none for SQLite + FAISS (the defaults); for
    PostgreSQL + Milvus, a throwaway server of each (Milvus's under `root`), stopped after."""
    if backend == "sqlite+faiss":
        yield {}
        return
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
    from milvus import MilvusServer
    from pgserver import PgServer

    pg_root = Path(tempfile.mkdtemp(prefix="matcher-bench-pg-"))  # not under a 0700 folder: the server's user must reach it
    pg_root.chmod(0o755)
    milvus = MilvusServer()
    milvus.set_base_dir(str(root / "milvus"))
    try:
        with PgServer(pg_root / "pg") as pg:
            milvus.start()
            try:
                yield {"store": pg.store_section(pg.fresh_db()),
                       "index": {"engine": "milvus", "milvus": {"uri": f"http://127.0.0.1:{milvus.listen_port}"}}}
            finally:
                milvus.stop()
    finally:
        shutil.rmtree(pg_root, ignore_errors=True)


def run_backends(backends: list[str], sizes: list[int], n_queries: int, workdir: Path) -> dict:
    """Each backend in a fresh store, the same sightings from 0 to each size: ingest, then the same queries (on
    Milvus twice: right after the last insert, and once flushed and indexed)."""
    results: dict = {"load_start": Path("/proc/loadavg").read_text().split()[:3], "rows": []}
    for backend in backends:
        with backend_sections(backend, workdir / backend) as sections:
            m = Matcher(config(workdir / backend / "data", **sections))
            m.start()
            try:
                done = 0
                for size in sorted(sizes):
                    log.info("%s: ingesting up to %d sightings", backend, size)
                    rate = ingest(m, done, size)
                    done = size
                    m.index.wait_rebuilds()
                    queries = _queries(m, n_queries)
                    when = "after the last insert" if m.index.partition(MODEL).kind == "milvus" else "rebuilds done"
                    results["rows"].append({"backend": backend, "ingest": rate, **_backend_queries(m, queries, when)})
                    if m.index.partition(MODEL).kind == "milvus":
                        when = f"flushed and indexed ({_milvus_indexed(m):.0f} s)"
                        results["rows"].append({"backend": backend, "ingest": None, **_backend_queries(m, queries, when)})
                    log.info("%s at %d: %s", backend, size, results["rows"][-1])
            finally:
                m.stop()
    results["load_end"] = Path("/proc/loadavg").read_text().split()[:3]
    return results


def _backend_queries(m: Matcher, queries: tuple, when: str) -> dict:
    ids, _, vecs, exact_ids = queries
    with OtherLoad() as other:
        index_ms, recall = _partition_search(m, vecs, exact_ids)
        full = _full_search(m, vecs)
    return {"n": len(ids), "index_name": _index_name(m), "when": when, "index": index_ms, "recall": recall, "full": full,
            "other": other.cores}


def _index_name(m: Matcher) -> str:
    p = m.index.partition(MODEL)
    if p.kind == "ivf":
        return f"IVF{faiss.extract_index_ivf(p.index).nlist},Flat"
    return f"Milvus {m.index.mcfg.index_type}" if p.kind == "milvus" else p.kind


def _milvus_indexed(m: Matcher) -> float:
    """Seconds to flush the version's collection and build the index of every sealed segment."""
    from pymilvus import connections, utility

    name = m.index.partition(MODEL).name
    t0 = time.perf_counter()
    m.index.client.flush(name)
    connections.connect(alias="bench", uri=m.index.mcfg.uri)
    try:
        utility.wait_for_index_building_complete(name, using="bench", timeout=1800)
    finally:
        connections.disconnect("bench")
    return time.perf_counter() - t0


def backends_report(r: dict, command: str, minutes: float) -> str:
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    from milvus import __version__ as milvus_version
    lines = [BACKENDS_SECTION, "", f"`{command}`, {now}, {minutes:.0f} min.", "",
             f"- {machine(*versions(), f'milvus (server package) {milvus_version}')}",
             f"- Load average {' '.join(r['load_start'])} at the start, {' '.join(r['load_end'])} at the end (a shared "
             "machine; \"other load\" is other processes' CPU in cores of the 2).",
             "- Each backend ingests the same sightings into a fresh store over loopback ZeroMQ (sightings/s counted once "
             "committed), then answers the same queries one at a time, k = 10; recall@10 against exact brute force on the "
             "stored vectors. SQLite + FAISS: the default config; PostgreSQL + Milvus: a local PostgreSQL server "
             "(`synchronous_commit` on) and the `milvus` package's standalone server on the same 2 cores, its default "
             "HNSW index, Session consistency; queried right after the last insert (growing segments are searched "
             "unindexed while Milvus seals and indexes them in the background), then again once the collection is "
             "flushed and every sealed segment indexed.", "",
             "| backend | sightings | index | queried | ingest sightings/s | matcher CPU µs per sighting "
             "| index search p50 / p99 ms | `search_embedding` p50 / p99 ms | recall@10 vs exact | other load (cores) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for row in r["rows"]:
        i = row["ingest"]
        ingested = f"**{i['rate']:,.0f}** | {i['cpu_us']:.0f}" if i else "– | –"
        lines.append(f"| {row['backend']} | {row['n']:,} | {row['index_name']} | {row['when']} | {ingested} | "
                     f"**{row['index'][0]:.2f} / {row['index'][1]:.2f}** | {row['full'][0]:.1f} / {row['full'][1]:.1f} | "
                     f"**{row['recall']:.3f}** | {row['other']:.2f} |")
    return "\n".join(lines + ["", "Matcher CPU is this process's only: PostgreSQL's and Milvus's own CPU is not in it "
                               "(they run as other processes, so they count in \"other load\"). A row's ingest rate is "
                               "over the sightings added since the previous size (100,000 → 1,000,000 for the 10^6 rows).", ""])


def _ingest_row(run: str, span: str, thumb: str, i: dict) -> str:
    during = f"{i['rebuild_rate']:,.0f} ({i['rebuild_share']:.0%})" if i["rebuild_rate"] else "–"
    return (f"| {run} | {span} | {thumb} | **{i['rate']:,.0f}** | {i['seconds']:.1f} | {during} | {i['cpu_us']:.0f} | "
            f"{i['batch_ms']:.1f} | {i['other']:.2f} |")


def ingest_report(r: dict, run_line: str | None = None) -> list[str]:
    """The ingest subsection; `run_line` says how and when it was measured when it is rerun on its own."""
    lines = [f"{INGEST_SECTION}, committed (WAL, `synchronous=FULL`) before counted, then indexed", ""]
    if run_line:
        lines += [run_line, ""]
    lines += [
        "| matcher config | sightings | thumbnail | sightings/s | seconds | sightings/s while an IVF trains (share of the time) "
        "| matcher CPU µs per sighting | mean ms per batch (≤ 1000), commit start to searchable | other load (cores) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for i, thumb in zip(r["sustained"], ("none", "4 KB", "none")):
        how = f", acknowledged ({ACK_WINDOW:,} in flight)" if i["acked"] else ""
        lines.append(_ingest_row(f"exact (`exact_max` {2 * i['n']:,}){how}", f"0 → {i['n']:,}", thumb, i))
    acked = r["sustained"][2]
    start = 0
    for i in r["ingest"]:
        lines.append(_ingest_row("default", f"{start:,} → {start + i['n']:,}", "none", i))
        start += i["n"]
    return lines + [
        "", "Sightings/s count accepted sightings (committed) from the first to the last; the sender is a separate process that "
        "encoded its messages beforehand. \"Matcher CPU\" is the matcher process's CPU time (all its threads: ZeroMQ, "
        "decoding, SQLite, FAISS, IVF training) per accepted sighting, the sender's not included. Rows with the default "
        "config pass `exact_max` (50,000) or grow the IVF partition 4x, so a background IVF training (one FAISS thread) "
        "competes for the 2 cores during the share of the time shown. The acknowledged row sends wire v2 messages with a "
        f"sequence number, as edges do: the matcher deduplicates them against the store and acknowledges each batch once "
        f"committed; the sender keeps at most {ACK_WINDOW:,} unacknowledged and saw {acked['acked_rate']:,.0f} "
        "acknowledgements/s from the first to the last.", ""]


def report(r: dict, command: str, minutes: float) -> str:
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    d = IndexConfig()
    lines = [
        SECTION, "",
        f"`{command}`, {now}, {minutes:.0f} min.", "",
        f"- {machine(*versions())}",
        f"- Load average {' '.join(r['load_start'])} at the start, {' '.join(r['load_end'])} at the end. A shared machine: "
        "\"other load\" is the CPU other processes used during a measurement (/proc/stat minus this process and its sender), "
        "in cores of the 2; compare rows as ratios.",
        f"- {DIM}-d embeddings; identities of {PER_ID} sightings (5 cameras x 10-sighting tracks), cosine to the identity ≈ 0.86;"
        f" default matcher config (`exact_max` {d.exact_max}, {d.kind.upper()}, `nprobe` {d.nprobe}, `nlist_max` {d.nlist_max}, "
        f"FAISS threads {d.threads}, batches ≤ 1000 / 5 ms).", "",
        *ingest_report(r),
    ]
    lines += ["### Queries (one at a time, k = 10)", "",
              "| sightings | index | partition search p50 / p99 ms | `search_embedding` p50 / p99 ms | recall@10 vs exact | "
              "FAISS IndexFlatIP p50 / p99 ms | flat p50 / partition p50 | other load (cores) |",
              "|---|---|---|---|---|---|---|---|"]
    for q in r["queries"]:
        kind = f"IVF{q['nlist']},Flat" if q["kind"] == "ivf" else q["kind"]
        lines.append(f"| {q['n']:,} | {kind} | **{q['index'][0]:.2f} / {q['index'][1]:.2f}** | {q['full'][0]:.1f} / {q['full'][1]:.1f} | "
                     f"**{q['recall']:.3f}** | {q['flat'][0]:.1f} / {q['flat'][1]:.1f} | {q['flat'][0] / q['index'][0]:.0f}x | "
                     f"{q['other']:.2f} |")
    big, rs = r["queries"][-1], r["restart"]
    lines += ["", "`search_embedding` is the whole query: over-fetch (80 sightings for 10 tracks), SQLite lookups, grouping.", ""]
    for q in r["queries"]:
        if q["sweep"]:
            lines += [f"IVF{q['nlist']},Flat at {q['n']:,}, the same queries at other `nprobe` values:", "",
                      "| nprobe | partition search p50 / p99 ms | recall@10 |", "|---|---|---|"]
            lines += [f"| {n}{' (config)' if n == d.nprobe else ''} | {ms[0]:.2f} / {ms[1]:.2f} | {rec:.3f} |"
                      for n, (ms, rec) in q["sweep"].items()] + [""]
    lines += [
              f"### Memory and disk at {big['n']:,}", "",
              f"- Process RSS growth: {r['rss_per_sighting']:,.0f} bytes per sighting (FAISS index alone: "
              f"{big['index_bytes'] / big['n']:,.0f}; a 256-d float32 vector is 1,024)",
              f"- SQLite: {r['store_bytes']:,.0f} bytes per sighting without thumbnail; "
              f"{r['thumb_store_bytes']:,.0f} with a 4 KB thumbnail", "",
              f"### Restart at {big['n']:,}", "",
              f"- From the final snapshot ({rs['snapshot_kind']}): **{rs['snapshot_s']:.1f} s** until queries are served",
              f"- With no snapshot: {rs['store_s']:.1f} s to an exact index built from the store (queries served), "
              f"{rs['retrain_s']:.1f} s until the background IVF training is done", "",
              f"### HTTP API at {big['n']:,}: `GET /api/v1/sightings/{{id}}`, {r['http']['n']} requests one at a time", "",
              "| connection | p50 / p99 ms |", "|---|---|",
              *(f"| {name} | **{r['http'][key][0]:.1f}** / {r['http'][key][1]:.1f} |"
                for key, name in (("keep_alive", "one keep-alive connection"), ("fresh", "a fresh connection each"))), ""]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000])
    ap.add_argument("--queries", type=int, default=1000)
    ap.add_argument("--out", type=Path, default=None, help="markdown file whose Matcher section is replaced")
    ap.add_argument("--workdir", type=Path, default=None, help="data directory parent (default: a temporary one)")
    ap.add_argument("--sustained", type=int, default=SUSTAINED, help="sightings per sustained-ingest row (default: %(default)s)")
    ap.add_argument("--backend", nargs="+", choices=BACKENDS, default=None,
                    help="only ingest and queries, side by side on these backends (default: the full run on sqlite+faiss)")
    ap.add_argument("--only", choices=["ingest"], default=None,
                    help="ingest only (no queries, memory, restart); --out then replaces only the ingest subsection")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)-7s %(name)s: %(message)s", datefmt="%H:%M:%S")
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="matcher-bench-"))
    t0 = time.time()
    try:
        if args.backend:
            results = run_backends(args.backend, args.sizes, args.queries, workdir)
        else:
            results = run(args.sizes, args.queries, workdir, only_ingest=args.only == "ingest", n_sustained=args.sustained)
    finally:
        if args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)
    command = "python " + " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]])
    if args.backend:
        text = backends_report(results, command, (time.time() - t0) / 60)
    elif args.only:
        now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
        text = "\n".join(ingest_report(results, f"`{command}`, {now}, {(time.time() - t0) / 60:.0f} min; {machine(*versions())}; load "
                                                 f"average {' '.join(results['load_start'])} at the start, "
                                                 f"{' '.join(results['load_end'])} at the end."))
    else:
        text = report(results, command, (time.time() - t0) / 60)
    print(text)
    if args.out:
        write_section(args.out, BACKENDS_SECTION if args.backend else INGEST_SECTION if args.only else SECTION, text)


if __name__ == "__main__":
    main()
