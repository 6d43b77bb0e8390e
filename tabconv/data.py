"""Dataset registry: every dataset as uint8 image tensors, normalised only when batched.

Images stay uint8 in memory (a quarter of float32) so that all of CIFAR-10 fits comfortably,
and every consumer gets the same normalisation from ``ImageSet.batch`` / ``ImageSet.batches``.
"""

from __future__ import annotations

import hashlib
import os
import socket
import zipfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from tabconv.atomic import atomic_write

SPLITS = ("train", "test")
_DOWNLOAD_HOW = "downloaded by torchvision on first use (needs network)"
_OFFLINE_HOW = "offline on the project's machines: ../shared/datasets/prepare.sh DEST, then use DEST as the data root"


@dataclass(frozen=True)
class DatasetInfo:
    """Static facts about a dataset; loading it is ``load_dataset``'s job."""

    name: str
    channels: int
    height: int
    width: int
    num_classes: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    description: str
    how_to_get: str
    class_names: tuple[str, ...] = ()  # label k's name (empty: not known, labels are numbers)
    test_images: int | None = None  # the test split's size (None: not known before loading it)

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return (self.channels, self.height, self.width)


DATASETS: dict[str, DatasetInfo] = {
    info.name: info
    for info in (
        DatasetInfo(
            name="digits",
            channels=1,
            height=32,
            width=32,
            num_classes=10,
            # Measured once on the digits train split (a test checks they still match), so digits
            # reach the network zero-mean and unit-variance like every other dataset.
            mean=(0.3052,),
            std=(0.3236,),
            description="scikit-learn's 8x8 handwritten digits (1797 images), upsampled to 32x32; "
            "fixed stratified split: 1347 train / 450 test",
            how_to_get="bundled with scikit-learn, always available",
            class_names=tuple("0123456789"),
            test_images=450,
        ),
        DatasetInfo(
            name="mnist",
            channels=1,
            height=28,
            width=28,
            num_classes=10,
            mean=(0.1307,),
            std=(0.3081,),
            description="MNIST handwritten digits, 60000 train / 10000 test, 28x28 grey",
            how_to_get=f"{_DOWNLOAD_HOW}; {_OFFLINE_HOW}",
            class_names=tuple("0123456789"),
            test_images=10000,
        ),
        DatasetInfo(
            name="fashion-mnist",
            channels=1,
            height=28,
            width=28,
            num_classes=10,
            mean=(0.2860,),
            std=(0.3530,),
            description="Fashion-MNIST clothing images, 60000 train / 10000 test, 28x28 grey",
            how_to_get=f"{_DOWNLOAD_HOW}; {_OFFLINE_HOW}",
            class_names=("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                         "Ankle boot"),
            test_images=10000,
        ),
        DatasetInfo(
            name="cifar10",
            channels=3,
            height=32,
            width=32,
            num_classes=10,
            mean=(0.4914, 0.4822, 0.4465),
            std=(0.2470, 0.2435, 0.2616),
            description="CIFAR-10 natural images, 50000 train / 10000 test, 32x32 RGB",
            how_to_get=f"{_DOWNLOAD_HOW}, or an image-folder export at cifar10-images/{{train,test}}/<class>/*.jpg; "
            f"{_OFFLINE_HOW}",
            class_names=("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"),
            test_images=10000,
        ),
        DatasetInfo(
            name="cifar100",
            channels=3,
            height=32,
            width=32,
            num_classes=100,
            mean=(0.5071, 0.4865, 0.4409),
            std=(0.2673, 0.2564, 0.2762),
            description="CIFAR-100 natural images, 50000 train / 10000 test, 32x32 RGB, 100 classes",
            how_to_get=f"{_DOWNLOAD_HOW}; not available offline on the project's machines",
            test_images=10000,
        ),
    )
}

# The files torchvision's dataset classes read, relative to the data root (a test checks them against
# torchvision): knowing them statically lets a cached decode skip importing torchvision (~2.7 s here).
_TORCHVISION_FILES: dict[str, list[str]] = {
    **{name: [f"{folder}/raw/{prefix}-{kind}-ubyte" for prefix in ("train", "t10k")
              for kind in ("images-idx3", "labels-idx1")]
       for name, folder in (("mnist", "MNIST"), ("fashion-mnist", "FashionMNIST"))},
    "cifar10": [f"cifar-10-batches-py/{file}" for file in
                (*(f"data_batch_{i}" for i in range(1, 6)), "test_batch", "batches.meta")],
    "cifar100": [f"cifar-100-python/{file}" for file in ("train", "test", "meta")],
}
_CIFAR10_FOLDER = "cifar10-images"
_CIFAR10_CLASSES = 10
# torchvision's downloads open sockets without a timeout; an unreachable mirror would hang forever.
_DOWNLOAD_TIMEOUT_S = 20.0


class DatasetUnavailable(RuntimeError):
    """The dataset's files are not on disk and could not be fetched; the message says how to get them.

    `detail` is the message without the last sentence, which says how the command line chooses the data root,
    so that the explorer can point at its own Data root field instead."""

    def __init__(self, detail: str, root_hint: str = "") -> None:
        super().__init__(f"{detail} {root_hint}".strip())
        self.detail = detail


@dataclass
class ImageSet:
    """One split of a dataset: uint8 images (N, C, H, W) and int64 labels (N,)."""

    info: DatasetInfo
    split: str
    images: torch.Tensor
    labels: torch.Tensor
    first: int = 0  # the index of its first image in the split (ImageSet.skip)

    def __post_init__(self) -> None:
        if self.images.dtype != torch.uint8 or tuple(self.images.shape[1:]) != self.info.input_shape:
            raise ValueError(
                f"{self.info.name} images must be uint8 (N, {', '.join(map(str, self.info.input_shape))}), "
                f"got {self.images.dtype} {tuple(self.images.shape)}"
            )
        if self.labels.shape != (len(self.images),):
            raise ValueError(f"{len(self.images)} images but labels of shape {tuple(self.labels.shape)}")

    def __len__(self) -> int:
        return len(self.images)

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 images (on any device) to float32 with the dataset's mean and std."""
        mean = torch.tensor(self.info.mean, device=images.device).view(-1, 1, 1)
        std = torch.tensor(self.info.std, device=images.device).view(-1, 1, 1)
        return (images.float() / 255.0 - mean) / std

    def batch(self, index: slice | torch.Tensor) -> torch.Tensor:
        """Normalised float32 images for a slice or an index tensor."""
        return self.normalize(self.images[index])

    def head(self, n: int | None) -> ImageSet:
        """The first n images (None: all), e.g. the evaluation subset everyone agrees on."""
        if n is None:
            return self
        if n < 1 or n > len(self):
            raise ValueError(
                f"asked for the first {n} images of {self.info.name} {self.split}, "
                f"which has {len(self)} (use 1..{len(self)} or all)"
            )
        return ImageSet(self.info, self.split, self.images[:n], self.labels[:n], self.first)

    def skip(self, n: int) -> ImageSet:
        """Every image after the first n, e.g. those a search chose on: what is measured on the rest was never
        seen by the choice (the checkpoint trained on the training split, so only test images are unseen)."""
        if n < 0 or n >= len(self):
            raise ValueError(f"cannot leave out the first {n} of the {len(self)} {self.info.name} {self.split} images "
                             f"(use 0..{len(self) - 1})")
        return ImageSet(self.info, self.split, self.images[n:], self.labels[n:], self.first + n)

    def batches(
        self, batch_size: int, device: torch.device | str | None = None
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """(images, labels) in order; uint8 travels to the device and is normalised there (4x less copying)."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        for start in range(0, len(self), batch_size):
            images = self.images[start : start + batch_size].to(device)
            yield self.normalize(images), self.labels[start : start + batch_size].to(device)


def resolve_root(data_root: str | os.PathLike[str] | None) -> Path:
    """The data root: the argument, else $TABCONV_DATA, else the per-user cache."""
    if data_root is not None and str(data_root):
        return Path(data_root).expanduser()
    if os.environ.get("TABCONV_DATA"):
        return Path(os.environ["TABCONV_DATA"]).expanduser()
    return _cache_home() / "data"


def _cache_home() -> Path:
    """$XDG_CACHE_HOME/tabconv, defaulting to ~/.cache/tabconv."""
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "tabconv"


def get_info(name: str) -> DatasetInfo:
    """The registry entry; an unknown name lists the known ones."""
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; known datasets: {', '.join(DATASETS)}")
    return DATASETS[name]


def load_dataset(
    name: str,
    split: str = "test",
    data_root: str | os.PathLike[str] | None = None,
    download: bool = True,
) -> ImageSet:
    """One split of a dataset; missing files are downloaded when allowed, else DatasetUnavailable."""
    info = get_info(name)
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; use one of {', '.join(SPLITS)}")
    if name == "digits":
        images, labels = _load_digits(split)
    else:
        images, labels = _load_files(info, split, resolve_root(data_root), download)
    return ImageSet(info, split, images, labels)


def is_available(name: str, data_root: str | os.PathLike[str] | None = None) -> bool:
    """Whether the files are on disk (only existence is checked: no download, no decoding)."""
    get_info(name)
    if name == "digits":
        return True
    root = resolve_root(data_root)
    return not _missing_files(name, root) or (name == "cifar10" and _has_cifar10_folders(root))


def _load_digits(split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """sklearn's digits scaled from 0..16 to 0..255 and upsampled to 32x32, so image models see a usual size."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    pixels, targets = load_digits(return_X_y=True)
    train_idx, test_idx = train_test_split(np.arange(len(targets)), test_size=0.25, random_state=0, stratify=targets)
    idx = train_idx if split == "train" else test_idx
    small = torch.from_numpy(pixels[idx]).float().reshape(-1, 1, 8, 8) * (255.0 / 16.0)
    large = F.interpolate(small, size=(32, 32), mode="bilinear", align_corners=False)
    return large.round().clamp(0, 255).to(torch.uint8), torch.from_numpy(targets[idx]).long()


def _torchvision_files(name: str) -> list[str]:
    """The files torchvision needs for a dataset, relative to the data root."""
    return list(_TORCHVISION_FILES[name])


def _torchvision_dataset(name: str, root: Path, split: str, download: bool):
    """torchvision's dataset object (imported only here: decoding or downloading needs it)."""
    from torchvision import datasets

    classes = {"mnist": datasets.MNIST, "fashion-mnist": datasets.FashionMNIST, "cifar10": datasets.CIFAR10,
               "cifar100": datasets.CIFAR100}
    return classes[name](str(root), train=split == "train", download=download)


def _missing_files(name: str, root: Path) -> list[str]:
    return [file for file in _torchvision_files(name) if not (root / file).is_file()]


def _has_cifar10_folders(root: Path) -> bool:
    folders = [root / _CIFAR10_FOLDER / split for split in SPLITS]
    return all(
        path.is_dir() and sum(entry.is_dir() for entry in os.scandir(path)) == _CIFAR10_CLASSES for path in folders
    )


def _unavailable(info: DatasetInfo, root: Path, reason: str) -> DatasetUnavailable:
    """One paragraph: what is missing, where it was looked for, how to get it."""
    missing = _missing_files(info.name, root)
    alternative = (
        f", or the image folders {root / _CIFAR10_FOLDER}/{{train,test}}/<class>/*.jpg"
        if info.name == "cifar10"
        else ""
    )
    return DatasetUnavailable(
        f"dataset {info.name!r} is not available under the data root {root} ({reason}). "
        f"Expected files: {', '.join(missing or _torchvision_files(info.name))}{alternative}. "
        f"How to get them: {info.how_to_get}.",
        "Choose the data root with --data-root or the TABCONV_DATA environment variable.",
    )


def _load_files(info: DatasetInfo, split: str, root: Path, download: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """torchvision's files when present (or downloadable), else CIFAR-10's image folders."""
    missing = _missing_files(info.name, root)
    use_folders = bool(missing) and info.name == "cifar10" and _has_cifar10_folders(root)
    fetch = bool(missing) and not use_folders
    if fetch and not download:
        raise _unavailable(info, root, "its files are not there and downloading is off")
    try:
        if use_folders:
            return _load_image_folder(root / _CIFAR10_FOLDER / split)
        if fetch:
            with socket_timeout(_DOWNLOAD_TIMEOUT_S):
                _torchvision_dataset(info.name, root, split, download=True)
        return _load_decoded(info.name, root, split)
    except Exception as err:  # any failure to fetch or read user files becomes one clear message
        action = "download failed" if fetch else "reading failed"
        raise _unavailable(info, root, f"{action}: {' '.join(str(err).split())}") from err


def _load_decoded(name: str, root: Path, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """torchvision's decode of a split, cached as .npz keyed by the files' paths, sizes and times."""
    files = [root / file for file in _torchvision_files(name)]
    stamp = "\n".join(f"{file.resolve()}:{file.stat().st_size}:{file.stat().st_mtime_ns}" for file in files)
    key = hashlib.sha256(f"{stamp}\n{split}".encode()).hexdigest()[:16]

    def decode() -> tuple[np.ndarray, np.ndarray]:
        dataset = _torchvision_dataset(name, root, split, download=False)
        images = np.asarray(dataset.data)
        images = images[:, None] if images.ndim == 3 else images.transpose(0, 3, 1, 2)
        return np.ascontiguousarray(images), np.asarray(dataset.targets, dtype=np.int64)

    return _cached_decode(_cache_home() / "decoded" / f"{name}-{split}-{key}.npz", decode)


@contextmanager
def socket_timeout(seconds: float) -> Iterator[None]:
    """A default socket timeout for the duration of a download, restored afterwards."""
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(seconds)
    try:
        yield
    finally:
        socket.setdefaulttimeout(previous)


def _load_image_folder(folder: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """Decoded image folder, cached as .npz keyed by the folder's absolute path and file count."""
    classes = sorted(entry.name for entry in os.scandir(folder) if entry.is_dir())
    per_class = [sorted(entry.name for entry in os.scandir(folder / name) if entry.is_file()) for name in classes]
    # Interleave the classes (image 0 of every class, then image 1, ...) so that any head(n)
    # is class-balanced; the export's per-class numbering has lost the official order anyway.
    order = sorted((i, label) for label, files in enumerate(per_class) for i in range(len(files)))
    paths = [folder / classes[label] / per_class[label][i] for i, label in order]
    labels = np.array([label for _, label in order], dtype=np.int64)
    key = hashlib.sha256(f"{folder.resolve()}\n{len(paths)}".encode()).hexdigest()[:16]

    def decode() -> tuple[np.ndarray, np.ndarray]:
        return np.ascontiguousarray(np.stack([_decode_rgb(path) for path in paths]).transpose(0, 3, 1, 2)), labels

    return _cached_decode(_cache_home() / "decoded" / f"{folder.parent.name}-{folder.name}-{key}.npz", decode,
                          len(paths))


def _cached_decode(cache: Path, decode: Callable[[], tuple[np.ndarray, np.ndarray]],
                   expected: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(images, labels) from a .npz cache, else decoded and cached; a damaged or short cache is rebuilt."""
    stored = _read_npz(cache)
    if stored is not None and expected in (None, len(stored["labels"])):
        return torch.from_numpy(stored["images"]), torch.from_numpy(stored["labels"])
    images, labels = decode()
    _save_npz_atomic(cache, images=images, labels=labels)
    return torch.from_numpy(images), torch.from_numpy(labels)


def _read_npz(path: Path) -> dict[str, np.ndarray] | None:
    """A cached decode, or None when absent or damaged (a damaged cache is simply rebuilt)."""
    try:
        with np.load(path) as stored:
            return {name: stored[name] for name in stored.files}
    except (OSError, ValueError, zipfile.BadZipFile):
        return None


def _decode_rgb(path: Path) -> np.ndarray:
    """One image file as uint8 (H, W, 3)."""
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


def _save_npz_atomic(path: Path, **arrays: np.ndarray) -> None:
    """A concurrent reader never sees half a cache."""
    atomic_write(path, lambda handle: np.savez(handle, **arrays))
