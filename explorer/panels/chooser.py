"""Sidebar: what to explore (a built-in model or checkpoint file and dataset, or the user's own torchvision
architecture, weights file and image folder), image counts, calibration and table fitting, default C/K or
sub-vector length.

It is one form, because every choice except the defaults costs a new Session; the page opens on the
form's initial values (ResNet-18 on digits), so the first screen needs no set-up. The two model sources are
two tabs of the form: the tab shown when Open is pressed is the one opened, so a look at the other tab
changes nothing.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import streamlit as st
from streamlit.runtime.uploaded_file_manager import UploadedFile

from explorer.editing import C_FROM, C_FROM_HELP, table_setting
from explorer.workbench import Spec
from tabconv import zoo
from tabconv.config import CALIBRATION_MODES, FIT_METHODS, Calibration
from tabconv.data import DATASETS, is_available, resolve_root
from tabconv.models import MODEL_DESCRIPTIONS, MODEL_NAMES
from tabconv.settings import C_LIMITS, ENCODERS, K_LIMITS, LUT_DTYPES, S_LIMITS, LayerSetting, SettingError
from tabconv.userload import channel_values

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
WEIGHTS_UPLOAD_MB = 1024  # torchvision's largest classification weights (ViT-H/14) are about 2.4 GB; VGG-16: 528 MB
BUILT_IN, USER = "Built-in model", "Your torchvision model"
ARCH_HELP = ("Any classification model of torchvision.models by its builder's name (resnet50, mobilenet_v2, "
             "mobilenet_v3_small, efficientnet_b0, vgg11_bn, densenet121, regnet_x_400mf, convnext_tiny, "
             "shufflenet_v2_x0_5, …) or tabconv's own (resnet18, resnet34, nin, tiny). A misspelt name is answered "
             "with the closest ones.")
WEIGHTS_HELP = ("A file saved with torch.save(model.state_dict(), 'w.pth') (also a {'state_dict': …} wrapper or a "
                "tabconv checkpoint), loaded with weights_only=True: no code in it runs. Or a torchvision weight "
                "name such as IMAGENET1K_V1, which also sets the image size and normalisation (downloaded once, "
                "needs internet). Empty: random weights (seeded), useful for timing only.")
FOLDER_HELP = ("A folder on this machine: DIR/<class>/*.jpg|png (a fixed, seeded split per class: 80% calibration, "
               "20% evaluation), or DIR/train/<class>/… and DIR/val/<class>/…. One subfolder per class the model "
               "predicts, in the order it numbers them (sorted names). Decoded images are cached.")


def default_images(variable: str, fallback: int) -> int:
    """Image counts of the first screen; the tests lower them through the environment."""
    return int(os.environ.get(variable) or fallback)


@dataclass(frozen=True)
class UserChoice:
    """The user's own model as the form gives it; the library checks every part when it is opened."""

    arch: str
    weights: str | None  # a file (an upload's stored copy), or a torchvision weight name; None: random weights
    images: str  # the image folder
    num_classes: int | None = None
    image_size: int | None = None
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    weights_label: str = ""  # how messages name an uploaded weights file: its own name, not where it is kept
    error: str = ""  # a field the form could not read (mean or std): shown instead of opening anything


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
    user: UserChoice | None = None  # the user's own model (the form's second tab) instead of model and dataset
    submitted: bool = field(default=False, compare=False)  # Open was pressed for this run

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
    built_in, own = st.tabs([BUILT_IN, USER], key="choose_source", on_change="rerun")
    with built_in:
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
                      help="Where MNIST, Fashion-MNIST and CIFAR files live (default: $TABCONV_DATA or the user "
                           "cache).")
    with own:
        user = _user_fields()
    st.subheader("Calibration and evaluation")
    left, right = st.columns(2)
    calibration = left.number_input("Calibration images", 1, 60000, key="choose_calibration",
                                    value=default_images("TABCONV_EXPLORER_CALIBRATION", 512),
                                    help="The first N training images: their activations fit the prototypes.")
    evaluation = right.number_input("Evaluation images", 1, 10000, key="choose_eval",
                                    value=min(default_images("TABCONV_EXPLORER_EVAL", 1000),
                                              DATASETS[dataset].test_images or 10000),
                                    help="The first N test images (capped at the test split's size).")
    mode = st.selectbox("Calibration mode", CALIBRATION_MODES, key="choose_mode", help=MODE_HELP)
    fit = st.selectbox("Table fitting", FIT_METHODS, key="choose_fit", help=FIT_HELP)
    ridge = st.number_input("Ridge (least-squares)", 1e-6, 1e6, float(Calibration.ridge), 0.01, format="%g",
                            key="choose_ridge", help=RIDGE_HELP)
    refit = st.checkbox("Refit classifier", key="choose_refit", help=REFIT_HELP)
    st.subheader("Default table setting")
    c_from = st.radio("Codebooks", C_FROM, horizontal=True, key="choose_c_from", help=C_FROM_HELP)
    left, right = st.columns(2)  # two to a row: three cut their labels in the sidebar
    codebooks = left.number_input("C (codebooks)", *C_LIMITS, 8, key="choose_c", help="With 'C per layer'.")
    subvector = right.number_input("S (sub-vector)", *S_LIMITS, 9, key="choose_s",
                                   help="With 'sub-vector length S': each layer gets C = ⌈D / S⌉ (4, 8, 9, 16 …).")
    left, right = st.columns(2)
    centroids = left.number_input("K (prototypes)", *K_LIMITS, 64, key="choose_k")
    lut = right.selectbox("Table dtype", LUT_DTYPES, key="choose_lut")
    encoder = st.selectbox("Encoder", ENCODERS, key="choose_encoder",
                           help="exhaustive: nearest prototype (N·K·D multiply-adds). tree: MADDNESS-style "
                           "hash tree, log2(K) comparisons per subspace (K must be a power of two).")
    submitted = st.form_submit_button("Open", type="primary", width="stretch")
    try:
        defaults, error = table_setting(c_from, codebooks, subvector, centroids, encoder, lut), ""
    except SettingError as exc:
        defaults, error = None, str(exc)
    return Choice(model, dataset, _checkpoint_file(upload, named), root,
                  _calibration(int(calibration), mode, fit, float(ridge), bool(refit)), int(evaluation), defaults,
                  error, upload.name if upload is not None else "", user if _source(submitted) == USER else None,
                  submitted)


