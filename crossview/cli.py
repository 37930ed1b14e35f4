"""The `crossview` command: one verb per stage, each a thin layer over one module.

| verb               | module                          | what                                             |
|--------------------|---------------------------------|--------------------------------------------------|
| `edge`             | `crossview.edge.node`           | run an edge node                                 |
| `demo`             | `crossview.demo`                | edge node + matcher + cross-camera query on the shipped footage |
| `build-embedder`   | `crossview.trainer.export`      | build the default MobileNetV2 ONNX embedder      |
| `export-detector`  | `crossview.edge.yolo_export`    | export a local YOLO .pt to ONNX, offline         |
| `init`             | `crossview.site`                | a new site: every key, the allow-list, token and configs |
| `keys`             | `crossview.kernel.transport`    | CURVE key pair for an edge or the matcher        |
| `matcher`          | `crossview.matcher.service`     | run the matcher: ingest, index, retention, and   |
|                    | `crossview.matcher.api`         | its HTTP API and web page                        |
| `query`            | `crossview.matcher.query`       | search a matcher's data directory, read-only; or |
|                    | `crossview.matcher.client`      | with `--url`, a running matcher's HTTP API       |
| `users`, `audit`   | `crossview.matcher.users`, `.audit` | API users and roles; the audit log as JSON lines |
| `models`           | `crossview.matcher.registry`    | the model registry: list, register, promote, rollback, status |
| `train`            | `crossview.trainer.engine`      | domain adaptation (DAAM / DAAL, Algorithm 1)     |
| `adapt`            | `crossview.adapt`               | the periodic job: harvest → adapt → gate → register |
| `export`           | `crossview.trainer.export`      | a training checkpoint's domain-shared path → ONNX |
|                    | `crossview.trainer.quantize`    | with `--int8`, its statically quantised twin too  |
| `calibrate`        | `crossview.trainer.calibration` | fit cosine → P(same person) on a harvest, into the model |
| `quantize`         | `crossview.trainer.quantize`    | an fp32 ONNX embedder → int8 (QDQ), calibrated on a harvest |
| `model-info`       | `crossview.kernel.modelmeta`    | a model's version, precision and score calibration |
| `eval`             | `crossview.trainer.eval_onnx`   | rank-1/5/10 and mAP of an ONNX model on a labelled set |

This is the app floor: the only code, with `crossview.demo`, that imports the services.
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
import threading
import time
from datetime import datetime, timezone
from functools import partial
from pathlib import Path

from crossview.kernel.config import ConfigError, IndexConfig, QueryConfig, StoreConfig, load_edge_config, load_matcher_config
from crossview.kernel.runtime import offline_env, passive_threads, setup_logging

log = logging.getLogger("crossview")


def _edge(args: argparse.Namespace) -> int:
    from crossview.edge.node import EdgeNode

    node = EdgeNode(load_edge_config(args.config))
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: node.stop())
    stats = node.run(max_seconds=args.max_seconds)
    return 0 if any(s.frames for s in stats.values()) else 1


def _demo(args: argparse.Namespace) -> int:
    from crossview.demo import run_demo

    return run_demo(args.config, args.out, serve=args.serve)


def _build_embedder(args: argparse.Namespace) -> int:
    from crossview.trainer.export import build_default_embedder

    args.out.parent.mkdir(parents=True, exist_ok=True)
    meta = build_default_embedder(args.out)
    print(f"{args.out}: {meta.name} version {meta.version}, input {meta.input_h}x{meta.input_w}, {meta.embedding_dim}-d")
    return 0


def _export_detector(args: argparse.Namespace) -> int:
    from crossview.edge.yolo_export import export_yolo

    if len(args.imgsz) > 2:
        raise ValueError(f"--imgsz takes one side or H W, got {args.imgsz}")
    h, w = args.imgsz if len(args.imgsz) == 2 else args.imgsz * 2
    out = export_yolo(args.weights, args.out, imgsz=(h, w))
    print(f"{out}: ONNX detector, input 1x3x{h}x{w}")
    return 0


def _keys(args: argparse.Namespace) -> int:
    from crossview.kernel.transport import generate_keys

    public, secret = generate_keys(args.out, args.name, force=args.force)
    print(f"public key {public} (give it to the other side), secret key {secret} (keep it here, mode 600)")
    return 0


def _init(args: argparse.Namespace) -> int:
    from crossview.site import init_site

    written = init_site(args.site, args.edges.split(","), args.camera, args.matcher_host, args.port, args.http_port)
    models = (args.site / "models").resolve()
    print(f"wrote the site's setup in {args.site}: {', '.join(f'{name} {path}' for name, path in written.items())}")
    print("next, on this machine (or copy each folder to its machine):")
    print(f"  crossview build-embedder --out {models / 'mobilenetv2-imagenet.onnx'}")
    print(f"  crossview matcher --config {written['matcher']}")
    for name, path in written.items():
        if name != "matcher":
            print(f"  crossview edge --config {path}")
    token = (args.site / "matcher" / "keys" / "http-token").resolve()
    print(f"the edges follow the matcher's model registry; to adapt the model to this site weekly (a GPU, a labelled "
          f"source, harvest.enabled in the edge configs): crossview adapt --config configs/adapt.yaml, with its "
          f"matcher.url http://{args.matcher_host}:{args.http_port} and matcher.token_file {token}")
    return 0


def _matcher(args: argparse.Namespace) -> int:
    from crossview.matcher.api import serve
    from crossview.matcher.service import Matcher

    cfg = load_matcher_config(args.config)
    matcher = Matcher(cfg)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    matcher.start()
    server = None
    try:
        server = serve(matcher, cfg.http)
        stop.wait(args.max_seconds)
    finally:
        if server is not None:
            server.stop()
        matcher.stop()
    return 0


def _when(text: str) -> float:
    """Unix seconds, or an ISO 8601 date/time (local time unless it says otherwise), within the wire's bounds."""
    from crossview.kernel.wire import MAX_TS

    try:
        ts = float(text)
    except ValueError:
        try:
            ts = datetime.fromisoformat(text).timestamp()
        except ValueError:
            raise argparse.ArgumentTypeError(f"not Unix seconds or an ISO date/time: {text!r}") from None
    if not 0 <= ts <= MAX_TS:  # NaN fails too
        raise argparse.ArgumentTypeError(f"{text!r} is outside 1970 .. 2200 (Unix seconds 0 .. {MAX_TS:.0f})")
    return ts


