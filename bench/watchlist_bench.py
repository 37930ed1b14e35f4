"""Watchlist benchmark: ingest with and without 1,000 watchlist entries, and the time from a sighting's arrival
to its alert, through the real service.

    python bench/watchlist_bench.py [--sustained 200000] [--repeats 2] [--samples 30] [--out docs/benchmarks.md]

| part       | what is measured                                                                          |
|------------|-------------------------------------------------------------------------------------------|
| throughput | `matcher_bench`'s sustained ingest (256-d, exact partition, a sender process), into a fresh |
|            | matcher with no watchlist and with 1,000 entries (990 people never seen, 10 who are: their |
|            | tracks alert), alternated `--repeats` times in one run, so the ratio is of like conditions  |
| latency    | 1,000 entries and a webhook receiver on 127.0.0.1; one sighting of a watched person on a   |
|            | new track at a time: from its send on a DEALER socket to the alert stored (`Watchlist`),   |
|            | and to the signed POST received; idle, and while the sender pushes a sustained stream      |
"""

from __future__ import annotations

import argparse
import datetime
import logging
import multiprocessing as mp
import shutil
import sys
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import zmq
from docsection import machine, write_section
from matcher_bench import DIM, MODEL, PER_ID, _send, centers, config, ingest, noisy, versions
from otherload import OtherLoad

from crossview.kernel.config import parse_config
from crossview.kernel.wire import Sighting, encode
from crossview.matcher.query import Subject
from crossview.matcher.service import Matcher

SECTION = "## Watchlist (bench/watchlist_bench.py)"
ENTRIES = 1000
SEEN = 10  # entries who are people of the stream
log = logging.getLogger("bench")


