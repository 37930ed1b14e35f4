"""Training images/s per backbone: the engine's own step (`trainer.engine.train_step`) on the full DAAM model.

Each row runs in a fresh process, because OpenMP reads OMP_WAIT_POLICY once at torch's import. The
spinning row (OMP_WAIT_POLICY=ACTIVE, OpenMP's usual behaviour) next to the passive one shows what
`crossview.kernel.runtime.passive_threads()` buys on a shared CPU. CUDA rows (AMP) appear when a GPU is usable.

    python bench/train_bench.py [--steps 6] [--out docs/benchmarks.md]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

from docsection import machine, write_section

REPO = Path(__file__).resolve().parents[1]
SECTION = "## Trainer: training speed (bench/train_bench.py)"


def step_rate(backbone: str, height: int, width: int, batch: int, steps: int, device: str) -> float:
    """Images/s of the engine's own `train_step` on the full DAAM model, with the engine's optimizer and AMP
    setting, on batches of half source, half target images; after two warm-up steps."""
    import torch

    from crossview.trainer.config import TrainConfig
    from crossview.trainer.engine import make_optimizer, train_step
    from crossview.trainer.methods import METHODS
    from crossview.trainer.modeling.losses import Batch

    cfg = TrainConfig(name="bench", source={"kind": "folders", "root": "."}, target={"kind": "images", "root": "."},
                      model={"backbone": backbone, "pretrained": "none"})
    dev = torch.device(device)
    method = METHODS[cfg.method](cfg)
    net = method.build(100).to(dev).train()
    net.set_target_classes(torch.randn(50, net.dim))  # what DAAM's target step gives it: one row per cluster
    opt = make_optimizer(net, cfg.adapt, cfg.optim)
    amp = cfg.amp and dev.type == "cuda"
    scaler = torch.amp.GradScaler("cuda", enabled=amp)
    half = batch // 2
    b = Batch(torch.randn(batch, 3, height, width, device=dev), half, torch.randint(0, 100, (half,), device=dev),
              torch.randint(0, 50, (half,), device=dev), torch.rand(half, device=dev))
    for i in range(steps + 2):
        if i == 2:
            if dev.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
        train_step(net, method.losses, b, opt, scaler, amp, where=f"bench step {i}")
    if dev.type == "cuda":
        torch.cuda.synchronize()
    return steps * batch / (time.perf_counter() - t0)


def child(args: argparse.Namespace) -> None:
    import torch

    rate = step_rate(args.backbone, args.height, args.width, args.batch, args.steps, args.device)
    print(json.dumps({"rate": rate, "threads": torch.get_num_threads()}))


def measure(backbone: str, size: tuple[int, int], batch: int, steps: int, device: str, wait: str) -> dict:
    env = {**os.environ, "OMP_WAIT_POLICY": wait}
    cmd = [sys.executable, __file__, "--child", "--backbone", backbone, "--height", str(size[0]), "--width",
           str(size[1]), "--batch", str(batch), "--steps", str(steps), "--device", device]
    out = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--out", type=Path, help="markdown file whose trainer-speed section is replaced")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--backbone", default="mobilenet_v2")
    ap.add_argument("--height", type=int, default=256)
    ap.add_argument("--width", type=int, default=128)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    if args.child:
        child(args)
        return
    import torch

    rows = [("mobilenet_v2", (256, 128), "PASSIVE"), ("mobilenet_v2", (256, 128), "ACTIVE"),
            ("mobilenet_v2", (128, 64), "PASSIVE"), ("resnet18", (256, 128), "PASSIVE"),
            ("resnet50", (256, 128), "PASSIVE")]
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    load0 = os.getloadavg()[0]
    lines = [SECTION, "", f"`python bench/train_bench.py --steps {args.steps} --batch {args.batch}`, "
             f"{datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC, {machine(f'torch {torch.__version__}')}; "
             f"{'GPU: ' + torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'no GPU on this machine'}.",
             "", "One step = the engine's own `train_step` (forward, the DAAM method's losses, backward, the engine's "
             "Nesterov SGD) on the full DAAM model (attention, both branches, all five losses) and a batch of half "
             "source, half target images; random weights (speed does not depend on them).",
             "", "| device | backbone | input | OpenMP idle threads | torch threads | images/s |", "|---|---|---|---|---|---|"]
    for device in devices:
        for backbone, size, wait in rows if device == "cpu" else [(b, (256, 128), "PASSIVE") for b in
                                                                 ("mobilenet_v2", "resnet18", "resnet50")]:
            r = measure(backbone, size, args.batch, args.steps, device, wait)
            lines.append(f"| {device} | {backbone} | {size[0]}x{size[1]} | {wait.lower()} | {r['threads']} | "
                         f"**{r['rate']:.1f}** |")
            print(lines[-1], flush=True)
    lines += ["", f"Load average {load0:.1f} at the start, {os.getloadavg()[0]:.1f} at the end.", ""]
    text = "\n".join(lines)
    if args.out:
        write_section(args.out, SECTION, text)
    print(text)


if __name__ == "__main__":
    main()