def _track_ref(text: str) -> tuple[str, str, int]:
    from crossview.kernel.wire import MAX_INT

    node, sep, rest = text.partition(":")
    camera, sep2, track = rest.rpartition(":")
    if not (sep and sep2 and node and camera and track.isdigit() and int(track) <= MAX_INT):
        raise argparse.ArgumentTypeError(f"a track is node:camera:track, e.g. edge-1:gate:17, the track a number up to "
                                         f"{MAX_INT}; got {text!r}")
    return node, camera, int(track)


def _seconds(text: str) -> float:
    """A positive, finite number of seconds."""
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"a positive number of seconds; got {text!r}")
    return value


def _camera(text: str):
    from crossview.site import parse_camera

    try:
        return parse_camera(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _query(args: argparse.Namespace) -> int:
    from crossview.matcher.query import Filters
    from crossview.matcher.service import open_data

    if args.image is not None and not args.model:
        raise ValueError("--image needs --model VERSION: the embedding model version to search")
    if args.url:
        return _query_http(args)
    cfg = load_matcher_config(args.config) if args.config else None
    data_dir = args.data_dir or (cfg.data_dir if cfg else Path("var/matcher"))
    models = [*(cfg.models if cfg else []), *args.embedder]
    engine = open_data(data_dir, cfg.index if cfg else IndexConfig(), cfg.query if cfg else QueryConfig(), models, read_only=True,
                       store_cfg=cfg.store if cfg else None)
    filters = Filters(since=args.since, until=args.until, cameras=args.camera, min_score=args.min_score, top_k=args.top_k,
                      min_probability=args.min_probability)
    try:
        result = _ask(engine, args, filters)
    except LookupError as e:
        log.error("%s", e.args[0])
        return 1
    finally:
        engine.store.close()
    print(json.dumps(result.to_dict(), indent=2) if args.json else result.to_text())
    return 0


def _ask(engine, args: argparse.Namespace, filters):
    if args.sighting is not None:
        return engine.search_sighting(args.sighting, filters)
    if args.track is not None:
        return engine.search_track(*args.track, args.model, filters)
    import cv2

    image = cv2.imread(str(args.image), cv2.IMREAD_COLOR)
    if image is None:
        raise FileNotFoundError(f"{args.image}: not a readable image")
    return engine.search_image(image, args.model, filters)


def _status(args: argparse.Namespace) -> int:
    from crossview.matcher.client import MatcherClient, read_token
    from crossview.matcher.edges import report_text

    try:
        report = MatcherClient(args.url, read_token(args.token_file), timeout=15).edges()
    except (PermissionError, ConnectionError) as e:
        log.error("%s", e)
        return 2
    print(json.dumps(report, indent=2) if args.json else report_text(report))
    return 0


def _watch(args: argparse.Namespace) -> int:
    from crossview.matcher.client import MatcherClient, read_token

    if args.image is not None and not args.model:
        raise ValueError("--image needs --model VERSION: the embedding model version of the watchlist entry")
    client = MatcherClient(args.url, read_token(args.token_file), timeout=30)
    fields = {"name": args.name, "min_probability": args.min_probability, "min_similarity": args.min_similarity,
              "cameras": args.camera}
    try:
        if args.image is not None:
            entry = client.watch_image(args.image.read_bytes(), args.image.name, {**fields, "model": args.model})
        elif args.sighting is not None:
            entry = client.watch({**fields, "sighting_id": args.sighting})
        else:
            node, camera, track = args.track
            entry = client.watch({**fields, "track": {"node": node, "camera": camera, "track": track, "model": args.model}})
    except (LookupError, PermissionError, ConnectionError) as e:
        log.error("%s", e)
        return 1 if isinstance(e, LookupError) else 2
    level = (f"P >= {entry['min_probability']:g}" if entry["calibrated"]
             else f"similarity >= {entry['min_similarity']:g} (uncalibrated model: raw cosine, not a probability)")
    print(f"watchlist entry {entry['id']}: {entry['name']}, model {entry['model']}, alert at {level}, "
          f"cameras {', '.join(entry['cameras'] or ['all'])}")
    return 0


def _alert_line(a: dict) -> str:
    score = f"P {a['probability']:.2f}" if a["probability"] is not None else f"similarity {a['similarity']:.2f} (uncalibrated)"
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(a["ts"]))
    return f"alert {a['id']}: {a['name']} on {a['camera']} at {when}, {score}, node {a['node']} track {a['track']}, " \
           f"sighting {a['sighting']}"


