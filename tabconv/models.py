"""Model registry: the architectures the paper evaluated, plus a tiny CNN for fast tests.

Layer names are stable qualified module names (``layer3.5.conv2``, ``block1.0``) because every
per-layer setting is keyed by them.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable

from torch import nn
from torchvision import models as tv_models

MODEL_DESCRIPTIONS: dict[str, str] = {
    "resnet18": "torchvision ResNet-18 (ImageNet stem: 7x7 stride-2 conv + max-pool), untrained",
    "resnet34": "torchvision ResNet-34 (ImageNet stem: 7x7 stride-2 conv + max-pool), untrained",
    "nin": "Network-in-Network: three mlpconv blocks (5x5/5x5/3x3 conv + two 1x1 convs), "
    "global average pool, no fully connected layer",
    "tiny": "Two-conv CNN with batch norm and a linear head, for fast tests",
}


def _resnet(factory: Callable[..., nn.Module], num_classes: int, in_channels: int) -> nn.Module:
    """torchvision's ResNet; a non-RGB input gets a stem conv of the same geometry."""
    model = factory(weights=None, num_classes=num_classes)
    if in_channels != 3:
        model.conv1 = nn.Conv2d(in_channels, 64, kernel_size=7, stride=2, padding=3, bias=False)
    return model


def _mlpconv(in_channels: int, kernel: int, widths: tuple[int, int, int]) -> list[nn.Module]:
    """One NIN block: a same-padded k x k conv then two 1x1 convs, each followed by its own ReLU."""
    layers: list[nn.Module] = []
    for i, width in enumerate(widths):
        size = kernel if i == 0 else 1
        layers += [nn.Conv2d(in_channels, width, size, padding=size // 2), nn.ReLU(inplace=True)]
        in_channels = width
    return layers


def _downsample() -> list[nn.Module]:
    """3x3 stride-2 max-pool (padding 1: 32 -> 16 -> 8, 28 -> 14 -> 7) and dropout."""
    return [nn.MaxPool2d(kernel_size=3, stride=2, padding=1), nn.Dropout(0.5)]


def _nin(num_classes: int, in_channels: int) -> nn.Module:
    """NIN as in the TabConv reference; this variant reproduces the paper's 223,897,472 count."""
    return nn.Sequential(
        OrderedDict(
            [
                ("block1", nn.Sequential(*_mlpconv(in_channels, 5, (192, 160, 96)), *_downsample())),
                ("block2", nn.Sequential(*_mlpconv(96, 5, (192, 192, 192)), *_downsample())),
                ("block3", nn.Sequential(*_mlpconv(192, 3, (192, 192, num_classes)))),
                ("pool", nn.AdaptiveAvgPool2d(1)),
                ("flatten", nn.Flatten()),
            ]
        )
    )


def _tiny(num_classes: int, in_channels: int) -> nn.Module:
    """A small CNN with a foldable conv+BN pair, a strided conv and a linear head."""
    return nn.Sequential(
        OrderedDict(
            [
                ("conv1", nn.Conv2d(in_channels, 8, 3, padding=1)),
                ("bn1", nn.BatchNorm2d(8)),
                ("relu1", nn.ReLU(inplace=True)),
                ("conv2", nn.Conv2d(8, 16, 3, stride=2, padding=1)),
                ("bn2", nn.BatchNorm2d(16)),
                ("relu2", nn.ReLU(inplace=True)),
                ("pool", nn.AdaptiveAvgPool2d(1)),
                ("flatten", nn.Flatten()),
                ("fc", nn.Linear(16, num_classes)),
            ]
        )
    )


_BUILDERS: dict[str, Callable[[int, int], nn.Module]] = {
    "resnet18": lambda n, c: _resnet(tv_models.resnet18, n, c),
    "resnet34": lambda n, c: _resnet(tv_models.resnet34, n, c),
    "nin": _nin,
    "tiny": _tiny,
}


def model_names() -> list[str]:
    """Registered model names, in display order."""
    return list(_BUILDERS)


def build_model(name: str, num_classes: int, in_channels: int) -> nn.Module:
    """A freshly initialised model (never downloads weights)."""
    if name not in _BUILDERS:
        raise ValueError(f"unknown model {name!r}; known models: {', '.join(model_names())}")
    return _BUILDERS[name](num_classes, in_channels)
