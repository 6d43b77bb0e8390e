"""Training and checkpoints: a real (tiny) training run on digits, and every way a checkpoint can be bad."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from tabconv import __version__
from tabconv.data import ImageSet, load_dataset
from tabconv.models import build_model
from tabconv.progress import ProgressEvent, Stage
from tabconv.train import (
    CheckpointError,
    accuracy,
    load_checkpoint,
    save_checkpoint,
    shift_and_flip,
    train_and_save,
    train_model,
    weights_sha256,
)

# A recipe that gets the tiny CNN well above chance on digits in about two seconds.
TINY = {"epochs": 5, "batch_size": 32, "lr": 0.2}
META = {"model": "tiny", "dataset": "digits", "input_shape": [1, 32, 32], "num_classes": 10}


@pytest.fixture(scope="module")
def digits() -> tuple[ImageSet, ImageSet]:
    return load_dataset("digits", "train"), load_dataset("digits", "test")


@pytest.fixture(scope="module")
def tiny(digits: tuple[ImageSet, ImageSet]) -> nn.Module:
    torch.manual_seed(0)
    return train_model(build_model("tiny", 10, 1), digits[0], seed=0, **TINY)


@pytest.fixture
def checkpoint(tiny: nn.Module, tmp_path: Path) -> Path:
    path = tmp_path / "tiny.pt"
    save_checkpoint(path, tiny, META)
    return path


def test_training_learns_digits(tiny: nn.Module, digits: tuple[ImageSet, ImageSet]) -> None:
    assert not tiny.training
    assert accuracy(tiny, digits[1]) > 0.4  # chance is 0.1


def test_training_is_repeatable_and_reports_progress(tiny: nn.Module, digits: tuple[ImageSet, ImageSet]) -> None:
    events: list[ProgressEvent] = []
    torch.manual_seed(0)
    again = train_model(build_model("tiny", 10, 1), digits[0], seed=0, progress=events.append, **TINY)
    assert weights_sha256(again.state_dict()) == weights_sha256(tiny.state_dict())
    steps = len(digits[0]) // TINY["batch_size"]
    assert len(events) == TINY["epochs"] * steps
    assert {e.stage for e in events} == {Stage.TRAIN} and [e.index for e in events] == list(range(1, len(events) + 1))
    assert (events[-1].index, events[-1].total, events[-1].detail) == (
        TINY["epochs"] * steps, TINY["epochs"] * steps, f"epoch {TINY['epochs']}/{TINY['epochs']}")
    assert events[-1].loss < events[0].loss


def test_weights_hash_ignores_order_but_sees_every_change(tiny: nn.Module) -> None:
    state = tiny.state_dict()
    reference = weights_sha256(state)
    assert weights_sha256(dict(reversed(state.items()))) == reference
    changed = {**state, "fc.bias": state["fc.bias"] + 1e-6}
    assert weights_sha256(changed) != reference
    retyped = {**state, "fc.bias": state["fc.bias"].double()}
    assert weights_sha256(retyped) != reference


def test_checkpoint_round_trip_gives_identical_outputs(
    tiny: nn.Module, checkpoint: Path, digits: tuple[ImageSet, ImageSet]
) -> None:
    loaded, meta = load_checkpoint(checkpoint)
    assert not loaded.training
    assert meta["sha256"] == weights_sha256(tiny.state_dict())
    assert meta["library_version"] == __version__ and meta["dataset"] == "digits"
    images = digits[1].batch(slice(0, 64))
    with torch.no_grad():
        assert torch.equal(loaded(images), tiny(images))


def test_missing_checkpoint(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="no such checkpoint file"):
        load_checkpoint(tmp_path / "absent.pt")


def test_corrupted_checkpoint(checkpoint: Path) -> None:
    checkpoint.write_bytes(checkpoint.read_bytes()[:200])
    with pytest.raises(CheckpointError, match="not a PyTorch checkpoint.*python -m tabconv train") as raised:
        load_checkpoint(checkpoint)
    assert str(checkpoint) in str(raised.value)


def test_a_plain_state_dict_is_named_as_such_with_a_way_forward(tiny: nn.Module, tmp_path: Path) -> None:
    path = tmp_path / "plain.pt"
    torch.save(tiny.state_dict(), path)
    with pytest.raises(CheckpointError, match="a plain state_dict.*save_checkpoint"):
        load_checkpoint(path)
    torch.save({"weights": tiny.state_dict()}, path)
    with pytest.raises(CheckpointError, match="not a tabconv checkpoint.*save_checkpoint"):
        load_checkpoint(path)


def test_a_pickled_object_is_refused_without_advising_an_unsafe_load(tiny: nn.Module, tmp_path: Path) -> None:
    path = tmp_path / "whole-model.pt"
    torch.save(tiny, path)  # a whole nn.Module: loading it would run code
    with pytest.raises(CheckpointError, match="safe \\(weights-only\\) load refuses") as raised:
        load_checkpoint(path)
    assert "weights_only=False" not in str(raised.value) and "\n" not in str(raised.value)


def test_tampered_weights_fail_the_hash(checkpoint: Path) -> None:
    payload = torch.load(checkpoint, weights_only=True)
    payload["state_dict"]["fc.bias"] += 1.0
    torch.save(payload, checkpoint)
    with pytest.raises(CheckpointError, match="do not match their recorded sha256"):
        load_checkpoint(checkpoint)


def test_weights_of_another_architecture(checkpoint: Path) -> None:
    payload = torch.load(checkpoint, weights_only=True)
    payload["meta"]["model"] = "nin"
    torch.save(payload, checkpoint)
    with pytest.raises(CheckpointError, match="weights do not fit a 'nin' model"):
        load_checkpoint(checkpoint)


def test_unsupported_version(checkpoint: Path) -> None:
    payload = torch.load(checkpoint, weights_only=True)
    payload["version"] = 99
    torch.save(payload, checkpoint)
    with pytest.raises(CheckpointError, match="version 99 is not supported"):
        load_checkpoint(checkpoint)


def test_meta_must_describe_the_model(tiny: nn.Module, tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="meta lacks input_shape"):
        save_checkpoint(tmp_path / "x.pt", tiny, {"model": "tiny", "num_classes": 10})
    assert not list(tmp_path.iterdir())


def test_train_and_save(tiny: nn.Module, tmp_path: Path, digits: tuple[ImageSet, ImageSet]) -> None:
    out = tmp_path / "models" / "tiny-digits.pt"
    meta = train_and_save("tiny", "digits", out, **TINY, seed=0, device="cpu")
    assert meta["sha256"] == weights_sha256(tiny.state_dict())  # same seed, same weights
    assert meta["test_images"] == 450 and meta["input_shape"] == [1, 32, 32] and meta["epochs"] == 5
    assert meta["augment"] is None and meta["train_seconds"] > 0
    model, loaded_meta = load_checkpoint(out)
    assert loaded_meta == meta
    assert accuracy(model, digits[1]) == meta["test_accuracy"] > 0.4
    assert [path.name for path in out.parent.iterdir()] == ["tiny-digits.pt"]  # no temporary file left


def test_shift_and_flip_crops_the_padded_image_and_mirrors_half() -> None:
    """Each image is a 32x32 window of itself zero-padded by 4 (torchvision's RandomCrop(32, padding=4)), mirrored
    or not; the draws come from the generator alone, so a seeded run repeats."""
    from torchvision.transforms.v2 import functional as TF

    images = torch.randint(1, 256, (64, 3, 32, 32), dtype=torch.uint8)
    out = shift_and_flip(images, torch.Generator().manual_seed(3))
    assert torch.equal(out, shift_and_flip(images, torch.Generator().manual_seed(3)))
    flips = 0
    for image, result in zip(images, out, strict=True):
        padded = TF.pad(image, [4])
        crops = {(dy, dx): padded[:, dy:dy + 32, dx:dx + 32] for dy in range(9) for dx in range(9)}
        windows = {(dy, dx, flip) for (dy, dx), crop in crops.items() for flip in (False, True)
                   if torch.equal(result, TF.horizontal_flip(crop) if flip else crop)}
        assert windows, "not a window of the padded image"
        flips += all(flip for _, _, flip in windows)
    assert 16 < flips < 48  # about half mirrored (64 images)
    assert not torch.equal(out, images)
