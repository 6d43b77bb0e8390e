"""Sidebar: what to explore (model or checkpoint file, dataset, image counts, calibration and table
fitting, default C/K or sub-vector length).

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

from explorer.editing import C_FROM, C_FROM_HELP, table_setting
from tabconv import zoo
from tabconv.atomic import atomic_write_bytes
from tabconv.config import CALIBRATION_MODES, FIT_METHODS, Calibration
from tabconv.data import DATASETS, is_available, resolve_root
from tabconv.models import MODEL_DESCRIPTIONS, MODEL_NAMES
from tabconv.settings import C_LIMITS, ENCODERS, K_LIMITS, LUT_DTYPES, S_LIMITS, LayerSetting, SettingError

MODE_HELP = ("**independent**: every layer learns from exact activations, so its tables serve any mask and a "
             "toggle rebuilds nothing: interactive. **sequential** (the paper's): each layer learns from the "
             "approximated upstream network, so changing a layer rebuilds every table after it. With "
             "least-squares fitting that is slow (about a minute for ResNet-18 per toggle): it suits choosing a "
             "configuration first (e.g. in independent mode), then evaluating it sequentially.")
FIT_HELP = ("**kmeans**: prototypes × weights (the paper's tables). **least-squares**: the tables are refit to "
            "the exact layer output; with sequential calibration each layer's tables then correct the error it "
            "receives from the layers before it.")
RIDGE_HELP = ("Least-squares (and classifier refit) pull toward the k-means tables, in units of the mean bucket "
              "size: larger = closer to k-means. Not used by plain k-means fitting.")
REFIT_HELP = ("Before tabling the classifier, refit its weights by least squares so that the tabled network's "
              "features give the exact logits (the reference's step). Its tables then depend on every upstream "
              "choice, like sequential calibration.")

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
    checkpoint_label: str = ""  # how messages name the checkpoint: an upload's own file name, not where it is kept

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
    left, right = st.columns(2)
    mode = left.selectbox("Calibration mode", CALIBRATION_MODES, key="choose_mode", help=MODE_HELP)
    fit = right.selectbox("Table fitting", FIT_METHODS, key="choose_fit", help=FIT_HELP)
    left, right = st.columns(2, vertical_alignment="bottom")
    ridge = left.number_input("Ridge (least-squares)", 1e-6, 1e6, float(Calibration.ridge), 0.01, format="%g",
                              key="choose_ridge", help=RIDGE_HELP)
    refit = right.checkbox("Refit classifier to exact logits", key="choose_refit", help=REFIT_HELP)
    st.subheader("Default table setting")
    c_from = st.radio("Codebooks", C_FROM, horizontal=True, key="choose_c_from", help=C_FROM_HELP)
    left, middle, right = st.columns(3)
    codebooks = left.number_input("C (codebooks)", *C_LIMITS, 8, key="choose_c", help="With 'C per layer'.")
    subvector = middle.number_input("S (sub-vector)", *S_LIMITS, 9, key="choose_s",
                                    help="With 'sub-vector length S': each layer gets C = ⌈D / S⌉ (4, 8, 9, 16 …).")
    centroids = right.number_input("K (prototypes)", *K_LIMITS, 64, key="choose_k")
    left, right = st.columns(2)
    encoder = left.selectbox("Encoder", ENCODERS, key="choose_encoder",
                             help="exhaustive: nearest prototype (N·K·D multiply-adds). tree: MADDNESS-style "
                             "hash tree, log2(K) comparisons per subspace (K must be a power of two).")
    lut = right.selectbox("Table dtype", LUT_DTYPES, key="choose_lut")
    st.form_submit_button("Open", type="primary", width="stretch")
    try:
        defaults, error = table_setting(c_from, codebooks, subvector, centroids, encoder, lut), ""
    except SettingError as exc:
        defaults, error = None, str(exc)
    return Choice(model, dataset, _checkpoint_file(upload, named), root,
                  _calibration(int(calibration), mode, fit, float(ridge), bool(refit)), int(evaluation), defaults,
                  error, upload.name if upload is not None else "")


def _calibration(images: int, mode: str, fit: str, ridge: float, refit: bool) -> Calibration:
    """The form's calibration; the ridge only where it is used, so a ridge edit under k-means keeps the session."""
    uses_ridge = fit == "least-squares" or refit
    return Calibration(images, mode, fit=fit, ridge=ridge if uses_ridge else Calibration.ridge,
                       refit_classifier=refit)


def _checkpoint_file(upload: UploadedFile | None, named: str) -> str | None:
    """A path for the chosen file: an upload is stored once under checkpoints/uploads/ by content hash."""
    if upload is not None:
        data = upload.getvalue()
        path = zoo.checkpoint_dir() / "uploads" / f"{hashlib.sha256(data).hexdigest()[:16]}.pt"
        if not path.is_file():
            atomic_write_bytes(path, data)
        return str(path)
    return str(Path(named).expanduser()) if named.strip() else None


def _dataset_note(choice: Choice) -> None:
    calibration = choice.calibration
    if (calibration.mode, calibration.fit) == ("sequential", "least-squares"):
        st.caption("Sequential calibration with least-squares tables: every toggle rebuilds the tables after the "
                   "layer it changes (slow). Choose a configuration in independent mode, then evaluate it here.")
    info = DATASETS[choice.dataset]
    st.caption(f"**{info.name}**: {info.description}.")
    if not is_available(choice.dataset, choice.data_root):
        st.caption(f"Not on disk. How to get it: {info.how_to_get}.")


def used_counts(choice: Choice, calibration_images: int, eval_images: int) -> None:
    """Under the form: the image counts really used, where a split is smaller than the count asked for."""
    notes = [f"{used} {what} images are used: the {choice_split} split has {used} (asked for {asked})."
             for what, choice_split, asked, used in (
                 ("evaluation", "test", choice.eval_images, eval_images),
                 ("calibration", choice.calibration.split, choice.calibration.images, calibration_images))
             if used < asked]
    if notes:
        st.sidebar.info(" ".join(notes))
