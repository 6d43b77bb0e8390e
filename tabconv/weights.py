"""Weights a user brings for an architecture: a weights file (a plain state_dict, a common wrapper of one, or a
tabconv checkpoint), or a torchvision weight enum name such as IMAGENET1K_V1.

Every file is read with torch.load(weights_only=True): tensors only, no Python code run; tabconv never suggests an
unsafe load. Keys or shapes that do not fit the architecture are reported as one line plus a short list.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import torch
from torch import nn

from tabconv.architectures import AUX_HEADS, check_architecture, is_project_model, torchvision_names
from tabconv.atomic import atomic_write
from tabconv.data import socket_timeout
from tabconv.inputs import Ask, Input, InputError, Part
from tabconv.train import _is_state_dict, checkpoint_contents, is_checkpoint, safe_load

SAVE_HINT: tuple[Part, ...] = ("save a state_dict with torch.save(model.state_dict(), 'w.pth') and pass ",
                               Ask(Input.WEIGHTS, "w.pth"))
WRAPPER_KEYS = ("state_dict", "model_state_dict", "model", "module", "net")  # {"state_dict": {...}, "epoch": 3}
STRIPPED_PREFIXES = ("module.", "_orig_mod.")  # DataParallel / DistributedDataParallel, torch.compile
DOWNLOAD_TIMEOUT_S = 20.0
_SHOWN = 5  # keys listed per kind of mismatch
_FILE_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt", ".tar", ".pkl", ".safetensors")
_ENUM_SPELLING = re.compile(r"^(?:(\w+)\.)?(\w+)$")
_HASH_PREFIX = re.compile(r"-([a-f0-9]{6,})\.")  # torchvision's file names end in -<sha256 prefix>.pth
# Old torchvision DenseNet files name 'norm.1' what the module now calls 'norm1' (torchvision renames on load).
_DENSENET_OLD_KEY = re.compile(r"^(.*denselayer\d+\.(?:norm|relu|conv))\.((?:[12])\.(?:weight|bias|running_mean|"
                               r"running_var))$")


class WeightsError(InputError):
    """Weights that cannot be used; the message names the file (or enum) and the way forward."""

    concerns = Input.WEIGHTS


@dataclass(frozen=True)
class WeightEnum:
    """A torchvision weight enum's facts: its file, its classes and the preprocessing it was evaluated with."""

    name: str  # e.g. "ResNet50_Weights.IMAGENET1K_V2" (DEFAULT resolved)
    url: str
    categories: tuple[str, ...]
    image_size: int  # the transform's crop
    resize: int  # its resize of the shorter side
    interpolation: str
    mean: tuple[float, ...]
    std: tuple[float, ...]
    builder_options: dict[str, Any] = field(default_factory=dict)  # what torchvision's builder sets for them

    @property
    def num_classes(self) -> int:
        return len(self.categories)

    @property
    def path(self) -> Path:
        """Where torch.hub keeps the file: $TORCH_HOME/hub/checkpoints/<file name of the url>."""
        return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(urlparse(self.url).path)


@dataclass
class WeightsFile:
    """A state dict read from a file, and the tabconv checkpoint meta when the file was one."""

    path: Path
    state_dict: dict[str, torch.Tensor]
    kind: str  # "state_dict", "wrapped state_dict" or "tabconv checkpoint"
    meta: dict[str, Any] | None = None


def looks_like_enum(text: str) -> bool:
    """IMAGENET1K_V1, DEFAULT or ResNet50_Weights.IMAGENET1K_V1 (not a path, no file suffix)."""
    return bool(_ENUM_SPELLING.match(text)) and not text.lower().endswith(_FILE_SUFFIXES)


