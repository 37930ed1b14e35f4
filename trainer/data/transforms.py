"""Image transforms: re-ID training augmentation and the deterministic test transform.

| what   | how (torchvision.transforms.v2, PIL image in, float tensor (3, H, W) out)                    |
|--------|-----------------------------------------------------------------------------------------------|
| train  | resize (H, W) → flip p=0.5 → pad 10 px + random crop (H, W) → normalise → random erasing p=0.5 |
| test   | resize (H, W) → normalise                                                                     |

Normalisation uses ImageNet mean/std, as the pretrained backbones and the exported model metadata do.
Random erasing (Zhong et al. 2017: area 2-40 %, aspect 0.3-3.3) runs after normalisation with value 0,
i.e. the ImageNet mean colour ("RE-M" in the paper). Randomness comes from torch's RNG, so
`torch.manual_seed` (or a DataLoader generator) makes it reproducible.

    >>> from PIL import Image
    >>> build_transforms((256, 128), train=True)(Image.new("RGB", (50, 120))).shape
    torch.Size([3, 256, 128])
"""

from __future__ import annotations

import torch
from torchvision.transforms import v2

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def build_transforms(size: tuple[int, int] = (256, 128), train: bool = False, *, flip_p: float = 0.5, pad: int = 10,
                     erase_p: float = 0.5, mean: tuple[float, ...] = IMAGENET_MEAN,
                     std: tuple[float, ...] = IMAGENET_STD) -> v2.Compose:
    """`size` is (height, width). For training, `flip_p`, `pad` and `erase_p` of 0 switch each step off."""
    size = (int(size[0]), int(size[1]))
    steps: list = [v2.Resize(size, antialias=True)]
    if train:
        if flip_p > 0:
            steps.append(v2.RandomHorizontalFlip(flip_p))
        if pad > 0:
            steps += [v2.Pad(pad), v2.RandomCrop(size)]
    steps += [v2.ToImage(), v2.ToDtype(torch.float32, scale=True), v2.Normalize(list(mean), list(std))]
    if train and erase_p > 0:
        steps.append(v2.RandomErasing(p=erase_p, scale=(0.02, 0.4), ratio=(0.3, 3.33), value=0))
    steps.append(v2.ToPureTensor())  # plain tensors collate and print like any other
    return v2.Compose(steps)
