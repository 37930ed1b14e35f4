"""Algorithm 1 of DAAM / DAAL: pre-train on the source, then cluster the target and adapt, repeatedly.

| step                      | what                                                                    |
|---------------------------|-------------------------------------------------------------------------|
| pre-train                 | source PK batches, L_ReIDs only (Alg. 1 line 1)                         |
| each iteration            | extract f_sh on the target, cluster (k-means++ or DBSCAN), weights (Eq. 9 or DAAL Eq. 4), train on L_total (Eq. 12) |
| stop                      | after `adapt.iterations`, or when NMI(previous, new pseudo labels) > `adapt.nmi_stop` |
| every epoch               | checkpoint (`last.pt`), JSON-lines metrics, progress bar                |
| `resume=True`             | continues from `last.pt` at the next epoch, with the same pseudo labels |
| devices                   | CUDA with AMP when available, CPU otherwise; several GPUs under torchrun (DDP, rank 0 clusters, evaluates and writes) |

The run ends by exporting the domain-shared path to `<output_dir>/<name>.onnx` for the edge nodes.
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.nn import functional as F  # noqa: N812
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from crossview.trainer.clustering import PseudoLabels, cluster, nmi
from crossview.trainer.config import TrainConfig
from crossview.trainer.data.build import TrainData, load_train_data
from crossview.trainer.data.loader import make_eval_loader, make_train_loader
from crossview.trainer.data.samples import with_labels
from crossview.trainer.data.transforms import build_transforms
from crossview.trainer.evaluation import evaluate_features
from crossview.trainer.modeling.losses import Batch, LossWeights, total_loss
from crossview.trainer.modeling.network import ReidNet

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
    def __init__(self, cfg: TrainConfig, resume: bool = False):
        self.cfg = cfg
        self.out = Path(cfg.output_dir)
        self.rank, self.world = _init_distributed()
        self.device = _device(cfg.device)
        self.amp = cfg.amp and self.device.type == "cuda"
        _seed_everything(cfg.seed + self.rank)
        self.data: TrainData = self._load_data()
        if cfg.clustering.method == "kmeans" and cfg.clustering.k >= len(self.data.target):
            raise ValueError(f"clustering.k is {cfg.clustering.k} but the target has only {len(self.data.target)} "
                             "images; lower it or harvest more crops")
        self.model = ReidNet.from_config(cfg.model, self.data.num_source_ids).to(self.device)
        self.state = State()
        self.labels: PseudoLabels | None = None
        self.weights = LossWeights(**cfg.loss.model_dump(exclude={"target"}))
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
        while self.state.stage == "adapt" and (self.state.iteration < cfg.adapt.iterations or self.state.epoch):
            if self.state.epoch == 0:
                self.state.iteration += 1
                if self._recluster():
                    break
            self._stage(cfg.adapt, self._adapt_epoch)
            self._evaluate(f"iteration {self.state.iteration}")
            self.state.epoch = 0
            self._save()
        self.state.stage = "done"
        self._save()
        return self._export() if self.rank == 0 else None

    # ------------------------------------------------------------- stages
    def _stage(self, sched, epoch_fn) -> None:
        """Run the epochs of one schedule from `state.epoch` on, checkpointing after each."""
        optimizer = self._optimizer(sched)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda e: _lr_factor(sched, e))
        scaler = torch.amp.GradScaler("cuda", enabled=self.amp)
        if self._resume_ckpt is not None:
            optimizer.load_state_dict(self._resume_ckpt["optimizer"])
            scheduler.load_state_dict(self._resume_ckpt["scheduler"])
            scaler.load_state_dict(self._resume_ckpt["scaler"])
            self._resume_ckpt = None
        net = self._wrapped()
        while self.state.epoch < sched.epochs:
            t0 = time.perf_counter()
            lr = optimizer.param_groups[-1]["lr"]
            terms, images = epoch_fn(net, optimizer, scaler)
            scheduler.step()
            self.state.epoch += 1
            seconds = time.perf_counter() - t0
            self._save(optimizer, scheduler, scaler)  # before the log line: a logged epoch is always resumable
            self._log("epoch", **terms, lr=lr, images=images,
                      images_per_s=round(images * self.world / seconds, 2), seconds=round(seconds, 2))

    def _pretrain_epoch(self, net, optimizer, scaler) -> tuple[dict, int]:
        source = self._source_iter()
        steps = max(1, math.ceil(len(self.data.source) / self._batch()))

        def batch() -> Batch:
            xs, ys = next(source)
            return Batch(xs, len(xs), ys)

        return self._train_steps(net, optimizer, scaler, steps, batch)

    def _adapt_epoch(self, net, optimizer, scaler) -> tuple[dict, int]:
        source = self._source_iter()
        target = self._target_iter()
        inliers = int((self.labels.labels >= 0).sum())
        steps = max(1, math.ceil(max(len(self.data.source), inliers) / self._batch()))

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
        for _ in tqdm(range(steps), desc=desc, disable=self.rank != 0, leave=False):
            b = _to(make_batch(), self.device)
            with torch.autocast(self.device.type, dtype=torch.float16, enabled=self.amp):
                loss, terms = total_loss(net(b.images), b, self.weights)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"loss became {loss.item()} at {desc}; lower the learning rate")
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            images += b.images.shape[0]
            for k, v in {"loss": float(loss.detach()), **terms}.items():
                sums[k] = sums.get(k, 0.0) + v
        return {k: round(v / steps, 5) for k, v in sums.items()}, images

    # ---------------------------------------------------- pseudo labels
    def _recluster(self) -> bool:
        """Alg. 1 lines 3-5; True when the labels stopped changing (NMI above the threshold)."""
        previous, t0 = self.labels, time.perf_counter()
        payload = [self._cluster_target() if self.rank == 0 else None]
        if self.world > 1:
            dist.broadcast_object_list(payload, src=0)
        self.labels = payload[0]
        score = nmi(previous.labels, self.labels.labels) if previous is not None else None
        self._log("cluster", clusters=self.labels.n_clusters, outlier_share=round(self.labels.outlier_share, 4),
                  **_cluster_sizes(self.labels), seconds=round(time.perf_counter() - t0, 2),
                  **({"nmi": round(score, 4)} if score is not None else {}))
        if self.labels.n_clusters < 2:
            raise RuntimeError(f"clustering found {self.labels.n_clusters} clusters on the target; "
                               "check clustering.p / min_samples (DBSCAN) or the target data")
        self.model.set_target_classes(torch.as_tensor(self.labels.centers))
        converged = score is not None and score > self.cfg.adapt.nmi_stop
        if converged:
            log.info("pseudo labels stopped changing (NMI > %s): stopping", self.cfg.adapt.nmi_stop)
        return converged

    def _cluster_target(self) -> PseudoLabels:
        """f_sh of the target → clusters and their weights (all ones for the "w/o weights" ablation)."""
        c = self.cfg.clustering
        labels = cluster(self.extract(self.data.target), method=c.method, k=c.k, k1=c.k1, k2=c.k2, p=c.p,
                         min_samples=c.min_samples, soft=self.cfg.loss.target == "soft", epsilon=c.epsilon,
                         seed=self.cfg.seed)
        if self.cfg.loss.target == "hard":
            labels.weights = np.ones(len(labels.labels), np.float32)
        return labels

    # ------------------------------------------------------------- features
    @torch.no_grad()
    def extract(self, samples) -> np.ndarray:
        """L2-normalised f_sh of `samples`, in order (the space the clusters and distances live in)."""
        self.model.eval()
        loader = make_eval_loader(samples, build_transforms(self._size), self.cfg.eval_batch_size, self.cfg.workers)
        out = []
        for images, *_ in tqdm(loader, desc="features", disable=self.rank != 0, leave=False):
            with torch.autocast(self.device.type, dtype=torch.float16, enabled=self.amp):
                f = self.model(images.to(self.device, non_blocking=True))
            out.append(F.normalize(f.float(), dim=1).cpu())
        return torch.cat(out).numpy()

    def _evaluate(self, label: str) -> None:
        if self.rank != 0 or self.data.query is None:
            return
        result = evaluate_features(self.extract(self.data.query), self.extract(self.data.gallery),
                                   self.data.query, self.data.gallery)
        entry = {"label": label, **result}
        self.state.history.append(entry)
        self._log("eval", **entry)

    # ------------------------------------------------------------- batches
    @property
    def _size(self) -> tuple[int, int]:
        return self.cfg.input.height, self.cfg.input.width

    def _batch(self) -> int:
        """Images per step over all ranks: an epoch is one pass over the data whatever the GPU count."""
        return self.cfg.sampler.p * self.cfg.sampler.k * self.world

    def _source_iter(self):
        for images, pids, _, _ in self._loader(self.data.source, stream=0):
            yield images, pids

    def _target_iter(self):
        weights = torch.as_tensor(self.labels.weights)
        samples = with_labels(self.data.target, self.labels.labels)  # outliers (-1) are never drawn
        for images, labels, _, index in self._loader(samples, stream=1):
            yield images, labels, weights[index]

    def _loader(self, samples, stream: int):
        """Endless augmented PK batches over `samples`, reshuffled per epoch, stream and rank."""
        p = min(self.cfg.sampler.p, len({s.pid for s in samples if s.pid >= 0}))
        loader = make_train_loader(samples, build_transforms(self._size, train=True), p, self.cfg.sampler.k,
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
        # Every head reaches the loss (idle ones x0, see `total_loss`), so no unused-parameter search.
        return DistributedDataParallel(self.model, device_ids=ids)

    def _optimizer(self, sched) -> torch.optim.Optimizer:
        trunk = list(self.model.trunk.parameters())
        trunk_ids = {id(p) for p in trunk}
        rest = [p for p in self.model.parameters() if id(p) not in trunk_ids]
        groups = [{"params": trunk, "lr": sched.lr * sched.backbone_lr_mult}, {"params": rest, "lr": sched.lr}]
        o = self.cfg.optim
        return torch.optim.SGD(groups, lr=sched.lr, momentum=o.momentum, weight_decay=o.weight_decay, nesterov=True)

    # ------------------------------------------------------- checkpoints
    def _save(self, optimizer=None, scheduler=None, scaler=None) -> None:
        if self.rank != 0:
            return
        ckpt = {
            "state": asdict(self.state),
            "model": self.model.state_dict(),
            "labels": asdict(self.labels) if self.labels is not None else None,
            "optimizer": optimizer.state_dict() if optimizer else None,
            "scheduler": scheduler.state_dict() if scheduler else None,
            "scaler": scaler.state_dict() if scaler else None,
            "config": self.cfg.model_dump(mode="json"),
            "num_source_ids": self.data.num_source_ids,
        }
        tmp = self.out / f".{CHECKPOINT}.tmp"
        torch.save(ckpt, tmp)
        os.replace(tmp, self.out / CHECKPOINT)  # a kill mid-write leaves the previous checkpoint whole

    def _load_checkpoint(self) -> dict | None:
        path = self.out / CHECKPOINT
        if not path.is_file():
            log.warning("--resume: no checkpoint at %s, starting from scratch", path)
            return None
        ckpt = torch.load(path, map_location="cpu", weights_only=False)  # our own file, written by _save
        self.state = State(**ckpt["state"])
        if ckpt["labels"] is not None:
            self.labels = PseudoLabels(**ckpt["labels"])
            self.model.set_target_classes(torch.as_tensor(self.labels.centers))
        self.model.load_state_dict(ckpt["model"])
        log.info("resumed %s at %s iteration %d after epoch %d", path, self.state.stage, self.state.iteration,
                 self.state.epoch)
        return ckpt if ckpt["optimizer"] is not None and self.state.epoch > 0 else None

    # ------------------------------------------------------------- output
    def _log(self, event: str, **fields) -> None:
        if self.rank != 0:
            return
        record = {"event": event, "time": round(time.time(), 3), "stage": self.state.stage,
                  "iteration": self.state.iteration, "epoch": self.state.epoch, **fields}
        with open(self.out / "metrics.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")
        log.info("%s %s", event, " ".join(f"{k}={v}" for k, v in fields.items()))

    def _export(self) -> Path:
        from crossview.trainer.export import export_trained

        return export_trained(self.model, self.cfg, self.state.history, self.out / f"{self.cfg.name}.onnx")


def _cluster_sizes(pl: PseudoLabels) -> dict:
    """Cluster size spread and the mean confidence weight: how the pseudo labels look without ground truth."""
    sizes = np.bincount(pl.labels[pl.labels >= 0], minlength=pl.n_clusters)
    inlier_w = pl.weights[pl.labels >= 0]
    return {"size_min": int(sizes.min()), "size_median": float(np.median(sizes)), "size_max": int(sizes.max()),
            "mean_weight": round(float(inlier_w.max(axis=1).mean() if inlier_w.ndim == 2 else inlier_w.mean()), 4)}


def _lr_factor(sched, epoch: int) -> float:
    warm = (epoch + 1) / sched.warmup_epochs if epoch < sched.warmup_epochs else 1.0
    return warm * sched.gamma ** sum(epoch >= m for m in sched.milestones)


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
