"""Domain adaptive attention: split a feature map F into domain-shared and domain-specific parts.

| variant  | paper            | A(F)                                                                   |
|----------|------------------|------------------------------------------------------------------------|
| `daam`   | DAAM Eq. 3-4     | S(F) x C(F): spatial (channel mean, 3x3/2 conv, upsample, 1x1 conv) times channel (GAP, c→c/r→c) |
| `daal`   | DAAL Fig. 3      | sequential: depthwise-separable 3x3/2 conv to c/2, bilinear resize, 1x1 c/16, 1x1 c |
| `ia`     | DAAM Table 3     | independent attention: one module per branch, no residual split        |
| `none`   | ablation "DSH+DSP" | no attention: both branches see the whole map F                      |

`AttentionSplit(kind, c)(F)` returns (F_sh, F_sp) = (A*F, (1-A)*F) (Eq. 1-2); for `ia` F_sp = A'*F
with its own A'; for `none` (F, F).

Both papers state A in (0,1); DAAM's Eq. 4 closes C(F) with a ReLU, which cannot keep it below 1,
so each attention ends in a sigmoid (as in HA-CNN, which the paper follows) and A = S x C stays in (0,1).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F  # noqa: N812

ATTENTIONS = ("daam", "daal", "ia", "none")


class DaamAttention(nn.Module):
    """DAAM's A(F) = S(F) x C(F), Eq. 3; S is (N,1,h,w), C is (N,c,1,1)."""

    def __init__(self, channels: int, reduction: int = 16):
        super().__init__()
        self.spatial_down = nn.Conv2d(1, 1, 3, stride=2, padding=1)
        self.spatial_scale = nn.Conv2d(1, 1, 1)
        hidden = max(channels // reduction, 1)
        self.channel = nn.Sequential(
            nn.Conv2d(channels, hidden, 1), nn.ReLU(inplace=True), nn.Conv2d(hidden, channels, 1)
        )

    def forward(self, f: torch.Tensor) -> torch.Tensor:
        s = F.relu(self.spatial_down(f.mean(dim=1, keepdim=True)))
        s = F.interpolate(s, size=f.shape[-2:], mode="bilinear", align_corners=False)
        s = torch.sigmoid(self.spatial_scale(s))
        c = torch.sigmoid(self.channel(F.adaptive_avg_pool2d(f, 1)))
        return s * c


class DaalAttention(nn.Module):
    """DAAL's sequential spatial-then-channel attention, a full (N,c,h,w) map."""

    def __init__(self, channels: int, reduction: int = 16):
        super().__init__()
        half, hidden = max(channels // 2, 1), max(channels // reduction, 1)
        self.spatial = nn.Sequential(  # depthwise 3x3 stride 2, then pointwise to c/2 kernels
            nn.Conv2d(channels, channels, 3, stride=2, padding=1, groups=channels, bias=False),
            nn.Conv2d(channels, half, 1, bias=False), nn.BatchNorm2d(half), nn.ReLU(inplace=True),
        )
        self.channel = nn.Sequential(
            nn.Conv2d(half, hidden, 1, bias=False), nn.BatchNorm2d(hidden), nn.ReLU(inplace=True),
            nn.Conv2d(hidden, channels, 1, bias=False), nn.BatchNorm2d(channels),
        )

    def forward(self, f: torch.Tensor) -> torch.Tensor:
        s = F.interpolate(self.spatial(f), size=f.shape[-2:], mode="bilinear", align_corners=False)
        return torch.sigmoid(self.channel(s))


class AttentionSplit(nn.Module):
    """F → (F_sh, F_sp) for one of `ATTENTIONS`."""

    def __init__(self, kind: str, channels: int, reduction: int = 16):
        super().__init__()
        if kind not in ATTENTIONS:
            raise ValueError(f"unknown attention {kind!r}; choose one of {', '.join(ATTENTIONS)}")
        self.kind = kind
        make = DaalAttention if kind == "daal" else DaamAttention
        self.shared = make(channels, reduction) if kind != "none" else None
        self.specific = make(channels, reduction) if kind == "ia" else None

    def attention(self, f: torch.Tensor) -> torch.Tensor:
        """A(F) of the domain-shared path (all ones without attention)."""
        return self.shared(f) if self.shared is not None else torch.ones_like(f[:, :1, :1, :1])

    def shared_map(self, f: torch.Tensor) -> torch.Tensor:
        """F_sh alone: the only part the exported re-ID model needs."""
        return self.attention(f) * f

    def forward(self, f: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.shared is None:
            return f, f
        a = self.attention(f)
        f_sp = self.specific(f) * f if self.specific is not None else (1 - a) * f
        return a * f, f_sp
