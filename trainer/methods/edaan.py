"""EDAAN (Khatun et al.): source images translated into the target's style under a foreground mask, re-ID end to end.

| interface        | EDAAN                                                                                 |
|------------------|---------------------------------------------------------------------------------------|
| network          | `EdaanNet`: the re-ID net (the trainer's backbone, GAP, 128-d embedding, the paper's FC-BN-dropout-ReLU-FC classifier) + G_S(E_S), G_T(E_T) (CycleGAN ResNet generators), A_S, A_T (attention), D_S, D_T (PatchGAN), `trainer.modeling.gan` |
| translation      | G(x) = (1 − A_S(x)) ⊙ G_S(E_S(x)) + A_S(x) ⊙ x (Eq. 1), F(x) the mirror with A_T, G_T (Eq. 2); `edaan.attention: false` is plain CycleGAN, G(x) = G_S(E_S(x)) |
| losses           | generators: LSGAN on D_T(G(x_s)) and D_S(F(x_t)) + `cycle` ‖G_T(E_T(G_S(E_S(x_s)))) − x_s‖₁ + mirror (Eq. 4) + `attn` Eq. 5 + re-ID on x_s and G(x_s): `id` CE + `metric` quartet (Eq. 7, `quartet`) or batch-hard triplet (Eq. 6); discriminators: LSGAN on real vs pooled fakes (`edaan.pool`) |
| one batch        | `train_step`: the generators', attention and re-ID step, then the discriminators' step, with the one Adam (each step leaves the other's parameters without gradients, which Adam skips) |
| schedule         | `begin_epoch`: A_S, A_T train for `attention_epochs` (then frozen: the masks drift to all-ones otherwise, as the paper reports), D_S, D_T see whole images for `whole_image_epochs`, then (1 − A) ⊙ image; both cut-offs are logged |
| target step      | none (always False): one adaptation iteration of `adapt.epochs` on source + raw target batches, like ARN |
| checkpoint state | the image pools (the networks, Adam's moments and the epoch are the engine's), so `--resume` goes on in either stage and across the cut-offs |
| export           | the re-ID path only: trunk → GAP → embedding (`EdaanEmbedder`); no generator, mask or discriminator |
| per epoch        | `mask_s` / `mask_t` (mean foreground mask of the batches' source / target images) in the epoch record; `end_epoch` writes `<output_dir>/translation.png`: source crops, their masks (white = kept), their translations |

Where the paper is incomplete or inconsistent, and what is done here:
- The re-ID network. Sec. III-B "shares the encoder as the backbone for re-ID", but Sec. IV reports a
  ResNet-50 re-ID model and a 128-d embedding head, and Fig. 3 (the architectures) is missing. The re-ID
  network here is the trainer's backbone (`model.backbone`), apart from the GAN encoder E_S; "end to end"
  is kept as the paper's Table V defines it: the re-ID losses on G(x_s) reach G_S, E_S and A_S
  (`edaan.end_to_end: false` detaches them: Table V's two-stage "DAAN").
- Eq. 3 pairs D_T with D_S and the raw generator; here one LSGAN discriminator per domain scores the
  attention-blended output (what Fig. 2 feeds D): on the raw G_S(E_S(x)) the masks would get no adversarial
  gradient. The cycle is Eq. 4 as written, through the raw generators (weight `edaan.cycle`, which Eq. 9
  leaves out): through the blended mappings, as AGGAN does, a mask of ones satisfies it exactly
  (F(G(x)) = x), and on TUD the masks' mean went from 0.5 to 0.71 in the first epoch that way.
- After the attention cut-off the masks are computed without gradients and Eq. 5 is no longer added (it
  trains only A_S, A_T); the discriminator's masked inputs use the masks detached.
- The quartet loss, Eq. 7, written as max{d(a,p) − d(a,n1) + d(a,p) − d(n2,n1), τ1}, is read as two hinges
  (Chen et al.'s quadruplet loss, from which the quartet loss comes), see `quartet`.
- The paper's classifier hidden layer and embedding are both 128-d: here both are `model.embedding_dim` (128).

The schedule (configs/train/edaan.yaml): Adam 2e-4, β1 0.5 (`optim.momentum`), 200 epochs, constant for 100,
then linearly towards 0 (`adapt.decay_epochs: 100`), batch 16 (P 4 x K 4 of source, as many target images).
One process only: DDP would need every parameter in every backward, and each of EDAAN's two steps leaves
half of them out (`check` refuses WORLD_SIZE > 1).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from PIL import Image
from torch import nn
from torch.nn import functional as F  # noqa: N812

from crossview.trainer.data.loader import read_image
from crossview.trainer.data.transforms import build_transforms
from crossview.trainer.methods.base import AdaptSamples, Method
from crossview.trainer.modeling.adfl import build_trunk
from crossview.trainer.modeling.embedding_losses import batch_hard_triplet, pairwise_distance
from crossview.trainer.modeling.gan import (
    AttentionNet,
    ImagePool,
    PatchDiscriminator,
    ResnetGenerator,
    blend,
    from_unit,
    lsgan,
    to_unit,
)
from crossview.trainer.modeling.losses import Batch, optimise
from crossview.trainer.modeling.network import load_trunk

log = logging.getLogger("crossview.trainer")
SHEET = "translation.png"


# ------------------------------------------------------------------------------------------------ network
class Translation(NamedTuple):
    image: torch.Tensor  # the blended translation G(x) (Eq. 1), [-1, 1]
    keep: torch.Tensor | None  # the foreground mask A(x) (N, 1, H, W); None without attention
    raw: torch.Tensor  # the generator's own output G_S(E_S(x)), what the cycle (Eq. 4) goes through


class ReidOutputs(NamedTuple):
    embedding: torch.Tensor  # (N, dim): the metric loss, the export
    logits: torch.Tensor  # (N, source ids), from the pooled feature


class EdaanEmbedder(nn.Module):
    """The deployable re-ID path: trunk → GAP → embedding. Shares parameters with the network."""

    def __init__(self, trunk: nn.Module, embedding: nn.Module):
        super().__init__()
        self.trunk, self.embedding = trunk, embedding

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.embedding(F.adaptive_avg_pool2d(self.trunk(images), 1).flatten(1))


class EdaanNet(nn.Module):
    """Re-ID network plus the translation networks; `forward` is the re-ID network's (train: `ReidOutputs`, eval: the
    embedding); the translation is `translate`, on images in [-1, 1]."""

    def __init__(self, cfg, num_source_ids: int, pretrained: str | None = None):
        super().__init__()
        m, e = cfg.model, cfg.edaan
        init_from = m.init_from if pretrained != "none" else None
        self.trunk, channels = build_trunk(m.backbone, "none" if init_from else pretrained or m.pretrained,
                                           m.last_stride, m.attn3)
        if init_from:
            load_trunk(self.trunk, init_from)
        self.dim = m.embedding_dim
        self.embedding = nn.Linear(channels, self.dim)
        self.classifier = nn.Sequential(nn.Linear(channels, self.dim), nn.BatchNorm1d(self.dim), nn.Dropout(0.5),
                                        nn.ReLU(inplace=True), nn.Linear(self.dim, num_source_ids))
        self.gen_s, self.gen_t = (ResnetGenerator(e.gen_channels, e.gen_blocks) for _ in range(2))  # S → T, T → S
        self.attn_s, self.attn_t = (AttentionNet(e.attn_channels) if e.attention else None for _ in range(2))
        self.disc_s, self.disc_t = (PatchDiscriminator(e.disc_channels, e.disc_layers) for _ in range(2))

    def embedder(self) -> EdaanEmbedder:
        return EdaanEmbedder(self.trunk, self.embedding)

    def discriminators(self) -> list[nn.Module]:
        return [self.disc_s, self.disc_t]

    def forward(self, images: torch.Tensor) -> ReidOutputs | torch.Tensor:
        pooled = F.adaptive_avg_pool2d(self.trunk(images), 1).flatten(1)
        if not self.training:
            return self.embedding(pooled)
        return ReidOutputs(self.embedding(pooled), self.classifier(pooled))

    def translate(self, x: torch.Tensor, to_target: bool, learn_attention: bool = True) -> Translation:
        """G(x) of source images (A_S, G_S), F(x) of target ones (`to_target=False`: A_T, G_T); [-1, 1] in and out."""
        raw = (self.gen_s if to_target else self.gen_t)(x)
        keep = self.mask(x, to_target, learn_attention)
        return Translation(raw if keep is None else blend(x, raw, keep), keep, raw)

    def mask(self, x: torch.Tensor, source: bool, learn_attention: bool = True) -> torch.Tensor | None:
        """A_S(x) (`source`) or A_T(x); None without attention; without gradients when `learn_attention` is False."""
        attn = self.attn_s if source else self.attn_t
        if attn is None:
            return None
        with torch.set_grad_enabled(learn_attention and torch.is_grad_enabled()):
            return attn(x)


# ------------------------------------------------------------------------------------------------- losses
def quartet(f: torch.Tensor, labels: torch.Tensor, margin1: float, margin2: float) -> torch.Tensor:
    """The quartet loss (Eq. 7) on a batch, mined batch-hard: the mean over anchors a of two hinges,

        max(0, d(a, p) − d(a, n1) + τ1)  +  max(0, d(a, p) − d(n1, n2) + τ2),

    p the farthest positive of a, n1 the nearest negative of a, n2 the nearest image to n1 of a third identity
    (neither a's nor n1's). The first hinge is the triplet loss; the second asks a's intra-class distance to be
    below the distance between two other identities, so it pulls identities together whatever the probe (the
    paper's argument). Eq. 7 writes both inside one max{·, τ1}, whose τ1 would then be a floor and not a margin;
    two hinges with their own margins (τ2 < τ1) is the quadruplet loss the quartet loss derives from. Anchors
    with no negative (or no third identity) in the batch add nothing to that hinge. Euclidean distances, in float32.
    """
    with torch.autocast(f.device.type, enabled=False):
        d = pairwise_distance(f.float())
        same = labels[:, None] == labels[None, :]
        d_ap = d.masked_fill(~same, 0).amax(1)
        d_an1, n1 = d.masked_fill(same, float("inf")).min(1)
        third = ~same & (labels[None, :] != labels[n1][:, None])  # [a, j]: j is neither a's identity nor n1's
        d_n1n2 = d[n1].masked_fill(~third, float("inf")).amin(1)
        has_n1 = torch.isfinite(d_an1)
        has_n2 = has_n1 & torch.isfinite(d_n1n2)
        zero = f.sum() * 0
        first = F.relu(d_ap - d_an1 + margin1)[has_n1].mean() if has_n1.any() else zero
        second = F.relu(d_ap - d_n1n2 + margin2)[has_n2].mean() if has_n2.any() else zero
        return first + second


def _requires_grad(modules: list[nn.Module], flag: bool) -> None:
    for module in modules:
        for p in module.parameters():
            p.requires_grad_(flag)


# ------------------------------------------------------------------------------------------------- method
class Edaan(Method):
    name = "edaan"
    defaults = {
        "model": {"attention": "none", "embedding_dim": 128},  # no DAAM split; the paper's 128-d embedding
        "optim": {"kind": "adam", "momentum": 0.5, "weight_decay": 0.0},  # Adam 2e-4, β1 0.5 (CycleGAN's)
        "pretrain": {"epochs": 0, "lr": 2e-4, "milestones": []},
        "adapt": {"iterations": 1, "epochs": 200, "lr": 2e-4, "milestones": [], "decay_epochs": 100},
    }

    def __init__(self, cfg):
        super().__init__(cfg)
        self.pools = [ImagePool(cfg.edaan.pool), ImagePool(cfg.edaan.pool)]  # for D_T, D_S
        self.learn_attention, self.masked = True, False  # set per epoch by `begin_epoch`

    def build(self, num_source_ids, pretrained=None) -> EdaanNet:
        return EdaanNet(self.cfg, num_source_ids, pretrained)

    def check(self, data) -> None:
        c, e = self.cfg, self.cfg.edaan
        if int(os.environ.get("WORLD_SIZE", 1)) > 1:
            raise ValueError("method edaan runs in one process (its generator and discriminator steps each leave half "
                             "the parameters without gradients, which DDP does not allow); start it without torchrun")
        if c.input.height % 4 or c.input.width % 4:
            raise ValueError(f"input.height and input.width must be multiples of 4 for edaan's generators, not "
                             f"{c.input.height}x{c.input.width}")
        if min(c.input.height, c.input.width) >> e.disc_layers < 2:
            raise ValueError(f"edaan.disc_layers {e.disc_layers} halves {c.input.height}x{c.input.width} below 2 "
                             "pixels; lower it or raise the input size")
        if c.adapt.iterations != 1:
            raise ValueError(f"adapt.iterations is {c.adapt.iterations}; edaan translates and trains re-ID in one "
                             "adaptation iteration of adapt.epochs (set it to 1)")
        if not data.target:
            raise ValueError("edaan translates the source into the target's style but the target has no images")

    # ------------------------------------------------------------ schedule
    def begin_epoch(self, run) -> None:
        e, st = self.cfg.edaan, run.state
        self.learn_attention = st.epoch < e.attention_epochs
        self.masked = e.attention and st.epoch >= e.whole_image_epochs
        if st.stage != "adapt" or not e.attention:
            return
        if st.epoch == e.attention_epochs:
            run.log("attention_stopped", after_epochs=e.attention_epochs)
        if st.epoch == e.whole_image_epochs:
            for pool in self.pools:  # whole fakes would teach D_T / D_S nothing about masked real images
                pool.clear()
            run.log("discriminator_masked", after_epochs=e.whole_image_epochs)

    def end_epoch(self, run, model) -> None:
        if run.state.stage == "adapt":
            write_sheet(model, sheet_samples(run.data.source, self.cfg.edaan.sheet),
                        (self.cfg.input.height, self.cfg.input.width), Path(run.out) / SHEET)

    # -------------------------------------------------------------- losses
    def losses(self, out: ReidOutputs, batch):
        """The re-ID terms on the batch's source rows: identity CE (Eq. 8) and the quartet / triplet loss."""
        e, s = self.cfg.edaan, batch.n_source
        metric = (quartet(out.embedding[:s], batch.source_ids, e.margin1, e.margin2) if e.loss == "quartet"
                  else batch_hard_triplet(out.embedding[:s], batch.source_ids, e.margin1))
        terms = {"id": e.id * F.cross_entropy(out.logits[:s].float(), batch.source_ids), e.loss: e.metric * metric}
        return sum(terms.values()), {k: float(v.detach()) for k, v in terms.items()}

    def train_step(self, net: EdaanNet, batch: Batch, optimizer, scaler, amp: bool, *, where: str):
        s, device = batch.n_source, batch.images.device.type
        if s == batch.images.shape[0]:  # a source-only (pre-training) batch: re-ID alone
            with torch.autocast(device, dtype=torch.float16, enabled=amp):
                loss, terms = self.losses(net(batch.images), batch)
            optimise(loss, optimizer, scaler, where)
            return float(loss.detach()), terms
        _requires_grad(net.discriminators(), False)
        try:
            with torch.autocast(device, dtype=torch.float16, enabled=amp):
                loss_g, terms, seen = self._generator_loss(net, batch)
            optimise(loss_g, optimizer, scaler, where)
        finally:
            _requires_grad(net.discriminators(), True)
        with torch.autocast(device, dtype=torch.float16, enabled=amp):
            loss_d = self._discriminator_loss(net, *seen)
        optimise(loss_d, optimizer, scaler, where)
        return float(loss_g.detach() + loss_d.detach()), {**terms, "disc": float(loss_d.detach())}

    def _seen(self, images: torch.Tensor, keep: torch.Tensor | None) -> torch.Tensor:
        """What a discriminator is shown: the whole image, or after the cut-off only what the mask translates."""
        return images if keep is None or not self.masked else (1 - keep.detach()) * images

    def _generator_loss(self, net: EdaanNet, batch: Batch):
        """(loss, weighted terms and mask means, what the discriminators then see: real / fake of each domain)."""
        e, s, learn = self.cfg.edaan, batch.n_source, self.learn_attention
        x_s, x_t = to_unit(batch.images[:s]), to_unit(batch.images[s:])
        g, f = net.translate(x_s, True, learn), net.translate(x_t, False, learn)  # G(x_s), F(x_t) and their masks
        fake_t, keep_s, fake_s, keep_t = g.image, g.keep, f.image, f.keep
        seen_fake_t, seen_fake_s = self._seen(fake_t, keep_s), self._seen(fake_s, keep_t)
        terms = {
            "gan": e.gan * (lsgan(net.disc_t(seen_fake_t), True) + lsgan(net.disc_s(seen_fake_s), True)),
            "cycle": e.cycle * ((net.gen_t(g.raw) - x_s).abs().mean() + (net.gen_s(f.raw) - x_t).abs().mean()),
        }
        if keep_s is not None and learn:  # Eq. 5: A_S(x_s) vs A_T(G(x_s)), A_T(x_t) vs A_S(F(x_t))
            terms["attn"] = e.attn * ((keep_s - net.mask(fake_t, source=False)).abs().mean()
                                      + (keep_t - net.mask(fake_s, source=True)).abs().mean())
        translated = from_unit(fake_t if e.end_to_end else fake_t.detach()).to(batch.images.dtype)  # AMP: G is fp16
        reid = Batch(torch.cat([batch.images[:s], translated]), 2 * s, batch.source_ids.repeat(2))
        reid_loss, reid_terms = self.losses(net(reid.images), reid)
        loss = sum(v.float() for v in terms.values()) + reid_loss
        logged = {k: float(v.detach()) for k, v in terms.items()} | reid_terms
        if keep_s is not None:
            logged |= {"mask_s": float(keep_s.detach().mean()), "mask_t": float(keep_t.detach().mean())}
        seen = (self._seen(x_t, keep_t), seen_fake_t.detach(), self._seen(x_s, keep_s), seen_fake_s.detach())
        return loss, logged, seen

    def _discriminator_loss(self, net: EdaanNet, real_t, fake_t, real_s, fake_s) -> torch.Tensor:
        """LSGAN for D_T and D_S, each (real + pooled fake) / 2 as CycleGAN."""
        pool_t, pool_s = self.pools
        d_t = lsgan(net.disc_t(real_t), True) + lsgan(net.disc_t(pool_t.query(fake_t)), False)
        d_s = lsgan(net.disc_s(real_s), True) + lsgan(net.disc_s(pool_s.query(fake_s)), False)
        return self.cfg.edaan.gan * (d_t + d_s) / 2

    # ------------------------------------------------------- the engine's rest
    def target_step(self, run, model) -> bool:
        return False

    def adapt_samples(self, data) -> AdaptSamples:
        return AdaptSamples(data.source, data.target, torch.ones(len(data.target)), target_classes=False)

    def state_dict(self) -> dict | None:
        return {"pools": [pool.state_dict() for pool in self.pools]}

    def load_state_dict(self, state, model) -> None:
        if state is not None:
            device = next(model.parameters()).device
            for pool, saved in zip(self.pools, state["pools"]):
                pool.load_state_dict(saved, device)


# -------------------------------------------------------------------------------------------------- sheet
def sheet_samples(source, n: int) -> list:
    """`n` source samples spread evenly over the source list (which runs identity by identity)."""
    index = np.linspace(0, len(source) - 1, min(n, len(source))).round().astype(int)
    return [source[i] for i in index]


@torch.no_grad()
def write_sheet(model: EdaanNet, samples, size: tuple[int, int], path: Path) -> Path:
    """A PNG of three rows: the source crops, their masks A_S(x) (white: kept as it is; grey without attention) and
    their translations G(x), crops side by side; small crops are enlarged (nearest) to be seen. Written atomically."""
    transform = build_transforms(size)
    device = next(model.parameters()).device
    x = to_unit(torch.stack([transform(read_image(s.path)) for s in samples]).to(device))
    translated, keep, _ = model.translate(x, to_target=True)
    mask = (keep * 2 - 1).expand_as(x) if keep is not None else torch.zeros_like(x)
    rows = [torch.cat(list(F.pad(r, (1, 1, 1, 1), value=1.0)), dim=2) for r in (x, mask, translated)]
    grid = ((torch.cat(rows, dim=1).clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).cpu().numpy()
    scale = max(1, 128 // size[0])
    image = Image.fromarray(grid).resize((grid.shape[1] * scale, grid.shape[0] * scale), Image.NEAREST)
    tmp = path.with_name(f".{path.name}.tmp")
    image.save(tmp, format="PNG")
    os.replace(tmp, path)
    return path
