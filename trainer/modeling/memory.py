"""Memory-bank losses for pseudo-labelled targets: cluster contrast, camera-aware proxies, co-occurrence negatives.

| what                    | from                       | on                                                                  |
|-------------------------|----------------------------|---------------------------------------------------------------------|
| `cluster_nce`           | Cluster Contrast (Dai 2021) | InfoNCE of each embedding against every cluster centroid, its own the positive |
| `intra_camera_proxy`    | CAP (Wang 2021), PPLR       | InfoNCE against the proxies of the embedding's own camera only       |
| `inter_camera_proxy`    | CAP                         | its cluster's proxies in every camera as positives, the `hard` most similar other proxies as negatives |
| `cooccurrence_margin`   | this repo (the tracklet constraint) | hinge: a crop must be nearer its own centroid than any centroid holding a tracklet seen beside it, by `margin` |
| `momentum_update`       | Cluster Contrast            | m_c ← normalise(μ m_c + (1 − μ) f) for each row, in batch order (a new tensor) |

Memories are unit rows; embeddings are L2-normalised here. The losses run in float32 outside autocast
(`_float32`), like the embedding losses: with τ = 0.05, fp16 logits of 20 lose the differences the
softmax lives on. The memories are updated without gradient, after the loss has read them.
"""

from __future__ import annotations

import torch
from torch.nn import functional as F  # noqa: N812

from crossview.trainer.modeling.embedding_losses import _float32


@_float32
def cluster_nce(f: torch.Tensor, labels: torch.Tensor, centroids: torch.Tensor, tau: float = 0.05) -> torch.Tensor:
    """Mean of -log softmax(f·Mᵀ/τ)[label]: Cluster Contrast's ClusterMemory loss."""
    return F.cross_entropy(F.normalize(f, dim=1) @ centroids.t() / tau, labels)


@_float32
def intra_camera_proxy(f: torch.Tensor, proxies: torch.Tensor, proxy: torch.Tensor, proxy_cam: torch.Tensor,
                       tau: float = 0.07) -> torch.Tensor:
    """CAP's intra-camera loss: softmax over the proxies of the row's camera only, the row's own (cluster, camera)
    proxy the target; it learns identities within a camera without the camera's style separating them."""
    logits = F.normalize(f, dim=1) @ proxies.t() / tau
    other_camera = proxy_cam[None, :] != proxy_cam[proxy][:, None]
    return F.cross_entropy(logits.masked_fill(other_camera, float("-inf")), proxy)


@_float32
def inter_camera_proxy(f: torch.Tensor, proxies: torch.Tensor, proxy: torch.Tensor, proxy_cluster: torch.Tensor,
                       tau: float = 0.07, hard: int = 50) -> torch.Tensor:
    """CAP's inter-camera loss: -mean over the row's cluster's proxies P of log(exp(f·p/τ) / Σ over P and the `hard`
    most similar proxies of other clusters); it pulls one person's views from every camera together."""
    logits = F.normalize(f, dim=1) @ proxies.t() / tau
    positive = proxy_cluster[None, :] == proxy_cluster[proxy][:, None]
    negatives = logits.masked_fill(positive, float("-inf"))
    top = negatives.topk(min(hard, logits.shape[1]), dim=1).values
    denominator = torch.logsumexp(torch.cat([logits.masked_fill(~positive, float("-inf")), top], 1), dim=1)
    per_positive = (denominator[:, None] - logits).masked_fill(~positive, 0)
    return (per_positive.sum(1) / positive.sum(1)).mean()


@_float32
def cooccurrence_margin(f: torch.Tensor, labels: torch.Tensor, centroids: torch.Tensor, conflict: torch.Tensor,
                        margin: float = 0.1) -> torch.Tensor:
    """Mean over (row, conflicting cluster) of max(0, f·m_c − f·m_label + margin); `conflict` (rows, K) marks the
    clusters holding a tracklet that co-occurs with the row's, i.e. certainly someone else. 0 with no conflicts."""
    sim = F.normalize(f, dim=1) @ centroids.t()
    gap = F.relu(sim - sim.gather(1, labels[:, None]) + margin)
    return (gap * conflict).sum() / conflict.sum().clamp_min(1)


@torch.no_grad()
def momentum_update(memory: torch.Tensor, rows: torch.Tensor, f: torch.Tensor, momentum: float) -> torch.Tensor:
    """A new memory, row by row in batch order (a row seen twice moves twice): m ← normalise(μ m + (1 − μ) f). New, not
    in place: the batch's loss graph still holds the old memory for its backward pass."""
    memory = memory.clone()
    f = F.normalize(f.detach().float(), dim=1)
    for r, x in zip(rows.tolist(), f):
        memory[r] = F.normalize(momentum * memory[r] + (1 - momentum) * x, dim=0)
    return memory
