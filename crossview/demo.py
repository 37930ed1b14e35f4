"""The demo: edge node → matcher → a cross-camera query, on the footage shipped in `data/demo`.

    $ crossview demo                  # builds the default embedder on first use
    $ crossview demo --serve          # then keeps the matcher's web page up until Ctrl-C

From Python: `run_demo(Path("configs/demo.yaml"), Path("runs/demo"))`.

The edge node runs four cameras: two cut from one real overhead view (`campus-a` is its first ten
seconds, `campus-b` the next ten, with `start_offset_s: 10` so its times follow on, and the same people
walk through both) and the two TUD street clips. The matcher ingests everything; then the longest track of `campus-a` is looked up on the
other cameras. Prints what each camera saw, the matches, and writes an HTML report with thumbnails.
The edge harvests crops as it goes, and the embedder's calibration (cosine → P(same person)) is
fitted on those tracklets before the query, so the answers are probabilities.
"""

from __future__ import annotations

import base64
import html
import logging
import secrets
import shutil
import signal
import threading
import time
from pathlib import Path

from crossview.kernel.config import EdgeConfig, MatcherConfig, load_edge_config, parse_config

log = logging.getLogger(__name__)
QUERY_CAMERA = "campus-a"


def ensure_default_embedder(path: Path) -> None:
    if path.is_file():
        return
    from crossview.trainer.export import build_default_embedder  # torch is only needed to build it

    log.info("building the default embedder (MobileNetV2, ImageNet weights) into %s", path)
    build_default_embedder(path)


def _matcher_config(edge: EdgeConfig, data_dir: Path) -> MatcherConfig:
    return parse_config({
        "data_dir": str(data_dir),
        "ingest": {"endpoint": edge.publisher.endpoint, "security": {"mode": "plain"}},
        "http": {"token": secrets.token_urlsafe(24), "port": 0},
        "models": [str(edge.embedder.model)],
    }, MatcherConfig)


def run_demo(config: Path, out: Path, serve: bool = False) -> int:
    from crossview.edge.node import EdgeNode
    from crossview.matcher.query import Filters
    from crossview.matcher.service import Matcher

    edge_cfg = load_edge_config(config)
    # a spool of its own too, or what an interrupted demo left unacknowledged would land in this one's empty matcher
    edge_cfg = edge_cfg.model_copy(update={"publisher": edge_cfg.publisher.model_copy(update={"spool_dir": out / "spool"}),
                                           "harvest": edge_cfg.harvest.model_copy(update={"dir": out / "harvest"})})
    ensure_default_embedder(edge_cfg.embedder.model)
    shutil.rmtree(out, ignore_errors=True)  # each demo starts from an empty matcher
    matcher = Matcher(_matcher_config(edge_cfg, out / "matcher"))
    matcher.start()
    try:
        stats = EdgeNode(edge_cfg).run()
        _drain(matcher, sum(s.sightings for s in stats.values()))
        _print_cameras(stats, matcher)
        if edge_cfg.harvest.enabled:
            _calibrate(matcher, edge_cfg.embedder.model, out)
        result = _cross_camera_query(matcher, Filters(top_k=5, cameras=[c for c in stats if c != QUERY_CAMERA]))
        if result is None:
            print(f"\nno track on {QUERY_CAMERA} to look up")
            return 1
        query, hits = result
        others = [c for c in stats if c != QUERY_CAMERA]
        unmatched = [c for c in others if c not in hits.cameras]
        print(f"\nWhere else was {QUERY_CAMERA} track {query.track} seen?\n{hits.to_text()}")
        print("".join(f"{c}: no match\n" for c in unmatched), end="")
        report = _write_report(out / "report.html", matcher, query, hits, unmatched)
        print(f"\nreport with thumbnails: {report}")
        if serve:
            _serve_until_interrupted(matcher)
    finally:
        matcher.stop()
    return 0


def _calibrate(matcher, model: Path, out: Path) -> None:
    """Fit the model's calibration on the crops the demo harvested, so the matcher answers in P(same person)."""
    from crossview.trainer.calibration import calibrate_model

    calibrated = out / f"{model.stem}-calibrated.onnx"
    try:
        cal = calibrate_model(model, out / "harvest", calibrated)
    except ValueError as e:  # too few tracklets, say: the answers stay raw similarity, labelled so
        log.warning("no calibration from the demo's footage (%s): scores stay raw cosine similarity", e)
        return
    matcher.queries.use_model(calibrated)
    print(f"\ncalibrated on the demo's own tracklets: {cal.describe()}")