def _source(submitted: bool) -> str:
    """The tab opened: the one shown when Open was last pressed (at first, the one shown: the built-in one)."""
    if submitted or st.session_state.get("opened_source") is None:
        st.session_state.opened_source = st.session_state.get("choose_source") or BUILT_IN
    return st.session_state.opened_source


def _user_fields() -> UserChoice:
    """The second tab: architecture, weights, image folder and optional preprocessing, as typed (the library
    judges them when Open is pressed)."""
    arch = st.text_input("Architecture", key="choose_arch", placeholder="mobilenet_v2", help=ARCH_HELP)
    named = st.text_input("Weights: a file on this machine, or a torchvision weight name", key="choose_weights",
                          placeholder="w.pth, or IMAGENET1K_V1; empty: random weights", help=WEIGHTS_HELP)
    upload = st.file_uploader("or upload a weights file", type=["pth", "pt", "bin", "ckpt"],
                              key="choose_weights_upload", max_upload_size=WEIGHTS_UPLOAD_MB,
                              help="A state_dict file, loaded with weights_only=True: no code in it runs.")
    images = st.text_input("Image folder", key="choose_images", placeholder="/data/photos", help=FOLDER_HELP)
    left, right = st.columns(2)
    classes = left.number_input("Classes", 1, 100_000, None, key="choose_classes", placeholder="the folder's",
                                help="How many classes the model predicts. Empty: the weights' count, else the "
                                     "folder's (they must agree).")
    size = right.number_input("Image size", 1, 4096, None, key="choose_image_size", placeholder="224",
                              help="Side of the square input: images are resized (shorter side) and centre-cropped "
                                   "to it. Empty: 224, or the weight name's. Smaller is faster.")
    left, right = st.columns(2)
    mean = left.text_input("Mean (R, G, B)", key="choose_mean", placeholder="ImageNet's",
                           help="The normalisation the weights were trained with. Empty: ImageNet's "
                                "(0.485, 0.456, 0.406), or the weight name's.")
    std = right.text_input("Std (R, G, B)", key="choose_std", placeholder="ImageNet's",
                           help="Empty: ImageNet's (0.229, 0.224, 0.225), or the weight name's.")
    try:
        mean_values, std_values, error = channel_values(mean, "Mean"), channel_values(std, "Std"), ""
    except ValueError as exc:
        mean_values, std_values, error = None, None, str(exc)
    weights = _weights_file(upload) if upload is not None else (named.strip() or None)
    return UserChoice(arch.strip(), weights, images.strip(), None if classes is None else int(classes),
                      None if size is None else int(size), mean_values, std_values,
                      upload.name if upload is not None else "", error)


