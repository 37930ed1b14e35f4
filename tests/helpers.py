"""Reusable test helpers: the shared real footage and a controllable MJPEG-over-HTTP camera.

| helper                 | what                                                                     |
|------------------------|--------------------------------------------------------------------------|
| `shared_data(name)`    | path under `../shared/data`, or skip the test naming what is missing      |
| `jpeg_frames(path, n)` | the first `n` frames of a video, JPEG-encoded                              |
| `raw_export(...)`      | ONNX export without the contract checks, for models that break it           |
| `filled_model(path, v)` | a tiny embedder with full metadata and every weight `v` (NaN, 0): broken weights |
| `MjpegServer`          | `multipart/x-mixed-replace` stream on 127.0.0.1 that a test can kill, restart or stall |
| `edge_config(model, cams)` | an `EdgeConfig` for tests: HOG, plain ZeroMQ, the given embedder, a fresh spool |
| `matcher_config(dir)`  | a `MatcherConfig` for tests: plain ZeroMQ on a free port, data in `dir`    |
| `person_world(...)`    | synthetic sightings: people walking past cameras, one edge track per person and camera |
| `Pusher(endpoint)`     | a real ZeroMQ DEALER socket, as an edge node has, for sightings or raw bytes (acks unread) |
| `store_insert(store, sightings)` | sightings straight into a matcher store, each its own track: their ids |
| `wait_until(cond, s)`  | poll until `cond()` holds, or fail saying what was awaited                |
| `index_ids(index)`     | the ids a FAISS index holds (IDMap2 or IVF), to compare with the store     |
| `held_ids(index, model)` | the ids the matcher's index holds for a version: FAISS's, or its Milvus collection's |
| `free_port()`          | a TCP port of 127.0.0.1 nobody listens on now                              |
| `jpeg_declaring(crop, w, h)`, `jpeg_of_scans(n)` | hostile JPEGs: a forged frame size; thousands of scans that decode |
| `CrossviewProcess(log, *args)` | a real `crossview ...` subprocess logging to a file: `text()`, `kill9()`, `stop()` |

    >>> world = person_world(persons=20)           # world.sightings, world.centers, world.track(p, "gate")
    >>> with Pusher(matcher.ingest.endpoint) as push:
    ...     push.send(world.sightings)
    >>> with MjpegServer(jpeg_frames(shared_data("vtest.avi"), 50)) as cam:
    ...     cap = cv2.VideoCapture(cam.url, cv2.CAP_FFMPEG)
    ...     cam.stall()   # keep the connection open but send nothing; cam.resume() sends again
    ...     cam.stop()    # shut down and drop every client (they see EOF)
    ...     cam.start()   # same port again
"""

from __future__ import annotations

import re
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import cv2
import faiss
import numpy as np
import onnx
import pytest
import torch
import zmq
from torch import nn

from crossview.kernel.config import EdgeConfig, MatcherConfig, parse_config
from crossview.kernel.modelmeta import ModelMeta
from crossview.kernel.wire import Sighting, encode
from crossview.trainer.export import IMAGENET_MEAN, IMAGENET_STD
from crossview.trainer.modeling.backbones import GapEmbedder

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def shared_data(name: str) -> Path:
    path = SHARED_DATA / name
    if not path.exists():
        pytest.skip(f"shared footage {path} not present (expected beside the checkout in ../shared/data)")
    return path


def jpeg_frames(path: Path, n: int, width: int = 384) -> list[bytes]:
    """First `n` frames of `path`, downscaled to `width` so a stream stays light on 2 cores."""
    cap = cv2.VideoCapture(str(path), cv2.CAP_FFMPEG)
    out = []
    while len(out) < n:
        ok, img = cap.read()
        if not ok:
            break
        h = round(img.shape[0] * width / img.shape[1])
        out.append(cv2.imencode(".jpg", cv2.resize(img, (width, h)))[1].tobytes())
    cap.release()
    if not out:
        raise RuntimeError(f"{path}: no frames decoded")
    return out


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True  # restart on the same port while old connections sit in TIME_WAIT

    def __init__(self, addr, owner: "MjpegServer"):
        self.owner = owner
        self.clients: set[socket.socket] = set()
        super().__init__(addr, _Handler)

    def process_request(self, request, client_address):
        self.clients.add(request)  # remembered so stop() can cut live streams, not just the listener
        super().process_request(request, client_address)


