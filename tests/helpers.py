"""Reusable test helpers: the shared real footage and a controllable MJPEG-over-HTTP camera.

| helper                 | what                                                                     |
|------------------------|--------------------------------------------------------------------------|
| `shared_data(name)`    | path under `../shared/data`, or skip the test naming what is missing      |
| `jpeg_frames(path, n)` | the first `n` frames of a video, JPEG-encoded                              |
| `raw_export(...)`      | ONNX export without the contract checks, for models that break it           |
| `MjpegServer`          | `multipart/x-mixed-replace` stream on 127.0.0.1 that a test can kill, restart or stall |

    >>> with MjpegServer(jpeg_frames(shared_data("vtest.avi"), 50)) as cam:
    ...     cap = cv2.VideoCapture(cam.url, cv2.CAP_FFMPEG)
    ...     cam.stall()   # keep the connection open but send nothing; cam.resume() sends again
    ...     cam.stop()    # shut down and drop every client (they see EOF)
    ...     cam.start()   # same port again
"""

from __future__ import annotations

import socket
import threading
import time
import warnings
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import cv2
import onnx
import pytest
import torch
from torch import nn

from crossview.modelmeta import ModelMeta
from trainer.export import IMAGENET_MEAN, IMAGENET_STD

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
