"""A user's image folder as calibration and evaluation ImageSets, preprocessed exactly as torchvision's eval
transforms would (Resize of the shorter side, CenterCrop, ToTensor, Normalize) so that a model sees here what it
saw when its owner evaluated it.

Layouts: DIR/<class>/*.jpg (split here: a fixed, stratified, seeded 80/20), or DIR/train/<class> with
DIR/val/<class> (or DIR/test/<class>). Classes are the sorted folder names, as torchvision's ImageFolder numbers
them. Every problem is found (and raised as one line naming the path) before any cache file is written.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from tabconv.data import DatasetInfo, ImageSet, _cache_home, _read_npz, _save_npz_atomic
from tabconv.progress import Progress, ProgressEvent, Stage

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".pgm", ".tif", ".tiff", ".webp")  # ImageFolder's
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
DEFAULT_IMAGE_SIZE = 224
EVAL_FRACTION = 0.2  # of each class, when the folder has no train/val split of its own
SPLIT_SEED = 0  # fixed, so every run (and every calibration seed) evaluates on the same images
INTERPOLATIONS = {"nearest": Image.Resampling.NEAREST, "bilinear": Image.Resampling.BILINEAR,
                  "bicubic": Image.Resampling.BICUBIC}
_LAYOUT_HELP = "expected DIR/<class>/*.jpg|png, or DIR/train/<class>/*.jpg|png and DIR/val/<class>/*.jpg|png"
_CACHE_FORMAT = 1  # part of every decoded-cache key: bump when decoding changes



class ImageFolderError(ValueError):
    """An image folder that cannot be used; the message names the path and what to do."""


@dataclass(frozen=True)
class ImageFile:
    path: Path
    label: int
    size: int
    mtime_ns: int


@dataclass(frozen=True)
class FolderScan:
    """What is in the folder (no image decoded yet): classes and the two parts, each in class-interleaved
    order (image 0 of every class, then image 1, ...) so that any first-N subset is class-balanced."""

    root: Path
    classes: tuple[str, ...]
    calibration: tuple[ImageFile, ...]
    evaluation: tuple[ImageFile, ...]
    layout: str  # "train/val", "train/test" or "split"

    @property
    def split_text(self) -> str:
        if self.layout == "split":
            return f"stratified split of each class, {1 - EVAL_FRACTION:.0%} calibration / {EVAL_FRACTION:.0%} " \
                   f"evaluation (seed {SPLIT_SEED})"
        return f"{self.layout} folders"

    def part(self, split: str) -> tuple[ImageFile, ...]:
        """'train': the calibration part; 'test': the evaluation part (the names Calibration.split uses)."""
        return self.calibration if split == "train" else self.evaluation


@dataclass(frozen=True)
class Preprocessing:
    """torchvision's eval transform: Resize(resize) of the shorter side, CenterCrop(image_size), then the
    normalisation by mean and std (applied later, by ImageSet.normalize). channels=1 reads images as greyscale
    (PIL's "L", the luma torchvision's Grayscale computes too), for a model whose first layer takes one channel."""

    image_size: int = DEFAULT_IMAGE_SIZE
    resize: int | None = None  # None: the image size (no border cropped away)
    interpolation: str = "bilinear"
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    channels: int = 3

    def __post_init__(self) -> None:
        for key in ("image_size", "resize"):
            value = getattr(self, key)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ImageFolderError(f"{key.replace('_', ' ')} must be a positive integer, got {value!r}")
        if self.interpolation not in INTERPOLATIONS:
            raise ImageFolderError(f"interpolation must be one of {', '.join(INTERPOLATIONS)}, "
                                   f"got {self.interpolation!r}")
        if self.channels not in (1, 3):
            raise ImageFolderError(f"images are read with 3 channels (RGB) or 1 (greyscale), not {self.channels}")
        wanted = "3 numbers (R,G,B) or one for all" if self.channels == 3 else "one number (greyscale)"
        for key in ("mean", "std"):
            values = tuple(getattr(self, key))
            if len(values) == 1:
                values = values * self.channels
            if len(values) != self.channels or not all(isinstance(v, int | float) and np.isfinite(v)
                                                       for v in values):
                raise ImageFolderError(f"{key} needs {wanted}, got {getattr(self, key)!r}")
            if key == "std" and min(values) <= 0:
                raise ImageFolderError(f"std must be positive, got {values}")
            object.__setattr__(self, key, tuple(float(v) for v in values))
        if self.resize is None:
            object.__setattr__(self, "resize", self.image_size)

    def key(self) -> str:
        """What the decoded uint8 pixels depend on (not mean/std: those are applied per batch)."""
        return f"{self.image_size}:{self.resize}:{self.interpolation}" + (":L" if self.channels == 1 else "")


def scan_image_folder(root: str | os.PathLike[str]) -> FolderScan:
    """The folder's classes and files, checked: every class has images and every file is an image."""
    root = Path(root).expanduser().absolute()
    if not root.exists():
        raise ImageFolderError(f"{root}: no such folder; {_LAYOUT_HELP}")
    if not root.is_dir():
        raise ImageFolderError(f"{root}: not a folder; {_LAYOUT_HELP}")
    folders = _subfolders(root)
    val_name = "val" if "val" in folders else "test" if "test" in folders else None
    if "train" in folders and val_name:
        train_classes, train = _scan_classes(root / "train")
        val_classes, val = _scan_classes(root / val_name)
        if train_classes != val_classes:
            only_train = sorted(set(train_classes) - set(val_classes))
            only_val = sorted(set(val_classes) - set(train_classes))
            raise ImageFolderError(f"{root}: train and {val_name} have different class folders (only in train: "
                                   f"{_names(only_train)}; only in {val_name}: {_names(only_val)}); "
                                   f"give both the same classes")
        return FolderScan(root, train_classes, _interleave(train), _interleave(val), f"train/{val_name}")
    if "train" in folders or val_name:
        found, missing = ("train", "val") if "train" in folders else (val_name, "train")
        raise ImageFolderError(f"{root}: has {found}/ but no {missing}/; give both, or put the class folders "
                               f"directly in {root}")
    classes, per_class = _scan_classes(root)
    calibration, evaluation = _split(root, classes, per_class)
    return FolderScan(root, classes, _interleave(calibration), _interleave(evaluation), "split")


