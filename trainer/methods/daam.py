"""DAAM (Huang et al.): domain adaptive attention, k-means++ pseudo labels with Eq. 9 weights, Eq. 12's losses.

| interface        | DAAM                                                                            |
|------------------|---------------------------------------------------------------------------------|
| network          | `ReidNet`: attention split, DSH / DSP branches, domain head (`model.*` switches) |
| losses           | `total_loss`: Eq. 12 with the `loss.*` weights                                   |
| target step      | Alg. 1 lines 3-5: f_sh of the target → clusters (`clustering.method`) → weights (Eq. 9, DAAL's soft labels with `loss.target: soft`, all ones with `hard`) → a fresh K-way target classifier; stop when NMI(previous, new) > `adapt.nmi_stop` |
| adaptation draws | the source, and the target's inliers by pseudo label                            |
| checkpoint state | the pseudo labels (`PseudoLabels` as a dict)                                    |

The papers' ablation switches are config keys the network and losses read: `model.attention`,
`model.dsp`, `model.domain_loss`, `loss.orth`, `loss.target`.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict

import numpy as np
import torch

from crossview.trainer.clustering import PseudoLabels, cluster, nmi, size_summary
from crossview.trainer.data.samples import with_labels
from crossview.trainer.methods.base import AdaptSamples, Method
from crossview.trainer.modeling.losses import LossWeights, total_loss
from crossview.trainer.modeling.network import ReidNet

log = logging.getLogger("crossview.trainer")


class Daam(Method):
    name = "daam"

    def __init__(self, cfg):
        super().__init__(cfg)
        self.weights = LossWeights(**cfg.loss.model_dump(exclude={"target"}))
        self.labels: PseudoLabels | None = None

    def check(self, data) -> None:
        c = self.cfg.clustering
        if c.method == "kmeans" and c.k >= len(data.target):
            raise ValueError(f"clustering.k is {c.k} but the target has only {len(data.target)} "
                             "images; lower it or harvest more crops")

    def build(self, num_source_ids, pretrained=None) -> ReidNet:
        return ReidNet.from_config(self.cfg.model, num_source_ids, pretrained)

    def losses(self, out, batch):
        return total_loss(out, batch, self.weights)

    def target_step(self, run, model) -> bool:
        previous, t0 = self.labels, time.perf_counter()
        self.labels = run.share(lambda: self._cluster(run.extract(run.data.target)))
        score = nmi(previous.labels, self.labels.labels) if previous is not None else None
        run.log("cluster", clusters=self.labels.n_clusters, outlier_share=round(self.labels.outlier_share, 4),
                **_cluster_sizes(self.labels), seconds=round(time.perf_counter() - t0, 2),
                **({"nmi": round(score, 4)} if score is not None else {}))
        if self.labels.n_clusters < 2:
            raise RuntimeError(f"clustering found {self.labels.n_clusters} clusters on the target; "
                               "check clustering.p / min_samples (DBSCAN) or the target data")
        model.set_target_classes(torch.as_tensor(self.labels.centers))
        converged = score is not None and score > self.cfg.adapt.nmi_stop
        if converged:
            log.info("pseudo labels stopped changing (NMI > %s): stopping", self.cfg.adapt.nmi_stop)
        return converged

    def _cluster(self, features: np.ndarray) -> PseudoLabels:
        """Clusters and their weights (all ones for the "w/o weights" ablation)."""
        c, target = self.cfg.clustering, self.cfg.loss.target
        labels = cluster(features, method=c.method, k=c.k, k1=c.k1, k2=c.k2, p=c.p, min_samples=c.min_samples,
                         soft=target == "soft", epsilon=c.epsilon, seed=self.cfg.seed)
        if target == "hard":
            labels.weights = np.ones(len(labels.labels), np.float32)
        return labels

    def adapt_samples(self, data) -> AdaptSamples:
        return AdaptSamples(data.source, with_labels(data.target, self.labels.labels),
                            torch.as_tensor(self.labels.weights))

    def state_dict(self) -> dict | None:
        return asdict(self.labels) if self.labels is not None else None

    def load_state_dict(self, state, model) -> None:
        if state is not None:
            self.labels = PseudoLabels(**state)
            model.set_target_classes(torch.as_tensor(self.labels.centers))


def _cluster_sizes(pl: PseudoLabels) -> dict:
    """Cluster size spread and the mean confidence weight: how the pseudo labels look without ground truth."""
    inlier_w = pl.weights[pl.labels >= 0]
    return {**size_summary(pl.labels, pl.n_clusters),
            "mean_weight": round(float(inlier_w.max(axis=1).mean() if inlier_w.ndim == 2 else inlier_w.mean()), 4)}
