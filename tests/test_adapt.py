"""`crossview adapt`: one job against a served matcher, with its harvest uploaded over HTTP as edges do.

A real harvest (TUD-Stadtmitte's ground-truth tracks in the edge's harvest format) goes to the matcher
through `POST /api/v1/harvest` with the edges' token; the job collects it through the API, trains a
short CPU run on it, gates the candidate against the model the site runs, and registers it.
"""

from __future__ import annotations

import json
import threading

import pytest
import requests
import yaml
from helpers import matcher_config, shared_data

from crossview.adapt import _locked, load_adapt_config, run_job
from crossview.cli import main
from crossview.kernel.harvest import sidecar_path
from crossview.matcher.api import serve
from crossview.matcher.service import Matcher
from crossview.trainer.config import overlay
from crossview.trainer.data.mot_harvest import mot_harvest

TOKEN = "test-token-0123456789"
EDGE_TOKEN = "edge-token-0123456789"


def upload_harvest(url: str, root) -> int:
    """Every crop under `root` to the matcher, 50 at a time, as an edge's uploader sends them."""
    crops = sorted(root.rglob("*.jpg"))
    for i in range(0, len(crops), 50):
        batch = crops[i:i + 50]
        files = [("crops", (c.name, c.read_bytes(), "image/jpeg")) for c in batch]
        files += [("sidecars", (c.name + ".json", sidecar_path(c).read_bytes(), "application/json")) for c in batch]
        res = requests.post(f"{url}/api/v1/harvest", files=files, headers={"Authorization": f"Bearer {EDGE_TOKEN}"},
                            timeout=60)
        assert res.status_code == 200 and all(r["status"] == "stored" for r in res.json()["results"]), res.text
    return len(crops)


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    """A served matcher holding the harvest of TUD-Stadtmitte (10 people, every 4th frame)."""
    tmp = tmp_path_factory.mktemp("site")
    (tmp / "edge-token").write_text(EDGE_TOKEN)
    (tmp / "token").write_text(TOKEN)
    cfg = matcher_config(tmp / "matcher", http={"port": 0, "token": TOKEN, "edge_token_file": str(tmp / "edge-token")})
    m = Matcher(cfg)
    m.start()
    server = serve(m, cfg.http)
    url = server.url.rstrip("/")
    mot_harvest(shared_data("TUD-Stadtmitte"), tmp / "cache", tmp / "harvest", frame_step=4)
    crops = upload_harvest(url, tmp / "harvest")
    yield m, url, tmp, crops
    server.stop()
    m.stop()


def job_config(site, name: str, baseline, train_over: dict | None = None, **over):
    m, url, tmp, _ = site
    train = {
        "method": "daam", "name": "site", "cache_dir": str(tmp / "cache"), "device": "cpu", "workers": 0,
        "source": {"kind": "mot", "root": str(shared_data("TUD-Campus")), "frame_step": 3},
        "target": {"kind": "harvest", "root": "unused: the job sets it"},
        "input": {"height": 64, "width": 32},
        "model": {"backbone": "mobilenet_v2", "pretrained": "imagenet", "embedding_dim": 64},
        "clustering": {"method": "kmeans", "k": 8}, "sampler": {"p": 4, "k": 4},
        "pretrain": {"epochs": 1, "lr": 0.01}, "adapt": {"iterations": 1, "epochs": 1, "lr": 0.005},
    }
    (tmp / f"{name}-train.yaml").write_text(yaml.safe_dump(overlay(train, train_over or {})))
    job = {"matcher": {"url": url, "token_file": str(tmp / "token")}, "train": f"{name}-train.yaml",
           "state_dir": str(tmp / name), "baseline_model": str(baseline), "min_tracklets": 5,
           "gate": {"holdout": 0.4}, **over}
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(job))
    return path