def _drain(matcher, made: int, wait_s: float = 10.0) -> None:
    """Let the matcher index what it acknowledged before reporting."""
    deadline = time.monotonic() + wait_s
    while matcher.ingest.accepted < made and time.monotonic() < deadline:
        time.sleep(0.1)


def _print_cameras(stats: dict, matcher) -> None:
    header = f"{'camera':<16} {'status':<9} {'frames':>6} {'people':>6} {'sightings':>9} {'stored':>7}"
    print("\n" + header + "\n" + "-" * len(header))
    for cid, s in stats.items():
        print(f"{cid:<16} {s.status:<9} {s.frames:>6} {len(s.tracks):>6} {s.sightings:>9} "
              f"{matcher.ingest.accepted_by_camera[cid]:>7}")
    print("people = distinct tracks per camera; sightings = sent by the edge (spooled until acknowledged); "
          "stored = committed by the matcher")


def _cross_camera_query(matcher, filters):
    """The longest track of the query camera, and where else it was seen."""
    sightings = matcher.store.recent(QUERY_CAMERA, limit=100000)
    if not sightings:
        return None
    counts: dict[int, int] = {}
    for s in sightings:
        counts[s.track] = counts.get(s.track, 0) + 1
    track = max(counts, key=counts.get)
    query = next(s for s in sightings if s.track == track)  # the newest: its embedding is the track's mean
    return query, matcher.queries.search_sighting(query.id, filters)


def _img(matcher, sighting_id: int) -> str:
    jpg = matcher.store.thumbnail(sighting_id)
    if not jpg:
        return "<span>no thumbnail</span>"
    return f'<img src="data:image/jpeg;base64,{base64.b64encode(jpg).decode()}" alt="sighting {sighting_id}">'


def _legend(result) -> str:
    if not result.calibrated:
        return ("<p class=legend>Scores are cosine similarity: this model has no calibration, so they are not "
                "probabilities (<code>crossview calibrate</code> adds one).</p>")
    return ("<p class=legend>P = P(same person), from the model's calibration: <b class=high>&ge; 0.9 likely same "
            "person</b> <b class=mid>&ge; 0.5 possible</b> <b class=low>below: unlikely</b>. Tracks one camera saw at "
            "the same time are different people: they share one person's odds.</p>")


def _caption(hit, s) -> str:
    score = f"P {hit.probability:.2f} · {hit.verdict}" if hit.probability is not None else f"sim {hit.score:.2f}"
    return f"track {hit.track} · {score}<br>{time.strftime('%H:%M:%S', time.localtime(s.ts))}"


def _band(hit) -> str:
    return {"likely same person": "high", "possible": "mid", "unlikely": "low"}.get(hit.verdict, "raw")


def _write_report(path: Path, matcher, query, result, unmatched: list[str]) -> Path:
    rows = []
    for cam, hits in result.cameras.items():
        cells = "".join(f'<figure class={_band(h)}>{_img(matcher, s.id)}<figcaption>{_caption(h, s)}</figcaption></figure>'
                        for h in hits for s in h.sightings)
        rows.append(f"<h2>{html.escape(cam)}</h2><div class=row>{cells}</div>")
    rows += [f"<h2>{html.escape(cam)}</h2><p>no match</p>" for cam in unmatched]
    path.write_text(
        "<!doctype html><meta charset=utf-8><title>Crossview demo</title>"
        "<style>body{font:14px sans-serif;margin:2em}.row{display:flex;flex-wrap:wrap;gap:8px}"
        "figure{margin:0;text-align:center;border-top:4px solid #999}img{height:128px}"
        ".high{border-color:#2a9d5c;color:#2a9d5c}.mid{border-color:#c99a16;color:#c99a16}"
        ".low{border-color:#c94848;color:#c94848}</style>"
        f"<h1>Where else was {html.escape(QUERY_CAMERA)} track {query.track} seen?</h1>"
        f"<figure>{_img(matcher, query.id)}<figcaption>query: sighting {query.id}</figcaption></figure>"
        + _legend(result) + "".join(rows)
    )
    return path.resolve()


def _serve_until_interrupted(matcher) -> None:
    from crossview.matcher.api import serve

    server = serve(matcher, matcher.cfg.http)
    print(f"\nweb page: {server.url}  (token: {matcher.cfg.http.token})  Ctrl-C to stop")
    done = threading.Event()
    signal.signal(signal.SIGINT, lambda *_: done.set())
    signal.signal(signal.SIGTERM, lambda *_: done.set())
    done.wait()
    server.stop()
