"""The ARN network (Li et al., CVPRW 2018): shared E_I, domain-invariant E_C, private E_S / E_T, decoder D_C, classifier C_S.

| part      | paper (Sec. 4.2)                                   | here                                                 |
|-----------|----------------------------------------------------|------------------------------------------------------|
| E_I       | ResNet-50 without pooling: X is 7x7x2048            | `build_backbone` trunk: X (N, c, h, w)                |
| E_C, E_S, E_T | 3-layer fully convolutional nets → 2048-d       | `Encoder`: 1x1, 3x3, 1x1 convs (GroupNorm, ReLU), GAP → d (`model.embedding_dim`) |
| D_C       | FCN from [e_c ‖ e_p] (4096) to X                    | `Decoder`: a transposed conv to X's h x w, 3x3 and 1x1 convs; or up to the image (`arn.reconstruct: image`) |
| C_S       | fully connected layers with dropout, on source e_c  | dropout 0.5, linear                                   |
| test      | E_I + E_C, cosine distance                          | `embedder()`: trunk → E_C → e_c                       |

Where each loss reaches (the tests check it): L_cls and L_ctrs train E_I, E_C and C_S; L_rec and L_diff
train E_C, E_S, E_T and D_C but not E_I, whose input to them is detached. The paper's ablation says
without L_cls and L_ctrs "we are not able to fine-tune E_I", i.e. only the source losses move it; that
also keeps E_I from shrinking X to make it easy to rebuild. E_C therefore runs twice, on X and on the
detached X; its weights are the same, so e_c is the same.

The encoders and decoder use GroupNorm, which normalises each image on its own: E_S and E_T can then
run on every row of a mixed batch and the loss keep each domain's rows, exactly as if each saw only its
own domain (the network never learns which rows are source), and every parameter reaches every batch's
loss, as DistributedDataParallel without the unused-parameter search needs.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import nn
from torch.nn import functional as F  # noqa: N812

from crossview.trainer.modeling.backbones import build_backbone


def _norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(math.gcd(32, channels), channels)


def _conv(cin: int, cout: int, kernel: int) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, kernel, padding=kernel // 2, bias=False), _norm(cout), nn.ReLU(inplace=True)]


class Encoder(nn.Module):
    """E_C / E_S / E_T: a feature map X → a d-dim latent vector (three convolutions, then global average pooling)."""

    def __init__(self, channels: int, dim: int):
        super().__init__()
        # The last conv has no ReLU: e_c is matched by cosine and must be free to take either sign.
        self.body = nn.Sequential(*_conv(channels, dim, 1), *_conv(dim, dim, 3), nn.Conv2d(dim, dim, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x).mean(dim=(2, 3))


class Decoder(nn.Module):
    """D_C: a latent vector → X̂ (c, h, w), or with `upsample` doublings and `out_size` → an image."""

    def __init__(self, latent: int, hidden: int, out_channels: int, grid: tuple[int, int], upsample: int = 0,
                 out_size: tuple[int, int] | None = None):
        super().__init__()
        layers: list[nn.Module] = [nn.ConvTranspose2d(latent, hidden, grid, bias=False), _norm(hidden),
                                   nn.ReLU(inplace=True), *_conv(hidden, hidden, 3)]
        width = hidden
        for _ in range(upsample):  # image mode: double the map until it is about the image's size
            layers += [nn.Upsample(scale_factor=2, mode="nearest"), *_conv(width, max(width // 2, 32), 3)]
            width = max(width // 2, 32)
        self.body = nn.Sequential(*layers)
        self.out = nn.Conv2d(width, out_channels, 1)
        self.out_size = out_size

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        y = self.body(z[:, :, None, None])
        if self.out_size is not None and tuple(y.shape[-2:]) != self.out_size:
            y = F.interpolate(y, size=self.out_size, mode="bilinear", align_corners=False)
        return self.out(y)


class ArnOutputs(NamedTuple):  # a tuple, so DistributedDataParallel finds the tensors in it
    e_c: torch.Tensor  # (N, d) E_C(X): reaches E_I (L_cls, L_ctrs, MMD)
    logits: torch.Tensor  # (N, source ids) C_S(e_c); the loss reads the source rows
    e_c_free: torch.Tensor  # (N, d) E_C(X detached): L_diff and D_C's input
    e_s: torch.Tensor | None  # (N, d) E_S on every row; the loss reads the source rows (None without private encoders)
    e_t: torch.Tensor | None  # (N, d) E_T on every row; the loss reads the target rows
    rebuilt_s: torch.Tensor  # D_C([e_c ‖ e_s]) (or D_C(e_c) without private encoders), shaped like `original`
    rebuilt_t: torch.Tensor  # D_C([e_c ‖ e_t])
    original: torch.Tensor  # what D_C rebuilds: X detached, or the input images


class EncoderPath(nn.Module):
    """The deployable ARN model: E_I → E_C. Shares parameters with the network."""

    def __init__(self, trunk: nn.Module, shared: Encoder):
        super().__init__()
        self.trunk, self.shared = trunk, shared

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.shared(self.trunk(images))


class ArnNet(nn.Module):
    def __init__(self, num_source_ids: int, input_size: tuple[int, int], backbone: str = "resnet50",
                 pretrained: str = "imagenet", last_stride: int = 1, dim: int = 2048, private: bool = True,
                 reconstruct: str = "features"):
        super().__init__()
        if reconstruct not in ("features", "image"):
            raise ValueError(f"unknown reconstruct {reconstruct!r}; choose features or image")
        self.trunk, channels = build_backbone(backbone, pretrained, last_stride)
        grid = _map_size(self.trunk, input_size)
        self.dim, self.reconstruct = dim, reconstruct
        self.shared = Encoder(channels, dim)
        self.source_private = Encoder(channels, dim) if private else None
        self.target_private = Encoder(channels, dim) if private else None
        latent = 2 * dim if private else dim
        if reconstruct == "features":
            self.decoder = Decoder(latent, dim, channels, grid)
        else:
            doublings = max(0, round(math.log2(input_size[0] / grid[0])))
            self.decoder = Decoder(latent, dim, 3, grid, upsample=doublings, out_size=tuple(input_size))
        self.classifier = nn.Sequential(nn.Dropout(0.5), nn.Linear(dim, num_source_ids))

    @classmethod
    def from_config(cls, cfg, num_source_ids: int, pretrained: str | None = None) -> ArnNet:
        """From a `TrainConfig`; `pretrained="none"` when the weights come from a checkpoint."""
        m = cfg.model
        return cls(num_source_ids, (cfg.input.height, cfg.input.width), m.backbone, pretrained or m.pretrained,
                   m.last_stride, m.embedding_dim, cfg.arn.private, cfg.arn.reconstruct)

    def embedder(self) -> EncoderPath:
        return EncoderPath(self.trunk, self.shared)

    def _rebuild(self, e_c: torch.Tensor, e_p: torch.Tensor | None) -> torch.Tensor:
        return self.decoder(e_c if e_p is None else torch.cat([e_c, e_p], dim=1))

    def forward(self, images: torch.Tensor) -> ArnOutputs | torch.Tensor:
        x = self.trunk(images)
        if not self.training:
            return self.shared(x)
        e_c = self.shared(x)
        free = x.detach()  # L_rec and L_diff do not reach E_I (see the module doc)
        e_c_free = self.shared(free)
        e_s = self.source_private(free) if self.source_private is not None else None
        e_t = self.target_private(free) if self.target_private is not None else None
        rebuilt_s = self._rebuild(e_c_free, e_s)
        rebuilt_t = self._rebuild(e_c_free, e_t) if e_t is not None else rebuilt_s
        original = free if self.reconstruct == "features" else images
        return ArnOutputs(e_c, self.classifier(e_c), e_c_free, e_s, e_t, rebuilt_s, rebuilt_t, original)


@torch.no_grad()
def _map_size(trunk: nn.Module, input_size: tuple[int, int]) -> tuple[int, int]:
    """X's (h, w) for this input size, which D_C's first layer spans; BN statistics are left untouched."""
    was_training = trunk.training
    trunk.eval()
    try:
        return tuple(trunk(torch.zeros(1, 3, *input_size)).shape[-2:])
    finally:
        trunk.train(was_training)
