"""Shared fixtures: the offline datasets and the explorer's environment, each set up once per test session."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

APP = Path(__file__).resolve().parents[1] / "explorer" / "app.py"
# The checkout sits beside shared/ on developer machines and in CI: <parent>/main, <parent>/shared.
SHARED_DATASETS = Path(__file__).resolve().parents[2] / "shared" / "datasets"


@pytest.fixture(autouse=True)
def _kernel_default_per_test():
    """A command's --kernel sets the process's default: each test starts from $TABCONV_KERNEL again."""
    from tabconv import native

    yield
    native.use_kernel(None)


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


@pytest.fixture(scope="session")
def explorer_env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """Environment for the explorer's tests: its own checkpoint and table-cache folders and small image counts.

    The default checkpoint (ResNet-18 on digits) is trained once per test session, or copied from the
    developer's checkpoints/ when one is there already.
    """
    from tabconv import zoo

    root = tmp_path_factory.mktemp("explorer")
    checkpoints = root / "checkpoints"
    existing = zoo.checkpoint_path(zoo.DEFAULT_MODEL, zoo.DEFAULT_DATASET)
    target = zoo.checkpoint_path(zoo.DEFAULT_MODEL, zoo.DEFAULT_DATASET, root=checkpoints)
    if existing.is_file():
        checkpoints.mkdir()
        shutil.copyfile(existing, target)
    else:
        zoo.ensure_checkpoint(zoo.DEFAULT_MODEL, zoo.DEFAULT_DATASET, root=checkpoints)
    return {"TABCONV_CHECKPOINTS": str(checkpoints), "TABCONV_CACHE": str(root / "tables"),
            "TABCONV_DATA": str(root / "data"), "TABCONV_EXPLORER_CALIBRATION": "128", "TABCONV_EXPLORER_EVAL": "200"}


@pytest.fixture
def app(explorer_env: dict[str, str], monkeypatch: pytest.MonkeyPatch):
    """The explorer's page after its first run on the default model (an AppTest), with nothing failed."""
    from streamlit.testing.v1 import AppTest

    from tests.helpers import no_failure

    for key, value in explorer_env.items():
        monkeypatch.setenv(key, value)
    at = AppTest.from_file(str(APP), default_timeout=900)
    at.run()
    no_failure(at)
    return at
