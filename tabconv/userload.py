"""A user's own model: an architecture, its weights and an image folder, opened as what a Session needs
(model, meta, calibration images, evaluation images).

Checks run cheapest first and every one before anything is written (decoded-image cache, downloaded weights):
the architecture name, the folder's layout, the weights' spelling and class count against the folder's, the
weights' keys and shapes; only then are images decoded.
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from tabconv.architectures import build_architecture, check_architecture, classifier_keys, is_project_model
from tabconv.config import Calibration
from tabconv.data import DATASETS, DatasetInfo, ImageSet
from tabconv.devices import resolve_device
from tabconv.imagefolder import (
    DEFAULT_IMAGE_SIZE,
    IMAGENET_MEAN,
    IMAGENET_STD,
    FolderScan,
    Preprocessing,
    load_image_folder,
    scan_image_folder,
)
from tabconv.inputs import Ask, Input, InputError, Part
from tabconv.progress import Progress
from tabconv.train import weights_sha256
from tabconv.weights import (
    WeightEnum,
    WeightsFile,
    adapt_keys,
    enum_weights_file,
    file_classes,
    load_into,
    looks_like_enum,
    read_weights_file,
    weight_enum,
)

INIT_SEED = 0  # random initialisation without weights (useful for timing) is the same network every time


class UserModelError(InputError):
    """The parts do not fit together (class counts, a missing folder argument); the message says how."""


def channel_values(text: str, name: str) -> tuple[float, ...] | None:
    """A per-channel mean or std as typed: '0.485, 0.456, 0.406', '0.485 0.456 0.406' or one number for every
    channel; empty: None (the defaults). `name` is the field's name for the message."""
    parts = [part for part in re.split(r"[\s,;]+", text.strip()) if part]
    if not parts:
        return None
    try:
        values = tuple(float(part) for part in parts)
    except ValueError:
        values = ()
    if len(values) not in (1, 3):
        raise UserModelError(f"{name} {text.strip()!r}: give 3 numbers (R, G, B) or one for all channels, such as "
                             "0.485, 0.456, 0.406")
    return values


@dataclass
class UserModel:
    """Everything Session needs; `calibration` is the one asked for, clamped to the folder's calibration part."""

    model: nn.Module
    meta: dict[str, Any]
    calibration_set: ImageSet
    eval_set: ImageSet
    calibration: Calibration


def open_user_model(arch: str, weights: str | os.PathLike[str] | None = None,
                    images: str | os.PathLike[str] | None = None, *, num_classes: int | None = None,
                    image_size: int | None = None, mean: Sequence[float] | None = None,
                    std: Sequence[float] | None = None, calibration: Calibration | None = None,
                    eval_images: int | None = None, device: torch.device | str | None = None,
                    progress: Progress | None = None) -> UserModel:
    """Open architecture + weights (a file, a torchvision weight name, or None: random, seeded) + image folder.

    Preprocessing defaults: 224x224 crops of images resized to 224 and ImageNet's mean/std; a torchvision
    weight name brings its own (resize, crop, interpolation, mean, std), and --image-size then scales its
    resize in proportion. Without num_classes the folder's class count is used.
    """
    check_architecture(arch)
    if images is None:
        raise UserModelError(f"{arch}: an image folder is needed (", Ask(Input.IMAGES),
                             ": DIR/<class>/*.jpg|png, or DIR/train and DIR/val)")
    scan = scan_image_folder(images)
    enum, file = _weights_source(arch, weights)
    state = adapt_keys(arch, file.state_dict) if file else None
    prep = _preprocessing(enum, image_size, mean, std, file, _input_channels(arch, state))
    classifier = classifier_keys(arch, prep.channels, prep.image_size) if weights is not None else {}
    if enum is not None:
        weight_classes, source = enum.num_classes, enum.name
    elif file is not None:
        weight_classes, source = file_classes(state, classifier), str(file.path)
    else:
        weight_classes, source = None, "random initialisation"
    num_classes, class_indices = _classes(scan, num_classes, weight_classes, source,
                                          enum.categories if enum else ())

    with torch.random.fork_rng(devices=[]):  # seeded without disturbing the caller's random state
        torch.manual_seed(INIT_SEED)
        model = build_architecture(arch, num_classes, prep.channels, image_size=prep.image_size,
                                   **(enum.builder_options if enum else {}))
    if enum is not None:
        file = read_weights_file(enum_weights_file(enum), arch)
        state = adapt_keys(arch, file.state_dict)
    if state is not None:
        load_into(model, state, source, arch, classifier)

    calibration = calibration or Calibration()
    available = len(scan.part(calibration.split))
    clamped = None
    if calibration.images > available:
        clamped = {"asked": calibration.images, "used": available,
                   "why": f"the folder's {'calibration' if calibration.split == 'train' else 'evaluation'} part "
                          f"has {available} images"}
        calibration = dataclasses.replace(calibration, images=available)
    calibration_set, eval_set = load_image_folder(scan, prep, calibration_images=calibration.images,
                                                  eval_images=eval_images, calibration_split=calibration.split,
                                                  class_indices=class_indices, num_classes=num_classes,
                                                  progress=progress)
    model = model.to(resolve_device(None if device is None else str(device))).eval()
    meta = _meta(arch, model, scan, prep, eval_set, enum, file)
    if class_indices is not None:
        meta["class_indices"] = class_indices  # the model's class number of each folder class, by category name
    if clamped:
        meta["calibration_images_clamped"] = clamped
    return UserModel(model, meta, calibration_set, eval_set, calibration)