class _Handler(BaseHTTPRequestHandler):
    server: _Server

    def log_message(self, *args) -> None:  # keep pytest output clean
        pass

    def do_GET(self) -> None:
        owner = self.server.owner
        if not self.path.startswith("/stream"):
            self.send_error(404)
            return
        self.send_response(200)
        self.send_header("Content-Type", "multipart/x-mixed-replace; boundary=frame")
        self.send_header("Cache-Control", "no-cache")
        self.end_headers()
        i = 0
        try:
            while owner.running.is_set():
                if owner.stalled.is_set():
                    time.sleep(0.05)
                    continue
                jpg = owner.frames[i % len(owner.frames)]
                head = f"--frame\r\nContent-Type: image/jpeg\r\nContent-Length: {len(jpg)}\r\n\r\n".encode()
                self.wfile.write(head + jpg + b"\r\n")
                self.wfile.flush()
                owner.sent += 1
                i += 1
                time.sleep(1 / owner.fps)
        except OSError:  # client went away or stop() cut the socket
            pass


class MjpegServer:
    """An HTTP MJPEG camera at `url` (`http://127.0.0.1:PORT/stream.mjpg`), looping over `frames`."""

    def __init__(self, frames: list[bytes], fps: float = 10.0, port: int = 0):
        self.frames, self.fps, self.port = frames, fps, port
        self.running, self.stalled = threading.Event(), threading.Event()
        self.sent = 0
        self._server: _Server | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/stream.mjpg"

    def start(self) -> "MjpegServer":
        self._server = _Server(("127.0.0.1", self.port), self)
        self.port = self._server.server_address[1]  # keep the port so a restart reuses it
        self.stalled.clear()
        self.running.set()
        threading.Thread(target=self._server.serve_forever, name=f"mjpeg-{self.port}", daemon=True).start()
        return self

    def stall(self) -> None:
        """Keep accepted connections open but stop sending: the client's read just waits."""
        self.stalled.set()

    def resume(self) -> None:
        self.stalled.clear()

    def stop(self) -> None:
        """Stop listening and drop every client connection, so readers see EOF at once."""
        if self._server is None:
            return
        self.running.clear()
        self._server.shutdown()
        self._server.server_close()
        for sock in list(self._server.clients):
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            sock.close()
        self._server = None

    def __enter__(self) -> "MjpegServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def raw_export(module: nn.Module, example: torch.Tensor, path: Path, meta: ModelMeta | None) -> None:
    """Export without export_onnx's checks, to make models that break the contract."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(module.eval(), (example,), str(path), input_names=["images"], dynamo=False)
    if meta is not None:
        proto = onnx.load(path)
        for key, value in meta.to_props().items():
            proto.metadata_props.add(key=key, value=value)
        onnx.save(proto, path)


# Metadata for tiny contract-breaking models: 32x16 input, 8-d output.
TINY_META = ModelMeta("bad", "bad-1", 32, 16, IMAGENET_MEAN, IMAGENET_STD, 8)


def filled_model(path: Path, value: float) -> Path:
    """A tiny embedder with full metadata (`TINY_META`) and every weight `value`: NaN is a training run that diverged."""
    conv = nn.Conv2d(3, 8, 3)
    for p in conv.parameters():
        nn.init.constant_(p, value)
    raw_export(GapEmbedder(conv), torch.zeros(1, 3, 32, 16), path, TINY_META)
    return path


def edge_config(model: Path, cameras: list[dict], endpoint: str = "tcp://127.0.0.1:9", **sections) -> EdgeConfig:
    """A node config; the default endpoint has no listener, as when the matcher is down."""
    raw = {
        "node_id": "test-edge",
        "cameras": cameras,
        # People in TUD are large and vtest's are small: upscale only as much as the test needs.
        "detector": {"kind": "hog", "hog": {"upscale": 1.0}},
        "embedder": {"model": str(model), "reload_check_s": 0.2},
        "publisher": {"endpoint": endpoint, "security": {"mode": "plain"}, "spool_dir": tempfile.mkdtemp(prefix="spool-")},
        "metrics": {"log_interval_s": 2},
    }
    for key, value in sections.items():
        raw[key] = {**raw.get(key, {}), **value}
    return parse_config(raw, EdgeConfig)


# -- matcher -------------------------------------------------------------------------------------

TINY_JPEG = cv2.imencode(".jpg", np.full((16, 8, 3), 128, np.uint8))[1].tobytes()
T0 = 1_700_000_000.0


def jpeg_declaring(crop: np.ndarray, width: int, height: int) -> bytes:
    """A real JPEG of `crop` whose frame header (SOF0) is rewritten to declare width x height."""
    data = bytearray(cv2.imencode(".jpg", crop)[1].tobytes())
    sof = data.index(b"\xff\xc0")
    data[sof + 5:sof + 9] = struct.pack(">HH", height, width)
    return bytes(data)


def jpeg_of_scans(n: int) -> bytes:
    """A progressive 48 x 96 JPEG that decodes, its smallest scan repeated to `n` scans in all: each one more pass
    over the whole image (libjpeg only warns), so thousands of them cost seconds of CPU for a few KB."""
    image = np.random.default_rng(n).integers(0, 255, (96, 48, 3), np.uint8)
    jpeg = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_PROGRESSIVE, 1])[1].tobytes()
    starts = [m.start() for m in re.finditer(b"\xff\xda", jpeg)]
    scans = [jpeg[a:b] for a, b in zip(starts, [*starts[1:], len(jpeg) - 2])]
    return jpeg[:-2] + min(scans, key=len) * (n - len(scans)) + b"\xff\xd9"


def matcher_config(data_dir: Path, **sections) -> MatcherConfig:
    """Plain ZeroMQ on a free port of 127.0.0.1; `sections` update the defaults one section at a time."""
    raw: dict = {
        "data_dir": str(data_dir),
        "ingest": {"endpoint": "tcp://127.0.0.1:*", "security": {"mode": "plain"}, "batch_wait_ms": 2},
        "http": {"token": "test-token-0123456789"},
        "metrics": {"log_interval_s": 2},
    }
    for key, value in sections.items():
        raw[key] = {**raw[key], **value} if isinstance(value, dict) and isinstance(raw.get(key), dict) else value
    return parse_config(raw, MatcherConfig)


def unit_vectors(rng: np.random.Generator, n: int, dim: int) -> np.ndarray:
    v = rng.standard_normal((n, dim)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def make_sighting(vec: np.ndarray, node: str = "edge-1", camera: str = "gate", ts: float = T0, frame: int = 0,
                  track: int = 1, model: str = "m1", thumbnail: bytes | None = TINY_JPEG) -> Sighting:
    return Sighting(node, camera, ts, frame, track, (10.0, 20.0, 50.0, 140.0), 0.9, np.asarray(vec, np.float32), model, thumbnail)


def store_insert(store, sightings: list[Sighting]) -> list[int]:
    """Straight into a `crossview.matcher.store.Store`, past the ingest pipeline: embeddings as they are (float32
    unit vectors), each sighting its own track. Returns their ids."""
    first = store.next_id()
    ids = list(range(first, first + len(sightings)))
    store.insert(ids, sightings, ids, [s.embedding for s in sightings])
    return ids


class PersonWorld:
    """`persons` people each walking once past every camera: one edge track per (person, camera).

    A track's sightings are noisy copies of its person's unit vector, less noisy later on (edges send
    a running mean). Camera j is visited around T0 + j * 10000 s, person p at + p * 60 s, so time
    windows select cameras. Cameras 0 and 1 are on node edge-1, the rest on edge-2; track id = p + 1.
    """

    def __init__(self, persons: int, cameras: tuple[str, ...], dim: int, per_track: int, model: str, seed: int, noise: float):
        rng = np.random.default_rng(seed)
        self.cameras, self.model, self.per_track = cameras, model, per_track
        self.centers = unit_vectors(rng, persons, dim)
        self.sightings: list[Sighting] = []
        for j, cam in enumerate(cameras):
            for p in range(persons):
                for s in range(per_track):
                    sigma = noise * (1 - s / (per_track + 1))
                    v = self.centers[p] + sigma * rng.standard_normal(dim).astype(np.float32) / np.sqrt(dim)
                    node, _, track = self.track(p, cam)
                    self.sightings.append(make_sighting(v / np.linalg.norm(v), node, cam, self.ts(p, j, s), 10 * s, track, model))

    @staticmethod
    def ts(person: int, camera_index: int, s: int = 0) -> float:
        return T0 + camera_index * 10_000 + person * 60 + s

    def track(self, person: int, camera: str) -> tuple[str, str, int]:
        """(node, camera, edge track id) of a person's track on a camera."""
        return ("edge-1" if self.cameras.index(camera) < 2 else "edge-2"), camera, person + 1


