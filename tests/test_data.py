"""Dataset registry: real loads of digits, MNIST, Fashion-MNIST and the CIFAR-10 image folders."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tabconv.data import (
    DATASETS,
    DatasetUnavailable,
    ImageSet,
    is_available,
    load_dataset,
    resolve_root,
)


@pytest.fixture(scope="module")
def digits_train() -> ImageSet:
    return load_dataset("digits", "train")


def test_registry_names_and_shapes() -> None:
    assert set(DATASETS) == {"digits", "mnist", "fashion-mnist", "cifar10", "cifar100"}
    assert DATASETS["cifar10"].input_shape == (3, 32, 32)
    assert DATASETS["mnist"].input_shape == (1, 28, 28)
    assert DATASETS["cifar100"].num_classes == 100


def test_unknown_dataset_and_split_are_clear_errors() -> None:
    with pytest.raises(ValueError, match="known datasets: digits, mnist"):
        load_dataset("imagenet")
    with pytest.raises(ValueError, match="unknown split 'val'"):
        load_dataset("digits", "val")


def test_digits_split_sizes_types_and_stratification(digits_train: ImageSet) -> None:
    test = load_dataset("digits", "test")
    assert (len(digits_train), len(test)) == (1347, 450)
    assert digits_train.images.shape == (1347, 1, 32, 32)
    assert digits_train.images.dtype == torch.uint8 and test.labels.dtype == torch.int64
    assert int(digits_train.images.max()) == 255
    in_test = torch.bincount(test.labels, minlength=10).float()
    in_all = in_test + torch.bincount(digits_train.labels, minlength=10)
    assert torch.allclose(in_test / in_all, torch.full((10,), 0.25), atol=0.01)  # stratified


def test_digits_is_deterministic(digits_train: ImageSet) -> None:
    again = load_dataset("digits", "train")
    assert torch.equal(again.images, digits_train.images)
    assert torch.equal(again.labels, digits_train.labels)


def test_digits_constants_are_the_train_statistics(digits_train: ImageSet) -> None:
    pixels = digits_train.images.float() / 255
    assert pixels.mean().item() == pytest.approx(digits_train.info.mean[0], abs=1e-3)
    assert pixels.std().item() == pytest.approx(digits_train.info.std[0], abs=1e-3)
    normalized = digits_train.batch(slice(None))
    assert normalized.dtype == torch.float32
    assert normalized.mean().item() == pytest.approx(0.0, abs=1e-2)
    assert normalized.std().item() == pytest.approx(1.0, abs=1e-2)


def test_batches_cover_the_set_in_order(digits_train: ImageSet) -> None:
    batches = list(digits_train.batches(500))
    assert [len(labels) for _, labels in batches] == [500, 500, 347]
    assert torch.equal(torch.cat([images for images, _ in batches]), digits_train.batch(slice(None)))
    assert torch.equal(torch.cat([labels for _, labels in batches]), digits_train.labels)
    index = torch.tensor([5, 0, 9])
    assert torch.equal(digits_train.batch(index), digits_train.batch(slice(None))[index])


def test_head(digits_train: ImageSet) -> None:
    first = digits_train.head(10)
    assert len(first) == 10 and torch.equal(first.labels, digits_train.labels[:10])
    assert digits_train.head(None) is digits_train
    with pytest.raises(ValueError, match="first 2000 images of digits train, which has 1347"):
        digits_train.head(2000)


def test_skip_leaves_out_the_first_images_and_remembers_where_the_rest_begins(digits_train: ImageSet) -> None:
    rest = digits_train.skip(1000)
    assert len(rest) == 347 and rest.first == 1000 and torch.equal(rest.labels, digits_train.labels[1000:])
    assert rest.head(10).first == 1000 and torch.equal(rest.head(10).images, digits_train.images[1000:1010])
    with pytest.raises(ValueError, match="cannot leave out the first 1347 of the 1347 digits train images"):
        digits_train.skip(1347)


def test_resolve_root_precedence(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("TABCONV_DATA", str(tmp_path / "env"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert resolve_root(tmp_path / "arg") == tmp_path / "arg"
    assert resolve_root(None) == tmp_path / "env"
    monkeypatch.delenv("TABCONV_DATA")
    assert resolve_root(None) == tmp_path / "xdg" / "tabconv" / "data"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert resolve_root(None) == Path.home() / ".cache" / "tabconv" / "data"


def test_missing_files_name_what_is_expected_and_how_to_get_it(tmp_path: Path) -> None:
    assert is_available("digits", tmp_path)
    assert not is_available("mnist", tmp_path)
    with pytest.raises(DatasetUnavailable) as raised:
        load_dataset("mnist", "test", tmp_path, download=False)
    message = str(raised.value)
    assert "MNIST/raw/t10k-images-idx3-ubyte" in message and str(tmp_path) in message
    assert "TABCONV_DATA" in message and "--data-root" in message and "prepare.sh" in message
    assert "\n" not in message


def test_unreadable_files_are_a_clear_error(tmp_path: Path) -> None:
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for prefix in ("train", "t10k"):
        for kind in ("images-idx3", "labels-idx1"):
            (raw / f"{prefix}-{kind}-ubyte").write_bytes(b"not an idx file")
    assert is_available("mnist", tmp_path)
    with pytest.raises(DatasetUnavailable, match="reading failed"):
        load_dataset("mnist", "test", tmp_path, download=False)


def test_mnist_and_fashion_mnist_from_the_prepared_root(data_root: Path) -> None:
    mnist = load_dataset("mnist", "test", data_root, download=False)
    assert mnist.images.shape == (10000, 1, 28, 28) and mnist.images.dtype == torch.uint8
    assert mnist.labels[:5].tolist() == [7, 2, 1, 0, 4]
    assert len(load_dataset("mnist", "train", data_root, download=False)) == 60000
    fashion = load_dataset("fashion-mnist", "test", data_root, download=False)
    assert fashion.images.shape == (10000, 1, 28, 28)
    assert torch.bincount(fashion.labels).tolist() == [1000] * 10
    for name, loaded in (("mnist", mnist), ("fashion-mnist", fashion)):  # what the registry says of them
        assert DATASETS[name].test_images == len(loaded) and len(DATASETS[name].class_names) == 10


def test_cifar10_image_folders_load_balanced_and_cache(
    data_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert is_available("cifar10", data_root)
    first = load_dataset("cifar10", "test", data_root, download=False)
    assert first.images.shape == (10000, 3, 32, 32) and DATASETS["cifar10"].test_images == 10000
    folders = sorted(p.name for p in (data_root / "cifar10-images" / "test").iterdir() if p.is_dir())
    assert list(DATASETS["cifar10"].class_names) == folders  # label k is the k-th class folder
    assert first.head(10).labels.tolist() == list(range(10))
    (cache,) = (tmp_path / "tabconv" / "decoded").glob("*.npz")
    with monkeypatch.context() as patched:
        patched.setattr("tabconv.data._decode_rgb", _no_decoding)
        cached = load_dataset("cifar10", "test", data_root, download=False)
    assert torch.equal(cached.images, first.images) and torch.equal(cached.labels, first.labels)
    cache.write_bytes(b"damaged")
    rebuilt = load_dataset("cifar10", "test", data_root, download=False)
    assert torch.equal(rebuilt.images, first.images)


def _no_decoding(path: Path) -> None:
    raise AssertionError(f"the second load must come from the cache, not from decoding {path}")


def test_static_file_lists_match_torchvision() -> None:
    """The file names known without importing torchvision are the ones its dataset classes read."""
    from torchvision import datasets

    from tabconv.data import _torchvision_files

    for name, cls in (("mnist", datasets.MNIST), ("fashion-mnist", datasets.FashionMNIST)):
        assert _torchvision_files(name) == [f"{cls.__name__}/raw/{prefix}-{kind}-ubyte" for prefix in ("train", "t10k")
                                            for kind in ("images-idx3", "labels-idx1")]
    for name, cls in (("cifar10", datasets.CIFAR10), ("cifar100", datasets.CIFAR100)):
        names = [entry[0] for entry in cls.train_list + cls.test_list] + [cls.meta["filename"]]
        assert _torchvision_files(name) == [f"{cls.base_folder}/{file}" for file in names]


def test_loading_a_decoded_split_does_not_import_torchvision(data_root: Path) -> None:
    """The warm path (decoded cache present) stays free of torchvision's ~2.7 s import."""
    import subprocess
    import sys

    load = f"from tabconv.data import load_dataset; s = load_dataset('mnist', 'test', {str(data_root)!r})\n"
    subprocess.run([sys.executable, "-c", load], check=True)  # decodes (with torchvision) unless cached
    check = ("import sys; from tabconv.models import build_model; build_model('resnet18', 10, 1)\n"
             "assert len(s) == 10000 and 'torchvision' not in sys.modules\n")
    subprocess.run([sys.executable, "-c", load + check], check=True)


def test_the_registry_knows_the_digits_test_split_and_its_class_names() -> None:
    """The explorer's first screen asks for at most the test split's images; the export names the classes."""
    test = load_dataset("digits", "test")
    assert DATASETS["digits"].test_images == len(test) == 450
    assert DATASETS["digits"].class_names == tuple("0123456789") and int(test.labels.max()) == 9