def weight_enum(arch: str, text: str) -> WeightEnum:
    """The torchvision weight enum `text` names for `arch`; unknown names list the ones that exist."""
    check_architecture(arch)
    if arch not in torchvision_names():
        raise WeightsError(f"{text!r}: no such weights file, and {arch} is tabconv's own model, without "
                           f"torchvision weight names; {SAVE_HINT}")
    from torchvision import models

    enum_class = models.get_model_weights(arch)
    match = _ENUM_SPELLING.match(text)
    owner, member = (match[1], match[2]) if match else (None, text)
    known = [name for name in enum_class.__members__]
    if owner is not None and owner != enum_class.__name__:
        raise WeightsError(f"{text!r}: {owner} are not weights of {arch}, whose weights are {enum_class.__name__}."
                           f"{{{', '.join(known)}}}")
    chosen = {name.upper(): name for name in known}.get(member.upper())
    if chosen is None:
        raise WeightsError(f"{text!r}: no such weights file, and not a weight name of {arch} "
                           f"(its names: {', '.join(known)})")
    weights = enum_class[chosen]
    transform = weights.transforms()
    options: dict[str, Any] = {}
    if arch in AUX_HEADS:  # torchvision's pretrained Inception/GoogLeNet normalise the input their own way
        options["transform_input"] = True
    return WeightEnum(name=str(weights), url=weights.url, categories=tuple(weights.meta["categories"]),
                      image_size=int(transform.crop_size[0]), resize=int(transform.resize_size[0]),
                      interpolation=transform.interpolation.value,
                      mean=tuple(float(v) for v in transform.mean), std=tuple(float(v) for v in transform.std),
                      builder_options=options)


def enum_weights_file(enum: WeightEnum) -> Path:
    """The enum's file from torch.hub's folder, downloaded there (atomically, hash-checked) when absent."""
    path = enum.path
    if path.is_file():
        return path
    try:
        _download(enum.url, path)
    except Exception as err:  # no network, a proxy, a full disk: one line, and the offline way
        reason = " ".join(str(err).split()) or type(err).__name__
        raise WeightsError(f"{enum.name}: its weights file {path} is not here and downloading {enum.url} failed "
                           f"({reason}); on a machine with internet, ", *SAVE_HINT,
                           f", or copy {path.name} to {path.parent}") from err
    return path


def _download(url: str, dest: Path, timeout: float = DOWNLOAD_TIMEOUT_S) -> None:
    """Fetch `url` to `dest` through a temporary file; a torchvision hash prefix in the name is checked."""
    import urllib.request

    digest = hashlib.sha256()

    def write(handle) -> None:
        with urllib.request.urlopen(url, timeout=timeout) as response:  # noqa: S310 (the enum's https url)
            while chunk := response.read(1 << 20):
                digest.update(chunk)
                handle.write(chunk)
        prefix = _HASH_PREFIX.search(dest.name)
        if prefix and not digest.hexdigest().startswith(prefix[1]):
            raise WeightsError(f"downloaded file's sha256 {digest.hexdigest()[:12]}... does not start with "
                               f"{prefix[1]}, as its name says")

    with socket_timeout(timeout):
        atomic_write(dest, write)


def read_weights_file(path: str | os.PathLike[str], arch: str) -> WeightsFile:
    """A state dict from a file, safely: a plain state_dict, {"state_dict"/"model": ...}, a DataParallel
    "module." prefix, or a tabconv checkpoint of the same architecture."""
    path = Path(path).expanduser()
    if path.is_dir():
        raise WeightsError(f"{path}: a folder, not a weights file; ", *SAVE_HINT)
    if not path.is_file():
        raise WeightsError(f"{path}: no such weights file (nor a weight name such as IMAGENET1K_V1); ", *SAVE_HINT)
    payload = safe_load(path, WeightsError, "weights file", SAVE_HINT)
    if is_checkpoint(payload):
        return _tabconv_checkpoint(path, payload, arch)
    kind, state = "state_dict", payload
    if not _is_state_dict(payload):
        inner = [key for key in WRAPPER_KEYS if isinstance(payload, Mapping) and _is_state_dict(payload.get(key))]
        if not inner:
            what = (f"top-level keys: {_names([str(k) for k in payload])}" if isinstance(payload, Mapping)
                    else f"a {type(payload).__name__}")
            raise WeightsError(f"{path}: a PyTorch file but no state_dict in it ({what}); ", *SAVE_HINT)
        kind, state = f"state_dict under {inner[0]!r}", payload[inner[0]]
    return WeightsFile(path, _strip_prefixes(dict(state)), kind)


