"""Every architecture a user can name: the project's own models, and torchvision's classification builders.

The project's names (resnet18, resnet34, nin, tiny) build from tabconv.models without importing torchvision,
whose import costs ~2.7 s here; torchvision is imported only when one of its architectures is asked for.
Project resnet18/34 are torchvision's module for module, so torchvision weights files fit them too.
"""

from __future__ import annotations

import difflib
import warnings
from typing import Any

import torch
from torch import nn

from tabconv.models import build_model, model_names

# Auxiliary classifiers that only run in training mode: torchvision drops them after loading pretrained weights
# unless asked to keep them; tabconv evaluates in eval mode, so they are always dropped (their layers never run).
AUX_HEADS: dict[str, tuple[str, ...]] = {"inception_v3": ("AuxLogits",), "googlenet": ("aux1", "aux2")}
# Architectures whose input size is fixed at build time, and the builder keyword that sets it.
_SIZED: dict[str, str] = {**{f"vit_{v}": "image_size" for v in ("b_16", "b_32", "l_16", "l_32", "h_14")},
                          "maxvit_t": "input_size"}


class ArchitectureError(ValueError):
    """An architecture name or option that cannot be built; the message names it and the way forward."""


def torchvision_names() -> list[str]:
    """torchvision's classification builders (its top-level models module only: no detection, video, ...)."""
    from torchvision import models

    return list(models.list_models(module=models))


def architecture_names() -> list[str]:
    """The project's models first, then torchvision's classification architectures not already among them."""
    own = model_names()
    return own + [name for name in torchvision_names() if name not in own]


def is_project_model(arch: str) -> bool:
    return arch in model_names()


def check_architecture(arch: str) -> None:
    """Raise ArchitectureError for an unknown name, with the closest known names (cheap for project names)."""
    if is_project_model(arch):
        return
    names = architecture_names()
    if arch not in names:
        close = difflib.get_close_matches(arch.lower(), names, n=5, cutoff=0.5)
        hint = f"did you mean {', '.join(close)}?" if close else f"known: {', '.join(model_names())} and " \
            f"torchvision's {len(names) - len(model_names())} classification models (e.g. resnet50, mobilenet_v2)"
        raise ArchitectureError(f"unknown architecture {arch!r}; {hint}")


def build_architecture(arch: str, num_classes: int, in_channels: int = 3, *, image_size: int | None = None,
                       **options: Any) -> nn.Module:
    """A freshly initialised network in eval form (never downloads weights).

    `image_size` matters only to architectures whose input size is fixed when built (ViT, MaxViT); `options`
    go to torchvision's builder (e.g. transform_input=True, as its pretrained Inception/GoogLeNet use).
    """
    check_architecture(arch)
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ArchitectureError(f"the number of classes must be a positive integer, got {num_classes!r}")
    if is_project_model(arch):
        return build_model(arch, num_classes, in_channels)
    if in_channels != 3:
        raise ArchitectureError(f"torchvision's {arch} takes 3 input channels (RGB), not {in_channels}; "
                                f"convert the images to RGB or use one of {', '.join(model_names())}")
    from torchvision import models

    if image_size is not None and arch in _SIZED:
        options[_SIZED[arch]] = image_size if arch.startswith("vit_") else (image_size, image_size)
    if arch in AUX_HEADS:
        options.setdefault("init_weights", False)  # the scipy-era init is slow and warned about; any init will do
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # "default weight initialization will change"
        try:
            model = models.get_model(arch, weights=None, num_classes=num_classes, **options)
        except (TypeError, ValueError) as err:
            raise ArchitectureError(f"torchvision cannot build {arch} with {options or 'its defaults'}: "
                                    f"{str(err).splitlines()[0]}") from err
    return drop_aux_heads(arch, model)


def drop_aux_heads(arch: str, model: nn.Module) -> nn.Module:
    """Remove training-only auxiliary classifiers, as torchvision does after loading its pretrained weights."""
    heads = AUX_HEADS.get(arch, ())
    if heads and hasattr(model, "aux_logits"):
        model.aux_logits = False
        for head in heads:
            setattr(model, head, None)
    return model


def classifier_keys(arch: str, in_channels: int = 3, image_size: int | None = None) -> dict[str, int]:
    """State-dict keys whose shape depends on the number of classes, with the dimension that holds it.

    Found by building the architecture twice (2 and 3 classes) on the meta device, which allocates nothing
    and takes milliseconds; a builder that cannot run on meta (torchvision's RegNets) is built on the CPU.
    """
    shapes = []
    for classes in (2, 3):
        try:
            with torch.device("meta"):
                model = build_architecture(arch, classes, in_channels, image_size=image_size)
        except (NotImplementedError, RuntimeError):
            model = build_architecture(arch, classes, in_channels, image_size=image_size)
        shapes.append({key: tuple(value.shape) for key, value in model.state_dict().items()})
    keys = {}
    for key, shape in shapes[0].items():
        other = shapes[1][key]
        if shape != other:
            keys[key] = next(i for i, (a, b) in enumerate(zip(shape, other, strict=True)) if a != b)
    return keys
