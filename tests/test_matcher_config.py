"""The matcher's configuration: the shipped file loads, paths resolve against it, mistakes name the key."""

from pathlib import Path

import pytest

from crossview.kernel.config import ConfigError, load_matcher_config

REPO = Path(__file__).resolve().parents[1]


def test_shipped_matcher_config_loads():
    cfg = load_matcher_config(REPO / "configs" / "matcher.yaml")
    assert cfg.data_dir == REPO / "var" / "matcher"
    # Where `crossview build-embedder` writes by default (run from the checkout), which `make demo` does first.
    assert cfg.models == [REPO / "models" / "mobilenetv2-imagenet.onnx"]
    assert (cfg.index.nprobe, cfg.index.threads, cfg.query.track_gap_s) == (64, 1, 60)


def test_model_paths_resolve_against_the_config_file(tmp_path):
    path = tmp_path / "m.yaml"
    path.write_text("ingest: {security: {mode: plain}}\nhttp: {token: 0123456789abcdef}\nmodels: [a.onnx, /abs/b.onnx]\n")
    assert load_matcher_config(path).models == [tmp_path / "a.onnx", Path("/abs/b.onnx")]


@pytest.mark.parametrize("section, error", [
    ("query: {overfetch: 0}", "query.overfetch: Input should be greater than or equal to 1"),
    ("query: {track_gap: 5}", "query.track_gap: unknown key"),
    ("index: {threads: -1}", "index.threads: Input should be greater than or equal to 0"),
])
def test_matcher_mistakes_name_the_key(tmp_path, section, error):
    path = tmp_path / "m.yaml"
    path.write_text(f"ingest: {{security: {{mode: plain}}}}\nhttp: {{token: 0123456789abcdef}}\n{section}\n")
    with pytest.raises(ConfigError, match=error):
        load_matcher_config(path)
