"""Configuration is validated once at load; every error names the file and the key."""

import re
import typing
from pathlib import Path

import pytest
from pydantic import BaseModel

from crossview.kernel.config import ConfigError, EdgeConfig, MatcherConfig, load_edge_config, redact_url

REPO = Path(__file__).resolve().parents[1]


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "edge.yaml"
    p.write_text(text)
    return p


def test_shipped_configs_load():
    for name in ("edge.yaml", "demo.yaml"):
        cfg = load_edge_config(REPO / "configs" / name)
        assert cfg.cameras and all(Path(c.source).is_file() for c in cfg.cameras), name


def _keys(model: type[BaseModel], prefix: str = "") -> list[str]:
    """Every key of `model` and of the sections inside it (lists and unions of sections too), dotted."""
    out = []
    for name, field in model.model_fields.items():
        out.append(prefix + name)
        types = [field.annotation, *typing.get_args(field.annotation)]
        types += [arg for t in types for arg in typing.get_args(t)]
        for t in {t for t in types if isinstance(t, type) and issubclass(t, BaseModel)}:
            out += _keys(t, f"{prefix}{name}.")
    return out


# The CURVE section is one type for both ends: each file leaves out the other end's keys.
OTHER_END = {"edge.yaml": {"publisher.security.allowed_clients", "publisher.security.bind_nodes"},
             "matcher.yaml": {"ingest.security.server_key"}}


@pytest.mark.parametrize("name, model", [("edge.yaml", EdgeConfig), ("matcher.yaml", MatcherConfig)])
def test_the_shipped_config_documents_every_key(name, model):
    """README: configs/edge.yaml and configs/matcher.yaml name every key, set or in a comment."""
    text = (REPO / "configs" / name).read_text()
    missing = [key for key in _keys(model) if key not in OTHER_END[name]
               and not re.search(rf"(^|[\s{{,#`]){re.escape(key.rpartition('.')[2])}:", text, re.M)]
    assert not missing, f"configs/{name} does not name {missing}"


PLAIN = "publisher: {security: {mode: plain}}\n"
CAM = "node_id: n\ncameras: [{id: a, source: x}]\n"


def test_relative_paths_resolve_against_the_config_file(tmp_path):
    cfg = load_edge_config(write(tmp_path, "node_id: n\ncameras: [{id: a, source: clips/a.mp4}]\nembedder: {model: m.onnx}\n" + PLAIN))
    assert cfg.cameras[0].source == str(tmp_path / "clips/a.mp4")
    assert cfg.embedder.model == tmp_path / "m.onnx"


def test_urls_and_usb_are_not_paths(tmp_path):
    cfg = load_edge_config(write(tmp_path, "node_id: n\ncameras: [{id: a, source: 'rtsp://h/x'}, {id: b, source: 'usb:0'}]\n" + PLAIN))
    assert [c.source for c in cfg.cameras] == ["rtsp://h/x", "usb:0"]
    assert not any(c.is_file for c in cfg.cameras)


