"""Image-translation modules for pixel-space adaptation (EDAAN): generator, discriminator, attention, LSGAN, pool.

| what                 | how                                                                                    |
|----------------------|----------------------------------------------------------------------------------------|
| pixel spaces         | `to_unit(x)`: the trainer's mean/std-normalised images → [-1, 1], where the GAN works; `from_unit` back |
| generator            | `ResnetGenerator(channels, blocks)`: CycleGAN's c7s1-k, d2k, d4k, blocks x R4k, u2k, uk, c7s1-3, tanh; `.encoder` / `.decoder` are E and G of EDAAN's G(E(x)) |
| discriminator        | `PatchDiscriminator(channels, layers)`: pix2pix / CycleGAN PatchGAN, instance norm; layers 3 is the 70x70 one |
| attention            | `AttentionNet(channels)`: a small conv encoder-decoder, one sigmoid map (N, 1, H, W) in [0, 1] |
| attention blend      | `blend(x, y, a)`: a ⊙ x + (1 - a) ⊙ y: where a is 1 the input is kept exactly          |
| adversarial loss     | `lsgan(pred, real)`: mean squared distance of the patch scores to 1 (real) or 0 (fake)  |
| image pool           | `ImagePool(size)`: CycleGAN's history of generated images the discriminator also sees   |

All sizes are (N, 3, H, W) with H and W multiples of 4 (the generator halves them twice). Instance norm
has no running statistics, so train and eval mode compute the same.

    >>> g = ResnetGenerator(channels=8, blocks=1)
    >>> g(torch.zeros(2, 3, 64, 32)).shape
    torch.Size([2, 3, 64, 32])
"""

from __future__ import annotations

import random

import torch
from torch import nn
from torch.nn import functional as F  # noqa: N812

from crossview.trainer.data.transforms import IMAGENET_MEAN, IMAGENET_STD


def _stats(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    mean = torch.tensor(IMAGENET_MEAN, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    return mean, std


def to_unit(x: torch.Tensor) -> torch.Tensor:
    """Mean/std-normalised RGB (what the loaders give and the re-ID network reads) → [-1, 1] (the generators' tanh)."""
    mean, std = _stats(x)
    return (x * std + mean) * 2 - 1


def from_unit(x: torch.Tensor) -> torch.Tensor:
    """[-1, 1] → mean/std-normalised RGB."""
    mean, std = _stats(x)
    return ((x + 1) / 2 - mean) / std


def blend(x: torch.Tensor, translated: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """EDAAN Eq. 1: keep ⊙ x + (1 - keep) ⊙ translated; `keep` (N, 1, H, W) is the foreground mask A(x)."""
    return keep * x + (1 - keep) * translated


def _norm_act(channels: int) -> list[nn.Module]:
    return [nn.InstanceNorm2d(channels), nn.ReLU(inplace=True)]


class ResidualBlock(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.body = nn.Sequential(nn.ReflectionPad2d(1), nn.Conv2d(channels, channels, 3), *_norm_act(channels),
                                  nn.ReflectionPad2d(1), nn.Conv2d(channels, channels, 3), nn.InstanceNorm2d(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


class ResnetGenerator(nn.Module):
    """CycleGAN's ResNet generator ([-1, 1] in and out); CycleGAN uses 64 channels and 9 blocks at 256x256."""

    def __init__(self, channels: int = 64, blocks: int = 9):
        super().__init__()
        c = channels
        self.encoder = nn.Sequential(
            nn.ReflectionPad2d(3), nn.Conv2d(3, c, 7), *_norm_act(c),
            nn.Conv2d(c, 2 * c, 3, stride=2, padding=1), *_norm_act(2 * c),
            nn.Conv2d(2 * c, 4 * c, 3, stride=2, padding=1), *_norm_act(4 * c),
        )
        self.decoder = nn.Sequential(
            *(ResidualBlock(4 * c) for _ in range(blocks)),
            nn.ConvTranspose2d(4 * c, 2 * c, 3, stride=2, padding=1, output_padding=1), *_norm_act(2 * c),
            nn.ConvTranspose2d(2 * c, c, 3, stride=2, padding=1, output_padding=1), *_norm_act(c),
            nn.ReflectionPad2d(3), nn.Conv2d(c, 3, 7), nn.Tanh(),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.encoder(x))


class PatchDiscriminator(nn.Module):
    """PatchGAN: one real/fake score per overlapping patch (70x70 with 3 layers), instance norm, no sigmoid (LSGAN)."""

    def __init__(self, channels: int = 64, layers: int = 3):
        super().__init__()
        mods: list[nn.Module] = [nn.Conv2d(3, channels, 4, stride=2, padding=1), nn.LeakyReLU(0.2, inplace=True)]
        width = channels
        for i in range(1, layers + 1):
            out = channels * min(2 ** i, 8)
            mods += [nn.Conv2d(width, out, 4, stride=2 if i < layers else 1, padding=1), nn.InstanceNorm2d(out),
                     nn.LeakyReLU(0.2, inplace=True)]
            width = out
        mods.append(nn.Conv2d(width, 1, 4, stride=1, padding=1))
        self.net = nn.Sequential(*mods)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class AttentionNet(nn.Module):
    """Foreground mask A(x) in [0, 1]: conv, one stride-2 conv, a residual block, upsample, conv, sigmoid."""

    def __init__(self, channels: int = 32):
        super().__init__()
        c = channels
        self.net = nn.Sequential(
            nn.ReflectionPad2d(3), nn.Conv2d(3, c, 7), *_norm_act(c),
            nn.Conv2d(c, 2 * c, 3, stride=2, padding=1), *_norm_act(2 * c),
            ResidualBlock(2 * c),
            nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(2 * c, c, 3, padding=1), *_norm_act(c),
            nn.ReflectionPad2d(3), nn.Conv2d(c, 1, 7), nn.Sigmoid(),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def lsgan(pred: torch.Tensor, real: bool) -> torch.Tensor:
    """Least-squares GAN loss (Mao et al.), as CycleGAN uses it: mean (D(x) - 1)² for real, D(x)² for fake."""
    return F.mse_loss(pred.float(), torch.full_like(pred.float(), 1.0 if real else 0.0))


class ImagePool:
    """CycleGAN's image buffer: the discriminator is shown a history of generated images, not only the latest.

    Until `size` images are held every new image is stored and shown; after, each new image is shown as it
    is or (with probability 1/2) swapped for a stored one, which it replaces. `size` 0 shows the batch as it is.
    """

    def __init__(self, size: int):
        self.size = size
        self.images: list[torch.Tensor] = []

    def query(self, images: torch.Tensor) -> torch.Tensor:
        if self.size == 0:
            return images
        shown = []
        for image in images.detach():
            if len(self.images) < self.size:
                self.images.append(image.clone())
                shown.append(image)
            elif random.random() < 0.5:
                i = random.randrange(self.size)
                shown.append(self.images[i].clone())
                self.images[i] = image.clone()
            else:
                shown.append(image)
        return torch.stack(shown).to(images.device, images.dtype)

    def clear(self) -> None:
        self.images = []

    def state_dict(self) -> dict:
        return {"images": torch.stack(self.images).cpu() if self.images else None}

    def load_state_dict(self, state: dict, device: torch.device) -> None:
        stored = state["images"]
        self.images = [] if stored is None else list(stored.to(device).unbind(0))
