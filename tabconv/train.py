"""Training the baseline networks and storing them as verifiable checkpoints.

A checkpoint carries its own recipe (model, dataset, input shape) and a hash of its weights, so a
table fitted later can be tied to exactly the weights it was fitted on.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import time
import zipfile
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from tabconv import __version__
from tabconv.atomic import atomic_write
from tabconv.data import ImageSet, load_dataset
from tabconv.devices import resolve_device
from tabconv.inputs import Input, InputError, Part
from tabconv.models import build_model, build_training_model, deployable
from tabconv.progress import Progress, ProgressEvent, Stage

CHECKPOINT_FORMAT = "tabconv-checkpoint"
CHECKPOINT_VERSION = 1
_REQUIRED_META = ("model", "num_classes", "input_shape")
# Digits was measured (ResNet-18: >= 96% test accuracy in about a minute on 2 CPU cores); the others
# are conventional starting points for the OneCycle schedule, not measured here.
DEFAULT_EPOCHS: dict[str, int] = {"digits": 5, "mnist": 3, "fashion-mnist": 5, "cifar10": 15, "cifar100": 15}
DEFAULT_LR = 0.05



class CheckpointError(InputError):
    """A checkpoint that cannot be used; the message names the file and the problem."""

    concerns = Input.CHECKPOINT


def train_model(
    model: nn.Module,
    train_set: ImageSet,
    *,
    epochs: int,
    batch_size: int = 128,
    lr: float = DEFAULT_LR,
    seed: int = 0,
    device: torch.device | str = "cpu",
    progress: Progress | None = None,
    augment: bool = False,
) -> nn.Module:
    """SGD with momentum under a OneCycle schedule; seeded shuffling (and augmentation) makes a run repeatable.

    The last incomplete batch of each epoch is dropped (every epoch reshuffles, so no image is
    left out for good): a batch of one image would break batch norm.
    """
    if epochs < 1 or batch_size < 1:
        raise ValueError(f"epochs and batch_size must be positive, got {epochs} and {batch_size}")
    if len(train_set) < 2:
        raise ValueError(f"training needs at least 2 images (batch norm), got {len(train_set)}")
    device = torch.device(device)
    torch.manual_seed(seed)
    shuffler = torch.Generator().manual_seed(seed)
    batch_size = min(batch_size, len(train_set))
    steps = len(train_set) // batch_size
    model.to(device).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, nesterov=True, weight_decay=5e-4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=epochs * steps)
    for epoch in range(epochs):
        order = torch.randperm(len(train_set), generator=shuffler)
        for step in range(steps):
            index = order[step * batch_size : (step + 1) * batch_size]
            images = train_set.images[index]
            if augment:
                images = shift_and_flip(images, shuffler)
            images = train_set.normalize(images.to(device))
            loss = F.cross_entropy(model(images), train_set.labels[index].to(device))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            if progress is not None:
                progress(ProgressEvent(Stage.TRAIN, epoch * steps + step + 1, epochs * steps,
                                       f"epoch {epoch + 1}/{epochs}", loss=loss.item()))
    return model.eval()


def shift_and_flip(images: torch.Tensor, generator: torch.Generator, shift: int = 4) -> torch.Tensor:
    """The standard CIFAR augmentation, per image: a crop of the image zero-padded by `shift` pixels (a random
    shift of up to `shift` pixels each way) and a horizontal flip half of the time. Not for digits: a flip
    changes what some of them mean."""
    n, channels, height, width = images.shape
    padded = F.pad(images, (shift, shift, shift, shift))
    dy, dx = (torch.randint(0, 2 * shift + 1, (n,), generator=generator) for _ in range(2))
    rows = (dy[:, None] + torch.arange(height))[:, None, :, None]
    cols = (dx[:, None] + torch.arange(width))[:, None, None, :]
    shifted = padded[torch.arange(n)[:, None, None, None], torch.arange(channels)[None, :, None, None], rows, cols]
    flip = torch.rand(n, generator=generator) < 0.5
    return torch.where(flip[:, None, None, None], shifted.flip(3), shifted)


@torch.no_grad()
def accuracy(
    model: nn.Module, image_set: ImageSet, *, batch_size: int = 256, device: torch.device | str = "cpu"
) -> float:
    """Top-1 accuracy over the whole set (puts the model in eval mode on the device)."""
    if len(image_set) == 0:
        raise ValueError("accuracy of an empty image set is undefined")
    model.to(device).eval()
    correct = 0
    for images, labels in image_set.batches(batch_size, device):
        correct += int((model(images).argmax(dim=1) == labels).sum())
    return correct / len(image_set)


def weights_sha256(state_dict: Mapping[str, torch.Tensor]) -> str:
    """A hash of names, dtypes, shapes and raw bytes, independent of device and dict order."""
    digest = hashlib.sha256()
    for name in sorted(state_dict):
        tensor = state_dict[name].detach().cpu().contiguous()
        digest.update(f"{name}\0{tensor.dtype}\0{tuple(tensor.shape)}\0".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def save_checkpoint(path: str | os.PathLike[str], model: nn.Module, meta: dict) -> dict:
    """Write weights and meta atomically; meta gains sha256 and library_version and is returned."""
    path = Path(path)
    missing = [key for key in _REQUIRED_META if key not in meta]
    if missing:
        raise CheckpointError(f"{path}: meta lacks {', '.join(missing)}, needed to rebuild the model")
    try:
        json.dumps(meta)
    except (TypeError, ValueError) as err:
        raise CheckpointError(f"{path}: meta must hold plain JSON values ({err})") from err
    state = {name: tensor.detach().cpu() for name, tensor in model.state_dict().items()}
    full_meta = {**meta, "sha256": weights_sha256(state), "library_version": __version__}
    payload = {
        "format": CHECKPOINT_FORMAT,
        "version": CHECKPOINT_VERSION,
        "meta": full_meta,
        "state_dict": state,
    }
    atomic_write(path, lambda handle: torch.save(payload, handle))
    return full_meta


def load_checkpoint(path: str | os.PathLike[str], device: torch.device | str = "cpu") -> tuple[nn.Module, dict]:
    """The model (eval mode, on the device) and its meta, after checking format, hash and architecture."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    payload = safe_load(path, CheckpointError, "checkpoint", (_WAY_FORWARD,))
    if _is_state_dict(payload):
        raise CheckpointError(f"{path}: a plain state_dict, without the model name, number of classes and input "
                              f"shape that tabconv needs to rebuild the network; {_WAY_FORWARD}")
    if not is_checkpoint(payload):
        raise CheckpointError(f"{path}: a PyTorch file but not a tabconv checkpoint (no format marker "
                              f"{CHECKPOINT_FORMAT!r}); {_WAY_FORWARD}")
    meta, state = checkpoint_contents(path, payload)
    model = _rebuild(path, meta)
    try:
        model.load_state_dict(state)
    except RuntimeError as err:
        raise CheckpointError(f"{path}: weights do not fit a {meta['model']!r} model ({_first_line(err)})") from err
    return model.to(device).eval(), meta


