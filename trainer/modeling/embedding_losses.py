"""Losses on embeddings shared by the later methods: triplet (ADFL), contrastive, difference and MMD (ARN).

| loss                  | from                    | on                                                              |
|-----------------------|-------------------------|-----------------------------------------------------------------|
| `batch_hard_triplet`  | Hermans et al., ADFL    | hardest positive and negative per anchor in a PK batch, margin m |
| `contrastive`         | ARN Eq. 2 (Hadsell)     | every pair: d² when the same identity, max(0, m - d)² otherwise  |
| `difference`          | ARN Eq. 4 (DSN)         | ‖Hcᵀ Hp‖²_F of shared vs private features, normalised as DSN's code |
| `mmd`                 | ARN authors' code       | squared MMD, Gaussian kernels at several bandwidths              |

Every loss is a mean (over anchors, pairs, entries), as in `trainer.modeling.losses`, and is computed
in float32 with autocast off (`_float32`): under AMP the matrix products would otherwise run in fp16, whose
pairwise distances and correlations lose the small differences these losses live on.
"""

from __future__ import annotations

import functools

import torch
from torch.nn import functional as F  # noqa: N812


def _float32(loss):
    """Run `loss` outside autocast, its floating-point tensor arguments cast to float32 (labels stay integers)."""

    @functools.wraps(loss)
    def run(*args, **kwargs):
        with torch.autocast(args[0].device.type, enabled=False):
            return loss(*(a.float() if torch.is_tensor(a) and a.is_floating_point() else a for a in args), **kwargs)

    return run


def pairwise_distance(x: torch.Tensor) -> torch.Tensor:
    """Euclidean distances (N, N); the clamp keeps the sqrt's gradient finite on the diagonal."""
    sq = x.pow(2).sum(1)
    return (sq[:, None] + sq[None, :] - 2 * x @ x.t()).clamp_min(1e-12).sqrt()


@_float32
def batch_hard_triplet(f: torch.Tensor, labels: torch.Tensor, margin: float = 0.3) -> torch.Tensor:
    """Mean over anchors of max(0, m + hardest positive distance - hardest negative distance)."""
    d = pairwise_distance(f)
    same = labels[:, None] == labels[None, :]
    hardest_pos = d.masked_fill(~same, 0).amax(1)
    hardest_neg = d.masked_fill(same, float("inf")).amin(1)
    has_neg = torch.isfinite(hardest_neg)  # a batch of one identity has no negatives: nothing to rank
    loss = F.relu(margin + hardest_pos - hardest_neg)
    return loss[has_neg].mean() if has_neg.any() else f.sum() * 0


@_float32
def contrastive(e: torch.Tensor, labels: torch.Tensor, margin: float = 2.0) -> torch.Tensor:
    """ARN Eq. 2 over the distinct pairs i < j: λ d² + (1 - λ) max(0, m - d)², λ = 1 for one identity."""
    d = pairwise_distance(e)
    same = (labels[:, None] == labels[None, :]).float()
    per_pair = same * d.pow(2) + (1 - same) * F.relu(margin - d).pow(2)
    i, j = torch.triu_indices(len(e), len(e), offset=1, device=e.device)
    return per_pair[i, j].mean() if len(i) else e.sum() * 0


@_float32
def difference(shared: torch.Tensor, private: torch.Tensor) -> torch.Tensor:
    """ARN Eq. 4 for one domain: ‖Hcᵀ Hp‖²_F, rows of Hc / Hp the batch's shared / private features.

    Normalised as in DSN's public code, which ARN's loss comes from: each feature centred over the batch,
    each row L2-normalised, and the mean instead of the sum of the dc x dp squared correlations. Unnormalised,
    the term grows with the features' scale to the 4th power and γ would mean nothing from one network to
    the next; so normalised, it is about B / d² for unrelated features (5e-4 at B 32, d 256), which is
    the scale the paper's γ = 1500 fits.
    """
    c = F.normalize(shared - shared.mean(0), dim=1)
    p = F.normalize(private - private.mean(0), dim=1)
    return (c.t() @ p).pow(2).mean()


@_float32
def mmd(x: torch.Tensor, y: torch.Tensor, bandwidths: tuple[float, ...] = (0.25, 0.5, 1.0, 2.0, 4.0)) -> torch.Tensor:
    """Squared MMD of two samples with a sum of Gaussian kernels, bandwidths relative to the mean squared distance."""
    z = torch.cat([x, y])
    d2 = pairwise_distance(z).pow(2)
    scale = d2.detach().mean().clamp_min(1e-6)
    k = sum(torch.exp(-d2 / (scale * b)) for b in bandwidths)
    n = len(x)
    return k[:n, :n].mean() + k[n:, n:].mean() - 2 * k[:n, n:].mean()
