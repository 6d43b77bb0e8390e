"""Export the current configuration as the library's JSON file (with its tables file when fine-tuned) and its
tabled network as a zip of files that run elsewhere; import a configuration, validated, with specific errors
(a fine-tuned one together with its tables file)."""

from __future__ import annotations

import re
from dataclasses import asdict

import streamlit as st

from explorer import charts, state, turns
from explorer.workbench import Workbench
from tabconv.config import ConfigError, Configuration, from_json
from tabconv.export import configuration_zip
from tabconv.metrics import Metrics, Origin
from tabconv.stats import accuracy_text
from tabconv.tablesfile import SUFFIX

CONFIG_UPLOAD_MB = 1  # a ResNet-34 configuration with metrics is about 30 KB
TABLES_UPLOAD_MB = 1024  # a fine-tuned tables file: every table layer's tables and prototypes (ResNet-18: MBs)
TOGETHER = ("Keep both files together, under these names: the configuration checks its tables file's sha256, "
            "and fine-tuned tables cannot be rebuilt without it.")


def _name(wb: Workbench, current: Metrics) -> str:
    """A file name for downloads; an image folder's dataset name ('folder:photos@1a2b…') loses its ':' and '@'."""
    info = wb.session.info
    return re.sub(r"[^\w.-]+", "-", f"tabconv-{info.model}-{info.dataset}-config{current.id}")


def tuned_files(wb: Workbench, metrics: Metrics, tables_file: str) -> tuple[str, bytes] | None:
    """(configuration JSON naming `tables_file`, that file's bytes) of a fine-tuned configuration whose
    tables this page holds (fine-tuned or imported here, and not yet dropped from memory); None otherwise."""
    given = wb.session.given(metrics)
    if given is None:
        return None
    return wb.session.tuned_configuration(metrics, tables_file).to_json(), given.content()


def export_button(wb: Workbench, current: Metrics) -> None:
    """Download the current configuration (settings, calibration, checkpoint hash, metrics, versions) - a
    fine-tuned one comes as two files, the configuration and its tables - and its tabled network: one row of
    buttons, as high for every configuration, so that loading another never moves what is below."""
    name = _name(wb, current)
    common = dict(on_click="ignore", icon=":material/download:", width="stretch")
    cols = st.columns([1.4, 1.2, 1.3, 1.5], vertical_alignment="center")  # wide enough for the labels
    if charts.is_tuned(current):
        files = tuned_files(wb, current, name + SUFFIX)
        if files is None:
            cols[3].caption("Fine-tuned tables that this page cannot export: not fine-tuned or imported here, or among "
                            "the oldest runs, which the server no longer keeps (import its two files again).")
            return
        text, tables = files
        cols[0].download_button("Export configuration", text, key="export", file_name=f"{name}.json",
                                mime="application/json", type="primary", help="The library's JSON file", **common)
        cols[1].download_button("Export tables file", tables, key="export_tables", file_name=name + SUFFIX,
                                mime="application/octet-stream", help="The fine-tuned tables the configuration names",
                                **common)
        cols[3].caption(TOGETHER)
        model = cols[2]
    else:
        cols[0].download_button("Export configuration", _json(wb, current), key="export",
                                help="The library's JSON file", file_name=f"{name}.json", mime="application/json",
                                type="primary", **common)
        model = cols[1]
    with model:
        _model_button(wb, current, name, common)


def _model_button(wb: Workbench, current: Metrics, name: str, common: dict) -> None:
    """The tabled network as a zip; built when clicked, not on every rerun (the ONNX export takes seconds)."""

    def build() -> bytes:
        with turns.turn("Exporting a tabled network"), wb.lock:
            return configuration_zip(wb.session, current)

    st.download_button("Export model (zip)", build, key="export_model", file_name=f"{name}-model.zip",
                       mime="application/zip", help="model.pt (tabconv.load_tabled), model.onnx (standard operators), "
                       "model-ops.onnx (tabconv's onnxruntime operator, on the native kernels), tables.npz, "
                       "manifest.json (with the preprocessing: input size, mean, std, class names) and a README.md "
                       "saying how to load each: the tabled network, to run outside this page. model.pt also carries "
                       f"the exact network's weights ({current.baseline.storage_bytes / 2**20:.1f} MiB), so that it "
                       "rebuilds the whole network: it is larger than the storage shown for the tables",
                       **common)


def _json(wb: Workbench, current: Metrics) -> str:
    files = tuned_files(wb, current, _name(wb, current) + SUFFIX) if charts.is_tuned(current) else None
    return files[0] if files else wb.session.configuration(current).to_json()


def import_panel(wb: Workbench, current: Metrics) -> None:
    """Upload a configuration file: it is checked against this model and checkpoint before it can be loaded."""
    left, right = st.columns(2)
    with left:
        upload = st.file_uploader("Import a configuration (JSON)", type=["json"], key="import_file",
                                  max_upload_size=CONFIG_UPLOAD_MB)
        if upload is not None:
            _check(wb, upload.name, upload.getvalue())
    with right, st.expander("The current configuration as JSON"):
        st.code(_json(wb, current), language="json")


