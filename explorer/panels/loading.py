"""From the sidebar's choice to a ready workbench: train a missing checkpoint (or read the user's architecture,
weights and image folder), open the Session, and evaluate the starting configuration (every layer tabled), each
step with its progress."""

from __future__ import annotations

import re
from pathlib import Path

import streamlit as st

from explorer import actions, state, turns
from explorer.panels.chooser import BUILT_IN, Choice, UserChoice
from explorer.progress import ProgressBar
from explorer.turns import Cancelled
from explorer.workbench import Spec, UserSource, Workbench, file_digest, folder_stamp, is_open, open_workbench
from tabconv import zoo
from tabconv.config import ConfigError
from tabconv.data import DatasetUnavailable, is_available, load_dataset
from tabconv.inputs import Ask, Input, InputError
from tabconv.models import MODEL_NAMES
from tabconv.train import DEFAULT_EPOCHS, CheckpointError

GROUP_WIDGETS = ("group_c_from", "group_c", "group_s", "group_k", "group_encoder", "group_lut")
USER_ERRORS = (CheckpointError, ConfigError, DatasetUnavailable, ValueError, OSError)
# A user's network may also fail to run on the images given (too small an image size for its pooling, say):
# torch says why in a RuntimeError, which the page shows like any other reason.
USER_MODEL_ERRORS = (*USER_ERRORS, RuntimeError)
# The sidebar's name for each input the library's errors ask for.
FIELDS = {Input.ARCH: "Architecture", Input.WEIGHTS: "Weights", Input.IMAGES: "Image folder",
          Input.NUM_CLASSES: "Classes", Input.IMAGE_SIZE: "Image size", Input.MEAN: "Mean", Input.STD: "Std",
          Input.CHECKPOINT: f"the {BUILT_IN} tab's checkpoint file", Input.DATA_ROOT: "Data root"}
MARKDOWN = re.compile(r"([\\`*<>$\[\]])")  # characters st.error's markdown would take as formatting


class _Unavailable(Exception):
    """The choice cannot be opened: `error` says why (None: the page already says what to do, e.g. train)."""

    def __init__(self, error: str | None = None) -> None:
        super().__init__(error)
        self.error = error


def open_choice(choice: Choice) -> Workbench:
    """The workbench of the choice. When it cannot be had, the page says why and keeps the workbench it showed
    before (nothing of that work is lost); with none before, the page stops there. While a workbench is shown, a
    choice that failed is not tried again on every rerun, only when Open is pressed again."""
    try:
        if st.session_state.spec is not None and choice == st.session_state.open_failed and not choice.submitted:
            raise _Unavailable
        wb = _open_choice(choice)
    except _Unavailable as exc:
        if exc.error is not None:
            st.session_state.open_failed = choice
        return _previous(exc.error, choice)
    st.session_state.open_failed = st.session_state.open_error = None
    return wb


def _open_choice(choice: Choice) -> Workbench:
    if choice.user is not None:
        return _open_user(choice.user, choice)
    path = _checkpoint(choice)
    spec = Spec(str(path), file_digest(str(path)), choice.calibration, choice.eval_images, choice.data_root)
    try:
        with st.spinner(f"Loading {path.name} and evaluating the exact model (once per launch)…"):
            return open_workbench(spec)
    except USER_ERRORS as exc:
        message = str(exc).replace(str(path), choice.checkpoint_label) if choice.checkpoint_label else str(exc)
        raise _Unavailable(f"Cannot open this checkpoint: {message}") from exc


def _open_user(user: UserChoice, choice: Choice) -> Workbench:
    """The user's own model, with progress while its images are decoded and the exact model evaluated (once per
    spec); whatever the library finds wrong is its one line of error."""
    problem = user.error or _missing(user)
    if problem:
        raise _Unavailable(problem)
    spec = _user_spec(user, choice)
    try:
        return open_workbench(spec) if is_open(spec) else _opening(spec, user)
    except USER_MODEL_ERRORS as exc:
        raise _Unavailable(f"Cannot open this model: {_message(exc, user)}") from exc


def _missing(user: UserChoice) -> str:
    """What the form must have before anything is opened (weights may be empty: random ones)."""
    if not user.arch:
        return "Your torchvision model: give an architecture name in the sidebar (e.g. mobilenet_v2, resnet50)."
    if not user.images:
        return ("Your torchvision model: give an image folder in the sidebar (one subfolder of images per class, "
                "or train and val subfolders of them).")
    return ""


def _user_spec(user: UserChoice, choice: Choice) -> Spec:
    """What the user's Session depends on: a weights file by its content, a weight name by its name, the folder by
    its path and a fingerprint of its listing, and every preprocessing and image-count option."""
    file = Path(user.weights).expanduser() if user.weights else None
    digest = file_digest(str(file)) if file is not None and file.is_file() else (user.weights or "random")
    source = UserSource(user.arch, user.weights, user.images, folder_stamp(user.images), user.num_classes,
                        user.image_size, user.mean, user.std)
    return Spec("", digest, choice.calibration, choice.eval_images, None, source)


def _opening(spec: Spec, user: UserChoice) -> Workbench:
    holder = st.empty()
    with holder.status(f"Opening {user.arch} on the images of {Path(user.images).name}: decoding them and "
                       "evaluating the exact model (once; decoded images are cached)", expanded=True) as status:
        try:
            with ProgressBar("Opening") as bar:
                wb = open_workbench(spec, bar)
        except BaseException:
            holder.empty()  # the error says why; a failed progress box would only repeat it
            raise
        status.update(label=f"Opened {user.arch} on {len(wb.session.eval_set)} evaluation images", state="complete",
                      expanded=False)
    return wb


