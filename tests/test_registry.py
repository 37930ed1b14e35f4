"""The model registry and its rollout: register, promote, roll back; an edge node following the production
version over HTTP with the read-only edge token, checking the checksum, and keeping its model when a download
is bad. On both backends (`store_section`); on PostgreSQL two matchers share one registry, files included."""

from __future__ import annotations

import dataclasses
import shutil
import threading

import pytest
import requests
from helpers import edge_config, filled_model, matcher_config, shared_data, wait_until

from crossview.cli import main
from crossview.kernel.config import StoreConfig
from crossview.kernel.embedder import Embedder, ModelError
from crossview.matcher.api import serve
from crossview.matcher.client import MatcherClient
from crossview.matcher.registry import Registry
from crossview.matcher.service import Matcher
from crossview.trainer.export import write_metadata

TOKEN = "test-token-0123456789"
EDGE_TOKEN = "edge-token-0123456789"


def relabel(src, out, version: str, **extra):
    """`src`'s graph as another model version (what a new training run would export)."""
    meta = Embedder(src, device="cpu").meta
    write_metadata(src, out, dataclasses.replace(meta, version=version, extra={**meta.extra, **extra}))
    return out


def test_register_promote_and_roll_back(tmp_path, default_model, store_section):
    store = StoreConfig(**store_section)
    reg = Registry(tmp_path, store=store)
    v2 = relabel(default_model, tmp_path / "v2.onnx", "site-2")
    first = reg.register(default_model)
    assert (first.state, reg.production()) == ("candidate", None)
    assert reg.register(default_model) == first  # the same file again: nothing new
    reg.register(v2, gate={"mAP": 0.71})
    with pytest.raises(ValueError, match="registered already with another file"):
        reg.register(relabel(default_model, tmp_path / "v2b.onnx", "site-2", note="other"))
    (tmp_path / "junk.onnx").write_bytes(b"not a model")
    with pytest.raises(ModelError, match="junk.onnx"):
        reg.register(tmp_path / "junk.onnx")
    with pytest.raises(LookupError, match="not in the registry"):
        reg.promote("nope")
    with pytest.raises(LookupError, match="nothing to roll back to"):
        reg.rollback()
    reg.promote(first.version)
    reg.promote("site-2")
    assert {e.version: e.state for e in reg.list()} == {first.version: "retired", "site-2": "production"}
    assert reg.get("site-2").gate == {"mAP": 0.71} and reg.get("site-2").meta["dim"] == first.meta["dim"]
    assert reg.rollback().version == first.version and reg.production().version == first.version
    assert Registry(tmp_path, read_only=True, store=store).production().version == first.version  # another process reads it


def test_the_cli_manages_the_registry_on_the_matcher_host(tmp_path, default_model, capsys):
    data = tmp_path / "matcher"
    assert main(["models", "register", str(default_model), "--data-dir", str(data)]) == 0
    version = Embedder(default_model, device="cpu").version
    assert f"{version}: candidate" in capsys.readouterr().out
    assert main(["models", "promote", version, "--data-dir", str(data)]) == 0
    assert main(["models", "list", "--data-dir", str(data)]) == 0
    out = capsys.readouterr().out
    assert f"{version}: production" in out and "production" in out.splitlines()[-1]
    assert main(["models", "promote", "nope", "--data-dir", str(data)]) == 1
    assert main(["models", "list", "--data-dir", str(tmp_path / "empty")]) == 0
    assert "no models registered" in capsys.readouterr().out


def test_a_model_that_gives_nan_is_not_registered(tmp_path, caplog):
    """Its metadata is complete: only the edge's load check, which registration runs, finds it broken."""
    nan = filled_model(tmp_path / "nan.onnx", float("nan"))
    with pytest.raises(ModelError, match="nan.onnx: test inference gives NaN or infinite values"):
        Registry(tmp_path / "matcher").register(nan)
    assert main(["models", "register", str(nan), "--data-dir", str(tmp_path / "matcher")]) == 2
    assert "nan.onnx: test inference gives NaN" in caplog.text
    assert Registry(tmp_path / "matcher", read_only=True).list() == []


