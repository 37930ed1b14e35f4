"""The DAAM (Eq. 5-12) and DAAL (Eq. 3-7) losses.

| loss      | equation        | on                                                                  |
|-----------|-----------------|---------------------------------------------------------------------|
| `ds`      | DAAM Eq. 5      | -log p_o(x) for source and target: both pulled into one nominal domain |
|           | (GRL ablation)  | 2-way domain cross-entropy through a gradient reversal layer        |
| `reid_s`  | DAAM Eq. 6      | cross-entropy of the source identities                              |
| `reid_t`  | DAAM Eq. 8      | cross-entropy of the target pseudo labels weighted by w_i (Eq. 9)   |
|           | DAAL Eq. 5      | soft-label cross-entropy -Σ_k w_ik log p(k|x) (w_ik from DAAL Eq. 4) |
| `dsp`     | DAAM Eq. 10     | 2-way domain cross-entropy on f_sp                                  |
| `orth`    | DAAM Eq. 11     | (f_sh · f_sp) / (‖f_sh‖² ‖f_sp‖²) per sample                         |
| total     | DAAM Eq. 12     | Σ weight × loss (DAAL Eq. 7 = weights of ds and orth set to 0)       |

The papers write sums over the dataset; here every term is a mean over the batch, which only
rescales the learning rate and keeps the terms comparable whatever the batch size.
Target samples whose pseudo label is -1 (DBSCAN outliers) are never in a batch (the sampler skips them).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.nn import functional as F  # noqa: N812

from crossview.trainer.modeling.network import Outputs

SOURCE, TARGET = 0, 1  # domain labels of the DSP and GRL classifiers


@dataclass(frozen=True)
class LossWeights:
    ds: float = 1.0
    reid_s: float = 1.0
    reid_t: float = 1.0
    dsp: float = 1.0
    orth: float = 1.0


@dataclass
class Batch:
    """One mixed batch: the first `n_source` rows are source images, the rest target images."""

    images: torch.Tensor
    n_source: int
    source_ids: torch.Tensor  # (n_source,)
    target_labels: torch.Tensor | None = None  # (n_target,) pseudo labels
    target_weights: torch.Tensor | None = None  # (n_target,) DAAM w_i, or (n_target, K) DAAL w_ik

    @property
    def domains(self) -> torch.Tensor:
        n = self.images.shape[0]
        d = torch.full((n,), TARGET, dtype=torch.long, device=self.images.device)
        d[: self.n_source] = SOURCE
        return d


def domain_similarity(logit: torch.Tensor) -> torch.Tensor:
    """Eq. 5: every sample, source or target, should be in the one nominal domain (p_o → 1)."""
    return F.binary_cross_entropy_with_logits(logit, torch.ones_like(logit))


def weighted_ce(logits: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Eq. 8 with w_i of Eq. 9 (all ones gives the "w/o weights" ablation)."""
    return (weights * F.cross_entropy(logits, labels, reduction="none")).mean()


def soft_label_ce(logits: torch.Tensor, soft: torch.Tensor) -> torch.Tensor:
    """DAAL Eq. 5: -Σ_k w_ik log p(k|x)."""
    return -(soft * F.log_softmax(logits, dim=1)).sum(dim=1).mean()


def soft_orthogonality(f_sh: torch.Tensor, f_sp: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Eq. 11 as written: inner product over the product of squared norms."""
    num = (f_sh * f_sp).sum(dim=1)
    den = f_sh.pow(2).sum(dim=1) * f_sp.pow(2).sum(dim=1)
    return (num / den.clamp_min(eps)).mean()


def target_reid(logits: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Eq. 8 when `weights` is one per sample, DAAL Eq. 5 when it is one per (sample, cluster)."""
    return soft_label_ce(logits, weights) if weights.dim() == 2 else weighted_ce(logits, labels, weights)


def total_loss(out: Outputs, batch: Batch, w: LossWeights) -> tuple[torch.Tensor, dict[str, float]]:
    """Eq. 12 over one mixed batch; returns the total and each weighted term for the metrics log."""
    s = batch.n_source
    terms: dict[str, torch.Tensor] = {"reid_s": F.cross_entropy(out.source_logits[:s], batch.source_ids)}
    has_target = s < out.f_sh.shape[0]
    if has_target and out.target_logits is not None and batch.target_labels is not None:
        terms["reid_t"] = target_reid(out.target_logits[s:], batch.target_labels, batch.target_weights)
    if has_target and out.domain_logit is not None:
        terms["ds"] = domain_similarity(out.domain_logit)
    if has_target and out.grl_logits is not None:
        terms["ds"] = F.cross_entropy(out.grl_logits, batch.domains)
    if has_target and out.dsp_logits is not None:
        terms["dsp"] = F.cross_entropy(out.dsp_logits, batch.domains)
    if has_target and out.f_sp is not None:
        terms["orth"] = soft_orthogonality(out.f_sh, out.f_sp)
    weighted = {k: getattr(w, k) * v for k, v in terms.items() if getattr(w, k) != 0}
    # Every output joins the graph, x0 where its loss is off (e.g. the target heads while pre-training):
    # DistributedDataParallel then gets a gradient for every parameter and never waits for one.
    idle = sum((t.sum() * 0 for t in out if t is not None), torch.zeros((), device=out.f_sh.device))
    total = sum(weighted.values(), idle)
    return total, {k: float(v.detach()) for k, v in weighted.items()}


def optimise(loss: torch.Tensor, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler, where: str) -> None:
    """Backward and step through the AMP scaler; parameters the loss did not reach keep grad None (Adam skips them).
    A loss that is not finite stops the run, naming `where`."""
    if not torch.isfinite(loss):
        raise FloatingPointError(f"loss became {loss.item()} at {where}; lower the learning rate")
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.step(optimizer)
    scaler.update()