def _alerts(args: argparse.Namespace) -> int:
    from crossview.matcher.client import MatcherClient, read_token

    client, after = MatcherClient(args.url, read_token(args.token_file), timeout=15), args.after
    try:
        while True:
            batch = client.alerts(after, 1000)
            for a in batch:
                print(json.dumps(a) if args.json else _alert_line(a), flush=True)
            after = batch[-1]["id"] if batch else after
            if not args.follow:
                return 0
            if len(batch) < 1000:
                time.sleep(2)
    except (PermissionError, ConnectionError) as e:
        log.error("%s", e)
        return 2
    except KeyboardInterrupt:
        return 0


def _matcher_data(args: argparse.Namespace) -> tuple[Path, StoreConfig | None]:
    """Where a verb working on the matcher's data finds it: the data directory (--data-dir, else the --config's, else
    the default) and the --config's `store` (with kind postgres, the registry, users and audit log are there)."""
    cfg = load_matcher_config(args.config) if args.config else None
    return args.data_dir or (cfg.data_dir if cfg else Path("var/matcher")), cfg.store if cfg else None


def _users(args: argparse.Namespace) -> int:
    from crossview.matcher.users import Users

    users = Users(*_matcher_data(args))
    if args.action == "add":
        token = users.add(args.name, args.role)
        print(f"user {args.name} ({args.role}) added; their token, shown only now:\n{token}")
    elif args.action == "revoke":
        users.revoke(args.name)
        print(f"user {args.name}: revoked (their next request is refused)")
    else:
        listed = users.list()
        for u in listed:
            state = "revoked " + _utc(u["revoked"]) if u["revoked"] else "active"
            print(f"{u['name']:<24} {u['role']:<7} since {_utc(u['created'])}  {state}")
        if not listed:
            print("no users: only the configured http.token (the user 'admin') gets in (crossview users add NAME)")
    return 0


def _audit(args: argparse.Namespace) -> int:
    from crossview.matcher.audit import AuditLog

    data_dir, store = _matcher_data(args)
    log_ = AuditLog(data_dir, read_only=True, store=store)
    since = time.time() - args.days * 86400 if args.days else None
    out = open(args.out, "w") if args.out else sys.stdout
    try:
        n = sum(out.write(line + "\n") > 0 for line in log_.export(since))
    finally:
        if args.out:
            out.close()
    if args.out:
        print(f"{n} audit entries written to {args.out}")
    return 0


