"""Sidebar: what to explore (model or checkpoint file, dataset, image counts, calibration, default C/K).

It is one form, because every choice except the defaults costs a new Session; the page opens on the
form's initial values (ResNet-18 on digits), so the first screen needs no set-up.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

import streamlit as st
from streamlit.runtime.uploaded_file_manager import UploadedFile

from tabconv import zoo
from tabconv.config import CALIBRATION_MODES, Calibration
from tabconv.data import DATASETS, is_available, resolve_root
from tabconv.models import MODEL_DESCRIPTIONS
from tabconv.settings import ENCODERS, LUT_DTYPES, LayerSetting, SettingError

MODEL_NAMES = {"resnet18": "ResNet-18", "resnet34": "ResNet-34", "nin": "NIN", "tiny": "tiny CNN (for tests)"}
CHECKPOINT_UPLOAD_MB = 200  # a ResNet-34 checkpoint is about 85 MB


def default_images(variable: str, fallback: int) -> int:
    """Image counts of the first screen; the tests lower them through the environment."""
    return int(os.environ.get(variable) or fallback)


@dataclass(frozen=True)
class Choice:
    """The form's submitted values: where the checkpoint comes from and how to calibrate and evaluate it."""

    model: str
    dataset: str
    checkpoint: str | None  # a file the user uploaded or named (overrides model and dataset)
    data_root: str | None
    calibration: Calibration
    eval_images: int
    defaults: LayerSetting | None  # None when the C/K/encoder given do not make a valid setting
    defaults_error: str = ""

    @property
    def zoo_path(self) -> Path:
        return zoo.checkpoint_path(self.model, self.dataset)


def sidebar() -> Choice:
    """Render the form and return the values it was last submitted with (its initial values at first)."""
    with st.sidebar:
        st.header("Model and data")
        with st.form("chooser", border=False):
            choice = _form()
        _dataset_note(choice)
    return choice


def _form() -> Choice:
    model = st.selectbox("Model", list(MODEL_NAMES), format_func=MODEL_NAMES.get, key="choose_model",
                         help="\n\n".join(f"**{MODEL_NAMES[m]}**: {MODEL_DESCRIPTIONS[m]}" for m in MODEL_NAMES))
    root = st.session_state.get("choose_root") or None
    dataset = st.selectbox("Dataset", list(DATASETS), key="choose_dataset",
                           format_func=lambda name: name if is_available(name, root) else f"{name} (not on disk)")
    with st.expander("…or a checkpoint file"):
        upload = st.file_uploader("Upload a tabconv checkpoint (.pt)", type=["pt", "pth"], key="choose_upload",
                                  max_upload_size=CHECKPOINT_UPLOAD_MB,
                                  help="Loaded with torch.load(weights_only=True): no code in the file runs.")
        named = st.text_input("or its path on this machine", key="choose_path", placeholder="checkpoints/x.pt")
    st.text_input("Data root", key="choose_root", placeholder=str(resolve_root(None)),
                  help="Where MNIST, Fashion-MNIST and CIFAR files live (default: $TABCONV_DATA or the user cache).")
    st.subheader("Calibration and evaluation")
    left, right = st.columns(2)
    calibration = left.number_input("Calibration images", 1, 60000, key="choose_calibration",
                                    value=default_images("TABCONV_EXPLORER_CALIBRATION", 512),
                                    help="The first N training images: their activations fit the prototypes.")
    evaluation = right.number_input("Evaluation images", 1, 10000, key="choose_eval",
                                    value=default_images("TABCONV_EXPLORER_EVAL", 1000),
                                    help="The first N test images (capped at the test split's size).")
    mode = st.selectbox("Calibration mode", CALIBRATION_MODES, key="choose_mode",
                        help="independent: every layer learns from exact activations (tables serve any mask). "
                        "sequential (the paper's): each layer learns from the approximated upstream network, "
                        "so changing a layer rebuilds the tables after it.")
    st.subheader("Default table setting")
    left, right = st.columns(2)
    codebooks = left.number_input("C (codebooks)", 1, 256, 8, key="choose_c")
    centroids = right.number_input("K (prototypes)", 2, 65536, 64, key="choose_k")
    left, right = st.columns(2)
    encoder = left.selectbox("Encoder", ENCODERS, key="choose_encoder",
                             help="exhaustive: nearest prototype (N·K·D multiply-adds). tree: MADDNESS-style "
                             "hash tree, log2(K) comparisons per subspace (K must be a power of two).")
    lut = right.selectbox("Table dtype", LUT_DTYPES, key="choose_lut")
    st.form_submit_button("Open", type="primary", width="stretch")
    try:
        defaults, error = LayerSetting("table", int(codebooks), int(centroids), encoder, lut), ""
    except SettingError as exc:
        defaults, error = None, str(exc)
    return Choice(model, dataset, _checkpoint_file(upload, named), root, Calibration(int(calibration), mode),
                  int(evaluation), defaults, error)


def _checkpoint_file(upload: UploadedFile | None, named: str) -> str | None:
    """A path for the chosen file: an upload is stored once under checkpoints/uploads/ by content hash."""
    if upload is not None:
        data = upload.getvalue()
        path = zoo.checkpoint_dir() / "uploads" / f"{hashlib.sha256(data).hexdigest()[:16]}.pt"
        if not path.is_file():
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(".part")
            tmp.write_bytes(data)
            tmp.replace(path)
        return str(path)
    return str(Path(named).expanduser()) if named.strip() else None


def _dataset_note(choice: Choice) -> None:
    info = DATASETS[choice.dataset]
    st.caption(f"**{info.name}**: {info.description}.")
    if not is_available(choice.dataset, choice.data_root):
        st.caption(f"Not on disk. How to get it: {info.how_to_get}.")