IMPORT_WAY_FORWARD = ("Import a configuration file that this page (Export configuration) or the command line "
                      "(`evaluate --save-config`, `search --out`, `finetune --out`) wrote for the model open in the "
                      "sidebar; open the model it was made for first if it names another.")


def _check(wb: Workbench, name: str, data: bytes) -> None:
    try:
        config = _parse(wb, data)
    except ConfigError as exc:
        if exc.field == "checkpoint_sha256":
            _retarget_offer(wb, name, data, exc)
            return
        st.error(f"**{name}** is not a usable configuration: {exc}. {IMPORT_WAY_FORWARD}")
        return
    tabled = config.table_layers()
    st.success(f"**{name}** is valid for this model: {len(tabled)}/{len(config.layers)} layers as tables.")
    if config.calibration != wb.session.calibration and not config.tables_file:
        st.warning(f"It was calibrated with {asdict(config.calibration)}; this session's tables use "
                   f"{asdict(wb.session.calibration)}, so its measured numbers may differ from the file's.")
    if config.metrics.get("accuracy") is not None:
        st.caption(f"Recorded in the file: accuracy {_recorded(config.metrics)}.")
    if config.tables_file:
        _tuned_import(name, data, config)
        return
    st.button("Load this configuration", key="import_load", on_click=state.request,
              args=(dict(config.layers), f"imported: {name}", Origin.IMPORTED))


def _retarget_offer(wb: Workbench, name: str, data: bytes, refusal: ConfigError) -> None:
    """A configuration made for another checkpoint of this architecture: its layer settings can be used here with
    tables rebuilt from the open checkpoint (the library's retarget), on request."""
    config = _parse(wb, data, retarget=True)
    source = config.retargeted_from or {}
    st.warning(f"**{name}** was made for another checkpoint of {wb.session.info.model} ({refusal}). Its layer "
               f"settings ({len(config.table_layers())}/{len(config.layers)} layers as tables) can be used with "
               "tables rebuilt from the checkpoint open here"
               + (" — not its fine-tuned tables file, which belongs to the other weights" if source.get(
                   "tables_sha256") else "") + "; the accuracy it recorded does not carry over.")
    st.button("Rebuild its tables for this checkpoint", key="import_retarget", on_click=state.request,
              args=(dict(config.layers), f"imported: {name} (retargeted: tables rebuilt for this checkpoint)",
                    Origin.IMPORTED))


def _recorded(metrics: dict) -> str:
    """A file's accuracy with its 95% interval ('68.00% (95% CI 63.6-72.1%, 450 images)'), or as written when its
    numbers cannot give one (a hand-edited file)."""
    accuracy, images = metrics["accuracy"], metrics.get("eval_images")
    try:
        return accuracy_text(round(accuracy * images), images, 2)
    except (TypeError, ValueError):
        return f"{accuracy} on {images} images"


def _tuned_import(name: str, data: bytes, config: Configuration) -> None:
    """A fine-tuned configuration needs its tables file: a second upload, checked when it is evaluated."""
    st.info(f"Its tables were fine-tuned: they come from its tables file **{config.tables_file}** "
            f"(sha256 {str(config.tables_sha256)[:12]}…), which cannot be rebuilt here. Upload it too.")
    tables = st.file_uploader(f"Its tables file ({config.tables_file})", type=["pt"], key="import_tables",
                              max_upload_size=TABLES_UPLOAD_MB)
    if tables is None:
        st.button("Load its layer settings with rebuilt (untuned) tables", key="import_load", on_click=state.request,
                  args=(dict(config.layers), f"imported: {name} (tables rebuilt, not fine-tuned)", Origin.IMPORTED))
        return
    st.button("Evaluate with the fine-tuned tables", key="import_tuned", type="primary", on_click=_request_tuned,
              args=(data.decode("utf-8"), name, tables.getvalue(), tables.name))


def _request_tuned(text: str, name: str, tables: bytes, tables_name: str) -> None:
    st.session_state.tables_request = (text, name, tables, tables_name)


def _parse(wb: Workbench, data: bytes, retarget: bool = False) -> Configuration:
    """Every check: size, encoding, schema, and fit to this model's layers and checkpoint (`retarget`: made for
    another checkpoint of this architecture, it is taken for this one, its tables to be rebuilt)."""
    if len(data) > CONFIG_UPLOAD_MB * 2**20:
        raise ConfigError(f"the file is {len(data) / 2**20:.1f} MB; a configuration is at most {CONFIG_UPLOAD_MB} MB")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise ConfigError("not a UTF-8 text file") from None
    config = from_json(text)
    info = wb.session.info
    if retarget:
        config = config.retargeted(info.sha256, "an uploaded file")
    return config.validate_against(wb.structure, info.sha256, model=info.model, dataset=info.dataset)
