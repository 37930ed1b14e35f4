"""`crossview init`: a site's whole starting setup in one folder, one sub-folder per machine.

| written                                   | what                                                       |
|-------------------------------------------|------------------------------------------------------------|
| `SITE/matcher/keys/matcher.key[_secret]`  | the matcher's CURVE key pair                               |
| `SITE/matcher/keys/edges/<edge>.key`      | the allow-list, already holding every edge's public key    |
| `SITE/matcher/keys/http-token`            | the HTTP API token (mode 600): operators, `crossview adapt` |
| `SITE/matcher/keys/edge-token`            | the edges' read-only HTTP token (mode 600, `http.edge_token_file`): models, harvest uploads |
| `SITE/matcher/matcher.yaml`               | the matcher's config, pointing at all of these             |
| `SITE/<edge>/keys/<edge>.key[_secret]`    | the edge's key pair, and `matcher.key` (the server's public key) |
| `SITE/<edge>/keys/edge-token`             | a copy of the edges' token (mode 600)                      |
| `SITE/<edge>/edge.yaml`                   | the edge's config: its cameras, the matcher's address, its keys, the model registry |

Each machine gets its own folder; config paths are relative to it (`../models` holds the ONNX
models, shared when everything runs on one machine). Every file written is loaded back through the
same validation the services run, so a site that `init` made starts. The edges follow the matcher's
model registry (`embedder.registry`) and know where to upload harvested crops (`harvest.upload`, used
once `harvest.enabled` is set), so a model `crossview adapt` promotes reaches them without editing.
With `--matcher-host` other than this machine, the matcher listens on every interface (ZeroMQ and
HTTP), as the edges must reach both.

    $ crossview init site --edges edge-1,edge-2 --camera gate=rtsp://cam1/stream --camera edge-2:dock=usb:0
"""

from __future__ import annotations

import os
import secrets
import shutil
from dataclasses import dataclass
from pathlib import Path

import yaml

from crossview.kernel.config import bad_id, load_edge_config, load_matcher_config
from crossview.kernel.transport import generate_keys

EMBEDDER = "../models/mobilenetv2-imagenet.onnx"


@dataclass(frozen=True)
class Camera:
    edge: str | None  # None: every edge
    id: str
    source: str


def parse_camera(text: str) -> Camera:
    """`[EDGE:]ID=SOURCE`; a relative file path is made absolute (the config lives elsewhere)."""
    target, sep, source = text.partition("=")
    edge, _, cam = target.rpartition(":")
    if not sep or not source or bad_id(cam) or (edge and bad_id(edge)):
        raise ValueError(f"--camera takes [EDGE:]ID=SOURCE, e.g. gate=rtsp://10.0.0.5/stream; got {text!r}")
    if "://" not in source and not source.startswith("usb:"):
        source = str(Path(source).resolve())
    return Camera(edge or None, cam, source)


def init_site(site: Path, edges: list[str], cameras: list[Camera], matcher_host: str = "127.0.0.1",
              port: int = 5555, http_port: int = 8080) -> dict[str, Path]:
    """Write the site; return each machine's config file. Refuses to touch an existing site."""
    _check(site, edges, cameras)
    try:
        return _write(site, edges, cameras, matcher_host, port, http_port)
    except BaseException:
        shutil.rmtree(site, ignore_errors=True)  # half a site is worse than none: keys would not match
        raise


def _check(site: Path, edges: list[str], cameras: list[Camera]) -> None:
    if site.exists() and any(site.iterdir()):
        raise FileExistsError(f"{site}: exists and is not empty; init never overwrites keys (pick a new folder)")
    bad = [e for e in edges if bad_id(e) or e == "matcher"]
    if not edges or bad or len(set(edges)) != len(edges):
        raise ValueError(f"--edges: distinct node ids of letters, digits, '_', '.', '-', not only dots, at most 64 (not 'matcher'); got {edges}")
    unknown = sorted({c.edge for c in cameras if c.edge and c.edge not in edges})
    if unknown:
        raise ValueError(f"--camera names edges that --edges does not: {', '.join(unknown)}")
    blind = [e for e in edges if not _cameras_of(e, cameras)]
    if blind:
        raise ValueError(f"no --camera for {', '.join(blind)}: give ID=SOURCE (every edge) or EDGE:ID=SOURCE")


def _cameras_of(edge: str, cameras: list[Camera]) -> list[dict]:
    return [{"id": c.id, "source": c.source, "fps": 5} for c in cameras if c.edge in (None, edge)]


def _write(site: Path, edges: list[str], cameras: list[Camera], host: str, port: int, http_port: int) -> dict[str, Path]:
    keys = site / "matcher" / "keys"
    generate_keys(keys, "matcher")
    _secret(keys / "http-token", secrets.token_urlsafe(32))
    edge_token = secrets.token_urlsafe(32)  # its own: an edge's copy never grants the API token's rights
    _secret(keys / "edge-token", edge_token)
    bind = "127.0.0.1" if host in ("127.0.0.1", "localhost") else "0.0.0.0"
    written = {"matcher": _dump(site / "matcher" / "matcher.yaml", {
        "data_dir": "data",
        "ingest": {"endpoint": f"tcp://{bind}:{port}",
                   "security": {"mode": "curve", "secret_key": "keys/matcher.key_secret", "allowed_clients": "keys/edges"}},
        "http": {"host": bind, "port": http_port, "token_file": "keys/http-token", "edge_token_file": "keys/edge-token"},
        "models": [EMBEDDER],
    })}
    matcher_http = {"url": f"http://{host}:{http_port}", "token_file": "keys/edge-token"}
    for edge in edges:
        own = site / edge / "keys"
        public, _ = generate_keys(own, edge)
        (keys / "edges").mkdir(exist_ok=True)
        shutil.copy(public, keys / "edges" / public.name)
        shutil.copy(keys / "matcher.key", own / "matcher.key")
        _secret(own / "edge-token", edge_token)
        written[edge] = _dump(site / edge / "edge.yaml", {
            "node_id": edge,
            "cameras": _cameras_of(edge, cameras),
            "embedder": {"model": EMBEDDER, "registry": dict(matcher_http)},  # copies: no YAML anchors in the file
            "publisher": {"endpoint": f"tcp://{host}:{port}",
                          "security": {"mode": "curve", "secret_key": f"keys/{edge}.key_secret", "server_key": "keys/matcher.key"}},
            "harvest": {"upload": matcher_http},
        })
    load_matcher_config(written["matcher"])  # what the services will read, validated now
    for edge in edges:
        load_edge_config(written[edge])
    return written


def _secret(path: Path, token: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)  # never readable by others, not even briefly
    with os.fdopen(fd, "w") as f:
        f.write(token + "\n")


def _dump(path: Path, cfg: dict) -> Path:
    header = "# Made by `crossview init`. Every key is documented in the shipped configs/*.yaml.\n"
    path.write_text(header + yaml.safe_dump(cfg, sort_keys=False))
    return path