def person_world(persons: int = 20, cameras: tuple[str, ...] = ("gate", "hall", "street"), dim: int = 64, per_track: int = 6,
                 model: str = "m1", seed: int = 0, noise: float = 0.35) -> PersonWorld:
    return PersonWorld(persons, cameras, dim, per_track, model, seed, noise)


class Pusher:
    """A ZeroMQ DEALER socket connected to the matcher, like an edge node's publisher, but without a spool: what it
    sends goes once, and the matcher's acknowledgements are left unread."""

    def __init__(self, endpoint: str):
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.SNDHWM, 0)  # unlimited: a test's messages are never dropped on this side
        self.sock.setsockopt(zmq.LINGER, 2000)
        self.sock.connect(endpoint)

    def send(self, sightings: list[Sighting]) -> None:
        for s in sightings:
            self.sock.send(encode(s))

    def send_raw(self, *messages: bytes) -> None:
        for m in messages:
            self.sock.send(m)

    def close(self) -> None:
        self.sock.close()
        self.ctx.term()

    def __enter__(self) -> "Pusher":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def wait_until(cond, timeout: float, what: str) -> None:
    if not wait_for(cond, timeout):
        raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def index_ids(index: faiss.Index) -> set[int]:
    if isinstance(index, faiss.IndexIDMap2):
        return set(faiss.vector_to_array(index.id_map).tolist())
    ivf = faiss.extract_index_ivf(index)
    lists = ivf.invlists
    return {int(i) for n in range(ivf.nlist) for i in faiss.rev_swig_ptr(lists.get_ids(n), lists.list_size(n))}


