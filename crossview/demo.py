"""The demo: an edge node and a receiver on the footage shipped in `data/demo`.

    $ crossview demo                  # builds the default embedder on first use
    >>> run_demo(Path("configs/demo.yaml"))

Prints, per camera, what the node saw and what the receiver got over ZeroMQ.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import defaultdict
from pathlib import Path

from crossview.config import load_edge_config
from matcher.ingest import Receiver

log = logging.getLogger(__name__)


def ensure_default_embedder(path: Path) -> None:
    if path.is_file():
        return
    from trainer.export import (
        build_default_embedder,  # torch is only needed to build it
    )

    log.info("building the default embedder (MobileNetV2, ImageNet weights) into %s", path)
    build_default_embedder(path)


def _receive(rx: Receiver, got: dict, stop: threading.Event) -> None:
    while not stop.is_set():
        s = rx.receive(timeout=0.2)
        if s is not None:
            got[s.camera]["messages"] += 1
            got[s.camera]["tracks"].add(s.track)


def run_demo(config: Path) -> int:
    from edge.node import EdgeNode

    cfg = load_edge_config(config)
    ensure_default_embedder(cfg.embedder.model)
    rx = Receiver(cfg.publisher.endpoint)
    got: dict = defaultdict(lambda: {"messages": 0, "tracks": set()})
    stop = threading.Event()
    thread = threading.Thread(target=_receive, args=(rx, got, stop), name="demo-receiver", daemon=True)
    thread.start()
    try:
        stats = EdgeNode(cfg).run()
        published = sum(s.published for s in stats.values())
        deadline = time.monotonic() + 5.0  # let the receiver drain what is still in flight
        while rx.accepted < published and time.monotonic() < deadline:
            time.sleep(0.1)
    finally:
        stop.set()
        thread.join()
        rx.close()
    _print_summary(stats, got, rx)
    return 0 if any(s.frames for s in stats.values()) else 1


def _print_summary(stats: dict, got: dict, rx: Receiver) -> None:
    header = f"{'camera':<18} {'status':<9} {'frames':>6} {'people':>6} {'published':>9} {'dropped':>7} {'received':>8}"
    print("\n" + header + "\n" + "-" * len(header))
    for cid, s in stats.items():
        print(f"{cid:<18} {s.status:<9} {s.frames:>6} {len(s.tracks):>6} {s.published:>9} {s.dropped:>7} {got[cid]['messages']:>8}")
    print(f"\nreceiver: {rx.accepted} valid sightings, {sum(rx.rejected.values())} rejected; "
          "people = distinct tracks per camera")