def test_two_matchers_on_one_postgres_share_the_registry_and_its_files(tmp_path, default_model, pg_server):
    store = StoreConfig(**pg_server.store_section(pg_server.fresh_db()))
    one, other = Registry(tmp_path / "one", store=store), Registry(tmp_path / "other", store=store)
    version = one.register(default_model).version
    other.promote(version)
    assert one.production().version == version and other.production().sha256 == one.get(version).sha256
    assert other.file_of(version).read_bytes() == default_model.read_bytes()  # fetched from the database, once
    assert Registry(tmp_path / "cli", read_only=True, store=store).production().version == version
    assert Registry(tmp_path / "none", read_only=True, store=StoreConfig(**pg_server.store_section(pg_server.fresh_db()))) \
        .list() == []  # a database without a registry reads as an empty one
    one.close()
    other.close()


@pytest.fixture
def site(tmp_path, default_model, store_section):
    (tmp_path / "edge-token").write_text(EDGE_TOKEN + "\n")
    cfg = matcher_config(tmp_path / "matcher", store=store_section,
                         http={"port": 0, "token": TOKEN, "edge_token_file": str(tmp_path / "edge-token")})
    m = Matcher(cfg)
    m.registry.register(default_model)
    m.registry.promote(Embedder(default_model, device="cpu").version)
    m.start()
    server = serve(m, cfg.http)
    yield m, server.url.rstrip("/")
    server.stop()
    m.stop()


def test_the_edge_token_reads_models_and_nothing_else(site):
    _, url = site
    edge = {"Authorization": f"Bearer {EDGE_TOKEN}"}
    assert requests.get(f"{url}/api/v1/models/production", headers=edge, timeout=10).json()["state"] == "production"
    assert requests.get(f"{url}/api/v1/models", headers={"Authorization": f"Bearer {TOKEN}"}, timeout=10).status_code == 200
    for path in ("/api/v1/stats", "/api/v1/edges", "/api/v1/alerts"):
        assert requests.get(f"{url}{path}", headers=edge, timeout=10).status_code == 403, path  # known, not allowed
    assert requests.get(f"{url}/api/v1/models/no%2Fpe/onnx", headers=edge, timeout=10).status_code in (404, 422)


def test_the_adapt_job_registers_and_promotes_over_http_with_the_api_token_only(site, default_model, tmp_path):
    m, url = site
    client = MatcherClient(url, TOKEN)
    current = client.production()
    cand = relabel(default_model, tmp_path / "site-2.onnx", "site-2")
    entry = client.register_model(cand, gate={"passed": True, "candidate": {"site_mAP": 0.6}})
    assert (entry["version"], entry["state"], entry["gate"]["passed"]) == ("site-2", "candidate", True)
    assert client.download_model(entry, tmp_path / "back.onnx").read_bytes() == cand.read_bytes()
    with pytest.raises(ValueError, match="not kept"):
        client.download_model({**entry, "sha256": "0" * 64}, tmp_path / "bad.onnx")
    assert not (tmp_path / "bad.onnx").exists()
    assert client.promote("site-2", canary=["edge-9"], hold_s=60)["state"] == "canary"
    assert client.production()["version"] == current["version"]  # production for the other edges stays
    assert client.promote("site-2")["state"] == "production" and m.registry.production().version == "site-2"
    assert requests.post(f"{url}/api/v1/models/rollback", headers={"Authorization": f"Bearer {TOKEN}"},
                         timeout=10).json()["version"] == current["version"]
    # The edges' token reads models, it cannot add or promote one.
    assert MatcherClient(url, EDGE_TOKEN).production()["version"] == current["version"]
    with pytest.raises(PermissionError):
        MatcherClient(url, EDGE_TOKEN).register_model(cand)
    with pytest.raises(PermissionError):
        MatcherClient(url, EDGE_TOKEN).promote("site-2")
    (tmp_path / "junk.onnx").write_bytes(b"not a model")
    with pytest.raises(ValueError, match="junk"):
        client.register_model(tmp_path / "junk.onnx")
    with pytest.raises(LookupError, match="not in the registry"):
        client.promote("nope")
    assert not list(m.registry.dir.glob(".upload-*")), "an upload's temp file was left behind"


def test_a_model_upload_over_http_max_model_bytes_is_refused_naming_the_key(tmp_path, default_model):
    cfg = matcher_config(tmp_path / "matcher", http={"port": 0, "token": TOKEN, "max_model_bytes": 1 << 20})
    m = Matcher(cfg)
    m.start()
    server = serve(m, cfg.http)
    try:
        with pytest.raises(ConnectionError, match="http.max_model_bytes"):
            MatcherClient(server.url, TOKEN).register_model(default_model)  # 9 MB
        assert m.registry.list() == []
    finally:
        server.stop()
        m.stop()


