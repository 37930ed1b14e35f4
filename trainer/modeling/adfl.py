"""ADFL (Liu et al. 2019): type I attention after stage 3, the AF3 attention-feature branch, GMP and a BN neck.

| part                | what                                                                           |
|---------------------|--------------------------------------------------------------------------------|
| `SpatialAttention`  | "1s", supplement Eq. 5-6: Q, K (C/8) and V (C) 1x1 convs, A = softmax over HW, O = α·V·Aᵀ + I |
| `ChannelAttention`  | "1c", supplement Eq. 7-8: A = softmax(I·Iᵀ) over channels, O = β·A·I + I        |
| `Attn1Sum`          | "1sum" (Fig. 6c): both in parallel, summed, the input added once: O = α·V·Aᵀ + β·A·I + I |
| `build_trunk`       | a backbone with `Attn1Sum` after stage 3 ("attn3"): any method's trunk (`model.attn3`) |
| `AdflNet`           | "AF3-cat-attn3-1sum": GMP(stage 4) ‖ GMP(conv block(attn3 output)) → BN neck → classifier |

α and β are learned scalars that start at 0, so the attention module starts as the identity and the
pretrained stage 4 sees the input it was trained on. The paper's "sum" of two modules that each add
the input back would add it twice (2I); we add it once, which keeps that identity start.

Both attention maps are computed in float32, also under AMP: I·Iᵀ over 1024 channels of a ResNet
stage-3 map easily exceeds fp16's 65504, and softmax is taken with the max subtracted (torch.softmax).

    >>> m = Attn1Sum(16)
    >>> x = torch.randn(2, 16, 6, 4)
    >>> bool(torch.equal(m(x), x))  # α = β = 0: the identity until training moves them
    True
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn
from torch.nn import functional as F  # noqa: N812

from crossview.trainer.modeling.backbones import build_backbone

# Where stage 3 ends in `build_backbone`'s trunk (stride 16), and its width: ResNet's layer3; for
# MobileNetV2, the last 96-channel block (features[13]), the stride-16 end of that network.
STAGE3 = {"resnet50": (7, 1024), "resnet18": (7, 256), "mobilenet_v2": (14, 96)}


def _float32(x: torch.Tensor):
    """A context where `x`'s device runs without autocast: attention energies stay in float32."""
    return torch.autocast(x.device.type, enabled=False)


