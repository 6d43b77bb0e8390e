"""From the sidebar's choice to a ready workbench: train a missing checkpoint, open the Session, and
evaluate the starting configuration (every layer tabled), each step with its progress."""

from __future__ import annotations

from pathlib import Path

import streamlit as st

from explorer import actions, state
from explorer.panels.chooser import Choice
from explorer.progress import ProgressBar
from explorer.workbench import Spec, Workbench, file_digest, open_workbench
from tabconv import zoo
from tabconv.config import ConfigError
from tabconv.data import DatasetUnavailable, is_available, load_dataset
from tabconv.models import MODEL_NAMES
from tabconv.train import DEFAULT_EPOCHS, CheckpointError

GROUP_WIDGETS = ("group_c_from", "group_c", "group_s", "group_k", "group_encoder", "group_lut")
USER_ERRORS = (CheckpointError, ConfigError, DatasetUnavailable, ValueError, OSError)


class _Unavailable(Exception):
    """The choice cannot be opened (the page already says why)."""


def open_choice(choice: Choice) -> Workbench:
    """The workbench of the choice. When it cannot be had, the page says why and keeps the workbench it showed
    before (nothing of that work is lost); with none before, the page stops there."""
    try:
        path = _checkpoint(choice)
        spec = Spec(str(path), file_digest(str(path)), choice.calibration, choice.eval_images, choice.data_root)
        try:
            with st.spinner(f"Loading {path.name} and evaluating the exact model (once per launch)…"):
                return open_workbench(spec)
        except USER_ERRORS as exc:
            message = str(exc).replace(str(path), choice.checkpoint_label) if choice.checkpoint_label else str(exc)
            st.error(f"Cannot open this checkpoint: {message}")
            raise _Unavailable from exc
    except _Unavailable:
        return _previous()


def _previous() -> Workbench:
    spec = st.session_state.spec
    if spec is None:
        st.stop()
    st.info("Still showing the model opened before, as it was: change the choice in the sidebar and press Open "
            "again.")
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
                                   "Tables")
        status.update(label="Tables ready", state="complete" if metrics else "error", expanded=metrics is None)
    if metrics is None:
        state.show_to(wb.session.baseline.id)
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
        st.error(problem)
        raise _Unavailable
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
        bar = ProgressBar("Training")
        try:
            path = zoo.ensure_checkpoint(choice.model, choice.dataset, choice.data_root, progress=bar)
        except USER_ERRORS as exc:
            status.update(state="error")
            st.error(f"Training failed: {exc}")
            raise _Unavailable from exc
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
