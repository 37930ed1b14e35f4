"""The network of the tracklet / camera-aware method: a backbone, average or GeM pooling, an optional BN neck.

| part        | what                                                                                          |
|-------------|-----------------------------------------------------------------------------------------------|
| trunk       | `build_trunk` (as DAAM's: `model.attn3`, `model.init_from` for a source-trained start)          |
| pooling     | `tcap.pool`: "avg" (GAP) or "gem": generalised mean (Radenović et al.), p learnt from `tcap.gem_p` |
| neck        | `tcap.neck`: BatchNorm1d on the pooled feature (BNNeck, Luo et al.): the triplet on the pooled feature, everything else on the neck |
| classifier  | source identities, on the embedding                                                           |
| `embedder()`| trunk → pool → neck: the exported re-ID embedding (width = the backbone's channels)             |
"""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

import torch
from torch import nn
from torch.nn import functional as F  # noqa: N812

from crossview.trainer.modeling.adfl import build_trunk
from crossview.trainer.modeling.network import load_trunk


class GeM(nn.Module):
    """Generalised mean pooling: (mean x^p)^(1/p) over the map; p = 1 is GAP, p → ∞ max pooling."""

    def __init__(self, p: float = 3.0, eps: float = 1e-6):
        super().__init__()
        self.p = nn.Parameter(torch.tensor(float(p)))
        self.eps = eps

    def forward(self, fmap: torch.Tensor) -> torch.Tensor:
        p = self.p.clamp_min(1.0)  # below 1 the mean favours the weakest activations
        return F.adaptive_avg_pool2d(fmap.clamp_min(self.eps).pow(p), 1).pow(1.0 / p).flatten(1)


class TcapOutputs(NamedTuple):  # a tuple, so DistributedDataParallel finds the tensors in it
    pooled: torch.Tensor  # (N, dim) before the neck: the source triplet
    embedding: torch.Tensor  # (N, dim) after the neck (the pooled feature without one): memories, classifier, export
    logits: torch.Tensor  # (N, source ids)


class TcapEmbedder(nn.Module):
    def __init__(self, trunk: nn.Module, pool: nn.Module, neck: nn.Module):
        super().__init__()
        self.trunk, self.pool, self.neck = trunk, pool, neck

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.neck(self.pool(self.trunk(images)))


class TcapNet(nn.Module):
    def __init__(self, num_source_ids: int, backbone: str = "resnet50", pretrained: str = "imagenet",
                 last_stride: int = 1, attn3: str = "none", pool: str = "gem", gem_p: float = 3.0,
                 neck: bool = True, init_from: str | Path | None = None):
        super().__init__()
        self.trunk, self.dim = build_trunk(backbone, "none" if init_from else pretrained, last_stride, attn3)
        if init_from:
            load_trunk(self.trunk, init_from)
        if pool not in ("avg", "gem"):
            raise ValueError(f"unknown pooling {pool!r}; choose avg or gem")
        self.pool = GeM(gem_p) if pool == "gem" else nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.neck = nn.BatchNorm1d(self.dim) if neck else nn.Identity()
        self.classifier = nn.Linear(self.dim, num_source_ids, bias=False)

    @classmethod
    def from_config(cls, cfg, num_source_ids: int, pretrained: str | None = None) -> TcapNet:
        """From a `TrainConfig`; `pretrained="none"` when the weights come from the run's own checkpoint."""
        m, t = cfg.model, cfg.tcap
        return cls(num_source_ids, m.backbone, pretrained or m.pretrained, m.last_stride, m.attn3, t.pool, t.gem_p,
                   t.neck, m.init_from if pretrained != "none" else None)

    def embedder(self) -> TcapEmbedder:
        return TcapEmbedder(self.trunk, self.pool, self.neck)

    def forward(self, images: torch.Tensor) -> TcapOutputs | torch.Tensor:
        pooled = self.pool(self.trunk(images))
        embedding = self.neck(pooled)
        if not self.training:
            return embedding
        return TcapOutputs(pooled, embedding, self.classifier(embedding))