def held_ids(index, model: str) -> set[int]:
    """The ids a matcher's index (`matcher.index`) holds for `model`, whichever engine: read from Milvus itself, not
    from what the index counted."""
    part = index.partition(model)
    return set(index._ids(part.name)) if part.kind == "milvus" else index_ids(part.index)


def wait_for(pred, timeout: float) -> bool:
    """Poll `pred` until it holds or `timeout` seconds pass; its last answer."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(0.05)
    return pred()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class CrossviewProcess:
    """A `crossview` subprocess whose log goes to a file the test reads."""

    def __init__(self, log: Path, *args: str):
        self.log_path = log
        self._log = log.open("a")
        self.started = time.monotonic()
        self.p = subprocess.Popen([sys.executable, "-m", "crossview.cli", *args], stdout=self._log, stderr=subprocess.STDOUT,
                                  cwd=Path(__file__).resolve().parents[1])

    def text(self) -> str:
        return self.log_path.read_text()

    def wait_for_line(self, text: str, timeout: float = 60) -> str:
        """Wait until the log holds `text` (or the process ended); the log."""
        wait_until(lambda: text in self.text() or self.p.poll() is not None, timeout, f"{text!r} in {self.log_path}")
        assert text in self.text(), self.text()
        return self.text()

    def kill9(self) -> None:
        self.p.send_signal(signal.SIGKILL)
        self.p.wait(10)

    def wait(self, timeout: float) -> int:
        rc = self.p.wait(timeout)
        self._log.close()
        return rc

    def stop(self) -> None:
        if self.p.poll() is None:
            self.p.terminate()
            try:
                self.p.wait(20)
            except subprocess.TimeoutExpired:
                self.kill9()
        self._log.close()
