"""Edge node benchmark on vtest.avi (768x576, 10 fps): embedder throughput and end-to-end node fps.

    python bench/edge_bench.py [--frames 150] [--out docs/benchmarks.md] [--profile]

| part        | what is compared (all in one run, so ratios hold on a noisy shared machine)                |
|-------------|---------------------------------------------------------------------------------------------|
| embedder    | ONNX Runtime `Embedder` batched vs the same network in PyTorch eager, one crop / batched    |
| YOLO        | YOLO11n ONNX inference alone: 640x640 vs 480x640 input                                      |
| edge node   | `EdgeNode` on vtest.avi with HOG, with YOLO11n ONNX 640 (random weights), and with YOLO     |
|             | timed but fed the HOG people (the target figure); time per stage from wrappers on the node |
| ORT options | every ONNX Runtime part under a few session options, patched in here (edge/ is not edited)  |

Other processes' CPU use (/proc/stat minus this process) is recorded for every measurement.
The tables are printed and replace the "Edge node (bench/edge_bench.py)" section of --out.
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


def build_yolo(folder: Path) -> dict[str, Path]:
    """YOLO11n with random weights from ultralytics' model YAML, exported like `crossview export-detector`:
    square 640 and 480x640, 768x576's aspect with no padding (`crossview export-detector --imgsz 480 640`)."""
    from ultralytics import YOLO

    pt = folder / "yolo11n-random.pt"
    YOLO("yolo11n.yaml").save(pt)
    # Beware: importing ultralytics sets OMP_NUM_THREADS=1 and cv2.setNumThreads(0) (no OpenCV threads), and
    # its exporter torch.set_num_threads(cpu_count - 1); TorchEmbedder sets its thread count at every call.
    return {f"{h}x{w}": export_yolo(pt, folder / f"yolo11n-random-{h}x{w}.onnx", imgsz=(h, w)) for h, w in YOLO_SHAPES}


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


def run_node(name: str, detector: DetectorConfig, model: Path, frames: int, people: list | None = None,
             ort_opts: dict | None = None, profile: cProfile.Profile | None = None) -> NodeRun:
    """EdgeNode on the first `frames` frames of vtest.avi; `people`: feed these boxes, the detector only timed."""
    receiver = AckReceiver()
    cfg = EdgeConfig(
        node_id="bench",
        cameras=[CameraConfig(id="vtest", source=str(VIDEO), fps=10)],  # native 10 fps: every frame, in order
        detector=detector,
        embedder=EmbedderConfig(model=model, batch_size=BATCH, device="cpu"),
        publisher=PublisherConfig(endpoint=receiver.endpoint, security=CurveConfig(mode="plain"),  # loopback
                                  spool_dir=Path(tempfile.mkdtemp(prefix="bench-spool-"))),
        metrics=MetricsConfig(port=0, log_interval_s=3600),
    )
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
    args = parser.parse_args()
    if not 1 <= args.frames <= 795:
        parser.error("--frames must be 1..795 (vtest.avi's length)")
    logging.basicConfig(level=logging.ERROR)  # the node's own log lines would break the progress bars
    info = {"date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "loadavg": " ".join(Path("/proc/loadavg").read_text().split()[:3])}
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