def _weights_file(upload: UploadedFile) -> str:
    """Where an uploaded weights file is kept: checkpoints/uploads/<content hash>/<its own name>, written once
    (remembered per upload, so that a rerun does not hash a large file again)."""
    stored = st.session_state.setdefault("weights_uploads", {})
    if upload.file_id not in stored:
        stored[upload.file_id] = str(zoo.store_upload(upload.getvalue(), upload.name))
    return stored[upload.file_id]


def _calibration(images: int, mode: str, fit: str, ridge: float, refit: bool) -> Calibration:
    """The form's calibration; the ridge only where it is used, so a ridge edit under k-means keeps the session."""
    uses_ridge = fit == "least-squares" or refit
    return Calibration(images, mode, fit=fit, ridge=ridge if uses_ridge else Calibration.ridge,
                       refit_classifier=refit)


def _checkpoint_file(upload: UploadedFile | None, named: str) -> str | None:
    """A path for the chosen file: an upload is stored once under checkpoints/uploads/ by content hash."""
    if upload is not None:
        return str(zoo.store_upload(upload.getvalue(), upload.name))
    return str(Path(named).expanduser()) if named.strip() else None


def _dataset_note(choice: Choice) -> None:
    calibration = choice.calibration
    if (calibration.mode, calibration.fit) == ("sequential", "least-squares"):
        st.caption("Sequential calibration with least-squares tables: every toggle rebuilds the tables after the "
                   "layer it changes (slow). Choose a configuration in independent mode, then evaluate it here.")
    if choice.user is not None:
        if choice.user.weights is None:
            st.caption("No weights given: random weights (seeded), so accuracy is at chance level; useful for "
                       "timing and for the cost of tables, not for their accuracy.")
        return
    info = DATASETS[choice.dataset]
    st.caption(f"**{info.name}**: {info.description}.")
    if not is_available(choice.dataset, choice.data_root):
        st.caption(f"Not on disk. How to get it: {info.how_to_get}.")


def used_counts(spec: Spec, calibration_images: int, eval_images: int) -> None:
    """Under the form: the image counts really used by the workbench shown, where a split (or a part of an image
    folder) is smaller than the count asked for."""
    split = spec.calibration.split
    if spec.user is not None:
        parts = ("the folder's evaluation part",
                 "the folder's calibration part" if split == "train" else "the folder's evaluation part")
    else:
        parts = ("the test split", f"the {split} split")
    notes = [f"{used} {what} images are used: {part} has {used} (asked for {asked})."
             for what, part, asked, used in (
                 ("evaluation", parts[0], spec.eval_images, eval_images),
                 ("calibration", parts[1], spec.calibration.images, calibration_images))
             if used < asked]
    if notes:
        st.sidebar.info(" ".join(notes))
