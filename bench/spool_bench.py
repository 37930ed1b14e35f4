"""Edge spool benchmark: what keeping every unacknowledged sighting on disk costs the edge, per sighting.

    python bench/spool_bench.py [--n 20000] [--out docs/benchmarks.md]

| row                     | what is timed, per sighting                                                       |
|-------------------------|-----------------------------------------------------------------------------------|
| encode                  | `wire.encode` of a 1280-d float32 sighting (the reference: the edge pays it anyway) |
| spool append            | `Spool.add`: one SQLite transaction (WAL, `synchronous=NORMAL`) per sighting       |
| spool acknowledge       | `Spool.ack` of 1,000 sequence numbers at a time, as acknowledgements arrive        |
| spool resend read       | `Spool.after`, 256 at a time, as a resend pass reads them                          |
| `Publisher.send`        | what the node's loop pays: encode with its `seq` + append + queue (matcher down)   |

Without and with a 6 KB thumbnail (a 128 px high JPEG crop). The spool sits in a temporary folder on the
disk of `--dir` (default: the system's temporary folder). Results replace the "Edge spool
(bench/spool_bench.py)" section of --out.
"""

from __future__ import annotations

import argparse
import datetime
import os
import shutil
import sqlite3
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from docsection import machine, write_section

from crossview.edge.publisher import Publisher
from crossview.edge.spool import Spool
from crossview.kernel.config import CurveConfig, PublisherConfig
from crossview.kernel.wire import Sighting, encode

SECTION = "## Edge spool (bench/spool_bench.py)"
DIM = 1280  # the default embedder's


def sightings(n: int, thumb_bytes: int) -> list[Sighting]:
    rng = np.random.default_rng(0)
    thumb = b"\xff\xd8" + os.urandom(thumb_bytes - 2) if thumb_bytes else None
    vecs = rng.standard_normal((n, DIM)).astype(np.float32)
    return [Sighting("bench", "gate", 1.7e9 + i, i, i // 20, (10.0, 20.0, 60.0, 180.0), 0.9, v, "m-1", thumb)
            for i, v in enumerate(vecs)]


def per_item_us(work, items: list) -> float:
    t0 = time.perf_counter()
    for item in items:
        work(item)
    return 1e6 * (time.perf_counter() - t0) / len(items)


def chunks(seq: list, size: int) -> list[list]:
    return [seq[i:i + size] for i in range(0, len(seq), size)]


def measure(n: int, thumb_bytes: int, folder: Path) -> dict:
    items = sightings(n, thumb_bytes)
    messages = [encode(s) for s in items]
    out = {"bytes": len(messages[0]), "encode": per_item_us(encode, items)}
    spool = Spool(folder / "spool", max_bytes=10**12)
    first = spool.next_seq()
    out["append"] = per_item_us(lambda m: spool.add(spool.next_seq(), time.time(), m), messages)
    seqs = list(range(first, first + n))
    out["read"] = per_item_us(lambda c: spool.after(c[0] - 1, len(c)), chunks(seqs, 256)) / 256
    out["ack"] = per_item_us(spool.ack, chunks(seqs, 1000)) / 1000
    spool.close()
    pub = Publisher(PublisherConfig(endpoint="tcp://127.0.0.1:9", security=CurveConfig(mode="plain"),  # no matcher
                                    spool_dir=folder / "publisher", spool_mb=10**6))
    out["send"] = per_item_us(pub.send, items)
    pub.close(drain_s=0)
    return out


def report(rows: dict[str, dict], command: str) -> str:
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    lines = [SECTION, "", f"`{command}`, {now}; {machine(f'SQLite {sqlite3.sqlite_version}')}; load average "
             f"{' '.join(Path('/proc/loadavg').read_text().split()[:3])} at the end.", "",
             "| thumbnail | message bytes | encode µs | spool append µs | spool acknowledge µs | spool resend read µs | "
             "`Publisher.send` µs |", "|---|---|---|---|---|---|---|"]
    for name, r in rows.items():
        lines.append(f"| {name} | {r['bytes']:,} | {r['encode']:.1f} | **{r['append']:.1f}** | {r['ack']:.1f} | {r['read']:.1f} | "
                     f"**{r['send']:.1f}** |")
    lines += ["", "Per sighting. A sighting costs the edge its detector and embedder time first (tens of ms per frame, "
              "see the edge node section); the spool's append and acknowledgement are what at-least-once delivery adds."]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=20000, help="sightings per row")
    ap.add_argument("--dir", type=Path, default=None, help="where the temporary spools go")
    ap.add_argument("--out", type=Path, default=None, help="markdown file whose Edge spool section is replaced")
    args = ap.parse_args()
    folder = Path(tempfile.mkdtemp(prefix="spool-bench-", dir=args.dir))
    try:
        rows = {"none": measure(args.n, 0, folder / "a"), "6 KB": measure(args.n, 6000, folder / "b")}
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    text = report(rows, "python " + " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]]))
    print(text)
    if args.out:
        write_section(args.out, SECTION, text)


if __name__ == "__main__":
    main()
