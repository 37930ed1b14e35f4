"""Shared fixtures: the shared data sets, the default embedder model (built once), tiny models, the matcher's
store backends (`store_section`: SQLite, or a fresh database on one PostgreSQL server per session, `pgserver.py`), the
Milvus standalone server of the `milvus` package (`milvus_server`, once a session, for tests marked so), and the
deployments the matcher's behaviour suites run on (`deployment`: SQLite + FAISS, or PostgreSQL + that Milvus).

Shared data lives beside the repository (`/work/shared/data` next to `/work/main`, as CI clones it);
tests that need it are skipped with the reason when it is absent.
"""

from __future__ import annotations

from crossview.kernel.runtime import passive_threads

passive_threads()  # before torch loads libgomp: what `crossview` itself does

import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from pgserver import BACKENDS, DEPLOYMENTS, backend_section, deployment_sections
from torch import nn

from crossview.kernel.modelmeta import ModelMeta
from crossview.trainer.export import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    build_default_embedder,
    export_onnx,
)
from crossview.trainer.modeling.backbones import GapEmbedder

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
TUD_CAMPUS = SHARED_DATA / "TUD-Campus"


@pytest.fixture(scope="session")
def default_model(tmp_path_factory) -> Path:
    """The default edge embedder (ImageNet MobileNetV2 + GAP, 256x128, 1280-d) as ONNX."""
    path = tmp_path_factory.mktemp("models") / "mobilenetv2-imagenet.onnx"
    build_default_embedder(path)
    return path


@pytest.fixture(scope="session")
def make_tiny_model():
    """`make(path, version, seed=0, dim=8) -> ModelMeta`: a small conv + GAP embedder at 32x16, exported."""

    def make(path: Path, version: str, seed: int = 0, dim: int = 8) -> ModelMeta:
        torch.manual_seed(seed)
        meta = ModelMeta("tiny", version, 32, 16, IMAGENET_MEAN, IMAGENET_STD, dim, {"source": "test"})
        export_onnx(GapEmbedder(nn.Conv2d(3, dim, 3, stride=2)), path, meta)
        return meta

    return make


@pytest.fixture(scope="session")
def tud_frames() -> list[np.ndarray]:
    """All frames of TUD-Campus (640x480 BGR, 71 frames); frame number n is index n - 1."""
    video = TUD_CAMPUS / "TUD-Campus.mp4"
    if not video.is_file():
        pytest.skip(f"shared data set absent: {video}")
    cap = cv2.VideoCapture(str(video))
    frames = []
    while (frame := cap.read()[1]) is not None:
        frames.append(frame)
    cap.release()
    assert frames, f"{video} decoded no frames"
    return frames


@pytest.fixture(scope="session")
def tud_crops(tud_frames):
    """`crops(frame) -> {person id: BGR crop}` from TUD-Campus ground truth (MOT format, frames from 1)."""
    gt = np.loadtxt(TUD_CAMPUS / "gt" / "gt.txt", delimiter=",", ndmin=2)

    def crops(frame: int) -> dict[int, np.ndarray]:
        image = tud_frames[frame - 1]
        out = {}
        for _, pid, left, top, width, height in gt[gt[:, 0] == frame, :6].astype(int):
            # Boxes may extend past the image; keep the visible part.
            crop = image[max(top, 0):top + height, max(left, 0):left + width]
            if crop.size:
                out[pid] = crop
        return out

    return crops


@pytest.fixture(scope="session")
def live_matcher(tmp_path_factory, default_model, tud_frames):
    """A running matcher fed with TUD-Campus sightings on cameras gate and hall, its HTTP API on 127.0.0.1
    (see `live_matcher.py`). Shared by the API and web page tests, which only read from it."""
    from live_matcher import LiveMatcher

    with LiveMatcher(tmp_path_factory.mktemp("matcher"), default_model, tud_frames) as live:
        yield live


@pytest.fixture(scope="module", params=DEPLOYMENTS)
def served_matcher(request, live_matcher, tmp_path_factory, default_model, tud_frames):
    """The session's live matcher (SQLite + FAISS), then the same on PostgreSQL + Milvus: the API and web page suites
    run on both."""
    if request.param == "sqlite+faiss":
        yield live_matcher
        return
    from live_matcher import LiveMatcher

    with LiveMatcher(tmp_path_factory.mktemp("matcher-pg"), default_model, tud_frames, deployment_sections(request)) as live:
        yield live


@contextmanager
def _pg_in_temp():
    from pgserver import PgServer

    root = Path(tempfile.mkdtemp(prefix="crossview-pg-"))  # not under pytest's 0700 folders: the server's user must reach it
    root.chmod(0o755)
    try:
        with PgServer(root / "pg") as pg:
            yield pg
    finally:
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="session")
def pg_server():
    """One PostgreSQL server for the session (`pgserver.PgServer`), started when a test first asks for it."""
    with _pg_in_temp() as pg:
        yield pg


@pytest.fixture
def own_pg_server():
    """A PostgreSQL server of the test's own, for a test that stops it."""
    with _pg_in_temp() as pg:
        yield pg


@pytest.fixture(scope="session")
def milvus_server():
    """The Milvus standalone server the `milvus` package bundles (with its embedded etcd), in a temporary folder."""
    milvus = pytest.importorskip("milvus", reason="the milvus extra is not installed")
    root = tempfile.mkdtemp(prefix="crossview-milvus-")
    server = milvus.MilvusServer()
    server.set_base_dir(root)
    try:
        server.start()
        yield f"http://127.0.0.1:{server.listen_port}"
    finally:
        server.stop()
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(params=BACKENDS)
def store_section(request) -> dict:
    """Per backend, a `store` section for one test (PostgreSQL: an empty database of its own)."""
    return backend_section(request)


@pytest.fixture(params=DEPLOYMENTS)
def deployment(request) -> dict:
    """Per deployment, the `store` and `index` sections for one test's matcher: `matcher_config(dir, **deployment)`."""
    return deployment_sections(request)


@pytest.fixture
def open_test_store(tmp_path, store_section):
    """`open_test_store(read_only=False)`: the backend's store, SQLite in tmp_path; all are closed at the end."""
    from crossview.kernel.config import StoreConfig
    from crossview.matcher.service import open_store

    opened = []

    def make(read_only: bool = False):
        opened.append(open_store(tmp_path, StoreConfig(**store_section), read_only))
        return opened[-1]

    yield make
    for store in opened:
        store.close()
