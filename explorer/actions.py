"""Everything that changes which configuration a tab shows: evaluate one (with built tables, or with an
imported fine-tuned tables file), or load one from the history.

Widgets only leave requests in session state (their callbacks run before the script); the workbench
handles them here at the top of its run, with progress, so the metrics and plots below it are drawn
from the new configuration in the same run.
"""

from __future__ import annotations

import time
from collections.abc import Mapping

import streamlit as st

from explorer import state, turns
from explorer.progress import ProgressBar
from explorer.workbench import Workbench
from tabconv.config import ConfigError, from_json
from tabconv.metrics import Metrics, Origin
from tabconv.session import Applied, GivenTables
from tabconv.settings import LayerSetting
from tabconv.tablesfile import TablesFileError, read_tables


def evaluate(wb: Workbench, settings: Mapping[str, LayerSetting], label: str, origin: Origin = Origin.EDIT,
             title: str = "Evaluating", tables: GivenTables | None = None) -> Metrics | None:
    """Evaluate (or recall) a configuration and show it; failures become a notice, not a traceback.

    What it rebuilt and re-ran is the session's record of this request, made inside this tab's turn. `tables`
    (fine-tuned ones) replace the built tables of its table layers."""
    asked = time.monotonic()
    try:
        known = wb.session.recall(dict(settings), tables and tables.sha256)  # shown without waiting in line
        if known is not None:
            done = Applied.recalled_now(known, label, origin, time.monotonic() - asked)
            waited = 0.0
        else:
            quick = tables is not None or not wb.session.unbuilt(dict(settings))  # builds no tables: goes first
            with turns.turn(title, short=quick) as held, ProgressBar(title, cancellable=held) as bar, wb.lock:
                done = wb.session.apply(dict(settings), progress=bar, label=label, origin=origin, tables=tables)
            waited = max(0.0, (held.started or asked) - asked)  # behind other tabs' work
    except turns.Cancelled as exc:  # left the line, or cancelled at its next progress event: nothing was added
        state.note_cancelled(exc)
        return None
    except Exception as exc:  # a page must survive any failure of the library (e.g. a broken encoder)
        state.notify("error", f"Could not evaluate this configuration: {exc}")
        return None
    metrics = done.metrics
    st.session_state.last_apply = {
        "id": metrics.id, "memoised": done.recalled, "fitted": len(done.fitted), "recomputed": done.recomputed,
        "earlier": ("this tab" if metrics.id in st.session_state.seen else "this server") if done.recalled else None,
        "nodes": done.nodes, "seconds": done.seconds, "waited": waited,
    }
    state.show_to(metrics, (done.label, done.origin))
    return metrics


def import_tuned(wb: Workbench, config_text: str, name: str, tables: bytes, tables_name: str) -> Metrics | None:
    """Evaluate an imported fine-tuned configuration with its uploaded tables file. A missing, edited or
    mismatching file is one line of error, and the page keeps the configuration it shows."""
    session = wb.session
    try:
        config = from_json(config_text).validate_against(session.structure, session.info.sha256,
                                                         model=session.info.model, dataset=session.info.dataset)
        if not config.tables_file:
            raise ConfigError("it names no tables file (its tables are rebuilt: load it as an ordinary configuration)")
        loaded = read_tables(tables, tables_name, config.tables_sha256, session.structure, config.layers,
                             session.device)
    except (ConfigError, TablesFileError) as exc:
        state.notify("error", f"Could not use **{name}** with **{tables_name}**: {exc}")
        return None
    given = GivenTables(config.tables_sha256, loaded, tables, dict(config.finetune))
    return evaluate(wb, config.layers, f"imported: {name} (fine-tuned)", Origin.IMPORTED,
                    "Evaluating the imported fine-tuned tables", tables=given)


def load(wb: Workbench, config_id: int) -> bool:
    """Show an evaluated configuration (whether there is one by that id); locks it would contradict are released
    (it was chosen whole)."""
    if not 0 <= config_id < len(wb.session.history):
        state.notify("error", f"There is no configuration #{config_id} in this session.")
        return False
    metrics = state.view(wb, config_id)
    released = sorted(st.session_state.locks & set(metrics.table_layers))
    if released:
        st.session_state.locks = st.session_state.locks - set(released)
        state.notify("info", f"Unlocked {', '.join(released)}: configuration #{config_id} uses tables there.")
    st.session_state.last_apply = {"id": config_id, "loaded": True}
    state.show_to(wb.metrics(config_id))
    st.session_state.editor_version += 1
    return True


def handle_requests(wb: Workbench) -> bool:
    """Carry out what widgets asked for since the last run; whether any of it succeeded."""
    done = False
    config_id, st.session_state.load_request = st.session_state.load_request, None
    if config_id is not None:
        done = load(wb, int(config_id))
    pending, st.session_state.pending = st.session_state.pending, None
    if pending is not None:
        done = evaluate(wb, *pending) is not None or done
    tuned, st.session_state.tables_request = st.session_state.tables_request, None
    if tuned is not None:
        done = import_tuned(wb, *tuned) is not None or done
    return done