def _message(exc: BaseException, user: UserChoice) -> str:
    """The library's message for the page: an upload named by its own file name, the sidebar's field names where
    the library asks for an input, and lines of data (wrong weights' keys) under the line, as code."""
    def text(part: str) -> str:
        if user.weights_label and user.weights:
            part = part.replace(user.weights, user.weights_label)
        return _escaped(part)

    if isinstance(exc, InputError):
        first, rest = exc.worded(_field, text), exc.details.splitlines()
    else:
        first, *rest = (str(exc).strip() or type(exc).__name__).splitlines()
        first = text(first)
    return first + ("\n\n```\n" + "\n".join(line.strip() for line in rest) + "\n```" if rest else "")


def _field(ask: Ask) -> str:
    """An input by the sidebar's name, with the value to give it (a checkpoint's path is the tab's own)."""
    name = f"**{FIELDS[ask.input]}**"
    if ask.value is None or ask.input is Input.CHECKPOINT:
        return name
    return f"{name} = {_escaped(ask.value)}"


def _escaped(text: str) -> str:
    return MARKDOWN.sub(r"\\\1", text)


def _previous(error: str | None, choice: Choice) -> Workbench:
    """The workbench shown before; the error pinned where the workbench shows its messages until another action
    succeeds (state.show_notice), and a line under the sidebar's form while its choice is the one that failed."""
    spec = st.session_state.spec
    if spec is None:
        if error:
            st.error(error)
        st.stop()
    if error:
        st.session_state.open_error = error
    elif choice != st.session_state.open_failed:  # e.g. a checkpoint to train first: what to do is on the page
        st.info(state.STILL_SHOWING)
    if choice == st.session_state.open_failed:
        st.sidebar.caption("The page shows the model opened before: this choice could not be opened. Press Open "
                           "to try it again.")
    return open_workbench(spec)


def start(wb: Workbench, choice: Choice) -> None:
    """A new Session or new default setting starts from 'every layer tabled', next to the baseline."""
    if st.session_state.spec != wb.spec:
        state.reset_view()
        st.session_state.spec = wb.spec
    if choice.defaults is None:
        st.sidebar.error(f"Default table setting: {choice.defaults_error}")
    elif choice.defaults != st.session_state.defaults:
        st.session_state.defaults = choice.defaults
        st.session_state.current_id = None
        for key in GROUP_WIDGETS:  # the group controls start again from the new defaults
            st.session_state.pop(key, None)
    if st.session_state.current_id is not None:
        return
    with st.status("Building the tables of every layer (first time only: later launches read them from the cache)",
                   expanded=True) as status:
        metrics = actions.evaluate(wb, wb.session.uniform(st.session_state.defaults), "start: every layer tabled",
                                   title="Tables")
        status.update(label="Tables ready", state="complete" if metrics else "error", expanded=metrics is None)
    if metrics is None:
        state.show_to(wb.session.baseline)
    st.session_state.previous_id = wb.session.baseline.id


def _checkpoint(choice: Choice) -> Path:
    """The checkpoint file to open: named or uploaded, else the zoo's, trained here when missing."""
    if choice.checkpoint:
        path = Path(choice.checkpoint)
        if not path.is_file():
            st.error(f"{path}: no such checkpoint file")
            raise _Unavailable
        return path
    problem = _dataset_problem(choice.dataset, choice.data_root)
    if problem:
        raise _Unavailable(problem)
    path = choice.zoo_path
    if path.is_file():
        return path
    name = f"{MODEL_NAMES[choice.model]} on {choice.dataset}"
    is_default = (choice.model, choice.dataset) == (zoo.DEFAULT_MODEL, zoo.DEFAULT_DATASET)
    if not is_default and not st.button(f"Train {name} now", type="primary", key="train"):
        st.info(f"No checkpoint for {name} is cached yet (looked for {path}). Train one here "
                f"({DEFAULT_EPOCHS[choice.dataset]} epochs, with progress), or give a checkpoint file in the sidebar.")
        raise _Unavailable
    _train(choice, name)
    return path


def _train(choice: Choice, name: str) -> None:
    epochs = DEFAULT_EPOCHS[choice.dataset]
    with st.status(f"No checkpoint cached for {name}: training one ({epochs} epochs, once)",
                   expanded=True) as status:
        try:
            with turns.turn(f"Training {name}") as held, ProgressBar("Training", cancellable=held) as bar:
                path = zoo.ensure_checkpoint(choice.model, choice.dataset, choice.data_root, progress=bar)
        except Cancelled as exc:
            status.update(label=f"Training cancelled after {exc.seconds:.0f} s", state="error")
            raise _Unavailable from exc
        except USER_ERRORS as exc:
            status.update(state="error")
            raise _Unavailable(f"Training failed: {exc}") from exc
        status.update(label=f"Trained {name}; cached at {path}", state="complete", expanded=False)


def _dataset_problem(name: str, root: str | None) -> str | None:
    """DatasetUnavailable's message (what is missing, how to get it), or None when the files are there."""
    if is_available(name, root):
        return None
    try:
        load_dataset(name, "test", root, download=False)
    except DatasetUnavailable as exc:
        return (f"{exc.detail} Then type the folder that holds them in the sidebar's **Data root** field "
                "(for example the folder `../shared/datasets/prepare.sh DEST` filled) and press Open.")
    return None
