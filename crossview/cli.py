"""The `crossview` command: one verb per stage, each a thin layer over one module.

| verb               | module                 | what                                             |
|--------------------|------------------------|--------------------------------------------------|
| `edge`             | `edge.node`            | run an edge node                                 |
| `demo`             | `crossview.demo`       | edge node + receiver on the shipped footage      |
| `build-embedder`   | `trainer.export`       | build the default MobileNetV2 ONNX embedder      |
| `export-detector`  | `edge.yolo_export`     | export a local YOLO .pt to ONNX, offline         |
| `keys`             | `crossview.transport`  | CURVE key pair for an edge or the matcher        |
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
from pathlib import Path

from crossview.config import ConfigError, load_edge_config
from crossview.runtime import offline_env, setup_logging

log = logging.getLogger("crossview")


def _edge(args: argparse.Namespace) -> int:
    from edge.node import EdgeNode

    node = EdgeNode(load_edge_config(args.config))
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: node.stop())
    stats = node.run(max_seconds=args.max_seconds)
    return 0 if any(s.frames for s in stats.values()) else 1


def _demo(args: argparse.Namespace) -> int:
    from crossview.demo import run_demo

    return run_demo(args.config)


def _build_embedder(args: argparse.Namespace) -> int:
    from trainer.export import build_default_embedder

    meta = build_default_embedder(args.out)
    print(f"{args.out}: {meta.name} version {meta.version}, input {meta.input_h}x{meta.input_w}, {meta.embedding_dim}-d")
    return 0


def _export_detector(args: argparse.Namespace) -> int:
    from edge.yolo_export import export_yolo

    out = export_yolo(args.weights, args.out, imgsz=args.imgsz)
    print(f"{out}: ONNX detector, input 1x3x{args.imgsz}x{args.imgsz}")
    return 0


def _keys(args: argparse.Namespace) -> int:
    from crossview.transport import generate_keys

    public, secret = generate_keys(args.out, args.name)
    print(f"public key {public} (give it to the other side), secret key {secret} (keep it here, mode 600)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="crossview", description="Find a person across a site's cameras.")
    p.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    sub = p.add_subparsers(dest="verb", required=True, metavar="VERB")

    e = sub.add_parser("edge", help="run an edge node: cameras -> detection -> tracking -> embeddings -> ZeroMQ")
    e.add_argument("--config", type=Path, default=Path("configs/edge.yaml"), help="edge YAML (default: %(default)s)")
    e.add_argument("--max-seconds", type=float, default=None, help="stop after this long (default: run until stopped)")
    e.set_defaults(run=_edge)

    d = sub.add_parser("demo", help="run an edge node and a receiver on the shipped footage and summarise")
    d.add_argument("--config", type=Path, default=Path("configs/demo.yaml"), help="demo edge YAML (default: %(default)s)")
    d.set_defaults(run=_demo)

    b = sub.add_parser("build-embedder", help="build the default MobileNetV2 ImageNet embedder as ONNX (offline)")
    b.add_argument("--out", type=Path, default=Path("models/mobilenetv2-imagenet.onnx"), help="(default: %(default)s)")
    b.set_defaults(run=_build_embedder)

    x = sub.add_parser("export-detector", help="export a local YOLO .pt file to ONNX for the edge node (offline)")
    x.add_argument("weights", type=Path, help="YOLO .pt file")
    x.add_argument("--out", type=Path, required=True, help="ONNX file to write")
    x.add_argument("--imgsz", type=int, default=640)
    x.set_defaults(run=_export_detector)
    k = sub.add_parser("keys", help="generate a CURVE key pair for an edge node or the matcher")
    k.add_argument("--out", type=Path, default=Path("keys"), help="folder (default: %(default)s)")
    k.add_argument("--name", required=True, help="e.g. matcher or the edge's node_id")
    k.set_defaults(run=_keys)
    return p


def main(argv: list[str] | None = None) -> int:
    offline_env()
    args = build_parser().parse_args(argv)
    setup_logging(args.log_level)
    try:
        return args.run(args)
    except ConfigError as e:
        log.error("%s", e)
        return 2
    except (FileNotFoundError, ValueError) as e:  # ModelError, SourceError, ... name the file themselves
        log.error("%s", e)
        return 2


if __name__ == "__main__":
    sys.exit(main())