def test_an_edge_follows_the_production_version_and_keeps_its_model_on_a_bad_download(site, default_model, tmp_path,
                                                                                       capsys, monkeypatch):
    m, url = site
    model = tmp_path / "edge-models" / "model.onnx"
    model.parent.mkdir()
    shutil.copy(default_model, model)
    (tmp_path / "edge-token-file").write_text(EDGE_TOKEN)
    clip = str(shared_data("TUD-Campus") / "TUD-Campus.mp4")
    from crossview.edge.node import EdgeNode

    cfg = edge_config(model, [{"id": "campus", "source": clip, "realtime": True, "loop": True, "fps": 5}],
                      endpoint=m.ingest.endpoint, publisher={"heartbeat_s": 0.5},
                      embedder={"registry": {"url": url, "token_file": str(tmp_path / "edge-token-file"), "poll_s": 1}})
    node = EdgeNode(cfg)
    runner = threading.Thread(target=node.run, daemon=True)
    runner.start()
    try:
        m.registry.register(relabel(default_model, tmp_path / "site-2.onnx", "site-2"))
        m.registry.promote("site-2")
        wait_until(lambda: node.embedder.version == "site-2", 30, "the edge on site-2")
        wait_until(lambda: m.edges.report()["edges"][0]["model"] == "site-2", 10, "its heartbeat saying so")
        monkeypatch.setenv("CROSSVIEW_TOKEN", TOKEN)
        assert main(["models", "status", "--url", url]) == 0
        assert "test-edge" in capsys.readouterr().out.split("production: site-2")[1].split("runs site-2 (production)")[0]

        m.registry.register(relabel(default_model, tmp_path / "site-3.onnx", "site-3"))
        with open(m.registry.file_of("site-3"), "ab") as f:  # damaged on the matcher's disk after registration
            f.write(b"\0")
        m.registry.promote("site-3")
        wait_until(lambda: node.rollout.failed >= 2, 30, "the bad download refused (and retried)")
        assert node.embedder.version == "site-2" and Embedder(model, device="cpu").version == "site-2"
        assert not list(model.parent.glob(".*download"))  # nothing half-written left beside the model
        assert m.registry.rollback().version == "site-2"
    finally:
        node.stop()
        runner.join(30)


def test_a_canary_runs_on_its_edges_first_and_becomes_production_once_they_ran_it(tmp_path, default_model, capsys,
                                                                                 store_section):
    reg = Registry(tmp_path, store=StoreConfig(**store_section))
    v1 = reg.register(default_model).version
    reg.promote(v1)
    reg.register(relabel(default_model, tmp_path / "v2.onnx", "site-2"))
    with pytest.raises(ValueError, match="not production"):
        reg.start_canary(v1, ["edge-1"], 60)
    trial = reg.start_canary("site-2", ["edge-1"], hold_s=60)
    since = reg.canary()["since"]
    assert trial.state == "canary" and reg.production().version == v1
    assert reg.production_for("edge-1").version == "site-2" and reg.production_for("edge-2").version == v1
    edges = [{"node": "edge-1", "state": "online", "model": "site-2"}, {"node": "edge-2", "state": "online", "model": v1}]
    assert reg.advance(edges, now=since + 30) is None  # still on trial
    assert reg.advance([{**edges[0], "state": "offline"}, edges[1]], now=since + 61) is None  # not seen running it
    assert reg.advance(edges, now=since + 61).version == "site-2"
    assert (reg.production().version, reg.canary(), reg.production_for("edge-2").version) == ("site-2", None, "site-2")

    reg.register(relabel(default_model, tmp_path / "v3.onnx", "site-3"))
    reg.start_canary("site-3", ["edge-2"], hold_s=60)
    assert reg.rollback().state == "retired"  # stops the trial: edge-2 back on production
    assert reg.production_for("edge-2").version == "site-2" and reg.canary() is None

    data = ["--data-dir", str(tmp_path / "cli")]
    assert main(["models", "register", str(tmp_path / "v3.onnx"), *data]) == 0
    assert main(["models", "promote", "site-3", "--canary", "edge-1,edge-2", "--hold", "5", *data]) == 0
    assert "site-3: canary" in capsys.readouterr().out
    assert Registry(tmp_path / "cli").canary()["nodes"] == ["edge-1", "edge-2"]
