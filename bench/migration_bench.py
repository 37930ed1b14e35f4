"""Gallery migration benchmark: thumbnails re-embedded per second by a new production version, on its own and with
ingest running beside it, through the real service (`matcher.migration`).

    python bench/migration_bench.py [--thumbnails 2000] [--sustained 100000] [--out docs/benchmarks.md]

| row           | what is measured                                                                        |
|---------------|-----------------------------------------------------------------------------------------|
| alone         | a matcher holding `--thumbnails` sightings of the old version, each with a thumbnail of a |
|               | TUD-Campus person (the edge's 128 px JPEG); the new version promoted; its migration thread |
|               | (ONNX Runtime on 1 thread, nice +10) from the switch to done: thumbnails/s                 |
| beside ingest | the same, while `matcher_bench`'s sender pushes `--sustained` 256-d sightings of another   |
|               | version: thumbnails/s while ingest runs, and ingest's sightings/s against a matcher with   |
|               | no migration (the ratio is what the migration costs ingest)                                |

Both versions are the default embedder (MobileNetV2 + GAP, 256x128, 1280-d), the new one relabeled: an adapted
site model of the same backbone costs the same per crop.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import logging
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

import cv2
import numpy as np
import onnxruntime
from docsection import machine, write_section
from matcher_bench import config, ingest, versions
from otherload import OtherLoad

from crossview.kernel.embedder import Embedder
from crossview.kernel.wire import Sighting
from crossview.matcher.service import Matcher
from crossview.trainer.export import build_default_embedder, write_metadata

SECTION = "## Gallery migration (bench/migration_bench.py)"
TUD = Path(__file__).resolve().parents[2] / "shared" / "data" / "TUD-Campus"
NEW = "bench-new"
log = logging.getLogger("bench")


def thumbnails(n: int) -> list[bytes]:
    """`n` edge thumbnails (128 px high JPEG) of TUD-Campus ground-truth people, cycled."""
    gt = np.loadtxt(TUD / "gt" / "gt.txt", delimiter=",", ndmin=2)
    cap, out, frame = cv2.VideoCapture(str(TUD / "TUD-Campus.mp4")), [], 0
    while (image := cap.read()[1]) is not None:
        frame += 1
        for left, top, width, height in gt[gt[:, 0] == frame, 2:6].astype(int):
            crop = image[max(top, 0):top + height, max(left, 0):left + width]
            if min(crop.shape[:2]) >= 16:
                w = max(1, round(crop.shape[1] * 128 / crop.shape[0]))
                out.append(cv2.imencode(".jpg", cv2.resize(crop, (w, 128), interpolation=cv2.INTER_AREA))[1].tobytes())
    cap.release()
    return [out[k % len(out)] for k in range(n)]


def models(workdir: Path) -> tuple[Path, Path]:
    old = workdir / "old.onnx"
    meta = build_default_embedder(old)
    write_metadata(old, workdir / "new.onnx", dataclasses.replace(meta, version=NEW))
    return old, workdir / "new.onnx"


def gallery(workdir: Path, old: Path, jpegs: list[bytes]) -> Matcher:
    """A started matcher holding one sighting of the old (production) version per thumbnail, 25 a second of the past."""
    cfg = config(workdir / f"m{time.monotonic_ns()}")
    m = Matcher(cfg.model_copy(update={"migration": cfg.migration.model_copy(update={"poll_s": 0.2})}))
    version = m.registry.promote(m.registry.register(old).version).version
    dim = Embedder(old, device="cpu").dim
    rng, t0, first = np.random.default_rng(0), time.time() - len(jpegs) / 25, m.store.next_id()
    vecs = rng.standard_normal((len(jpegs), dim)).astype(np.float32)  # what the old vectors hold does not matter here
    vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
    sightings = [Sighting("edge-1", f"cam{k % 5}", t0 + k / 25, k, k // 20, (10.0, 20.0, 60.0, 180.0), 0.9, v, version, j)
                 for k, (v, j) in enumerate(zip(vecs, jpegs))]
    ids = list(range(first, first + len(sightings)))
    if ids:
        m.store.insert(ids, sightings, [first + k // 20 * 20 for k in range(len(ids))], list(vecs))
        m.index.add(version, np.asarray(ids, np.int64), vecs)
    m.start()
    return m


def sampled(m: Matcher, stop: threading.Event, out: list) -> None:
    while not stop.wait(0.05):
        out.append((time.perf_counter(), m.ingest.accepted, m.migration.migrated if m.migration.target == NEW else -1))


def migrate(workdir: Path, old: Path, new: Path, jpegs: list[bytes], sustained: int) -> dict:
    """Promote the new version on a fresh gallery; with `sustained`, once that many sightings are streaming in."""
    m = gallery(workdir, old, jpegs)
    row: dict = {}
    try:
        m.registry.register(new)
        samples, stop = [], threading.Event()
        sampler = threading.Thread(target=sampled, args=(m, stop, samples), daemon=True)
        sampler.start()
        streaming = threading.Thread(target=lambda: row.update(ingest=ingest(m, 0, sustained)), daemon=True)
        if sustained:
            streaming.start()
            while not m.ingest.accepted:
                time.sleep(0.01)
        with OtherLoad() as other:
            m.registry.promote(NEW)
            while (m.migration.progress() or {}).get("model") != NEW or m.migration.progress()["state"] != "done":
                time.sleep(0.1)
        if sustained:
            streaming.join()
        stop.set()
        sampler.join()
        p = m.migration.progress()
        row |= {"n": p["migrated"], "rate": p["per_second"], "other": other.cores}
        # while both went on: the ingest count moving, the new version's migration begun and not yet through
        both = [(a, b) for a, b in zip(samples, samples[1:]) if b[1] > a[1] and 0 <= a[2] < p["migrated"]]
        seconds = sum(b[0] - a[0] for a, b in both)
        row["beside"] = sum(b[2] - a[2] for a, b in both) / seconds if seconds else float("nan")
        return row
    finally:
        m.stop()


def ingest_alone(workdir: Path, old: Path, sustained: int) -> dict:
    m = gallery(workdir, old, [])
    try:
        return ingest(m, 0, sustained)
    finally:
        m.stop()


def report(r: dict, command: str, minutes: float) -> str:
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    alone, beside, base = r["alone"], r["beside"], r["ingest_alone"]
    lines = [SECTION, "", f"`{command}`, {now}, {minutes:.0f} min; {machine(*versions(), f'onnxruntime {onnxruntime.__version__}')}.",
             "", f"{alone['n']:,} thumbnails (TUD-Campus people, 128 px JPEG) re-embedded by the new production version "
             "(MobileNetV2 256x128, ONNX Runtime on 1 thread, nice +10), from the switch to done.", "",
             "| row | thumbnails/s | ingest sightings/s | other processes (cores) |", "|---|---|---|---|",
             f"| migration alone | {alone['rate']:.1f} | | {alone['other']:.2f} |",
             f"| ingest alone ({r['sustained']:,} 256-d sightings) | | {base['rate']:,.0f} | {base['other']:.2f} |",
             f"| migration beside that ingest | {beside['beside']:.1f} while ingest ran ({beside['rate']:.1f} overall) | "
             f"{beside['ingest']['rate']:,.0f} | {beside['ingest']['other']:.2f} |", "",
             "The new version is promoted once the ingest stream is flowing; \"while ingest ran\" counts only the time both "
             "went on. Other processes: CPU cores other programs on the machine used meanwhile (the figures move with it: "
             "the migration thread runs at nice +10, so it yields to them).", "",
             f"Beside ingest the migration runs at **{beside['beside'] / alone['rate']:.2f}x** its rate alone, and ingest "
             f"at **{beside['ingest']['rate'] / base['rate']:.2f}x** its rate without a migration. At the rate alone, "
             f"a day of one camera at 1 sighting/s (86,400 thumbnails) takes {86400 / alone['rate'] / 3600:.1f} h."]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--thumbnails", type=int, default=2000, help="sightings with a thumbnail to re-embed (default: %(default)s)")
    ap.add_argument("--sustained", type=int, default=100_000, help="sightings ingested beside it (default: %(default)s)")
    ap.add_argument("--out", type=Path, default=None, help="markdown file whose Gallery migration section is replaced")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)-7s %(name)s: %(message)s", datefmt="%H:%M:%S")
    workdir = Path(tempfile.mkdtemp(prefix="migration-bench-"))
    t0 = time.time()
    try:
        old, new = models(workdir)
        jpegs = thumbnails(args.thumbnails)
        r = {"sustained": args.sustained, "alone": migrate(workdir, old, new, jpegs, 0),
             "ingest_alone": ingest_alone(workdir, old, args.sustained),
             "beside": migrate(workdir, old, new, jpegs, args.sustained)}
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    text = report(r, "python " + " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]]), (time.time() - t0) / 60)
    print(text)
    if args.out:
        write_section(args.out, SECTION, text)


if __name__ == "__main__":
    main()