def _subfolders(folder: Path) -> list[str]:
    """Visible subfolders, sorted (hidden ones, like .ipynb_checkpoints, are not classes)."""
    return sorted(e.name for e in os.scandir(folder) if e.is_dir() and not e.name.startswith("."))


def _scan_classes(folder: Path) -> tuple[tuple[str, ...], list[list[ImageFile]]]:
    """Class names and each class's image files, in ImageFolder's order (sorted walk, sorted names)."""
    classes = tuple(_subfolders(folder))
    if not classes:
        raise ImageFolderError(f"{folder}: no class subfolders; {_LAYOUT_HELP}")
    per_class = []
    for label, name in enumerate(classes):
        files = []
        for where, dirs, names in sorted(os.walk(folder / name, followlinks=True)):
            dirs[:] = [d for d in dirs if not d.startswith(".")]
            for file in sorted(names):
                if file.startswith("."):
                    continue
                path = Path(where) / file
                if not file.lower().endswith(IMAGE_EXTENSIONS):
                    raise ImageFolderError(f"{path}: not an image file (images end in {', '.join(IMAGE_EXTENSIONS)}"
                                           f"); move other files out of {folder}")
                stat = path.stat()
                files.append(ImageFile(path, label, stat.st_size, stat.st_mtime_ns))
        if not files:
            raise ImageFolderError(f"{folder / name}: class folder holds no images ({', '.join(IMAGE_EXTENSIONS)}); "
                                   f"add images or remove the folder")
        per_class.append(files)
    return classes, per_class