def test_a_run_collects_gates_registers_and_promotes_and_a_second_start_does_nothing(site, make_tiny_model, capsys):
    m, _, tmp, crops = site
    weak = tmp / "weak.onnx"
    # One dimension: every unit embedding is +1 or -1, so the ranking is near chance. (An untrained 8-d conv is a
    # colour histogram, which on TUD's ten people scores 52.5 held-out mAP, as much as a one-epoch CPU run.)
    make_tiny_model(weak, "weak-1", dim=1)
    path = job_config(site, "passes", weak, gate={"holdout": 0.4, "source": False})
    assert main(["adapt", "--config", str(path), "--run-id", "r1"]) == 0
    out = capsys.readouterr().out
    run = tmp / "passes" / "runs" / "r1"
    assert "passed the gate and is now production" in out
    assert len(list((run / "harvest").rglob("*.jpg"))) == crops  # collected through the API, every crop
    report = json.loads((run / "gate.json").read_text())
    assert report["passed"] and report["current"]["model"] == "weak-1"
    assert report["candidate"]["site_mAP"] > report["current"]["site_mAP"] and report["candidate"]["site_queries"] > 0
    assert "| site mAP (held-out tracklets)" in (run / "gate.md").read_text()
    production = m.registry.production()
    assert production.version == report["candidate"]["model"] and production.gate == report
    assert (tmp / "passes" / "checkpoints" / f"{production.version}.pt").exists()  # the next run starts from it
    held = len(list((run / "harvest").rglob("*.jpg"))) - len(list((run / "train-harvest").rglob("*.jpg")))
    assert held > 0, "the gate's tracklets were trained on"

    # Started again in the same run (a CronJob's double start): nothing is done twice.
    again = run_job(load_adapt_config(path), "r1")
    assert again.status == "done-before" and again.version == production.version
    with _locked(tmp / "passes") as ours:  # a run under way elsewhere
        assert ours
        busy = threading.Thread(target=lambda: setattr(busy, "outcome", run_job(load_adapt_config(path), "r2")))
        busy.start()
        busy.join()
    assert busy.outcome.status == "busy"
    # The next run's harvest starts where this one's ended: nothing new to adapt on yet.
    assert run_job(load_adapt_config(path), "r3").status == "too-little-harvest"
    assert not (tmp / "passes" / "runs" / "r3" / "plan.json").exists()  # a later start looks again, up to its time



def test_the_shipped_method_tcap_adapts_through_the_job_from_the_collected_tracklets(site, make_tiny_model):
    """configs/adapt.yaml trains TCAP: the harvest the job collects through the API must keep the sidecars TCAP
    clusters by (tracklets, co-occurring pairs), and the candidate is gated and registered like any other. Its
    train config has no `target:` (the job sets it)."""
    m, _, tmp, _ = site
    weak = tmp / "weak-tcap.onnx"
    make_tiny_model(weak, "weak-2", dim=1)
    tcap = {"method": "tcap", "model": {"attention": "none"}, "optim": {"kind": "adam"},
            "clustering": {"method": "dbscan"}, "pretrain": {"lr": 3.5e-4}, "adapt": {"lr": 3.5e-4}}
    path = job_config(site, "tcap", weak, tcap, gate={"holdout": 0.4, "source": False}, promote="never")
    train = tmp / "tcap-train.yaml"
    train.write_text(yaml.safe_dump({k: v for k, v in yaml.safe_load(train.read_text()).items() if k != "target"}))
    outcome = run_job(load_adapt_config(path), "t1")
    assert outcome.status in ("passed", "refused"), outcome.message
    records = [json.loads(line) for line in (tmp / "tcap" / "runs" / "t1" / "train" / "metrics.jsonl").read_text().splitlines()]
    clusters = [r for r in records if r["event"] == "cluster"]
    assert clusters and clusters[0]["segments"] > 1 and clusters[0]["cannot_link_pairs"] > 0
    report = json.loads((tmp / "tcap" / "runs" / "t1" / "gate.json").read_text())
    assert report["candidate"]["model"] == outcome.version and report["candidate"]["site_queries"] > 0
    assert m.registry.get(outcome.version) is not None
