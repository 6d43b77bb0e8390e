"""Edits to a configuration, as pure functions (no Streamlit), so the rules are testable on their own.

Rules: an exact layer is always stored as EXACT (one key per distinct configuration); giving an exact
layer a C, K, encoder or LUT dtype turns it into a table layer; a locked layer stays exact whatever a
group action or an edit asks, until it is unlocked.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from tabconv.settings import EXACT, LayerSetting, SettingError

EDIT_FIELDS = {"C": "codebooks", "K": "centroids", "encoder": "encoder", "LUT": "lut_dtype"}


def set_layers(settings: Mapping[str, LayerSetting], names: Iterable[str], setting: LayerSetting,
               locks: frozenset[str]) -> tuple[dict[str, LayerSetting], list[str]]:
    """Give `names` the setting (EXACT for 'exact'); returns the new settings and the locked names skipped."""
    new = dict(settings)
    skipped = []
    for name in names:
        if name in locks and setting.is_table:
            skipped.append(name)
            continue
        new[name] = setting if setting.is_table else EXACT
    return new, skipped


def apply_row_edits(settings: Mapping[str, LayerSetting], names: list[str], edited_rows: Mapping[Any, dict],
                    defaults: LayerSetting, locks: frozenset[str]
                    ) -> tuple[dict[str, LayerSetting], frozenset[str], list[str]]:
    """The data editor's edits ({row: {column: value}}) applied; returns settings, locks and messages."""
    new, new_locks, messages = dict(settings), set(locks), []
    for row, change in edited_rows.items():
        name = names[int(row)]
        if "lock" in change:
            (new_locks.add if change["lock"] else new_locks.discard)(name)
        try:
            new[name] = _edited_setting(new[name], change, defaults, locked=name in new_locks)
        except SettingError as exc:
            messages.append(f"{name}: {exc}")
        if name in new_locks and _wants_table(new[name], change):
            messages.append(f"{name} is locked exact: unlock it to make it a table layer")
    return new, frozenset(new_locks), messages


def _wants_table(current: LayerSetting, change: Mapping[str, Any]) -> bool:
    """Whether an edit asks for a table: ticked, or given a table parameter without being unticked."""
    if "table" in change:
        return bool(change["table"])
    touched = any(change.get(column) is not None for column in EDIT_FIELDS)
    return current.is_table or touched


def _edited_setting(current: LayerSetting, change: Mapping[str, Any], defaults: LayerSetting,
                    locked: bool) -> LayerSetting:
    if locked or not _wants_table(current, change):
        return EXACT
    base = current if current.is_table else defaults
    fields = {field: _value(field, change[column]) for column, field in EDIT_FIELDS.items()
              if change.get(column) is not None}
    return base.with_(mode="table", **fields)


def _value(field: str, value: Any) -> Any:
    """Editor cells arrive as JSON numbers (maybe 4.0): C and K must be whole numbers."""
    if field in ("codebooks", "centroids"):
        if isinstance(value, float) and not value.is_integer():
            raise SettingError(f"{field} must be a whole number, got {value}")
        return int(value)
    return value