def _tabconv_checkpoint(path: Path, payload: Mapping[str, Any], arch: str) -> WeightsFile:
    meta, state = checkpoint_contents(path, payload)
    if meta.get("model") != arch:
        raise WeightsError(f"{path}: a tabconv checkpoint of {meta.get('model')!r}, not of {arch!r}; pass ",
                           Ask(Input.ARCH, str(meta.get("model"))), " (or open it with ",
                           Ask(Input.CHECKPOINT, str(path)), ")")
    shape = meta.get("input_shape") or [3]
    if shape[0] not in (1, 3):
        raise WeightsError(f"{path}: a checkpoint for {shape[0]}-channel images, but image folders are read as "
                           "RGB or greyscale; open it with ", Ask(Input.CHECKPOINT, str(path)), " and its own dataset")
    return WeightsFile(path, dict(state), "tabconv checkpoint", dict(meta))


def _strip_prefixes(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    for prefix in STRIPPED_PREFIXES:
        if state and all(key.startswith(prefix) for key in state):
            state = {key[len(prefix):]: value for key, value in state.items()}
    return state


def adapt_keys(arch: str, state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """torchvision's own loading fix-ups: old DenseNet key names, and auxiliary heads dropped (tabconv's
    Inception/GoogLeNet are built without them, as torchvision leaves its pretrained ones)."""
    state = dict(state)
    if arch.startswith("densenet") and not is_project_model(arch):
        state = {(f"{m[1]}{m[2]}" if (m := _DENSENET_OLD_KEY.match(key)) else key): value
                 for key, value in state.items()}
    heads = tuple(f"{head}." for head in AUX_HEADS.get(arch, ()))
    if heads:
        state = {key: value for key, value in state.items() if not key.startswith(heads)}
    return state


def file_classes(state: Mapping[str, torch.Tensor], classifier: Mapping[str, int]) -> int | None:
    """The number of classes the weights' classifier has (None when the keys do not say, or disagree)."""
    counts = {state[key].shape[dim] for key, dim in classifier.items()
              if key in state and state[key].dim() > dim}
    return counts.pop() if len(counts) == 1 else None


def load_into(model: nn.Module, state: Mapping[str, torch.Tensor], source: str, arch: str,
              classifier: Mapping[str, int] | None = None) -> None:
    """Copy the weights into the model, or raise one line (counts) plus the first few keys of each kind."""
    own = model.state_dict()
    missing = [key for key in own if key not in state]
    unexpected = [key for key in state if key not in own]
    shapes = [(key, tuple(state[key].shape), tuple(own[key].shape)) for key in own
              if key in state and tuple(state[key].shape) != tuple(own[key].shape)]
    if not (missing or unexpected or shapes):
        model.load_state_dict(dict(state))
        return
    classifier = dict(classifier or {})
    if not missing and not unexpected and all(key in classifier for key, _, _ in shapes):
        classes = file_classes(state, classifier)
        model_classes = {shape[classifier[key]] for key, _, shape in shapes}.pop()
        raise WeightsError(f"{source}: the file has {classes} classes but the {arch} model is built for "
                           f"{model_classes}; pass ", Ask(Input.NUM_CLASSES, str(classes)),
                           f" (and give an image folder with {classes} classes)")
    lines: list[str] = []
    if missing:
        lines.append(f"  missing: {_names(missing)}")
    if unexpected:
        lines.append(f"  unexpected: {_names(unexpected)}")
    if shapes:
        shown = "; ".join(f"{key}: file {list(a)} vs model {list(b)}" for key, a, b in shapes[:_SHOWN])
        lines.append(f"  shapes: {shown}" + (f" (+{len(shapes) - _SHOWN} more)" if len(shapes) > _SHOWN else ""))
    raise WeightsError(f"{source}: the weights do not fit {arch} ({len(missing)} of the model's {len(own)} tensors "
                       f"missing, {len(unexpected)} unexpected, {len(shapes)} of different shape; is ",
                       Ask(Input.ARCH, arch), " right?)", details="\n".join(lines))


def _names(names: list[str]) -> str:
    shown = ", ".join(names[:_SHOWN])
    return shown + (f" (+{len(names) - _SHOWN} more)" if len(names) > _SHOWN else "")

