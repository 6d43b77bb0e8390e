"""Shared fixtures: the offline datasets laid out once per test session."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

# The checkout sits beside shared/ on developer machines and in CI: <parent>/main, <parent>/shared.
SHARED_DATASETS = Path(__file__).resolve().parents[2] / "shared" / "datasets"


@pytest.fixture(scope="session")
def data_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A torchvision data root with MNIST, Fashion-MNIST and the CIFAR-10 image folders (no network)."""
    prepare = SHARED_DATASETS / "prepare.sh"
    if not prepare.is_file():
        pytest.skip(f"offline datasets not found at {SHARED_DATASETS} (expected beside the checkout)")
    root = tmp_path_factory.mktemp("data")
    subprocess.run(["bash", str(prepare), str(root)], check=True, capture_output=True)
    return root


@pytest.fixture(scope="session")
def resnet18_digits(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """ResNet-18 trained on the embedded digits once per test session (the explorer's default model)."""
    from tabconv.train import train_and_save

    path = tmp_path_factory.mktemp("checkpoints") / "resnet18-digits.pt"
    train_and_save("resnet18", "digits", path)
    return path
