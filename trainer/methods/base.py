"""The interface of an adaptation method, and what the shared training loop offers it.

| member                       | what the method gives the loop                                              |
|------------------------------|-----------------------------------------------------------------------------|
| `defaults`                   | its paper's settings, applied under the train YAML's own keys               |
| `build(num_source_ids)`      | (a) the network: what the method adds to the backbone                        |
| `losses(out, batch)`         | (b) the total loss of one batch and its weighted terms (for metrics.jsonl)   |
| `target_step(run, model)`    | (c) its step on the target before each adaptation iteration: clustering and pseudo labels, or image translation; True stops adapting |
| `adapt_samples(data)`        | what the adaptation epochs draw: the source images and the target images with the class to sample them by |
| `state_dict` / `load_state_dict` | what a checkpoint keeps of the method, for `--resume` and `crossview export` |
| `check(data)`                | refuse settings this run's data cannot satisfy, before any training          |
| `begin_epoch` / `end_epoch`  | optional: before each epoch (a schedule inside the stage: EDAAN's attention cut-off), after its checkpoint (EDAAN's translation sheet) |
| `train_step`                 | optional: the method's own optimisation of one batch, when it is more than one loss's backward (EDAAN: generators, then discriminators); None is the engine's |

The network `build` returns has the backbone as `.trunk` (its lr is scaled by `backbone_lr_mult`; a trunk with
new modules inside, like ADFL's attention, names its pretrained part by `.pretrained_parameters()`), the
embedding width as `.dim` and the deployable part as `.embedder()`; in train mode its forward returns
what `losses` reads, in eval mode the re-ID embedding (N, dim). Every parameter must reach the loss of
every batch (x0 where a term is off): DDP runs without the unused-parameter search.

How the later papers fit: ARN's autoencoder (shared / private encoders, decoder) and ADFL's attention
branches are built in `build` and scored in `losses` (reconstruction, difference, contrastive, triplet);
a method without a target step returns False from `target_step`. EDAAN translates source images into
the target style inside its batches (generators and re-ID trained end to end, one adaptation iteration):
its `train_step` optimises the generators and re-ID network, then the discriminators, with the one optimiser
(Adam skips the parameters a backward left without a gradient), and `begin_epoch` reads `run.state.epoch`.

Everything else is the engine's (`trainer.engine`), shared by every method: epochs and schedules,
checkpoints and `--resume`, DDP, AMP, evaluation, metrics.jsonl and the ONNX export.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, ClassVar, NamedTuple, Protocol, TypeVar

if TYPE_CHECKING:
    from pathlib import Path

    import numpy as np
    import torch
    from torch import nn

    from crossview.trainer.config import TrainConfig
    from crossview.trainer.data.build import TrainData
    from crossview.trainer.data.samples import Sample
    from crossview.trainer.engine import State
    from crossview.trainer.modeling.losses import Batch

T = TypeVar("T")


class Run(Protocol):
    """What the engine offers a method's `target_step`."""

    data: TrainData
    state: State  # stage, iteration, epoch (epochs finished in the stage)
    out: Path  # the run's output folder

    def extract(self, samples: Sequence[Sample]) -> np.ndarray:
        """L2-normalised embeddings of `samples` from the current network, in order."""

    def share(self, compute: Callable[[], T]) -> T:
        """`compute()` on rank 0 only (the expensive part: clustering, translation), its result on every rank."""

    def log(self, event: str, **fields) -> None:
        """One metrics.jsonl record (rank 0 writes it)."""


class AdaptSamples(NamedTuple):
    """What one adaptation iteration's epochs draw from, as PK batches of source + target."""

    source: Sequence[Sample]  # labelled source images
    target: Sequence[Sample]  # pid = the class to sample by (a pseudo label); -1 is never drawn
    target_weights: torch.Tensor  # one row per target sample, handed to the loss as Batch.target_weights
    # False: the target has no classes to sample by (ARN uses no pseudo labels); its batches are then P x K
    # distinct images drawn uniformly, every target image drawable, and their pids mean nothing to the loss.
    target_classes: bool = True


class Method(ABC):
    """One domain-adaptation method behind the shared loop; `name` is its `method:` key in the train YAML."""

    name: ClassVar[str]
    defaults: ClassVar[dict] = {}
    # A method that optimises one batch in several steps sets this to its own
    # `(net, batch, optimizer, scaler, amp, *, where) -> (loss, terms)`; None: the engine's `train_step`.
    train_step: Callable | None = None

    def __init__(self, cfg: TrainConfig):
        self.cfg = cfg

    @abstractmethod
    def build(self, num_source_ids: int, pretrained: str | None = None) -> nn.Module:
        """The network; `pretrained="none"` when its weights come from a checkpoint."""

    @abstractmethod
    def losses(self, out, batch: Batch) -> tuple[torch.Tensor, dict[str, float]]:
        """Total loss and weighted terms of one batch (source only while pre-training)."""

    @abstractmethod
    def target_step(self, run: Run, model: nn.Module) -> bool:
        """Prepare the next adaptation iteration on the target; True when adapting should stop."""

    @abstractmethod
    def adapt_samples(self, data: TrainData) -> AdaptSamples:
        """The images the coming adaptation epochs draw from (after `target_step`)."""

    def state_dict(self) -> dict | None:
        return None

    def load_state_dict(self, state: dict | None, model: nn.Module) -> None:
        """Restore `state_dict()` into this method and the network it built (before the network's weights load)."""

    def check(self, data: TrainData) -> None:
        """Raise ValueError naming the config key when this run's data cannot satisfy the settings."""

    def begin_epoch(self, run: Run) -> None:
        """Before each epoch of either stage; `run.state.epoch` epochs of the stage are done."""

    def end_epoch(self, run: Run, model: nn.Module) -> None:
        """After each epoch's checkpoint (the epoch is counted in `run.state.epoch`)."""
