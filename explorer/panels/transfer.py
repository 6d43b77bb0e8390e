"""Export the current configuration as the library's JSON file; import one, validated, with specific errors."""

from __future__ import annotations

from dataclasses import asdict

import streamlit as st

from explorer import state
from explorer.workbench import Workbench
from tabconv.config import ConfigError, Configuration, from_json
from tabconv.metrics import Metrics

CONFIG_UPLOAD_MB = 1  # a ResNet-34 configuration with metrics is about 30 KB


def export_button(wb: Workbench, current: Metrics) -> None:
    """Download the current configuration (settings, calibration, checkpoint hash, metrics, versions)."""
    meta = wb.session.meta
    st.download_button("Export configuration", _json(wb, current), key="export", help="The library's JSON file",
                       file_name=f"tabconv-{meta['model']}-{meta['dataset']}-config{current.id}.json",
                       mime="application/json", on_click="ignore", type="primary", icon=":material/download:",
                       width="stretch")


def _json(wb: Workbench, current: Metrics) -> str:
    return wb.session.configuration(current).to_json()


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


def _check(wb: Workbench, name: str, data: bytes) -> None:
    try:
        config = _parse(wb, data)
    except ConfigError as exc:
        st.error(f"**{name}** is not a usable configuration: {exc}")
        return
    tabled = config.table_layers()
    st.success(f"**{name}** is valid for this model: {len(tabled)}/{len(config.layers)} layers as tables.")
    if config.calibration != wb.session.calibration:
        st.warning(f"It was calibrated with {asdict(config.calibration)}; this session's tables use "
                   f"{asdict(wb.session.calibration)}, so its measured numbers may differ from the file's.")
    recorded = config.metrics.get("accuracy")
    if recorded is not None:
        st.caption(f"Recorded in the file: accuracy {recorded:.2%} on {config.metrics.get('eval_images')} images.")
    st.button("Load this configuration", key="import_load", on_click=state.request,
              args=(dict(config.layers), f"imported: {name}"))


def _parse(wb: Workbench, data: bytes) -> Configuration:
    """Every check: size, encoding, schema, and fit to this model's layers and checkpoint."""
    if len(data) > CONFIG_UPLOAD_MB * 2**20:
        raise ConfigError(f"the file is {len(data) / 2**20:.1f} MB; a configuration is at most {CONFIG_UPLOAD_MB} MB")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise ConfigError("not a UTF-8 text file") from None
    config = from_json(text)
    meta = wb.session.meta
    if (config.model, config.dataset) != (meta["model"], meta["dataset"]):
        raise ConfigError(f"it is for {config.model} on {config.dataset}, but {meta['model']} on {meta['dataset']} "
                          "is loaded")
    return config.validate_against(wb.structure, meta.get("sha256"))
