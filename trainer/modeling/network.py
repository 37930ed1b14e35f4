"""The DAAM / DAAL re-ID network: backbone, attention split, domain-shared and domain-specific branches.

| part                 | what                                                                          |
|----------------------|-------------------------------------------------------------------------------|
| trunk                | `build_trunk(...)`: image → F (N, c, h, w); with `attn3` ADFL's attention after stage 3, with `init_from` a checkpoint's trained trunk (ADFL as pre-training) |
| split                | `AttentionSplit`: F → F_sh = A*F, F_sp = (1-A)*F                              |
| DSH branch           | head "fc": GAP, FC c→256, BN, ReLU (DAAM); head "gap": GAP (DAAL) → f_sh      |
| on f_sh              | source identity classifier, target cluster classifier (K), and either the one-class domain similarity head (FC→1, sigmoid) or a GRL + 2-way domain classifier |
| DSP branch           | own head of the same kind → f_sp, 2-way domain classifier                     |
| `embedder()`         | only trunk → F_sh → DSH head: what is exported to ONNX and runs on the edge   |

In train mode `forward` returns every output the losses need (`Outputs`); in eval mode it returns
f_sh, the re-ID embedding.
"""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

import torch
from torch import nn
from torch.nn import functional as F  # noqa: N812

from crossview.kernel import checkpoint
from crossview.trainer.modeling.adfl import build_trunk
from crossview.trainer.modeling.attention import AttentionSplit

HEADS = ("fc", "gap")
DOMAIN_LOSSES = ("occ", "grl", "none")


class Outputs(NamedTuple):  # a tuple, so DistributedDataParallel finds the tensors in it
    f_sh: torch.Tensor
    source_logits: torch.Tensor
    target_logits: torch.Tensor | None
    domain_logit: torch.Tensor | None  # one-class head, before the sigmoid: (N,)
    grl_logits: torch.Tensor | None  # GRL domain classifier: (N, 2)
    f_sp: torch.Tensor | None
    dsp_logits: torch.Tensor | None  # DSP domain classifier: (N, 2)


class _GradReverse(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, scale: float):
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return -ctx.scale * grad, None


def embedding_head(kind: str, channels: int, dim: int) -> nn.Module:
    """GAP (+ FC, BN, ReLU for "fc") from a feature map to a vector."""
    if kind not in HEADS:
        raise ValueError(f"unknown head {kind!r}; choose one of {', '.join(HEADS)}")
    layers: list[nn.Module] = [nn.AdaptiveAvgPool2d(1), nn.Flatten()]
    if kind == "fc":
        layers += [nn.Linear(channels, dim), nn.BatchNorm1d(dim), nn.ReLU(inplace=True)]
    return nn.Sequential(*layers)


class SharedPath(nn.Module):
    """The deployable re-ID model: trunk → F_sh → DSH head. Shares parameters with the network."""

    def __init__(self, trunk: nn.Module, split: AttentionSplit, head: nn.Module):
        super().__init__()
        self.trunk, self.split, self.head = trunk, split, head

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.split.shared_map(self.trunk(images)))


class ReidNet(nn.Module):
    def __init__(
        self,
        num_source_ids: int,
        backbone: str = "resnet50",
        pretrained: str = "imagenet",
        last_stride: int = 1,
        attention: str = "daam",
        reduction: int = 16,
        head: str = "fc",
        embedding_dim: int = 256,
        dsp: bool = True,
        domain_loss: str = "occ",
        attn3: str = "none",
        init_from: str | Path | None = None,
    ):
        super().__init__()
        if domain_loss not in DOMAIN_LOSSES:
            raise ValueError(f"unknown domain loss {domain_loss!r}; choose one of {', '.join(DOMAIN_LOSSES)}")
        self.trunk, channels = build_trunk(backbone, "none" if init_from else pretrained, last_stride, attn3)
        if init_from:
            load_trunk(self.trunk, init_from)
        self.split = AttentionSplit(attention, channels, reduction)
        self.dim = embedding_dim if head == "fc" else channels
        self.sh_head = embedding_head(head, channels, embedding_dim)
        self.source_classifier = nn.Linear(self.dim, num_source_ids, bias=False)
        self.target_classifier: nn.Linear | None = None
        self.domain_loss = domain_loss
        self.domain_head = nn.Linear(self.dim, 1 if domain_loss == "occ" else 2) if domain_loss != "none" else None
        self.sp_head = embedding_head(head, channels, embedding_dim) if dsp else None
        self.dsp_classifier = nn.Linear(self.dim, 2) if dsp else None
        self.grl_scale = 1.0

    @classmethod
    def from_config(cls, m, num_source_ids: int, pretrained: str | None = None) -> ReidNet:
        """From a `trainer.config.ModelConfig`; `pretrained="none"` when weights come from a checkpoint (the run's
        own: then `init_from` is not read either)."""
        return cls(
            num_source_ids, backbone=m.backbone, pretrained=pretrained or m.pretrained, last_stride=m.last_stride,
            attention=m.attention, reduction=m.reduction, head=m.head, embedding_dim=m.embedding_dim, dsp=m.dsp,
            domain_loss=m.domain_loss, attn3=m.attn3, init_from=m.init_from if pretrained != "none" else None,
        )

    def set_target_classes(self, centers: torch.Tensor) -> None:
        """A fresh K-way target classifier for this iteration's clusters, rows set to the unit centres.

        Cluster ids are new every iteration, so the old classifier means nothing; starting from the
        centres (instead of random rows) makes its first logits already agree with the pseudo labels.
        """
        k, dim = centers.shape
        device = self.source_classifier.weight.device
        self.target_classifier = nn.Linear(dim, k, bias=False).to(device)
        with torch.no_grad():
            self.target_classifier.weight.copy_(F.normalize(centers.float(), dim=1).to(device))

    def embedder(self) -> SharedPath:
        return SharedPath(self.trunk, self.split, self.sh_head)

    def forward(self, images: torch.Tensor) -> Outputs | torch.Tensor:
        fmap = self.trunk(images)
        if not self.training:
            return self.sh_head(self.split.shared_map(fmap))
        f_sh_map, f_sp_map = self.split(fmap)
        f_sh = self.sh_head(f_sh_map)
        f_sp = self.sp_head(f_sp_map) if self.sp_head is not None else None
        domain_in = _GradReverse.apply(f_sh, self.grl_scale) if self.domain_loss == "grl" else f_sh
        domain_out = self.domain_head(domain_in) if self.domain_head is not None else None
        return Outputs(
            f_sh=f_sh,
            source_logits=self.source_classifier(f_sh),
            target_logits=self.target_classifier(f_sh) if self.target_classifier is not None else None,
            domain_logit=domain_out.squeeze(1) if self.domain_loss == "occ" else None,
            grl_logits=domain_out if self.domain_loss == "grl" else None,
            f_sp=f_sp,
            dsp_logits=self.dsp_classifier(f_sp) if f_sp is not None else None,
        )


def load_trunk(trunk: nn.Module, path: str | Path) -> None:
    """The `trunk.*` weights of a training checkpoint (any method's, e.g. ADFL's) into `trunk`; ValueError naming the
    file when its trunk is not this one (another backbone, or `attn3` set differently)."""
    weights = {k[len("trunk."):]: v for k, v in checkpoint.load(path).deployed().items() if k.startswith("trunk.")}
    try:
        trunk.load_state_dict(weights)
    except RuntimeError as e:
        raise ValueError(f"{path}: its trunk does not fit this model (check model.backbone and model.attn3): {e}") from e