class SpatialAttention(nn.Module):
    """ADFL "1s": long-range dependency over positions; `attend` is α's term without α, `forward` adds I."""

    def __init__(self, channels: int):
        super().__init__()
        reduced = max(channels // 8, 1)
        self.query = nn.Conv2d(channels, reduced, 1)
        self.key = nn.Conv2d(channels, reduced, 1)
        self.value = nn.Conv2d(channels, channels, 1)
        self.alpha = nn.Parameter(torch.zeros(1))

    def attention(self, x: torch.Tensor) -> torch.Tensor:
        """A^S (N, HW, HW): row j is where position j looks, softmax over i (Eq. 5)."""
        with _float32(x):
            x = x.float()
            q, k = self.query(x).flatten(2), self.key(x).flatten(2)  # (N, C', HW)
            return torch.softmax(torch.bmm(q.transpose(1, 2), k), dim=-1)

    def attend(self, x: torch.Tensor) -> torch.Tensor:
        """Σ_i A_ji V_i of Eq. 6, shaped like x."""
        a = self.attention(x)
        with _float32(x):
            v = self.value(x.float()).flatten(2)  # (N, C, HW)
            return torch.bmm(v, a.transpose(1, 2)).view_as(x).to(x.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.alpha * self.attend(x) + x


class ChannelAttention(nn.Module):
    """ADFL "1c": long-range dependency over channels, no convolutions; `forward` adds I."""

    def __init__(self):
        super().__init__()
        self.beta = nn.Parameter(torch.zeros(1))

    @staticmethod
    def attention(x: torch.Tensor) -> torch.Tensor:
        """A^C (N, C, C): softmax over channels i of I_i·I_j (Eq. 7), max-subtracted so 1024 channels do not overflow."""
        with _float32(x):
            f = x.float().flatten(2)
            return torch.softmax(torch.bmm(f, f.transpose(1, 2)), dim=-1)

    def attend(self, x: torch.Tensor) -> torch.Tensor:
        """Σ_i A_ji I_i of Eq. 8, shaped like x."""
        a = self.attention(x)
        with _float32(x):
            return torch.bmm(a, x.float().flatten(2)).view_as(x).to(x.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.beta * self.attend(x) + x


class Attn1Sum(nn.Module):
    """ADFL "1sum": spatial and channel attention in parallel, summed, the input added once (see the module doc)."""

    def __init__(self, channels: int):
        super().__init__()
        self.spatial = SpatialAttention(channels)
        self.channel = ChannelAttention()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.spatial.alpha * self.spatial.attend(x) + self.channel.beta * self.channel.attend(x) + x


class Attn3Trunk(nn.Module):
    """A backbone cut after stage 3 with `Attn1Sum` in the cut; `forward` is the trunk, `features` also the attn3 output."""

    def __init__(self, early: nn.Module, attn: Attn1Sum, late: nn.Module, attn_channels: int):
        super().__init__()
        self.early, self.attn, self.late = early, attn, late
        self.attn_channels = attn_channels

    def features(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(stage-4 map, attn3 output): ADFL's AF3 branch reads the second."""
        a = self.attn(self.early(images))
        return self.late(a), a

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.late(self.attn(self.early(images)))

    def pretrained_parameters(self):
        """The backbone's own weights (at `backbone_lr_mult`, frozen by `freeze_backbone_epochs`); the attention is new."""
        return [*self.early.parameters(), *self.late.parameters()]


def build_trunk(backbone: str, pretrained: str = "imagenet", last_stride: int = 1,
                attn3: str = "none") -> tuple[nn.Module, int]:
    """`build_backbone`, with ADFL's attention after stage 3 when `attn3` is "1sum"."""
    trunk, channels = build_backbone(backbone, pretrained, last_stride)
    if attn3 == "none":
        return trunk, channels
    if attn3 != "1sum":
        raise ValueError(f"unknown attn3 {attn3!r}; choose none or 1sum")
    cut, width = STAGE3[backbone]
    return Attn3Trunk(trunk[:cut], Attn1Sum(width), trunk[cut:], width), channels


def conv_block(in_dim: int, out_dim: int) -> nn.Sequential:
    """ADFL Fig. 3: 3x3 conv, BN, ReLU, then 1x1 conv, BN, ReLU."""
    return nn.Sequential(
        nn.Conv2d(in_dim, out_dim, 3, padding=1, bias=False), nn.BatchNorm2d(out_dim), nn.ReLU(inplace=True),
        nn.Conv2d(out_dim, out_dim, 1, bias=False), nn.BatchNorm2d(out_dim), nn.ReLU(inplace=True),
    )


def global_max_pool(fmap: torch.Tensor) -> torch.Tensor:
    return F.adaptive_max_pool2d(fmap, 1).flatten(1)


class AdflOutputs(NamedTuple):
    neck: torch.Tensor  # (N, dim) after the BN neck: the triplet loss and the test feature
    logits: torch.Tensor  # (N, source ids): the softmax loss


class AdflEmbedder(nn.Module):
    """The deployable ADFL model: neck features, averaged with the mirror image's when `flip` (the paper's test)."""

    def __init__(self, net: AdflNet, flip: bool):
        super().__init__()
        self.net, self.flip = net, flip

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        f = self.net.neck_features(images)
        return (f + self.net.neck_features(images.flip(3))) / 2 if self.flip else f


class AdflNet(nn.Module):
    """AF3-cat-attn3-1sum: backbone (attn3 inside), GMP, AF3 branch, concatenation, BN neck, identity classifier.

    `attn3="none"` is the paper's baseline (Table I): the backbone, GMP and the BN neck, no attention, no AF3.
    """

    def __init__(self, num_source_ids: int, backbone: str = "resnet50", pretrained: str = "imagenet",
                 last_stride: int = 1, af_dim: int = 1024, flip_test: bool = True, attn3: str = "1sum"):
        super().__init__()
        self.trunk, channels = build_trunk(backbone, pretrained, last_stride, attn3)
        self.af3 = conv_block(self.trunk.attn_channels, af_dim) if attn3 != "none" else None
        self.dim = channels + (af_dim if self.af3 is not None else 0)
        self.neck = nn.BatchNorm1d(self.dim)
        self.classifier = nn.Linear(self.dim, num_source_ids, bias=False)
        self.flip_test = flip_test

    def neck_features(self, images: torch.Tensor) -> torch.Tensor:
        if self.af3 is None:
            return self.neck(global_max_pool(self.trunk(images)))
        fmap, attended = self.trunk.features(images)
        return self.neck(torch.cat([global_max_pool(fmap), global_max_pool(self.af3(attended))], dim=1))

    def embedder(self) -> AdflEmbedder:
        return AdflEmbedder(self, self.flip_test)

    def forward(self, images: torch.Tensor) -> AdflOutputs | torch.Tensor:
        if not self.training:
            return self.embedder()(images)
        f = self.neck_features(images)
        return AdflOutputs(f, self.classifier(f))