@pytest.mark.parametrize(
    "text, needle",
    [
        ("node_id: n\ncameras: [{id: a, source: x.mp4, fsp: 5}]\n" + PLAIN, "cameras.0.fsp: unknown key"),
        ("node_id: n\ncameras: [{id: a, source: x.mp4, fps: fast}]\n" + PLAIN, "cameras.0.fps"),
        ("node_id: n\ncameras: [{id: a, source: x.mp4, fps: -1}]\n" + PLAIN, "cameras.0.fps"),
        ("node_id: n\ncameras: []\n" + PLAIN, "cameras"),
        ("node_id: n\ncameras: [{id: a, source: 'usb:front'}]\n" + PLAIN, "cameras.0.source"),
        ("cameras: [{id: a, source: x.mp4}]\n" + PLAIN, "node_id: Field required"),
        ("node_id: n\ncameras: [{id: a, source: x}, {id: a, source: y}]\n" + PLAIN, "repeated: a"),
        ("node_id: n\ncameras: [{id: '..', source: x}]\n" + PLAIN, "cameras.0.id: Value error, an id is letters"),
        ("node_id: '.'\ncameras: [{id: a, source: x}]\n" + PLAIN, "node_id: Value error, an id is letters"),
        (f"node_id: {'n' * 65}\ncameras: [{{id: a, source: x}}]\n" + PLAIN, "node_id: Value error, an id is at most 64"),
        ("node_id: n\ncameras: [{id: a, source: x}]\ndetector: {imgsz: 650}\n" + PLAIN, "detector.imgsz"),
        (CAM + "publisher: {embedding_dtype: int8, security: {mode: plain}}\n", "publisher.embedding_dtype"),
        (CAM + "publisher: {hwm: 3000000000, security: {mode: plain}}\n", "publisher.hwm"),  # ZeroMQ's C int
        (CAM + "publisher: {spool_mb: 1.0e+308, security: {mode: plain}}\n", "publisher.spool_mb: Value error, 1e+308 is out"),
        (CAM + "publisher: {endpoint: 'tcp://127.0.0.1', security: {mode: plain}}\n", "(tcp://host:port, port 1-65535)"),
        (CAM + "publisher: {endpoint: 'tcp://h:99999', security: {mode: plain}}\n", "publisher.endpoint"),
        ("- just\n- a list\n", "mapping at the top level"),
        (CAM + "publisher: {security: {mode: curve}}\n", "publisher: Value error, security: mode curve needs secret_key"),
        ("node_id: [unclosed\n", "not valid YAML"),
    ],
)
def test_bad_config_names_the_key(tmp_path, text, needle):
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as e:
        load_edge_config(path)
    assert needle in str(e.value) and str(path) in str(e.value)


def test_publisher_is_required(tmp_path):
    with pytest.raises(ConfigError, match="publisher: Field required"):
        load_edge_config(write(tmp_path, CAM))


def test_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="configuration file not found"):
        load_edge_config(tmp_path / "nope.yaml")


@pytest.mark.parametrize("content, needle", [
    (b"a: &a [*a]\n", "a YAML alias refers to itself"),
    (bytes(range(256)) * 4, "not a text file"),
    (b"# " + b"x" * (1 << 20) + b"\n", "a configuration file is at most"),
])
def test_a_hostile_file_is_refused_naming_it(tmp_path, content, needle):
    path = tmp_path / "edge.yaml"
    path.write_bytes(content)
    with pytest.raises(ConfigError, match=needle) as e:
        load_edge_config(path)
    assert str(path) in str(e.value)


def test_environment_variables_fill_secrets(tmp_path, monkeypatch):
    monkeypatch.setenv("CAM_PASS", "s3cret")
    cfg = load_edge_config(write(tmp_path, "node_id: n\ncameras: [{id: a, source: 'rtsp://admin:${CAM_PASS}@h/x'}]\n" + PLAIN))
    assert cfg.cameras[0].source == "rtsp://admin:s3cret@h/x"


def test_an_unset_environment_variable_names_the_key(tmp_path, monkeypatch):
    monkeypatch.delenv("CAM_PASS", raising=False)
    with pytest.raises(ConfigError, match=r"cameras\.0\.source: environment variable CAM_PASS is not set"):
        load_edge_config(write(tmp_path, "node_id: n\ncameras: [{id: a, source: 'rtsp://admin:${CAM_PASS}@h/x'}]\n" + PLAIN))


@pytest.mark.parametrize("url, shown", [
    ("rtsp://admin:secret@10.0.0.5:554/stream", "rtsp://admin:***@10.0.0.5:554/stream"),
    ("rtsp://admin:p@ss/w@host/x", "rtsp://admin:***@host/x"),  # a raw '@' or '/' in the password stays hidden
    ("http://user@host/x", "http://user@host/x"),
    ("rtsp://host/x", "rtsp://host/x"),
    ("usb:0", "usb:0"),
    ("videos/a:b@c.mp4", "videos/a:b@c.mp4"),
])
def test_urls_are_shown_without_their_password(url, shown):
    assert redact_url(url) == shown
