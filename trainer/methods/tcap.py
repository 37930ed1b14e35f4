"""TCAP: tracklet- and camera-aware site adaptation, from a source-trained model, the labelled source training alongside.

| interface        | TCAP                                                                                  |
|------------------|---------------------------------------------------------------------------------------|
| network          | `TcapNet` (`trainer.modeling.tcap`): trunk, GeM or average pooling, optional BN neck, source classifier |
| losses           | source CE + batch-hard triplet; target: cluster-memory InfoNCE + intra- / inter-camera proxies + the co-occurrence margin (`trainer.modeling.memory`), weights `tcap.*` |
| target step      | embeddings → `trainer.tracklets.tracklet_labels` (tracklets split at appearance jumps, co-occurring ones never merged, DBSCAN eps from the tracklets' halves vs co-occurring pairs) → fresh memories: cluster centroids and (cluster, camera) proxies; stop when NMI(previous, new) > `adapt.nmi_stop` |
| adaptation draws | the source, and the target's inliers by cluster; `target_weights` carries each row's index into the target, which is how the losses find its proxy and its co-occurring clusters |
| checkpoint state | the pseudo labels and the memories as they stand after the last step, so `--resume` goes on with the same bank |
| export           | trunk → pool → neck                                                                   |

Start from a source-trained model with `pretrain.epochs` (source only, the same network and losses) or
`model.init_from: <run>/last.pt`. Ablations, one key each: `tcap.tracklets`, `tcap.split`,
`tcap.cannot_link`, `tcap.eps: profile` (Otsu on the k-NN profile) or `percentile` (DAAL's `clustering.p`), `tcap.pool: avg`, `tcap.neck: false`,
and 0 for any of the loss weights `tcap.memory`, `proxy_intra`, `proxy_inter`, `cooccur`.

AMP: the losses run in float32 outside autocast, the memories are float32. DDP: the gradients are
all-reduced by DDP as for every method; the memories are not parameters, so each rank keeps a copy and
updates it with every rank's rows (`_all_rows` gathers the batch's embeddings and indices first), in rank
order, so the copies stay equal; the loss itself reads only the rank's own rows. The pseudo labels are
computed on rank 0 and shared (`run.share`).
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict

import numpy as np
import torch
import torch.distributed as dist
from torch.nn import functional as F  # noqa: N812

from crossview.trainer.clustering import eps_from_percentile, nmi, size_summary
from crossview.trainer.data.samples import with_labels
from crossview.trainer.methods.base import AdaptSamples, Method
from crossview.trainer.modeling.embedding_losses import batch_hard_triplet
from crossview.trainer.modeling.memory import (
    cluster_nce,
    cooccurrence_margin,
    inter_camera_proxy,
    intra_camera_proxy,
    momentum_update,
)
from crossview.trainer.modeling.tcap import TcapNet, TcapOutputs
from crossview.trainer.tracklets import TrackletLabels, tracklet_labels

log = logging.getLogger("crossview.trainer")


class Tcap(Method):
    name = "tcap"
    defaults = {
        "model": {"attention": "none"},  # no DAAM split: the export's metadata records model.attention
        "optim": {"kind": "adam"},  # Cluster Contrast's: Adam 3.5e-4, weight decay 5e-4, re-cluster every few epochs
        "pretrain": {"epochs": 20, "lr": 3.5e-4, "milestones": [], "warmup_epochs": 2},
        "adapt": {"iterations": 20, "epochs": 2, "lr": 3.5e-4, "milestones": [], "nmi_stop": 0.98, "epoch_of": "target"},
    }

    def __init__(self, cfg):
        super().__init__(cfg)
        self.labels: TrackletLabels | None = None
        self.memory: dict[str, torch.Tensor] = {}  # centroids, proxies and the lookup tables the losses index

    def build(self, num_source_ids, pretrained=None) -> TcapNet:
        return TcapNet.from_config(self.cfg, num_source_ids, pretrained)

    def check(self, data) -> None:
        if self.cfg.tcap.min_crops > len(data.target):
            raise ValueError(f"tcap.min_crops is {self.cfg.tcap.min_crops} but the target has only {len(data.target)} "
                             "images")
        if self.cfg.tcap.tracklets and all(s.track < 0 for s in data.target):
            log.warning("tcap.tracklets: no target crop has a track id (not an edge harvest?): every crop is its own "
                        "tracklet and nothing co-occurs by track")

    # ------------------------------------------------------------------ losses
    def losses(self, out: TcapOutputs, batch):
        t, s = self.cfg.tcap, batch.n_source
        terms = {"source_ce": t.source_ce * F.cross_entropy(out.logits[:s].float(), batch.source_ids),
                 "source_triplet": t.source_triplet * batch_hard_triplet(out.pooled[:s], batch.source_ids,
                                                                          t.triplet_margin)}
        if s < out.embedding.shape[0]:
            terms.update(self._target_terms(out.embedding[s:], batch.target_labels, batch.target_weights))
        # Every output joins the graph (the target rows of the classifier x0): DDP needs a gradient for each parameter.
        idle = sum((o.float().sum() * 0 for o in out), torch.zeros((), device=out.embedding.device))
        total = sum(terms.values(), idle)
        return total, {k: float(v.detach()) for k, v in terms.items()}

    def _target_terms(self, f: torch.Tensor, labels: torch.Tensor, index: torch.Tensor) -> dict[str, torch.Tensor]:
        t, m = self.cfg.tcap, self.memory
        proxy = m["sample_proxy"][index]
        terms = {
            "memory": t.memory * cluster_nce(f, labels, m["centroids"], t.tau),
            "proxy_intra": t.proxy_intra * intra_camera_proxy(f, m["proxies"], proxy, m["proxy_cam"], t.proxy_tau),
            "proxy_inter": t.proxy_inter * inter_camera_proxy(f, m["proxies"], proxy, m["proxy_cluster"], t.proxy_tau,
                                                               t.hard_negatives),
            "cooccur": t.cooccur * cooccurrence_margin(f, labels, m["centroids"], m["conflict"][m["segment"][index]],
                                                       t.cooccur_margin),
        }
        self._update_memory(f, labels, proxy)
        return {k: v for k, v in terms.items() if getattr(t, k) != 0}

    def _update_memory(self, f: torch.Tensor, labels: torch.Tensor, proxy: torch.Tensor) -> None:
        """Momentum updates after the loss read the memories; new tensors, since autograd still holds the old ones."""
        f, labels, proxy = (_all_rows(x.detach()) for x in (f, labels, proxy))
        mu = self.cfg.tcap.momentum
        self.memory["centroids"] = momentum_update(self.memory["centroids"], labels, f, mu)
        self.memory["proxies"] = momentum_update(self.memory["proxies"], proxy, f, mu)

    # ------------------------------------------------------------- target step
    def target_step(self, run, model) -> bool:
        previous, t0 = self.labels, time.perf_counter()
        labels, memory = run.share(lambda: self._pseudo_labels(run))
        self.labels = labels
        self._set_memory(memory, _device(model))
        score = nmi(previous.labels, labels.labels) if previous is not None else None
        run.log("cluster", clusters=labels.n_clusters, segments=labels.n_segments, splits=labels.n_splits,
                cannot_link_pairs=len(labels.cannot_link), eps=round(labels.eps, 4), proxies=len(memory["proxies"]),
                outlier_share=round(float(np.mean(labels.labels < 0)), 4), **size_summary(labels.labels, labels.n_clusters),
                seconds=round(time.perf_counter() - t0, 2), **({"nmi": round(score, 4)} if score is not None else {}))
        if labels.n_clusters < 2:
            raise RuntimeError(f"tracklet clustering found {labels.n_clusters} clusters on the target; check tcap.eps, "
                               "tcap.min_crops or the target data")
        return score is not None and score > self.cfg.adapt.nmi_stop

    def _pseudo_labels(self, run) -> tuple[TrackletLabels, dict[str, np.ndarray]]:
        target, t, c = run.data.target, self.cfg.tcap, self.cfg.clustering
        features = run.extract(target)
        cams = np.array([s.camid for s in target])
        tracks = np.array([s.track if t.tracklets else -1 for s in target])
        frames = np.array([s.frame for s in target])
        rule = (lambda d: eps_from_percentile(d, c.p)) if t.eps == "percentile" else None
        labels = tracklet_labels(features, cams, tracks, frames, k1=c.k1, k2=c.k2, min_crops=t.min_crops,
                                 split=t.split, cannot_link=t.cannot_link, eps_k=t.eps_k,
                                 eps_by_halves=t.eps == "tracklets", eps_rule=rule)
        return labels, memory_init(features, cams, labels)

    def _set_memory(self, memory: dict[str, np.ndarray], device: torch.device) -> None:
        self.memory = {k: torch.as_tensor(v).to(device) for k, v in memory.items()}

    def adapt_samples(self, data) -> AdaptSamples:
        return AdaptSamples(data.source, with_labels(data.target, self.labels.labels), torch.arange(len(data.target)))

    # -------------------------------------------------------------- checkpoint
    def state_dict(self) -> dict | None:
        if self.labels is None:
            return None
        return {"labels": asdict(self.labels), "memory": {k: v.cpu().numpy() for k, v in self.memory.items()}}

    def load_state_dict(self, state, model) -> None:
        if state is not None:
            self.labels = TrackletLabels(**state["labels"])
            self._set_memory(state["memory"], _device(model))


def memory_init(features: np.ndarray, cams: np.ndarray, labels: TrackletLabels) -> dict[str, np.ndarray]:
    """The memories of one clustering: unit centroids (K, d), one unit proxy per (cluster, camera) with its cluster and
    camera, each crop's proxy (-1 for outliers), and which clusters co-occur with each segment (n_segments, K)."""
    y, seg = labels.labels, labels.segments
    inside = np.flatnonzero(y >= 0)
    pairs, sample_proxy = np.unique(np.stack([y[inside], cams[inside]], 1), axis=0, return_inverse=True)
    proxy_of = np.full(len(y), -1, np.int64)
    proxy_of[inside] = sample_proxy.ravel()
    seg_cluster = np.full(labels.n_segments, -1, np.int64)
    seg_cluster[seg] = y
    conflict = np.zeros((labels.n_segments, labels.n_clusters), np.float32)
    for a, b in labels.cannot_link:
        for i, j in ((a, b), (b, a)):
            if seg_cluster[j] >= 0:
                conflict[i, seg_cluster[j]] = 1.0
    return {"centroids": _unit_means(features, y, labels.n_clusters),
            "proxies": _unit_means(features, proxy_of, len(pairs)),
            "proxy_cluster": pairs[:, 0].astype(np.int64), "proxy_cam": pairs[:, 1].astype(np.int64),
            "sample_proxy": proxy_of, "segment": seg.astype(np.int64), "conflict": conflict}


def _unit_means(features: np.ndarray, groups: np.ndarray, n: int) -> np.ndarray:
    """L2-normalised mean feature of each group 0..n-1 (rows with group -1 ignored); (n, d) float32."""
    inside = groups >= 0
    sums = np.zeros((n, features.shape[1]), np.float64)
    np.add.at(sums, groups[inside], features[inside])
    return (sums / np.maximum(np.linalg.norm(sums, axis=1, keepdims=True), 1e-12)).astype(np.float32)


def _all_rows(x: torch.Tensor) -> torch.Tensor:
    """`x` from every rank, concatenated in rank order (every rank draws a batch of the same size); `x` alone without
    DDP."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x
    out = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(out, x.contiguous())
    return torch.cat(out)


def _device(model) -> torch.device:
    return next(model.parameters()).device
