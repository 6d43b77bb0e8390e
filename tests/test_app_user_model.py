"""The explorer with the user's own model: a torchvision architecture, its state_dict and an image folder, all made
here (no downloads), opened from the sidebar's second tab. Bad input is one error line naming the value, and the
workbench shown before stays, as it was.

AppTest runs the page in this process, so every test here shares the cached workbench of the good choice: each
opens it again (instantly) and checks what its own action changed. No test needs the built-in default model.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from streamlit.testing.v1 import AppTest

from explorer.panels.chooser import BUILT_IN, USER
from explorer.workbench import open_workbench
from tests.conftest import APP
from tests.helpers import no_failure

torchvision = pytest.importorskip("torchvision")
ARCH = "shufflenet_v2_x0_5"  # grouped and depthwise convolutions, and its tables build in seconds at 32x32
SIZE = 32
CLASSES = ("ant", "bee", "cat")
PER_CLASS = 10  # the folder's seeded split: 8 calibration and 2 evaluation images per class


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """An image folder (random 40x40 RGB images, PNG and JPEG), the architecture's weights, another
    architecture's weights, and an empty folder; every cache in temporary places (never the user's)."""
    root = tmp_path_factory.mktemp("user-model")
    rng = np.random.default_rng(0)
    photos = root / "photos"
    for name in CLASSES:
        (photos / name).mkdir(parents=True)
        for i in range(PER_CLASS):
            pixels = rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(photos / name / f"{i}.{'png' if i % 2 else 'jpg'}")
    torch.manual_seed(0)
    torch.save(torchvision.models.get_model(ARCH, weights=None, num_classes=3).state_dict(), root / "shuffle.pth")
    torch.save(torchvision.models.resnet18(num_classes=3).state_dict(), root / "resnet.pth")
    (root / "empty").mkdir()
    with pytest.MonkeyPatch.context() as patch:
        for key, folder in (("TABCONV_CACHE", "tables"), ("XDG_CACHE_HOME", "xdg"), ("TORCH_HOME", "torch"),
                            ("TABCONV_CHECKPOINTS", "checkpoints"), ("TABCONV_DATA", "data")):
            patch.setenv(key, str(root / folder))
        patch.setenv("TABCONV_EXPLORER_CALIBRATION", "128")  # more than the folder has: capped, and said so
        patch.setenv("TABCONV_EXPLORER_EVAL", "200")
        yield {"photos": photos, "weights": root / "shuffle.pth", "resnet": root / "resnet.pth",
               "empty": root / "empty"}


def _open(files: dict[str, Path]) -> AppTest:
    """The page on the user's model: the second tab's fields filled in before the first run, as a user would."""
    at = AppTest.from_file(str(APP), default_timeout=300)
    for key, value in {"choose_source": USER, "choose_arch": ARCH, "choose_weights": str(files["weights"]),
                       "choose_images": str(files["photos"]), "choose_image_size": SIZE, "choose_k": 16}.items():
        at.session_state[key] = value
    at.run()
    no_failure(at)
    return at


def _press_open(at: AppTest) -> None:
    next(b for b in at.button if b.label == "Open").click().run()


def _metric(at: AppTest, prefix: str) -> str:
    return next(m.value for m in at.metric if m.label.startswith(prefix))


def test_a_state_dict_and_an_image_folder_open_with_metrics(files: dict[str, Path]) -> None:
    at = _open(files)
    spec = at.session_state["spec"]
    assert spec.user is not None and spec.user.arch == ARCH and spec.user.images == str(files["photos"])
    assert _metric(at, "Accuracy (6 images)")  # the baseline and the live card name their image count
    for prefix in ("Retention", "FLOPs, paper", "FLOPs, full", "Storage"):
        assert _metric(at, prefix)
    caption = next(c.value for c in at.caption if c.value.startswith(f"**{ARCH}** on the image folder"))
    assert "**photos**" in caption and "`shuffle.pth` (state_dict)" in caption and "32×32" in caption
    assert "start: every layer tabled" in next(m.value for m in at.markdown
                                               if m.value.startswith("**Current configuration"))
    used = " ".join(i.value for i in at.sidebar.info)
    assert "6 evaluation images are used: the folder's evaluation part has 6 (asked for 200)" in used
    assert "24 calibration images are used: the folder's calibration part has 24 (asked for 128)" in used
    names = [b.label for b in at.download_button]
    assert names == ["Export configuration", "Export model (zip)"]
    assert any(b.key == "run_propagation" for b in at.button)  # a user's heatmap waits for a click
    assert any(m.value.startswith("**4 · The result.**") for m in at.markdown)  # the teaching view


def test_another_tab_changes_nothing_until_open_is_pressed(files: dict[str, Path]) -> None:
    at = _open(files)
    spec = at.session_state["spec"]
    at.session_state["choose_source"] = BUILT_IN
    at.run()
    no_failure(at)
    assert at.session_state["spec"] == spec


@pytest.mark.parametrize("field, value, expected", [
    ("choose_arch", "shufflenet_v9", "unknown architecture 'shufflenet_v9'; did you mean shufflenet_v2"),
    ("choose_images", "empty", "empty: no class subfolders"),
    ("choose_weights", "resnet", f"resnet.pth: the weights do not fit {ARCH}"),
    ("choose_std", "0.2, 0, 0.2", "std must be positive"),
    ("choose_mean", "a, b, c", "Mean 'a, b, c': give 3 numbers"),
])
def test_bad_input_is_one_error_naming_it_and_keeps_the_workbench(files: dict[str, Path], field: str, value: str,
                                                                   expected: str) -> None:
    at = _open(files)
    spec, current = at.session_state["spec"], at.session_state["current_id"]
    at.text_input(key=field).set_value(str(files[value]) if value in files else value)
    _press_open(at)
    assert not at.exception, [e.value for e in at.exception]
    errors = [e.value for e in at.error]
    assert len(errors) == 1 and expected in errors[0], errors
    if field == "choose_weights":  # one line, then the keys that do not fit, as a short list
        first, _, listed = errors[0].partition("\n\n")
        assert f"is **Architecture** = {ARCH} right?" in first and listed.startswith("```\nmissing: "), errors[0]
    assert any("Still showing the model opened before" in i.value for i in at.info)
    assert at.session_state["spec"] == spec and at.session_state["current_id"] == current
    assert _metric(at, "Accuracy (6 images)")


def test_an_uploaded_weights_file_is_named_by_its_own_name(files: dict[str, Path]) -> None:
    at = _open(files)
    at.file_uploader(key="choose_weights_upload").set_value(("mine.pth", b"not weights", "application/octet-stream"))
    _press_open(at)
    assert not at.exception
    errors = [e.value for e in at.error]
    assert len(errors) == 1 and "mine.pth: not a PyTorch weights file" in errors[0], errors
    assert "uploads" not in errors[0] and "**Weights** = w.pth" in errors[0]  # the sidebar's words, not --weights
    at.file_uploader(key="choose_weights_upload").set_value(("trained.pth", files["weights"].read_bytes(),
                                                             "application/octet-stream"))
    _press_open(at)
    no_failure(at)
    assert any("`trained.pth` (state_dict)" in c.value for c in at.caption)
    assert at.session_state["spec"].digest == hashlib.sha256(files["weights"].read_bytes()).hexdigest()


def test_the_page_shows_how_the_session_evaluates_and_the_layers_kept_exact(files: dict[str, Path]) -> None:
    """The library's notes (e.g. a network torch.fx cannot trace) and its untableable layers, set here on the
    shared workbench because the small network has neither."""
    at = _open(files)
    wb = open_workbench(at.session_state["spec"])
    wb.session.notes.append("torch.fx cannot trace this model (x), so every change re-evaluates the whole network")
    wb.structure.exact_only["conv_odd"] = "a reason the library gives"
    try:
        at.run()
        no_failure(at)
        assert any(i.value.startswith("Note: torch.fx cannot trace this model") for i in at.info)
        expander = next(e for e in at.expander if e.label.startswith("1 layer(s) always kept exact"))
        assert "`conv_odd`: a reason the library gives" in expander.markdown[0].value
    finally:
        wb.session.notes.pop()
        del wb.structure.exact_only["conv_odd"]
