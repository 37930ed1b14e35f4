"""The training loop every adaptation method shares (Algorithm 1 of DAAM / DAAL in its general form).

| step                      | what                                                                    |
|---------------------------|-------------------------------------------------------------------------|
| method                    | `method:` in the train YAML picks one of `trainer.methods.METHODS`: its network, losses and step on the target |
| pre-train                 | source PK batches (Alg. 1 line 1)                                        |
| each iteration            | the method's step on the target (DAAM / DAAL: cluster, pseudo labels, weights), then `adapt.epochs` on source + target batches |
| stop                      | after `adapt.iterations`, or when the method's step says so (DAAM / DAAL: NMI of consecutive pseudo labels > `adapt.nmi_stop`); ADFL has none (`adapt.iterations: 0`), ARN one long one |
| target batches            | PK by the method's classes (pseudo labels), or P·K distinct images when it has none (ARN: `AdaptSamples.target_classes`) |
| optimiser                 | Nesterov SGD or Adam (`optim.kind`), backbone at `backbone_lr_mult`, frozen for `freeze_backbone_epochs` |
| one step                  | `train_step`: forward under autocast, the method's losses, backward and SGD through the AMP scaler (bench/train_bench.py times it); a method with several objectives per batch (EDAAN: generators, then discriminators) brings its own `Method.train_step` |
| lr schedule               | warm-up, steps at `milestones`, and a linear decay towards 0 over the last `decay_epochs` (CycleGAN's); adaptation iteration i at `iteration_lr_decay`^(i-1) |
| every epoch               | the method's `begin_epoch` / `end_epoch` hooks, checkpoint (`last.pt`, format `crossview.kernel.checkpoint`), JSON-lines metrics, progress bar |
| `resume=True`             | continues from `last.pt` at the next epoch, with the method's saved state (the same pseudo labels) |
| devices                   | CUDA with AMP when available, CPU otherwise; several GPUs under torchrun (DDP, rank 0 runs the target step, evaluates and writes) |

The run ends by exporting the method's deployable network (`.embedder()`) to `<output_dir>/<name>.onnx`
for the edge nodes.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import os
import random
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.nn import functional as F  # noqa: N812
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from crossview.kernel import checkpoint
from crossview.trainer.config import TrainConfig
from crossview.trainer.data.build import TrainData, load_train_data
from crossview.trainer.data.loader import make_eval_loader, make_train_loader
from crossview.trainer.data.samples import with_labels
from crossview.trainer.data.transforms import build_transforms
from crossview.trainer.evaluation import evaluate_features
from crossview.trainer.methods import METHODS
from crossview.trainer.modeling.domain_bn import domains_split, reestimate, use_domain_bn
from crossview.trainer.modeling.losses import Batch, optimise

log = logging.getLogger("crossview.trainer")
CHECKPOINT = "last.pt"


@dataclass
class State:
    """Where the run is; saved in every checkpoint so `--resume` continues exactly there."""

    stage: str = "pretrain"  # "pretrain", "adapt", "done"
    iteration: int = 0  # Algorithm 1 iteration (1-based once adapting)
    epoch: int = 0  # epochs finished in the current stage / iteration
    history: list[dict] = field(default_factory=list)  # evaluation results


class Trainer:
    """One training run: the shared loop around `cfg.method`; to the method it is the `Run` (data, extract, share, log)."""

    def __init__(self, cfg: TrainConfig, resume: bool = False):
        if cfg.adapt.domain_bn and METHODS[cfg.method].train_step is not None:
            raise ValueError(f"adapt.domain_bn: method {cfg.method!r} optimises its batches itself; its rows are not "
                             "source then target")
        self.cfg = cfg
        self.out = Path(cfg.output_dir)
        self.rank, self.world = _init_distributed()
        self.device = _device(cfg.device)
        self.amp = cfg.amp and self.device.type == "cuda"
        _seed_everything(cfg.seed + self.rank)
        self.data: TrainData = self._load_data()
        self.method = METHODS[cfg.method](cfg)
        self.method.check(self.data)
        self.model = self.method.build(self.data.num_source_ids).to(self.device)
        if cfg.adapt.domain_bn:
            log.info("adapt.domain_bn: %d BatchNorm layers normalise source and target apart", use_domain_bn(self.model))
        self.teacher: nn.Module | None = None  # the mean teacher (`adapt.ema`), made when adaptation starts
        self.state = State()
        self.out.mkdir(parents=True, exist_ok=True)
        self._resume_ckpt = self._load_checkpoint() if resume else None

    # ---------------------------------------------------------------- run
    def run(self) -> Path | None:
        """Train to the end (or continue a resumed run); return the exported ONNX model on rank 0."""
        cfg = self.cfg
        if self.state.stage == "pretrain":
            self._stage(cfg.pretrain, self._pretrain_epoch)
            self._evaluate("direct transfer")
            self.state.stage, self.state.epoch = "adapt", 0
        if cfg.adapt.ema and self.teacher is None:  # adaptation starts (or resumes from a checkpoint without one)
            self.teacher = _frozen_copy(self.model)
        while self.state.stage == "adapt" and (self.state.iteration < cfg.adapt.iterations or self.state.epoch):
            if self.state.epoch == 0:
                self.state.iteration += 1
                if cfg.adapt.domain_bn:
                    self._adabn()
                if self.method.target_step(self, self.model):
                    break
            self._stage(cfg.adapt, self._adapt_epoch, cfg.adapt.iteration_lr_decay ** (self.state.iteration - 1))
            self._evaluate(f"iteration {self.state.iteration}")
            self.state.epoch = 0
            self._save()
        self.state.stage = "done"
        self._save()
        return self._export() if self.rank == 0 else None

    # ------------------------------------------------------------- stages
    def _stage(self, sched, epoch_fn, scale: float = 1.0) -> None:
        """Run the epochs of one schedule from `state.epoch` on, at `scale` x its lr, checkpointing after each."""
        optimizer = self._optimizer(sched)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, [lambda e: scale * _lr_factor(sched, e, backbone=True),
                                                                  lambda e: scale * _lr_factor(sched, e)])
        scaler = torch.amp.GradScaler("cuda", enabled=self.amp)
        if self._resume_ckpt is not None:
            optimizer.load_state_dict(self._resume_ckpt.optimizer)
            scheduler.load_state_dict(self._resume_ckpt.scheduler)
            scaler.load_state_dict(self._resume_ckpt.scaler)
            self._resume_ckpt = None
        net = self._wrapped()
        while self.state.epoch < sched.epochs:
            t0 = time.perf_counter()
            lr = optimizer.param_groups[-1]["lr"]
            self.method.begin_epoch(self)
            terms, images = epoch_fn(net, optimizer, scaler)
            scheduler.step()
            self.state.epoch += 1
            seconds = time.perf_counter() - t0
            self._save(optimizer, scheduler, scaler)  # before the log line: a logged epoch is always resumable
            self.method.end_epoch(self, self.model)
            self.log("epoch", **terms, lr=lr, images=images,
                     images_per_s=round(images * self.world / seconds, 2), seconds=round(seconds, 2))

    def _pretrain_epoch(self, net, optimizer, scaler) -> tuple[dict, int]:
        source = self._source_iter(self.data.source)
        steps = max(1, math.ceil(len(self.data.source) / self._batch()))

        def batch() -> Batch:
            xs, ys = next(source)
            return Batch(xs, len(xs), ys)

        return self._train_steps(net, optimizer, scaler, steps, batch)

    def _adapt_epoch(self, net, optimizer, scaler) -> tuple[dict, int]:
        draw = self.method.adapt_samples(self.data)
        source = self._source_iter(draw.source)
        target = self._target_iter(draw.target, draw.target_weights, draw.target_classes)
        drawable = sum(s.pid >= 0 for s in draw.target) if draw.target_classes else len(draw.target)
        per_epoch = drawable if self.cfg.adapt.epoch_of == "target" else max(len(draw.source), drawable)
        steps = max(1, math.ceil(per_epoch / self._batch()))

        def batch() -> Batch:
            xs, ys = next(source)
            xt, lt, wt = next(target)
            return Batch(torch.cat([xs, xt]), len(xs), ys, lt, wt)

        return self._train_steps(net, optimizer, scaler, steps, batch)

    def _train_steps(self, net, optimizer, scaler, steps: int, make_batch) -> tuple[dict, int]:
        net.train()
        sums: dict[str, float] = {}
        images = 0
        desc = f"{self.state.stage} it{self.state.iteration} ep{self.state.epoch + 1}"
        own_step = self.method.train_step
        for _ in tqdm(range(steps), desc=desc, disable=self.rank != 0, leave=False):
            b = _to(make_batch(), self.device)
            if own_step is not None:
                loss, terms = own_step(net, b, optimizer, scaler, self.amp, where=desc)
            else:
                with domains_split(net, b.n_source):
                    loss, terms = train_step(net, self.method.losses, b, optimizer, scaler, self.amp, where=desc)
            if self.teacher is not None:
                ema_update(self.teacher, self.model, self.cfg.adapt.ema)
            images += b.images.shape[0]
            for k, v in {"loss": loss, **terms}.items():
                sums[k] = sums.get(k, 0.0) + v
        return {k: round(v / steps, 5) for k, v in sums.items()}, images

    # ------------------------------------------------- for the method (`trainer.methods.base.Run`)
    def share(self, compute):
        """`compute()` on rank 0, its result broadcast to every rank."""
        payload = [compute() if self.rank == 0 else None]
        if self.world > 1:
            dist.broadcast_object_list(payload, src=0)
        return payload[0]

    # ------------------------------------------------------------- features
    @torch.no_grad()
    def extract(self, samples) -> np.ndarray:
        """L2-normalised embeddings of `samples` (DAAM / DAAL: f_sh), in order: the space clusters and distances live in.
        From the deployed network: the mean teacher where there is one."""
        net = self._deployed
        net.eval()
        loader = make_eval_loader(samples, build_transforms(self._size), self.cfg.eval_batch_size, self.cfg.workers)
        out = []
        for images, *_ in tqdm(loader, desc="features", disable=self.rank != 0, leave=False):
            with torch.autocast(self.device.type, dtype=torch.float16, enabled=self.amp):
                f = net(images.to(self.device, non_blocking=True))
            out.append(F.normalize(f.float(), dim=1).cpu())
        return torch.cat(out).numpy()

    @torch.no_grad()
    def _adabn(self) -> None:
        """The BatchNorms' running statistics re-estimated on the target (`adapt.domain_bn`): the source's, from
        pre-training, until the first adaptation epoch; every rank sees the same images in the same order."""
        t0 = time.perf_counter()
        loader = make_eval_loader(self.data.target, build_transforms(self._size), self.cfg.eval_batch_size,
                                  self.cfg.workers)
        # Both: the teacher takes the student's statistics only at its next step.
        for net in [n for n in (self.model, self.teacher) if n is not None]:
            with torch.autocast(self.device.type, dtype=torch.float16, enabled=self.amp):
                seen = reestimate(net, (images.to(self.device, non_blocking=True) for images, *_ in loader))
        self.log("adabn", images=seen, seconds=round(time.perf_counter() - t0, 2))

    def _evaluate(self, label: str) -> None:
        if self.rank != 0 or self.data.query is None:
            return
        result = evaluate_features(self.extract(self.data.query), self.extract(self.data.gallery),
                                   self.data.query, self.data.gallery)
        entry = {"label": label, **result}
        self.state.history.append(entry)
        self.log("eval", **entry)

    # ------------------------------------------------------------- batches
    @property
    def _size(self) -> tuple[int, int]:
        return self.cfg.input.height, self.cfg.input.width

    def _batch(self) -> int:
        """Images per step over all ranks: an epoch is one pass over the data whatever the GPU count."""
        return self.cfg.sampler.p * self.cfg.sampler.k * self.world

    def _source_iter(self, samples):
        for images, pids, _, _ in self._loader(samples, stream=0):
            yield images, pids

    def _target_iter(self, samples, weights: torch.Tensor, by_class: bool = True):
        for images, labels, _, index in self._loader(samples, stream=1, by_class=by_class):  # pid -1 is never drawn
            yield images, labels, weights[index]

    def _loader(self, samples, stream: int, by_class: bool = True):
        """Endless augmented PK batches over `samples`, reshuffled per epoch, stream and rank."""
        samples, p, k = pk_plan(samples, self.cfg.sampler.p, self.cfg.sampler.k, by_class)
        loader = make_train_loader(samples, build_transforms(self._size, train=True), p, k,
                                   seed=self._epoch_seed(stream), num_workers=self.cfg.workers,
                                   persistent_workers=False)
        return _forever(loader)

    def _epoch_seed(self, stream: int) -> int:
        return hash((self.cfg.seed, self.rank, self.state.iteration, self.state.epoch, stream)) & 0x7FFFFFFF

    def _load_data(self) -> TrainData:
        """Rank 0 first: it cuts and caches MOT crops that the other ranks then only read."""
        if self.rank != 0:
            dist.barrier()
        data = load_train_data(self.cfg)
        if self.rank == 0 and self.world > 1:
            dist.barrier()
        return data

    # ------------------------------------------------------------- model
    def _wrapped(self) -> nn.Module:
        if self.world == 1:
            return self.model
        ids = [self.device.index] if self.device.type == "cuda" else None
        # Every parameter reaches the method's loss (DAAM: idle heads x0, see `total_loss`): no unused-parameter search.
        return DistributedDataParallel(self.model, device_ids=ids)

    def _optimizer(self, sched) -> torch.optim.Optimizer:
        return make_optimizer(self.model, sched, self.cfg.optim)

    # ------------------------------------------------------- checkpoints
    def _save(self, optimizer=None, scheduler=None, scaler=None) -> None:
        if self.rank != 0:
            return
        ckpt = checkpoint.Checkpoint(
            config=self.cfg.model_dump(mode="json"), num_source_ids=self.data.num_source_ids,
            model=self.model.state_dict(), state=asdict(self.state), method=self.method.state_dict(),
            optimizer=optimizer.state_dict() if optimizer else None,
            scheduler=scheduler.state_dict() if scheduler else None, scaler=scaler.state_dict() if scaler else None,
            ema=self.teacher.state_dict() if self.teacher is not None else None,
        )
        checkpoint.save(ckpt, self.out / CHECKPOINT)  # atomic: a kill mid-write leaves the previous one whole

    def _load_checkpoint(self) -> checkpoint.Checkpoint | None:
        path = self.out / CHECKPOINT
        if not path.is_file():
            log.warning("--resume: no checkpoint at %s, starting from scratch", path)
            return None
        ckpt = checkpoint.load(path)
        self.state = State(**ckpt.state)
        self.method.load_state_dict(ckpt.method, self.model)
        self.model.load_state_dict(ckpt.model)
        if ckpt.ema is not None and self.cfg.adapt.ema:
            self.teacher = _frozen_copy(self.model)
            self.teacher.load_state_dict(ckpt.ema)
        log.info("resumed %s at %s iteration %d after epoch %d", path, self.state.stage, self.state.iteration,
                 self.state.epoch)
        return ckpt if ckpt.optimizer is not None and self.state.epoch > 0 else None

    # ------------------------------------------------------------- output
    def log(self, event: str, **fields) -> None:
        if self.rank != 0:
            return
        record = {"event": event, "time": round(time.time(), 3), "stage": self.state.stage,
                  "iteration": self.state.iteration, "epoch": self.state.epoch, **fields}
        with open(self.out / "metrics.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")
        log.info("%s %s", event, " ".join(f"{k}={v}" for k, v in fields.items()))

    @property
    def _deployed(self) -> nn.Module:
        """The network that is scored, clusters the target and is exported: the mean teacher once there is one."""
        return self.teacher if self.teacher is not None else self.model

    def _export(self) -> Path:
        from crossview.trainer.export import export_trained

        return export_trained(self._deployed, self.cfg, self.state.history, self.out / f"{self.cfg.name}.onnx")


def train_step(net: nn.Module, losses: Callable, batch: Batch, optimizer: torch.optim.Optimizer,
               scaler: torch.amp.GradScaler, amp: bool, *, where: str) -> tuple[float, dict[str, float]]:
    """One optimisation step of the shared loop: forward under autocast (fp16 when `amp`), `losses(out, batch)`,
    backward and optimizer step through the AMP scaler; returns the loss and its weighted terms. `where` names the
    step in the error when the loss is not finite."""
    with torch.autocast(batch.images.device.type, dtype=torch.float16, enabled=amp):
        loss, terms = losses(net(batch.images), batch)
    optimise(loss, optimizer, scaler, where)
    return float(loss.detach()), terms


def _frozen_copy(model: nn.Module) -> nn.Module:
    teacher = copy.deepcopy(model)
    teacher.requires_grad_(False)
    return teacher.eval()


@torch.no_grad()
def ema_update(teacher: nn.Module, student: nn.Module, momentum: float) -> None:
    """The mean teacher after one of the student's steps: its weights `momentum` of its own plus the rest of the
    student's (MMT's mean net); buffers (BatchNorm's running statistics) are the student's, since it never trains."""
    for t, s in zip(teacher.parameters(), student.parameters(), strict=True):
        t.lerp_(s, 1.0 - momentum)
    for t, s in zip(teacher.buffers(), student.buffers(), strict=True):
        t.copy_(s)


def pk_plan(samples, p: int, k: int, by_class: bool = True) -> tuple[list, int, int]:
    """(samples labelled by what to sample them by, P, K) for a PK sampler, P no more than there are classes.

    Without classes (`by_class=False`, ARN's raw target) every image is a class of its own and a batch is P·K
    classes of one image: P·K distinct images, instead of the K copies of each that K > 1 would draw."""
    if not by_class:
        samples, p, k = with_labels(samples, range(len(samples))), p * k, 1
    return list(samples), min(p, len({s.pid for s in samples if s.pid >= 0})), k


def make_optimizer(model: nn.Module, sched, optim) -> torch.optim.Optimizer:
    """Nesterov SGD or Adam (`optim.kind`) with two groups: the backbone at `sched.lr * sched.backbone_lr_mult`, the
    rest at `sched.lr`. The backbone is `model.trunk`, or its `pretrained_parameters()` when new modules sit inside it
    (ADFL's attention): those learn at the full rate, and while the backbone is frozen."""
    trunk = list(getattr(model.trunk, "pretrained_parameters", model.trunk.parameters)())
    trunk_ids = {id(p) for p in trunk}
    rest = [p for p in model.parameters() if id(p) not in trunk_ids]
    groups = [{"params": trunk, "lr": sched.lr * sched.backbone_lr_mult}, {"params": rest, "lr": sched.lr}]
    if optim.kind == "adam":
        return torch.optim.Adam(groups, lr=sched.lr, betas=(optim.momentum, 0.999), weight_decay=optim.weight_decay)
    return torch.optim.SGD(groups, lr=sched.lr, momentum=optim.momentum, weight_decay=optim.weight_decay, nesterov=True)


def _lr_factor(sched, epoch: int, backbone: bool = False) -> float:
    """The lr multiplier of `epoch`: linear warm-up, steps at the milestones, CycleGAN's linear decay over the last
    `decay_epochs` (1 - k / (decay_epochs + 1) in the k-th of them); 0 for a frozen backbone (ADFL's first 5)."""
    if backbone and epoch < sched.freeze_backbone_epochs:
        return 0.0
    warm = (epoch + 1) / sched.warmup_epochs if epoch < sched.warmup_epochs else 1.0
    decay = max(0, epoch + 1 - (sched.epochs - sched.decay_epochs)) / (sched.decay_epochs + 1)
    return warm * sched.gamma ** sum(epoch >= m for m in sched.milestones) * (1 - decay)


def _forever(loader):
    while True:
        yield from loader


def _to(b: Batch, device: torch.device) -> Batch:
    moved = {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in vars(b).items()}
    return Batch(**moved)


def _device(kind: str) -> torch.device:
    if kind == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device: cuda was asked for but no CUDA device is usable")
    if kind == "cpu" or not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))


def _init_distributed() -> tuple[int, int]:
    """(rank, world size); under torchrun this joins the process group (NCCL on GPUs, Gloo on CPU)."""
    world = int(os.environ.get("WORLD_SIZE", 1))
    if world == 1:
        return 0, 1
    if not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    return dist.get_rank(), world


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