def safe_load(path: Path, error: type[InputError], what: str, way_forward: Sequence[Part]) -> Any:
    """torch.load with weights_only=True; a file it refuses becomes `error` with one line naming the file (torch's
    own text there advises an unsafe load: never repeated)."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        if not zipfile.is_zipfile(path):  # not the archive torch.save writes: any other file ends up here too
            raise error(f"{path}: not a PyTorch {what} (torch.save did not write it); ", *way_forward) from err
        raise error(f"{path}: holds Python objects besides tensors, which a safe (weights-only) load refuses and "
                    "tabconv never runs; ", *way_forward) from err
    except Exception as err:  # torch raises many types for a file that is not a torch archive
        raise error(f"{path}: not a PyTorch {what} (torch.save did not write it); ", *way_forward) from err


def is_checkpoint(payload: Any) -> bool:
    """Whether a loaded file carries the tabconv checkpoint marker."""
    return isinstance(payload, Mapping) and payload.get("format") == CHECKPOINT_FORMAT


def checkpoint_contents(path: Path, payload: Mapping[str, Any]) -> tuple[dict, dict]:
    """(meta, state_dict) of a loaded tabconv checkpoint, after checking its version and its weights' sha256."""
    if payload.get("version") != CHECKPOINT_VERSION:
        raise CheckpointError(
            f"{path}: checkpoint version {payload.get('version')!r} is not supported "
            f"(this tabconv reads version {CHECKPOINT_VERSION})"
        )
    meta, state = payload.get("meta"), payload.get("state_dict")
    if not isinstance(meta, dict) or not isinstance(state, dict):
        raise CheckpointError(f"{path}: checkpoint lacks its meta or state_dict")
    if weights_sha256(state) != meta.get("sha256"):
        raise CheckpointError(f"{path}: weights do not match their recorded sha256 (file corrupted or edited)")
    return meta, state