def _split(root: Path, classes: Sequence[str], per_class: list[list[ImageFile]]
           ) -> tuple[list[list[ImageFile]], list[list[ImageFile]]]:
    """Per class, a seeded 20% for evaluation (at least one image) and the rest for calibration.

    Done per class rather than with one stratified draw so that every class is guaranteed in both parts."""
    rng = np.random.default_rng(SPLIT_SEED)
    calibration, evaluation = [], []
    for name, files in zip(classes, per_class, strict=True):
        if len(files) < 2:
            raise ImageFolderError(f"{root / name}: {len(files)} image, too few to split into calibration and "
                                   f"evaluation (each class needs at least 2); give {root}/train and {root}/val "
                                   f"instead")
        order = rng.permutation(len(files))
        held = max(1, round(len(files) * EVAL_FRACTION))
        evaluation.append([files[i] for i in sorted(order[:held])])
        calibration.append([files[i] for i in sorted(order[held:])])
    return calibration, evaluation


def _interleave(per_class: list[list[ImageFile]]) -> tuple[ImageFile, ...]:
    """Image 0 of every class, then image 1, ...: a first-N subset is as balanced as it can be."""
    order = sorted((i, label) for label, files in enumerate(per_class) for i in range(len(files)))
    return tuple(per_class[label][i] for i, label in order)


def _names(names: Sequence[str], limit: int = 5) -> str:
    shown = ", ".join(names[:limit]) or "none"
    return shown + (f" (+{len(names) - limit} more)" if len(names) > limit else "")