def _weights_source(arch: str, weights: str | os.PathLike[str] | None
                    ) -> tuple[WeightEnum | None, WeightsFile | None]:
    """An existing path is a file; otherwise a name spelled like IMAGENET1K_V1 is a torchvision weight enum."""
    if weights is None:
        return None, None
    text = os.fspath(weights)
    if Path(text).expanduser().exists() or not looks_like_enum(text):
        return None, read_weights_file(text, arch)
    return weight_enum(arch, text), None


def _preprocessing(enum: WeightEnum | None, image_size: int | None, mean: Sequence[float] | None,
                   std: Sequence[float] | None, file: WeightsFile | None = None, channels: int = 3) -> Preprocessing:
    """What the user gave, else the weight enum's transforms, else a tabconv checkpoint's (its input size and its
    dataset's mean/std), else ImageNet's at 224x224. One-channel weights read the images as greyscale."""
    if enum is not None:
        crop = image_size or enum.image_size
        resize = enum.resize if image_size is None else max(1, round(image_size * enum.resize / enum.image_size))
        return Preprocessing(crop, resize, enum.interpolation, tuple(mean or enum.mean), tuple(std or enum.std))
    trained = _checkpoint_data(file)
    if trained is not None:
        return Preprocessing(image_size or trained.height, None, "bilinear", tuple(mean or trained.mean),
                             tuple(std or trained.std), channels)
    if channels == 1 and file is not None and (mean is None or std is None):
        raise UserModelError(f"{file.path}: the first layer takes 1 channel, so the images are read as greyscale; "
                             "give the mean and std used in training, one number each (e.g. MNIST's 0.1307 and "
                             "0.3081): ", Ask(Input.MEAN), " and ", Ask(Input.STD))
    return Preprocessing(image_size or DEFAULT_IMAGE_SIZE, None, "bilinear", tuple(mean or IMAGENET_MEAN),
                         tuple(std or IMAGENET_STD), channels)


def _checkpoint_data(file: WeightsFile | None) -> DatasetInfo | None:
    """The built-in dataset a tabconv checkpoint was trained on (None for other files or unknown datasets)."""
    dataset = (file.meta or {}).get("dataset") if file is not None else None
    return DATASETS.get(dataset) if isinstance(dataset, str) else None


def _input_channels(arch: str, state: dict[str, torch.Tensor] | None) -> int:
    """1 when the weights' first convolution takes one channel (a project model trained on digits), else 3.
    torchvision's own builders always take 3; their weights are checked against that when loaded."""
    if state is None or not is_project_model(arch):
        return 3
    first = next(name for name, module in build_architecture(arch, 2).named_modules()
                 if isinstance(module, nn.Conv2d))
    weight = state.get(f"{first}.weight")
    return 1 if weight is not None and weight.dim() == 4 and weight.shape[1] == 1 else 3


def _classes(scan: FolderScan, asked: int | None, weight_classes: int | None, source: str,
             categories: Sequence[str] = ()) -> tuple[int, list[int] | None]:
    """The model's class count (asked, else the weights', else the folder's; all must agree) and, when the
    folders are named after the weights' categories (a few ImageNet classes for an ImageNet model), the model's
    index of each folder class."""
    folder = len(scan.classes)
    if categories and set(scan.classes) <= set(categories) and asked in (None, len(categories)):
        ambiguous = [name for name in scan.classes if categories.count(name) > 1]
        if ambiguous:
            raise UserModelError(f"{scan.root}: class folder(s) {', '.join(ambiguous)} name more than one of "
                                 f"{source}'s categories; keep only unambiguous ones")
        return len(categories), [categories.index(name) for name in scan.classes]
    names = ", ".join(scan.classes[:5]) + (f", ... ({folder} in all)" if folder > 5 else "")
    if asked is not None and weight_classes is not None and asked != weight_classes:
        raise UserModelError(f"{source}: the weights have {weight_classes} classes, not {asked}; pass ",
                             Ask(Input.NUM_CLASSES, str(weight_classes)), " (or leave it out)")
    count = asked or weight_classes or folder
    if count != folder:
        whose: tuple[Part, ...] = ((f"the weights have {count} classes",) if asked is None else
                                   (f"the model has {count} classes (", Ask(Input.NUM_CLASSES, str(count)), ")"))
        by_name = (f", or name the class folders after its categories ({', '.join(categories[:3])}, ...)"
                   if categories else "")
        raise UserModelError(f"{scan.root}: {folder} class folders ({names}) but ", *whose,
                             "; give a folder with one subfolder per class the model predicts, in the order it "
                             f"numbers them (sorted names){by_name}")
    return count, None


def _meta(arch: str, model: nn.Module, scan: FolderScan, prep: Preprocessing, eval_set: ImageSet,
          enum: WeightEnum | None, file: WeightsFile | None) -> dict[str, Any]:
    """The record Session and configuration files carry: what was opened, and how it was preprocessed."""
    if enum is not None:
        source, kind = enum.name, "torchvision weight enum"
    elif file is not None:
        source, kind = str(file.path.absolute()), file.kind
    else:
        source, kind = f"random initialisation (torch.manual_seed({INIT_SEED}))", "random"
    meta: dict[str, Any] = {
        "model": arch, "dataset": eval_set.info.name, "num_classes": eval_set.info.num_classes,
        "input_shape": [prep.channels, prep.image_size, prep.image_size], "sha256": weights_sha256(model.state_dict()),
        "weights": source, "weights_kind": kind,
        "weights_file": str(file.path.absolute()) if file is not None else None,
        "images": str(scan.root), "classes": list(scan.classes), "split": scan.split_text,
        "calibration_images_available": len(scan.calibration), "eval_images_available": len(scan.evaluation),
        "image_size": prep.image_size, "resize": prep.resize, "interpolation": prep.interpolation,
        "mean": list(prep.mean), "std": list(prep.std),
    }
    if file is not None and file.meta:
        meta["checkpoint_dataset"] = file.meta.get("dataset")
    return meta