def _rebuild(path: Path, meta: dict) -> nn.Module:
    """An untrained model of the architecture the meta describes."""
    try:
        return build_model(meta["model"], meta["num_classes"], meta["input_shape"][0])
    except (KeyError, IndexError, TypeError, ValueError) as err:
        raise CheckpointError(f"{path}: cannot rebuild the model from its meta ({_first_line(err)})") from err


_WAY_FORWARD = ("train one with `python -m tabconv train` (or the explorer's Train button), or wrap your weights with "
                "tabconv.train.save_checkpoint(path, model, {'model': ..., 'num_classes': ..., 'input_shape': ...})")


def _is_state_dict(payload: object) -> bool:
    """A bare `torch.save(model.state_dict(), ...)` file: every value a tensor."""
    return (isinstance(payload, Mapping) and bool(payload)
            and all(isinstance(value, torch.Tensor) for value in payload.values()))


def _first_line(err: BaseException) -> str:
    """torch's messages run over many lines; one line is enough to say what went wrong."""
    lines = str(err).strip().splitlines()
    return lines[0] if lines else type(err).__name__


def train_and_save(
    model_name: str,
    dataset: str,
    out: str | os.PathLike[str],
    *,
    epochs: int | None = None,
    batch_size: int = 128,
    lr: float = DEFAULT_LR,
    seed: int = 0,
    device: torch.device | str | None = "cpu",
    data_root: str | os.PathLike[str] | None = None,
    progress: Progress | None = None,
    train_images: int | None = None,
    augment: bool = False,
) -> dict:
    """Train on the train split (or its first `train_images`), measure the whole test split, save; the
    checkpoint records how it was trained, including the training time."""
    device = resolve_device(None if device is None else str(device))
    train_set = load_dataset(dataset, "train", data_root).head(train_images)
    test_set = load_dataset(dataset, "test", data_root)
    epochs = DEFAULT_EPOCHS[dataset] if epochs is None else epochs
    info = train_set.info
    torch.manual_seed(seed)
    model = build_training_model(model_name, info.num_classes, info.channels)
    started = time.perf_counter()
    train_model(
        model,
        train_set,
        epochs=epochs,
        batch_size=batch_size,
        lr=lr,
        seed=seed,
        device=device,
        progress=progress,
        augment=augment,
    )
    train_seconds = time.perf_counter() - started
    model = deployable(model_name, model, info.num_classes, info.channels)
    meta = {
        "model": model_name,
        "dataset": dataset,
        "input_shape": list(info.input_shape),
        "num_classes": info.num_classes,
        "test_accuracy": accuracy(model, test_set, device=device),
        "test_images": len(test_set),
        "epochs": epochs,
        "train_images": len(train_set),
        "seed": seed,
        "batch_size": batch_size,
        "lr": lr,
        "augment": "shift 4 + flip" if augment else None,
        "train_seconds": round(train_seconds, 1),
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    return save_checkpoint(out, model, meta)
