"""Harvest upload benchmark: how fast an edge's harvested crops reach the matcher's harvest store over HTTP.

    python bench/harvest_upload_bench.py [--crops 1000] [--batches 1 16 64] [--out docs/benchmarks.md]

Real person crops (TUD-Campus ground-truth boxes, JPEG quality 95 as the edge's harvester writes them) in a
harvest folder; `edge.uploader.Uploader` sends them to a `Matcher` with its HTTP API on 127.0.0.1
(`POST /api/v1/harvest`, edge token), which checks, stores and acknowledges each, and the uploader deletes them.
One row per batch size: crops per second from the first request to the last deletion, the matcher in the same
process (as on a one-machine site). Results replace the "Harvest upload (bench/harvest_upload_bench.py)" section
of --out; without it they are printed.
"""

from __future__ import annotations

import argparse
import datetime
import shutil
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np
from docsection import machine, write_section

from crossview.edge.uploader import Uploader
from crossview.kernel.config import HarvestConfig, MatcherConfig, parse_config
from crossview.kernel.harvest import Sidecar, encode, sidecar_path
from crossview.matcher.api import serve
from crossview.matcher.service import Matcher

SECTION = "## Harvest upload (bench/harvest_upload_bench.py)"
TUD = Path(__file__).resolve().parents[2] / "shared" / "data" / "TUD-Campus"
TOKEN, EDGE_TOKEN = "bench-token-0123456789", "bench-edge-token-0123456789"


def person_crops() -> list[bytes]:
    """Every ground-truth person box of TUD-Campus as a quality-95 JPEG (what the edge harvests)."""
    gt = np.loadtxt(TUD / "gt" / "gt.txt", delimiter=",", ndmin=2)[:, :6].astype(int)
    cap, crops, frame = cv2.VideoCapture(str(TUD / "TUD-Campus.mp4")), [], 0
    while (image := cap.read()[1]) is not None:
        frame += 1
        for _, _, left, top, width, height in gt[gt[:, 0] == frame]:
            crop = image[max(top, 0):top + height, max(left, 0):left + width]
            if crop.size:
                crops.append(cv2.imencode(".jpg", crop, [cv2.IMWRITE_JPEG_QUALITY, 95])[1].tobytes())
    return crops


def fill(root: Path, crops: list[bytes], n: int, track: int) -> int:
    """`n` crops with sidecars in the harvester's layout; their bytes."""
    size = 0
    for i in range(n):
        s = Sidecar("bench", "gate", time.time(), i, track, (10.0, 20.0, 60.0, 180.0), 0.9, "m-1")
        path = s.name.path(root)
        path.parent.mkdir(parents=True, exist_ok=True)
        sidecar_path(path).write_bytes(encode(s))
        path.write_bytes(crops[i % len(crops)])
        size += len(crops[i % len(crops)])
    return size


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--crops", type=int, default=1000)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 16, 64])
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    crops, tmp = person_crops(), Path(tempfile.mkdtemp(prefix="harvest-bench-"))
    (tmp / "edge-token").write_text(EDGE_TOKEN)
    cfg = parse_config({"data_dir": str(tmp / "matcher"), "ingest": {"endpoint": "tcp://127.0.0.1:*",
                                                                     "security": {"mode": "plain"}},
                        "http": {"port": 0, "token": TOKEN, "edge_token_file": str(tmp / "edge-token")}}, MatcherConfig)
    matcher = Matcher(cfg)
    matcher.start()
    server = serve(matcher, cfg.http)
    rows = []
    try:
        for batch in args.batches:
            size = fill(tmp / "harvest", crops, args.crops, track=batch)
            up = Uploader(HarvestConfig(dir=tmp / "harvest", upload={"url": server.url, "token_file": tmp / "edge-token",
                                                                     "batch": batch}))
            t0 = time.perf_counter()
            assert up.upload_pending() and up.uploaded == args.crops, up.status()
            seconds = time.perf_counter() - t0
            rows.append(f"| {batch} | {args.crops:,} | {size / args.crops / 1e3:.1f} | {args.crops / seconds:.0f} | "
                        f"{size / seconds / 1e6:.1f} |")
    finally:
        server.stop()
        matcher.stop()
        shutil.rmtree(tmp)
    text = "\n".join([
        SECTION, "",
        f"`python bench/harvest_upload_bench.py --crops {args.crops}`, {datetime.date.today()}; {machine()}. "
        "Uploader and matcher in one process on 127.0.0.1: each crop checked (sidecar, JPEG header, decoded), "
        "written, indexed, acknowledged, then deleted on the edge.", "",
        "| batch | crops | KB per crop | crops/s | MB/s |", "|---|---|---|---|---|", *rows])
    if args.out:
        write_section(args.out, SECTION, text)
    print(text)


if __name__ == "__main__":
    main()
