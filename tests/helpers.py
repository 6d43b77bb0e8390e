"""Small real models with non-trivial batch-norm statistics, for tests that need no training."""

from __future__ import annotations

import torch
from torch import nn

from tabconv.models import build_model


def randomised_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give every BatchNorm non-trivial statistics so folding is really exercised."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for mod in model.modules():
            if isinstance(mod, nn.BatchNorm2d):
                n = mod.num_features
                mod.running_mean.copy_(torch.rand(n, generator=g) * 0.4 - 0.2)
                mod.running_var.copy_(torch.rand(n, generator=g) + 0.5)
                mod.weight.copy_(torch.rand(n, generator=g) + 0.5)
                mod.bias.copy_(torch.rand(n, generator=g) * 0.2 - 0.1)
    return model.eval()


def model(name: str = "tiny", classes: int = 10, channels: int = 1, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return randomised_bn(build_model(name, classes, channels), seed)


def no_failure(at) -> None:
    """An AppTest run showed no exception and no error."""
    assert not at.exception, [e.value for e in at.exception]
    assert not at.error, [e.value for e in at.error]
