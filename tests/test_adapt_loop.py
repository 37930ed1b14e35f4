"""The whole re-adaptation loop on real footage: two edges harvest and upload, `crossview adapt` trains a short CPU
run, gates and promotes it, both edges roll it out, the matcher re-embeds its gallery, and a person seen before
the switch is found after it.

First a candidate worse than production (trained from random weights) meets the real gate: it is refused
and nothing changes on the edges. Then the gate is set to let any candidate through (`min_gain: -1`): what
the second run checks is the loop's plumbing; the gate's judgement of a better model is `test_gate.py`'s
and `test_adapt.py`'s.
"""

from __future__ import annotations

import shutil
import threading
from pathlib import Path

import pytest
import yaml
from helpers import edge_config, matcher_config, shared_data, wait_until

from crossview.adapt import load_adapt_config, run_job
from crossview.edge.node import EdgeNode
from crossview.kernel.embedder import Embedder
from crossview.matcher.api import serve
from crossview.matcher.query import Filters
from crossview.matcher.service import Matcher

REPO = Path(__file__).resolve().parents[1]
CLIPS = {"edge-a": REPO / "data" / "demo" / "tud-stadtmitte.mp4", "edge-b": REPO / "data" / "demo" / "tud-campus.mp4"}
TOKEN = "test-token-0123456789"
EDGE_TOKEN = "edge-token-0123456789"


def _edge(name: str, tmp: Path, default_model: Path, m: Matcher, url: str) -> EdgeNode:
    model = tmp / name / "model.onnx"
    model.parent.mkdir(parents=True)
    shutil.copy(default_model, model)
    camera = {"id": f"{name}-cam", "source": str(CLIPS[name]), "realtime": True, "loop": True, "fps": 3}
    cfg = edge_config(model, [camera], endpoint=m.ingest.endpoint, publisher={"heartbeat_s": 0.5},
                      embedder={"registry": {"url": url, "token_file": str(tmp / "edge-token"), "poll_s": 1}},
                      harvest={"enabled": True, "dir": str(tmp / name / "harvest"), "every_k": 2, "min_height": 48,
                               "upload": {"url": url, "token_file": str(tmp / "edge-token"), "interval_s": 1}})
    return EdgeNode(cfg.model_copy(update={"node_id": name}))


@pytest.mark.timeout(420)
def test_harvest_adapt_gate_promote_roll_out_migrate_and_find_a_person_from_before(tmp_path, default_model):
    (tmp_path / "edge-token").write_text(EDGE_TOKEN)
    (tmp_path / "token").write_text(TOKEN)
    cfg = matcher_config(tmp_path / "matcher", http={"port": 0, "token": TOKEN,
                                                     "edge_token_file": str(tmp_path / "edge-token")},
                         migration={"poll_s": 0.5})
    m = Matcher(cfg)
    old = m.registry.register(default_model).version
    m.registry.promote(old)
    m.start()
    server = serve(m, cfg.http)
    url = server.url.rstrip("/")
    nodes = [_edge(name, tmp_path, default_model, m, url) for name in CLIPS]
    runners = [threading.Thread(target=n.run, daemon=True) for n in nodes]
    for r in runners:
        r.start()
    try:
        wait_until(lambda: m.harvest.count >= 80 and len(m.store.cameras()) == 2, 120,
                   "both edges' harvest uploaded and their sightings stored")
        before = m.store.recent(camera="edge-a-cam", limit=1)[0]
        last_before = m.store.next_id() - 1
        worse = run_job(load_adapt_config(_job_config(tmp_path, url, default_model, "worse", pretrained="none",
                                                      gate={"holdout": 0.3, "min_gap_s": 1.0})), "loop-0")
        assert worse.status == "refused" and "site mAP" in worse.message, worse.message
        assert m.registry.production().version == old and m.registry.get(worse.version).state == "candidate"
        assert all(n.rollout.check() is None for n in nodes), "a poll of the registry installed something"
        assert all(n.embedder.version == old for n in nodes), "an edge changed model after a refusal"

        job = _job_config(tmp_path, url, default_model, "better", gate={
            "holdout": 0.3, "min_gap_s": 1.0, "min_gain": -1.0, "max_source_drop": 1.0, "max_ece_rise": 1.0})
        outcome = run_job(load_adapt_config(job), "loop-1")
        assert outcome.status == "passed", outcome.message
        new = outcome.version
        assert m.registry.production().version == new

        wait_until(lambda: all(n.embedder.version == new for n in nodes), 60, "both edges running the new model")
        wait_until(lambda: {e["model"] for e in m.edges.report()["edges"]} == {new}, 30, "their heartbeats saying so")
        wait_until(lambda: (m.migration.progress() or {}).get("state") == "done", 120, "the gallery migrated")
        progress = m.migration.progress()
        assert progress["model"] == new and progress["migrated"] >= last_before - progress["without_thumbnail"]

        # The person of a sighting stored under the old model, searched after the switch with the new one in the
        # history before it (the edges go on adding new-model sightings of the same people, which may fill a top 5).
        result = m.queries.search_sighting(before.id, Filters(top_k=5, until=before.ts))
        assert result.model == new and result.coverage is None  # migration done: the whole history covered
        hits = result.ranked()
        assert hits and any(s.id <= last_before for h in hits for s in h.sightings), "no earlier sighting found"
        assert Embedder(tmp_path / "edge-a" / "model.onnx", device="cpu").version == new
        wait_until(lambda: old not in m.index.partitions, 30, "the old partition dropped once no edge reports it")
    finally:
        for n in nodes:
            n.stop()
        for r in runners:
            r.join(30)
        server.stop()
        m.stop()


def _job_config(tmp: Path, url: str, baseline: Path, name: str, gate: dict, pretrained: str = "imagenet") -> Path:
    train = {
        "method": "daam", "name": "site", "cache_dir": str(tmp / "cache"), "device": "cpu", "workers": 0,
        "source": {"kind": "mot", "root": str(shared_data("TUD-Campus")), "frame_step": 3},
        "target": {"kind": "harvest", "root": "set by the job"},
        "input": {"height": 64, "width": 32},
        "model": {"backbone": "mobilenet_v2", "pretrained": pretrained, "embedding_dim": 64},
        "clustering": {"method": "kmeans", "k": 8}, "sampler": {"p": 4, "k": 4},
        "pretrain": {"epochs": 1, "lr": 0.01}, "adapt": {"iterations": 1, "epochs": 1, "lr": 0.005},
    }
    (tmp / f"{name}-train.yaml").write_text(yaml.safe_dump(train))
    job = {"matcher": {"url": url, "token_file": str(tmp / "token")}, "train": f"{name}-train.yaml",
           "state_dir": str(tmp / name), "baseline_model": str(baseline), "min_tracklets": 4,
           "gate": {**gate, "source": False}}
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(job))
    return path
