"""Model registry: the architectures the paper evaluated, plus a tiny CNN for fast tests.

Layer names are stable qualified module names (``layer3.5.conv2``, ``block1.0``) because every
per-layer setting is keyed by them.

The ResNets are torchvision's BasicBlock ResNets module for module (same names, types, order,
initialisation and forward; tests/test_models.py proves identical state-dict keys and outputs
against torchvision itself). They are defined here because ``import torchvision`` costs ~2.7 s on
the project's 2-core machine (torchvision.ops imports torch._dynamo), more than half of the
explorer's 5 s warm-start budget; torchvision is still used to download datasets.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable

import torch
from torch import nn

MODEL_NAMES: dict[str, str] = {  # how people name each model (the CLI takes the keys)
    "resnet18": "ResNet-18", "resnet34": "ResNet-34", "nin": "NIN", "tiny": "tiny CNN (for tests)"}

MODEL_DESCRIPTIONS: dict[str, str] = {
    "resnet18": "ResNet-18 as torchvision defines it (ImageNet stem: 7x7 stride-2 conv + max-pool), untrained",
    "resnet34": "ResNet-34 as torchvision defines it (ImageNet stem: 7x7 stride-2 conv + max-pool), untrained",
    "nin": "Network-in-Network: three mlpconv blocks (5x5/5x5/3x3 conv + two 1x1 convs), "
    "global average pool, no fully connected layer",
    "tiny": "Two-conv CNN with batch norm and a linear head, for fast tests",
}


class BasicBlock(nn.Module):
    """torchvision's BasicBlock: two 3x3 convs with batch norm, one ReLU module called twice."""

    def __init__(self, in_planes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += x if self.downsample is None else self.downsample(x)  # after conv2, as torchvision: forward order
        return self.relu(out)


class ResNet(nn.Module):
    """torchvision's ResNet for BasicBlock depths; the stem takes any number of input channels."""

    def __init__(self, blocks: tuple[int, int, int, int], num_classes: int, in_channels: int = 3) -> None:
        super().__init__()
        self.in_planes = 64
        self.conv1 = nn.Conv2d(in_channels, 64, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.layer1 = self._make_layer(64, blocks[0], 1)
        self.layer2 = self._make_layer(128, blocks[1], 2)
        self.layer3 = self._make_layer(256, blocks[2], 2)
        self.layer4 = self._make_layer(512, blocks[3], 2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(512, num_classes)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.constant_(module.weight, 1)
                nn.init.constant_(module.bias, 0)

    def _make_layer(self, planes: int, blocks: int, stride: int) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.in_planes != planes:
            downsample = nn.Sequential(nn.Conv2d(self.in_planes, planes, 1, stride=stride, bias=False),
                                       nn.BatchNorm2d(planes))
        layers = [BasicBlock(self.in_planes, planes, stride, downsample)]
        self.in_planes = planes
        layers += [BasicBlock(planes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def _mlpconv(in_channels: int, kernel: int, widths: tuple[int, int, int], batch_norm: bool) -> list[nn.Module]:
    """One NIN block: a same-padded k x k conv then two 1x1 convs, each followed by its own ReLU."""
    layers: list[nn.Module] = []
    for i, width in enumerate(widths):
        size = kernel if i == 0 else 1
        layers += [nn.Conv2d(in_channels, width, size, padding=size // 2),
                   *([nn.BatchNorm2d(width)] if batch_norm else []), nn.ReLU(inplace=True)]
        in_channels = width
    return layers


def _downsample() -> list[nn.Module]:
    """3x3 stride-2 max-pool (padding 1: 32 -> 16 -> 8, 28 -> 14 -> 7) and dropout."""
    return [nn.MaxPool2d(kernel_size=3, stride=2, padding=1), nn.Dropout(0.5)]


def _nin(num_classes: int, in_channels: int, batch_norm: bool = False) -> nn.Module:
    """NIN as in the TabConv reference; this variant reproduces the paper's 223,897,472 count."""
    return nn.Sequential(
        OrderedDict(
            [
                ("block1", nn.Sequential(*_mlpconv(in_channels, 5, (192, 160, 96), batch_norm), *_downsample())),
                ("block2", nn.Sequential(*_mlpconv(96, 5, (192, 192, 192), batch_norm), *_downsample())),
                ("block3", nn.Sequential(*_mlpconv(192, 3, (192, 192, num_classes), batch_norm))),
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
    "resnet18": lambda n, c: ResNet((2, 2, 2, 2), n, c),
    "resnet34": lambda n, c: ResNet((3, 4, 6, 3), n, c),
    "nin": _nin,
    "tiny": _tiny,
}


def build_training_model(name: str, num_classes: int, in_channels: int) -> nn.Module:
    """The network to train. NIN trains with a batch norm after every conv, folded away by `deployable`:
    without normalisation its ReLU on the class maps died within 100 SGD or Adam steps in every recipe tried
    here (loss stuck at ln 10), so the plain NIN never learned."""
    if name == "nin":
        return _nin(num_classes, in_channels, batch_norm=True)
    return build_model(name, num_classes, in_channels)


@torch.no_grad()
def deployable(name: str, trained: nn.Module, num_classes: int, in_channels: int) -> nn.Module:
    """The registered architecture computing what `trained` computes in eval mode (NIN: batch norms folded)."""
    if name != "nin":
        return trained
    from tabconv.lowering import fold_batchnorm

    plain = build_model(name, num_classes, in_channels).eval()
    convs = [m for m in trained.modules() if isinstance(m, nn.Conv2d)]
    norms = [m for m in trained.modules() if isinstance(m, nn.BatchNorm2d)]
    targets = [m for m in plain.modules() if isinstance(m, nn.Conv2d)]
    for conv, norm, target in zip(convs, norms, targets, strict=True):
        folded = fold_batchnorm(conv, norm)
        target.weight.copy_(folded.weight)
        target.bias.copy_(folded.bias)
    return plain.to(next(trained.parameters()).device)


def model_names() -> list[str]:
    """Registered model names, in display order."""
    return list(_BUILDERS)


def build_model(name: str, num_classes: int, in_channels: int) -> nn.Module:
    """A freshly initialised model (never downloads weights)."""
    if name not in _BUILDERS:
        raise ValueError(f"unknown model {name!r}; known models: {', '.join(model_names())}")
    return _BUILDERS[name](num_classes, in_channels)