def _utc(ts: float) -> str:
    return datetime.fromtimestamp(ts, timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


def _models(args: argparse.Namespace) -> int:
    if args.action == "status":
        return _models_status(args)
    from crossview.matcher.registry import Registry

    data_dir, store = _matcher_data(args)
    registry = Registry(data_dir, read_only=args.action == "list", store=store)
    if args.action == "list":
        entries = registry.list()
        if args.json:
            print(json.dumps([e.to_dict() for e in entries], indent=2))
        for e in [] if args.json else entries:
            gate = f", gate {json.dumps(e.gate)}" if e.gate else ""
            print(f"{e.version:<40} {e.state:<10} sha256 {e.sha256[:12]}  {e.bytes / 1e6:.1f} MB  "
                  f"{'calibrated' if e.meta['calibrated'] else 'uncalibrated'}, {e.meta['precision']}{gate}")
        if not entries and not args.json:
            print(f"no models registered in {data_dir} (crossview models register FILE)")
        return 0
    try:
        if args.action == "register":
            gate = json.loads(args.gate.read_text()) if args.gate else None
            entry = registry.register(args.model, gate)
        elif args.action == "promote" and args.canary:
            entry = registry.start_canary(args.version, [n for n in args.canary.split(",") if n], args.hold)
        elif args.action == "promote":
            entry = registry.promote(args.version)
        else:
            entry = registry.rollback()
    except LookupError as e:
        log.error("%s", e.args[0])
        return 1
    print(f"{entry.version}: {entry.state} (sha256 {entry.sha256[:12]})")
    return 0


def _models_status(args: argparse.Namespace) -> int:
    from crossview.matcher.client import MatcherClient, read_token

    client = MatcherClient(args.url, read_token(args.token_file), timeout=15)
    try:
        models = client.models()
        production = next((m for m in models if m["state"] == "production"), None)
        edges = client.edges()["edges"]
    except (PermissionError, ConnectionError) as e:
        log.error("%s", e)
        return 2
    want = production["version"] if production else None
    canary = next((m["version"] for m in models if m["state"] == "canary"), None)
    print(f"production: {want or 'none (crossview models promote VERSION)'}" + (f"; canary: {canary}" if canary else ""))
    for e in edges:
        mark = "" if want is None else " (production)" if e["model"] == want else \
            " (canary)" if e["model"] == canary else " (not production)"
        print(f"{e['node']:<24} {e['state']:<8} runs {e['model']}{mark}")
    if not edges:
        print("no edge has sent a heartbeat yet")
    return 0


def _query_http(args: argparse.Namespace) -> int:
    """`crossview query --url`: the same question to a running matcher's HTTP API."""
    from crossview.matcher.client import MatcherClient, read_token, result_from_dict

    if args.config or args.data_dir or args.embedder:
        raise ValueError("--url asks a running matcher: --config, --data-dir and --embedder do not apply")
    client = MatcherClient(args.url, read_token(args.token_file))
    filters = {"since": args.since, "until": args.until, "cameras": args.camera, "min_score": args.min_score, "top_k": args.top_k,
               "min_probability": args.min_probability}
    try:
        if args.image is not None:
            answer = client.query_image(args.image.read_bytes(), args.image.name, args.model, filters)
        elif args.sighting is not None:
            answer = client.query({"sighting_id": args.sighting, **filters})
        else:
            node, camera, track = args.track
            answer = client.query({"track": {"node": node, "camera": camera, "track": track, "model": args.model}, **filters})
    except LookupError as e:
        log.error("%s", e.args[0])
        return 1
    except (PermissionError, ConnectionError) as e:
        log.error("%s", e)
        return 2
    print(json.dumps(answer, indent=2) if args.json else result_from_dict(answer).to_text())
    return 0


def _train(args: argparse.Namespace) -> int:
    from crossview.trainer.config import load_train_config
    from crossview.trainer.engine import Trainer

    out = Trainer(load_train_config(args.config), resume=args.resume).run()
    if out is not None:
        print(f"model: {out}")
    return 0


def _adapt(args: argparse.Namespace) -> int:
    from crossview.adapt import load_adapt_config, run_job

    outcome = run_job(load_adapt_config(args.config), args.run_id)
    print(f"adapt run {outcome.run_id}: {outcome.message}")
    return 0


def _export(args: argparse.Namespace) -> int:
    from crossview.trainer.export import export_checkpoint

    if args.int8 and args.calib_harvest is None:
        raise ValueError("--int8 needs --calib-harvest DIR: the harvested crops that set the int8 ranges")
    out = export_checkpoint(args.checkpoint, args.out)
    print(f"model: {out}")
    if args.int8:
        _write_int8(out, out.with_name(f"{out.stem}-int8.onnx"), args)
    return 0


def _calibrate(args: argparse.Namespace) -> int:
    from crossview.trainer.calibration import calibrate_model

    cal = calibrate_model(args.model, args.harvest, args.out, min_gap_s=args.min_gap, method=args.method)
    print(f"{args.out or args.model}: {cal.describe()}")
    return 0


def _quantize(args: argparse.Namespace) -> int:
    _write_int8(args.model, args.out, args)
    return 0


def _write_int8(model: Path, out: Path, args: argparse.Namespace) -> None:
    """`quantize` and `export --int8`: the options of `_quantize_options`."""
    from crossview.trainer.quantize import quantize_model

    meta = quantize_model(model, args.calib_harvest, out, max_crops=args.max_crops, float_stem=args.float_stem)
    print(f"{out}: {meta.name} version {meta.version}, {meta.precision} ({meta.extra['quantization']})")


def _model_info(args: argparse.Namespace) -> int:
    from crossview.kernel.calibration import describe
    from crossview.kernel.embedder import Embedder

    meta = Embedder(args.model, device="cpu").meta
    print(f"{args.model}: {meta.name} version {meta.version}, {meta.precision}, input {meta.input_h}x{meta.input_w}, "
          f"{meta.embedding_dim}-d")
    print(f"score: {describe(meta.calibration)}")
    return 0


def _eval(args: argparse.Namespace) -> int:
    from crossview.trainer.eval_onnx import evaluate_onnx

    result = evaluate_onnx(args.model, args.kind, args.root, cache_dir=args.cache_dir, rerank=args.rerank)
    if args.json:
        print(json.dumps(result))
    else:
        print(f"{args.model} on {args.kind}:{args.root}: {result['valid_queries']} queries "
              f"({result['skipped_queries']} without a valid match skipped), {result['gallery']} gallery images")
        print(f"mAP {result['mAP']:.1%}  rank-1 {result['rank1']:.1%}  rank-5 {result['rank5']:.1%}  "
              f"rank-10 {result['rank10']:.1%}")
    return 0


def _quantize_options(p: argparse.ArgumentParser, required: bool) -> None:
    p.add_argument("--calib-harvest", type=Path, required=required, metavar="DIR",
                   help="harvested crops whose activations set the int8 ranges")
    p.add_argument("--max-crops", type=int, default=256, help="calibration crops drawn from it (default: %(default)s)")
    p.add_argument("--float-stem", type=int, metavar="N",
                   help="keep the first N convolutions float (default: the fewest of 0, 2, 4, 8 whose vectors agree with fp32's)")


def _person_args(p: argparse.ArgumentParser) -> None:
    """Who: exactly one of a stored sighting, an edge track or a crop, and the model version."""
    who = p.add_mutually_exclusive_group(required=True)
    who.add_argument("--sighting", type=int, metavar="ID", help="a stored sighting id")
    who.add_argument("--track", type=_track_ref, metavar="NODE:CAMERA:TRACK", help="an edge track")
    who.add_argument("--image", type=Path, metavar="FILE", help="a person crop (needs --model)")
    p.add_argument("--model", help="embedding model version (--image; optional with --track)")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="crossview", description="Find a person across a site's cameras.")
    levels = ["DEBUG", "INFO", "WARNING", "ERROR"]
    p.add_argument("--log-level", default="INFO", choices=levels)
    after_verb = argparse.ArgumentParser(add_help=False)  # `crossview edge --log-level DEBUG` works too
    after_verb.add_argument("--log-level", default=argparse.SUPPRESS, choices=levels, help="(default: INFO)")
    sub = p.add_subparsers(dest="verb", required=True, metavar="VERB")
    verb = partial(sub.add_parser, parents=[after_verb])
    remote = argparse.ArgumentParser(add_help=False)  # the verbs that only ask a running matcher's HTTP API
    remote.add_argument("--url", required=True, help="the matcher's HTTP API, e.g. http://127.0.0.1:8080")
    remote.add_argument("--token-file", type=Path, help="file holding the API token (default: $CROSSVIEW_TOKEN)")
    remote_verb = partial(sub.add_parser, parents=[after_verb, remote])

    e = verb("edge", help="run an edge node: cameras -> detection -> tracking -> embeddings -> ZeroMQ")
    e.add_argument("--config", type=Path, default=Path("configs/edge.yaml"), help="edge YAML (default: %(default)s)")
    e.add_argument("--max-seconds", type=_seconds, default=None, help="stop after this long (default: run until stopped)")
    e.set_defaults(run=_edge)

    d = verb("demo", help="edge node + matcher on the shipped footage, then a cross-camera query")
    d.add_argument("--config", type=Path, default=Path("configs/demo.yaml"), help="demo edge YAML (default: %(default)s)")
    d.add_argument("--out", type=Path, default=Path("runs/demo"), help="matcher data and report (default: %(default)s)")
    d.add_argument("--serve", action="store_true", help="afterwards keep the matcher's web page up until Ctrl-C")
    d.set_defaults(run=_demo)

    b = verb("build-embedder", help="build the default MobileNetV2 ImageNet embedder as ONNX (offline)")
    b.add_argument("--out", type=Path, default=Path("models/mobilenetv2-imagenet.onnx"), help="(default: %(default)s)")
    b.set_defaults(run=_build_embedder)

    x = verb("export-detector", help="export a local YOLO .pt file to ONNX for the edge node (offline)")
    x.add_argument("weights", type=Path, help="YOLO .pt file")
    x.add_argument("--out", type=Path, required=True, help="ONNX file to write")
    x.add_argument("--imgsz", type=int, nargs="+", default=[640], metavar="N",
                   help="one side, or H W (e.g. 480 640 for 4:3 cameras: a quarter less work than 640)")
    x.set_defaults(run=_export_detector)
    k = verb("keys", help="generate a CURVE key pair for an edge node or the matcher")
    k.add_argument("--out", type=Path, default=Path("keys"), help="folder (default: %(default)s)")
    k.add_argument("--name", required=True, help="e.g. matcher or the edge's node_id")
    k.add_argument("--force", action="store_true", help="replace an existing pair (cuts off every peer that trusts it)")
    k.set_defaults(run=_keys)

    i = verb("init", help="a new site: key pairs, allow-list, HTTP token, matcher and edge configs")
    i.add_argument("site", type=Path, help="new folder (one sub-folder per machine)")
    i.add_argument("--edges", required=True, help="comma-separated edge node ids, e.g. edge-1,edge-2")
    i.add_argument("--camera", type=_camera, action="append", default=[], metavar="[EDGE:]ID=SOURCE", required=True,
                   help="a camera of every edge, or of EDGE only (repeatable); SOURCE: file, rtsp://, http://, usb:N")
    i.add_argument("--matcher-host", default="127.0.0.1", help="address the edges reach the matcher at (default: %(default)s)")
    i.add_argument("--port", type=int, default=5555, help="matcher ZeroMQ ingest port (default: %(default)s)")
    i.add_argument("--http-port", type=int, default=8080, help="matcher HTTP API port (default: %(default)s)")
    i.set_defaults(run=_init)

    m = verb("matcher", help="run the matcher: ZeroMQ ingest -> SQLite + FAISS, retention, snapshots")
    m.add_argument("--config", type=Path, default=Path("configs/matcher.yaml"), help="matcher YAML (default: %(default)s)")
    m.add_argument("--max-seconds", type=_seconds, default=None, help="stop after this long (default: run until stopped)")
    m.set_defaults(run=_matcher)

    q = verb("query", help="find where a person was seen, from a matcher's data directory (read-only)",
                       description="Searches the matcher's store directly (safe while the matcher runs). "
                                   "Answers are tracks grouped per camera, ordered by time.")
    q.add_argument("--config", type=Path, help="matcher YAML: data_dir, index and query settings, models")
    q.add_argument("--data-dir", type=Path, help="matcher data directory (default: the config's, else var/matcher)")
    _person_args(q)
    q.add_argument("--embedder", type=Path, action="append", default=[], metavar="ONNX",
                   help="ONNX embedder for --image (repeatable; added to the config's models)")
    q.add_argument("--since", type=_when, help="Unix seconds or ISO date/time")
    q.add_argument("--until", type=_when, help="Unix seconds or ISO date/time")
    q.add_argument("--camera", action="append", metavar="ID", help="only these cameras (repeatable)")
    q.add_argument("--min-score", type=float, default=0.0, help="minimum cosine similarity (default: %(default)s)")
    q.add_argument("--min-probability", type=float, metavar="P",
                   help="minimum P(same person), from the model's calibration (calibrated models only)")
    q.add_argument("--top-k", type=int, default=10, help="tracks to return (default: %(default)s)")
    q.add_argument("--json", action="store_true", help="JSON instead of a table")
    q.add_argument("--url", help="ask a running matcher's HTTP API instead, e.g. http://127.0.0.1:8080")
    q.add_argument("--token-file", type=Path, help="with --url: file holding the API token (default: $CROSSVIEW_TOKEN)")
    q.set_defaults(run=_query)

    st = remote_verb("status", help="a running matcher's edges and cameras: online, stalled or offline, since when")
    st.add_argument("--json", action="store_true", help="the API's JSON instead of lines")
    st.set_defaults(run=_status)

    w = remote_verb("watch", help="put a person on a running matcher's watchlist: alerts when they are seen again")
    w.add_argument("--name", required=True, help="who this is, e.g. 'visitor in red'")
    _person_args(w)
    level = w.add_mutually_exclusive_group()
    level.add_argument("--min-probability", type=float, help="alert at this P(same person) (calibrated models)")
    level.add_argument("--min-similarity", type=float, help="alert at this cosine similarity (uncalibrated models)")
    w.add_argument("--camera", action="append", metavar="ID", help="watch only these cameras (repeatable)")
    w.set_defaults(run=_watch)

    a = remote_verb("alerts", help="a running matcher's watchlist alerts, oldest first; --follow waits for new ones")
    a.add_argument("--after", type=int, default=0, metavar="ID", help="only alerts after this one")
    a.add_argument("--follow", action="store_true", help="keep polling every 2 s until Ctrl-C")
    a.add_argument("--json", action="store_true", help="one JSON object per line")
    a.set_defaults(run=_alerts)

    mo = verb("models", help="the model registry: list, register, promote, rollback (matcher host); status (--url)")
    mo_sub = mo.add_subparsers(dest="action", required=True, metavar="ACTION")
    local = argparse.ArgumentParser(add_help=False)  # on the matcher's own disk, as `crossview query`
    local.add_argument("--config", type=Path, help="matcher YAML (its data_dir)")
    local.add_argument("--data-dir", type=Path, help="matcher data directory (default: the config's, else var/matcher)")
    mo_sub.add_parser("list", parents=[after_verb, local], help="every version, its state and gate report").add_argument(
        "--json", action="store_true")
    reg = mo_sub.add_parser("register", parents=[after_verb, local], help="add an ONNX model as a candidate")
    reg.add_argument("model", type=Path, help="ONNX embedder with crossview metadata")
    reg.add_argument("--gate", type=Path, help="its gate report (JSON)")
    pro = mo_sub.add_parser("promote", parents=[after_verb, local], help="make a version production (edges follow)")
    pro.add_argument("version")
    pro.add_argument("--canary", metavar="EDGE,EDGE", help="these edges first; the rest once they ran it --hold seconds")
    pro.add_argument("--hold", type=_seconds, default=3600.0, help="canary hold time in seconds (default: %(default)s)")
    mo_sub.add_parser("rollback", parents=[after_verb, local],
                      help="stop a canary; else make the production version before this one production")
    mo_sub.add_parser("status", parents=[after_verb, remote], help="which edge runs which version")
    mo.set_defaults(run=_models)

    us = verb("users", help="who may use the matcher's API: add (prints a token), list, revoke (matcher host)")
    us_sub = us.add_subparsers(dest="action", required=True, metavar="ACTION")
    add = us_sub.add_parser("add", parents=[after_verb, local], help="a new user with a role; prints their token once")
    add.add_argument("name")
    add.add_argument("--role", choices=("viewer", "admin"), default="viewer",
                     help="viewer: search and see alerts; admin: also watchlist, models, audit (default: %(default)s)")
    us_sub.add_parser("list", parents=[after_verb, local], help="every user, role and state")
    us_sub.add_parser("revoke", parents=[after_verb, local], help="end a user's access").add_argument("name")
    us.set_defaults(run=_users)

    au = verb("audit", help="export the matcher's audit log (who searched for whom) as JSON lines (matcher host)")
    au_sub = au.add_subparsers(dest="action", required=True, metavar="ACTION")
    ex_ = au_sub.add_parser("export", parents=[after_verb, local], help="every entry, oldest first")
    ex_.add_argument("--days", type=_seconds, help="only the last N days")
    ex_.add_argument("--out", type=Path, help="file to write (default: standard output)")
    au.set_defaults(run=_audit)

    t = verb("train", help="domain-adapt a re-ID model from a labelled source to the site (TCAP, DAAM, DAAL, "
                                "ARN, ADFL, EDAAN: the config's method)")
    t.add_argument("--config", type=Path, default=Path("configs/train/tcap.yaml"), help="(default: %(default)s)")
    t.add_argument("--resume", action="store_true", help="continue from <output_dir>/last.pt")
    t.set_defaults(run=_train)

    ad = verb("adapt", help="the periodic re-adaptation job: collect the harvest, adapt, gate, register (and promote)")
    ad.add_argument("--config", type=Path, default=Path("configs/adapt.yaml"), help="(default: %(default)s)")
    ad.add_argument("--run-id", help="a named run instead of the period's (a finished run is not repeated)")
    ad.set_defaults(run=_adapt)

    ex = verb("export", help="export a training checkpoint's domain-shared path to ONNX for the edges")
    ex.add_argument("checkpoint", type=Path, help="e.g. runs/train/tcap/last.pt")
    ex.add_argument("--out", type=Path, help="ONNX file (default: <name>.onnx beside the checkpoint)")
    ex.add_argument("--int8", action="store_true", help="also write <out>-int8.onnx, statically quantised (needs --calib-harvest)")
    _quantize_options(ex, required=False)
    ex.set_defaults(run=_export)

    c = verb("calibrate", help="fit a model's map from cosine similarity to P(same person) on a site harvest")
    c.add_argument("model", type=Path, help="ONNX embedder, e.g. models/mobilenetv2-imagenet.onnx")
    c.add_argument("--harvest", type=Path, required=True, help="an edge harvest folder (crops + sidecars)")
    c.add_argument("--out", type=Path, help="calibrated copy to write (default: the model file, replaced atomically)")
    c.add_argument("--min-gap", type=_seconds, default=2.0, metavar="S",
                   help="positives: crops of one track at least this many seconds apart (default: %(default)s)")
    c.add_argument("--method", choices=["isotonic", "platt"], default="isotonic",
                   help="isotonic (monotone, any shape) or Platt (logistic) (default: %(default)s)")
    c.set_defaults(run=_calibrate)

    qz = verb("quantize", help="an fp32 ONNX embedder -> int8 (ONNX Runtime static QDQ, per channel) for the edges")
    qz.add_argument("model", type=Path, help="fp32 ONNX embedder")
    qz.add_argument("--out", type=Path, required=True, help="int8 ONNX file to write")
    _quantize_options(qz, required=True)
    qz.set_defaults(run=_quantize)

    mi = verb("model-info", help="an ONNX embedder's version, precision and score calibration")
    mi.add_argument("model", type=Path)
    mi.set_defaults(run=_model_info)

    v = verb("eval", help="CMC rank-1/5/10 and mAP of an ONNX embedder on a labelled dataset")
    v.add_argument("model", type=Path, help="ONNX embedder with crossview metadata")
    v.add_argument("--kind", required=True, choices=["market1501", "dukemtmc", "msmt17", "cuhk03", "mot"])
    v.add_argument("--root", type=Path, required=True, help="dataset folder (mot: a sequence or a folder of them)")
    v.add_argument("--cache-dir", type=Path, default=Path("runs/cache"), help="mot crops (default: %(default)s)")
    v.add_argument("--rerank", action="store_true", help="k-reciprocal re-ranking")
    v.add_argument("--json", action="store_true")
    v.set_defaults(run=_eval)
    return p


def main(argv: list[str] | None = None) -> int:
    offline_env()
    passive_threads()
    args = build_parser().parse_args(argv)
    setup_logging(args.log_level)
    try:
        return args.run(args)
    except ConfigError as e:
        log.error("%s", e)
        return 2
    except (OSError, ValueError) as e:  # ModelError, KeyFileError, a busy port, ... name what was wrong
        log.error("%s", e)
        return 2


if __name__ == "__main__":
    sys.exit(main())
