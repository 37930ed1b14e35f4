"""Batch statistics per domain (`adapt.domain_bn`): DSBN's idea (Chang et al., CVPR 2019) with shared affine weights.

An adaptation batch is source rows then target rows. With one BatchNorm over both, every layer normalises the site's
crops by a mixture of the source's statistics and the site's, and the running statistics the export keeps are that
mixture, which no camera at the site produces. A second labelled source that looks unlike the site (PKU-Reid's small
outdoor crops beside a street camera) makes the mixture worse. Here each BatchNorm normalises the source rows by their
own batch statistics and the target rows by theirs; only the target rows move the running statistics, so evaluation,
the target step's features and the export all normalise by the site's statistics. Before each target step the
running statistics are re-estimated on the target crops (AdaBN, Li et al. 2016): until then they are the source's,
from pre-training.

The modules stay `nn.BatchNorm*d` (their class is switched to a subclass in place): the state dict is unchanged, so
checkpoints load either way, and in eval mode the forward is BatchNorm's own, which the ONNX export traces as ever.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager

import torch
from torch import nn
from torch.nn import functional as F  # noqa: N812
from torch.nn.modules.batchnorm import _BatchNorm


class _DomainBatchNorm:
    """Mixed into a BatchNorm class: `split` source rows first, normalised apart from the target rows after them."""

    split: int | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = self.split
        if not self.training or n is None or not 0 < n < x.shape[0]:
            return super().forward(x)
        self._check_input_dim(x)
        source = F.batch_norm(x[:n], None, None, self.weight, self.bias, True, 0.0, self.eps)  # batch statistics only
        return torch.cat([source, super().forward(x[n:])])


_SPLIT_CLASSES: dict[type, type] = {}


def _split_class(cls: type) -> type:
    if cls not in _SPLIT_CLASSES:
        _SPLIT_CLASSES[cls] = type(f"Domain{cls.__name__}", (_DomainBatchNorm, cls), {})
    return _SPLIT_CLASSES[cls]


def use_domain_bn(model: nn.Module) -> int:
    """Make every BatchNorm of `model` normalise the domains apart when a batch is split; returns how many."""
    norms = [m for m in model.modules() if isinstance(m, _BatchNorm) and not isinstance(m, _DomainBatchNorm)]
    for m in norms:
        m.__class__ = _split_class(type(m))
    return len(norms)


@contextmanager
def domains_split(model: nn.Module, n_source: int) -> Iterator[None]:
    """Within: a batch's first `n_source` rows are the source's (no-op for a model without `use_domain_bn`)."""
    norms = [m for m in model.modules() if isinstance(m, _DomainBatchNorm)]
    for m in norms:
        m.split = n_source
    try:
        yield
    finally:
        for m in norms:
            m.split = None


@torch.no_grad()
def reestimate(model: nn.Module, batches: Iterable[torch.Tensor]) -> int:
    """AdaBN: the running statistics of every BatchNorm that the eval-mode forward passes through become the exact mean
    and variance over `batches` (the target's images, on the model's device); weights and the other BatchNorms' stay
    as they were. Returns the number of images seen."""
    modes = {m: m.training for m in model.modules()}
    model.eval()
    hooks, seen = [], 0
    for m in model.modules():
        if isinstance(m, _BatchNorm) and m.track_running_stats:
            hooks.append(m.register_forward_pre_hook(_restart_statistics))
    try:
        for images in batches:
            model(images)
            seen += images.shape[0]
    finally:
        for h in hooks:
            h.remove()
        for m, training in modes.items():
            m.train(training)
            if isinstance(m, _BatchNorm) and hasattr(m, "_saved_momentum"):
                m.momentum = m.__dict__.pop("_saved_momentum")
    return seen


def _restart_statistics(m: _BatchNorm, _inputs) -> None:
    """At a BatchNorm's first call in `reestimate`: forget its statistics, and average over every batch from here on."""
    if not hasattr(m, "_saved_momentum"):
        m._saved_momentum = m.momentum
        m.reset_running_stats()
        m.momentum = None  # a cumulative average over the batches, not a decaying one
    m.train()
