"""A real matcher with its HTTP API, fed real sightings, for the API and web page tests.

| piece          | what                                                                                  |
|----------------|---------------------------------------------------------------------------------------|
| sightings      | TUD-Campus ground-truth crops embedded by the default ONNX model, every 3rd frame:     |
|                | frames 1-30 as camera `gate` (node `edge-1`), 36-71 as `hall` (node `edge-2`); a person's |
|                | id is their track id, so persons 2-5 walk from gate to hall                            |
| transport      | encoded with `crossview.kernel.wire` and sent through a real ZeroMQ DEALER socket (`Pusher`) |
| service        | `Matcher` on a temporary data dir, ingest on a free port, `serve()` on 127.0.0.1:0    |
| store, index   | SQLite and FAISS in the data dir, or the `store` and `index` sections given          |
|                | (PostgreSQL and Milvus: `pgserver.deployment_sections`)                              |

    >>> with LiveMatcher(tmp_path, model_path, tud_frames) as live:
    ...     requests to live.url with header live.auth
"""

from __future__ import annotations

import time
from pathlib import Path

import cv2
import numpy as np
from helpers import Pusher, shared_data

from crossview.kernel.config import MatcherConfig, parse_config
from crossview.kernel.embedder import Embedder
from crossview.kernel.wire import Sighting
from crossview.matcher.api import serve
from crossview.matcher.service import Matcher

TOKEN = "test-token-0123456789abcdef"
CAMERAS = {"gate": ("edge-1", range(1, 31, 3)), "hall": ("edge-2", range(36, 72, 3))}
FRAME_S = 0.5  # seconds between frames, so tracks span a few seconds of wall time


def thumbnail(crop: np.ndarray, height: int = 128) -> bytes:
    """The edge node's thumbnail: the crop scaled to `height`, JPEG."""
    width = max(1, round(crop.shape[1] * height / crop.shape[0]))
    return cv2.imencode(".jpg", cv2.resize(crop, (width, height), interpolation=cv2.INTER_AREA))[1].tobytes()


def load_gt() -> np.ndarray:
    return np.loadtxt(shared_data("TUD-Campus") / "gt" / "gt.txt", delimiter=",", ndmin=2)


def tud_people(frames: list[np.ndarray], gt: np.ndarray, frame: int) -> list[tuple[int, tuple[float, ...], np.ndarray]]:
    """(person id, box, crop) of every ground-truth person in TUD-Campus frame `frame` (from 1)."""
    image, out = frames[frame - 1], []
    for _, pid, left, top, width, height in gt[gt[:, 0] == frame, :6]:
        x1, y1 = max(left, 0), max(top, 0)
        x2, y2 = min(left + width, image.shape[1]), min(top + height, image.shape[0])
        if x2 - x1 >= 8 and y2 - y1 >= 16:
            out.append((int(pid), (x1, y1, x2, y2), image[int(y1):int(y2), int(x1):int(x2)]))
    return out


def person_crop(frames: list[np.ndarray], frame: int, person: int) -> np.ndarray:
    return next(crop for pid, _, crop in tud_people(frames, load_gt(), frame) if pid == person)


def tud_sightings(embedder: Embedder, frames: list[np.ndarray], t0: float) -> list[Sighting]:
    gt = load_gt()
    items = []  # (node, camera, frame, person, box, crop)
    for camera, (node, numbers) in CAMERAS.items():
        items += [(node, camera, n, *person) for n in numbers for person in tud_people(frames, gt, n)]
    vecs = embedder.embed([crop for *_, crop in items])
    return [
        Sighting(node=node, camera=camera, ts=t0 + n * FRAME_S, frame=n, track=pid, box=box, score=0.9, embedding=vec,
                 model=embedder.version, thumbnail=thumbnail(crop))
        for (node, camera, n, pid, box, crop), vec in zip(items, vecs)
    ]


class LiveMatcher:
    def __init__(self, data_dir: Path, model: Path, tud_frames: list[np.ndarray], sections: dict | None = None):
        self.cfg = parse_config({
            **(sections or {}),
            "data_dir": str(data_dir),
            "ingest": {"endpoint": "tcp://127.0.0.1:*", "security": {"mode": "plain"}},
            "http": {"port": 0, "token": TOKEN},
            "models": [str(model)],
        }, MatcherConfig)
        self.embedder = Embedder(model, device="cpu")
        self.sightings = tud_sightings(self.embedder, tud_frames, t0=time.time() - 600)
        self.model = self.embedder.version
        self.token, self.auth = TOKEN, {"Authorization": f"Bearer {TOKEN}"}

    def __enter__(self) -> "LiveMatcher":
        self.matcher = Matcher(self.cfg)
        self.matcher.start()
        try:
            with Pusher(self.matcher.ingest.endpoint) as pusher:  # a DEALER, as edges have
                pusher.send(self.sightings)
            self._wait_accepted(len(self.sightings))
            self.server = serve(self.matcher, self.cfg.http)
        except BaseException:
            self.matcher.stop()
            raise
        self.url = self.server.url.rstrip("/")
        return self

    def _wait_accepted(self, n: int, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while self.matcher.ingest.accepted < n:
            assert time.monotonic() < deadline, f"matcher accepted {self.matcher.ingest.accepted} of {n} sightings"
            time.sleep(0.05)

    def __exit__(self, *exc) -> None:
        self.server.stop()
        self.matcher.stop()