def matcher(data: Path, n: int, entries: int, hook: str | None = None) -> Matcher:
    cfg = config(data, exact_max=2 * n + 10_000)
    if hook:
        cfg = parse_config({**cfg.model_dump(mode="json"), "watchlist": {"webhooks": [{"url": hook, "secret": "bench-secret-0123456789"}]}},
                           type(cfg))
    m = Matcher(cfg)
    ids = centers(max(n // PER_ID, SEEN) + entries)
    # identities 0..SEEN-1 are in the stream; the others past its end are never seen
    people = np.concatenate([ids[:SEEN], ids[len(ids) - (entries - SEEN):]]) if entries else ids[:0]
    for k, v in enumerate(people[:entries]):
        m.watchlist.add(f"person {k}", Subject(v, MODEL, {"by": "embedding"}), min_similarity=0.7)
    m.start()
    return m


def throughput(workdir: Path, n: int, entries: int) -> dict:
    data = workdir / f"throughput-{entries}"
    m = matcher(data, n, entries)
    try:
        result = ingest(m, 0, n)
        result["alerts"] = m.watchlist.alerted
    finally:
        m.stop()
    shutil.rmtree(data)
    return result


class Receiver:
    def __init__(self):
        self.received: dict[int, float] = {}
        received = self.received

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                self.rfile.read(int(self.headers["Content-Length"]))
                received[int(self.headers["X-Crossview-Alert"])] = time.perf_counter()
                self.send_response(204)
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/alerts"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()


def _probe(sock: zmq.Socket, m: Matcher, rng, person: np.ndarray, track: int) -> tuple[float, int, float]:
    """Send one sighting of a watched person on a new track: (seconds to its alert, its id, when it was sent)."""
    vec = noisy(rng, person[None])[0]
    before = m.watchlist.alerted
    t0 = time.perf_counter()
    sock.send(encode(Sighting("probe-edge", "probe-cam", time.time(), 0, track, (10.0, 20.0, 60.0, 180.0), 0.9, vec, MODEL)))
    while m.watchlist.alerted == before:
        if time.perf_counter() - t0 > 30:
            raise RuntimeError(f"no alert within 30 s for probe track {track}")
        time.sleep(0.0005)
    return time.perf_counter() - t0, m.watchlist.alerts(after=0, limit=1_000_000)[-1].id, t0


def latency(workdir: Path, n_samples: int, load: int) -> dict:
    """Alert latency; with `load`, while a sender process streams that many other sightings."""
    data = workdir / f"latency-{load}"
    hooks = Receiver()
    m = matcher(data, max(load, 1000), ENTRIES, hooks.url)
    rng = np.random.default_rng(7)
    person = centers(SEEN)[0]
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.connect(m.ingest.endpoint)
    sender = None
    if load:  # watched identities 0..9 are in this stream too: their alerts count apart from the probes'
        sender = mp.get_context("spawn").Process(target=_send, args=(m.ingest.endpoint, 0, load, 0, 0, None))
        sender.start()
        while m.ingest.accepted < 1000:
            time.sleep(0.01)
    stored, posted = [], []
    try:
        with OtherLoad() as other:
            for k in range(n_samples):
                seconds, alert_id, t0 = _probe(sock, m, rng, person, 10**9 + k)
                stored.append(seconds)
                deadline = time.perf_counter() + 30
                while alert_id not in hooks.received and time.perf_counter() < deadline:
                    time.sleep(0.0005)
                posted.append(hooks.received[alert_id] - t0)
                time.sleep(0.1)
        busy = sender is not None and sender.is_alive()
    finally:
        if sender:
            sender.join()
        sock.close(0)
        ctx.term()
        m.stop()
        hooks.server.shutdown()
    shutil.rmtree(data)
    ms = lambda xs: (1000 * float(np.median(xs)), 1000 * float(np.percentile(xs, 95)), 1000 * max(xs))  # noqa: E731
    return {"load": load, "stored": ms(stored), "posted": ms(posted), "other": other.cores, "loaded_throughout": busy}


def report(r: dict, command: str, minutes: float) -> str:
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    lines = [SECTION, "", f"`{command}`, {now}, {minutes:.0f} min; {machine(*versions())}.", "",
             "### Ingest with 1,000 watchlist entries", "",
             f"{r['n']:,} {DIM}-d sightings per row, exact partition, sent unacknowledged from another process; rows in "
             "the order run.", "",
             "| watchlist | sightings/s | matcher CPU µs/sighting | alerts | other processes (cores) |",
             "|---|---|---|---|---|"]
    for entries, t in r["throughput"]:
        lines.append(f"| {entries:,} entries | {t['rate']:,.0f} | {t['cpu_us']:.0f} | {t['alerts']} | {t['other']:.2f} |")
    base = np.mean([t["rate"] for e, t in r["throughput"] if e == 0])
    full = np.mean([t["rate"] for e, t in r["throughput"] if e])
    cpu = np.mean([t["cpu_us"] for e, t in r["throughput"] if e]) / np.mean([t["cpu_us"] for e, t in r["throughput"] if not e])
    lines += ["", f"With {ENTRIES:,} entries: **{full / base:.2f}x** the sightings/s without (mean of {r['repeats']} "
              f"alternated rows each; target ≥ 0.90), at {cpu:.2f}x the matcher's CPU time per sighting.", "",
              "### Time from a sighting's arrival to its alert", "",
              "| load | to alert stored, ms (median / p95 / max) | to webhook POST received, ms (median / p95 / max) | other processes (cores) |",
              "|---|---|---|---|"]
    for x in r["latency"]:
        load = f"{x['load']:,} other sightings streaming" + ("" if x["loaded_throughout"] or not x["load"] else " (ended before the last probe)")
        lines.append(f"| {load if x['load'] else 'idle'} | {' / '.join(f'{v:.0f}' for v in x['stored'])} | "
                     f"{' / '.join(f'{v:.0f}' for v in x['posted'])} | {x['other']:.2f} |")
    lines += ["", f"{r['samples']} probes per row, one at a time, 0.1 s apart: a sighting of a watched person on a new track "
              "sent on a DEALER socket, timed to the alert in the watchlist and to the webhook's receipt of the signed POST "
              "(target ≤ 2 s)."]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sustained", type=int, default=200_000, help="sightings per throughput row (default: %(default)s)")
    ap.add_argument("--repeats", type=int, default=2, help="alternated pairs of throughput rows (default: %(default)s)")
    ap.add_argument("--samples", type=int, default=30, help="latency probes per row (default: %(default)s)")
    ap.add_argument("--out", type=Path, default=None, help="markdown file whose Watchlist section is replaced")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)-7s %(name)s: %(message)s", datefmt="%H:%M:%S")
    workdir = Path(tempfile.mkdtemp(prefix="watchlist-bench-"))
    t0 = time.time()
    try:
        rows = [(e, throughput(workdir, args.sustained, e)) for _ in range(args.repeats) for e in (0, ENTRIES)]
        lat = [latency(workdir, args.samples, 0), latency(workdir, args.samples, args.sustained)]
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    r = {"n": args.sustained, "repeats": args.repeats, "samples": args.samples, "throughput": rows, "latency": lat}
    text = report(r, "python " + " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]]), (time.time() - t0) / 60)
    print(text)
    if args.out:
        write_section(args.out, SECTION, text)


if __name__ == "__main__":
    main()