def preprocess_image(path: str | os.PathLike[str], prep: Preprocessing) -> np.ndarray:
    """One image as uint8 (channels, H, W), bit for bit what torchvision's Resize + CenterCrop give on a PIL image.

    Mirrors torchvision.transforms.functional: the shorter side becomes `resize` and the longer one
    int(resize * long / short); no resize when the size is already right; the crop is centred with
    round((size - crop) / 2), after zero padding ((crop - size) // 2 before) when the image is smaller.
    """
    with Image.open(path) as image:
        rgb = image.convert("RGB" if prep.channels == 3 else "L")  # ImageFolder's loader, or greyscale
    width, height = rgb.size
    short, long = (width, height) if width <= height else (height, width)
    new_short, new_long = prep.resize, int(prep.resize * long / short)
    new_w, new_h = (new_short, new_long) if width <= height else (new_long, new_short)
    if (new_w, new_h) != (width, height):
        rgb = rgb.resize((new_w, new_h), INTERPOLATIONS[prep.interpolation])
    pixels = np.asarray(rgb)
    if pixels.ndim == 2:
        pixels = pixels[:, :, None]
    crop = prep.image_size
    pad_h, pad_w = max(0, crop - pixels.shape[0]), max(0, crop - pixels.shape[1])
    if pad_h or pad_w:
        pixels = np.pad(pixels, ((pad_h // 2, (pad_h + 1) // 2), (pad_w // 2, (pad_w + 1) // 2), (0, 0)))
    top = int(round((pixels.shape[0] - crop) / 2.0))
    left = int(round((pixels.shape[1] - crop) / 2.0))
    return np.ascontiguousarray(pixels[top:top + crop, left:left + crop].transpose(2, 0, 1))


def dataset_name(scan: FolderScan, prep: Preprocessing, class_indices: Sequence[int] | None = None) -> str:
    """'folder:<name>@<digest>': the digest covers the calibration files, their labels and the preprocessing,
    everything tables depend on besides the weights, because the table cache tells data sets apart by this name."""
    indices = _indices(scan, class_indices)
    digest = hashlib.sha256(f"{_CACHE_FORMAT}\n{prep.key()}\n{prep.mean}\n{prep.std}\n{scan.layout}\n".encode())
    for file in scan.calibration:
        digest.update(f"{_stamp(scan, file)}:{indices[file.label]}\n".encode())
    return f"folder:{scan.root.name}@{digest.hexdigest()[:10]}"


def load_image_folder(scan: FolderScan, prep: Preprocessing, *, calibration_images: int | None = None,
                      eval_images: int | None = None, calibration_split: str = "train",
                      class_indices: Sequence[int] | None = None, num_classes: int | None = None,
                      progress: Progress | None = None) -> tuple[ImageSet, ImageSet]:
    """(calibration set, evaluation set): the first N of each part (None: all), decoded or read from the cache.

    Labels are the folder's class numbers (sorted names), or `class_indices[k]` for folder class k when the
    model numbers its classes otherwise (e.g. a 1000-class ImageNet model and a folder of a few of its classes).
    Every image is decoded before any cache file is written, so a bad image leaves the cache as it was.
    """
    indices = _indices(scan, class_indices)
    info = DatasetInfo(name=dataset_name(scan, prep, indices), channels=prep.channels, height=prep.image_size,
                       width=prep.image_size, num_classes=num_classes or len(scan.classes), mean=prep.mean,
                       std=prep.std, description=f"image folder {scan.root}: {len(scan.classes)} classes, "
                       f"{len(scan.calibration)} calibration / {len(scan.evaluation)} evaluation images "
                       f"({scan.split_text})",
                       how_to_get=f"your own image folder at {scan.root}",
                       class_names=scan.classes if class_indices is None else ())
    wanted = {"calibration": _head(scan, calibration_split, calibration_images, "calibration"),
              "evaluation": _head(scan, "test", eval_images, "evaluation")}
    arrays: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    pending: dict[str, Path] = {}
    for part, files in wanted.items():
        labels = np.array([indices[f.label] for f in files], dtype=np.int64)
        cache = _cache_path(scan, prep, part, files, labels)
        stored = _read_npz(cache)
        expected = (len(files), prep.channels, prep.image_size, prep.image_size)
        if stored is not None and stored.get("images", np.empty(0)).shape == expected \
                and np.array_equal(stored.get("labels"), labels):
            arrays[part] = (stored["images"], labels)
        else:
            arrays[part] = (_decode(files, prep, progress, part), labels)
            pending[part] = cache
    for part, cache in pending.items():  # only now: every image decoded
        _save_npz_atomic(cache, images=arrays[part][0], labels=arrays[part][1])
    sets = [ImageSet(info, split, torch.from_numpy(arrays[part][0]), torch.from_numpy(arrays[part][1]))
            for part, split in (("calibration", calibration_split), ("evaluation", "test"))]
    return sets[0], sets[1]


def _indices(scan: FolderScan, class_indices: Sequence[int] | None) -> list[int]:
    if class_indices is None:
        return list(range(len(scan.classes)))
    if len(class_indices) != len(scan.classes):
        raise ValueError(f"{len(class_indices)} class indices for {len(scan.classes)} class folders")
    return [int(i) for i in class_indices]


def _stamp(scan: FolderScan, file: ImageFile) -> str:
    return f"{file.path.relative_to(scan.root)}:{file.size}:{file.mtime_ns}"


def _head(scan: FolderScan, split: str, count: int | None, what: str) -> tuple[ImageFile, ...]:
    files = scan.part(split)
    if count is None:
        return files
    if count < 1 or count > len(files):
        raise ImageFolderError(f"asked for {count} {what} images but {scan.root} has {len(files)} in its "
                               f"{'calibration' if split == 'train' else 'evaluation'} part ({scan.split_text}); "
                               f"ask for 1..{len(files)}")
    return files[:count]


def _cache_path(scan: FolderScan, prep: Preprocessing, part: str, files: Sequence[ImageFile],
                labels: np.ndarray) -> Path:
    """Keyed by the folder, every file's relative path, size and modification time, its label, and the
    preprocessing."""
    digest = hashlib.sha256(f"{_CACHE_FORMAT}\n{scan.root}\n{prep.key()}\n".encode())
    for file, label in zip(files, labels.tolist(), strict=True):
        digest.update(f"{_stamp(scan, file)}:{label}\n".encode())
    return _cache_home() / "decoded" / f"folder-{scan.root.name}-{part}-{digest.hexdigest()[:16]}.npz"


def _decode(files: Sequence[ImageFile], prep: Preprocessing, progress: Progress | None, part: str) -> np.ndarray:
    images = np.empty((len(files), prep.channels, prep.image_size, prep.image_size), dtype=np.uint8)
    for i, file in enumerate(files):
        try:
            images[i] = preprocess_image(file.path, prep)
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
            reason = " ".join(str(err).split()) or type(err).__name__
            raise ImageFolderError(f"{file.path}: cannot be read as an image ({reason}); "
                                   f"remove or replace it") from err
        if progress and (i + 1 == len(files) or (i + 1) % 64 == 0):
            progress(ProgressEvent(Stage(f"decode {part} images"), i + 1, len(files)))
    return images
