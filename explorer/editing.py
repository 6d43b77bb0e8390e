"""Edits to a configuration, as pure functions (no Streamlit), so the rules are testable on their own.

Rules: an exact layer is always stored as EXACT (one key per distinct configuration); giving an exact
layer a C, K, S, encoder or LUT dtype turns it into a table layer; a locked layer stays exact whatever a
group action or an edit asks, until it is unlocked. C comes either per layer or from a sub-vector length
S (C = ceil(D / S), resolved by the library): giving a layer a C drops its S, giving it an S sets C from it.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from tabconv.settings import EXACT, LayerSetting, SettingError

NOT_APPLICABLE = "—"  # what the editor shows in a setting cell that does not apply (an exact layer's C, K …)
EDIT_FIELDS = {"C": "codebooks", "S": "subvector", "K": "centroids", "encoder": "encoder", "LUT": "lut_dtype"}
C_FROM = ("C per layer", "sub-vector length S")
C_FROM_HELP = ("C per layer: the same number of codebooks C in every layer. Sub-vector length S: each layer "
               "gets C = ⌈D / S⌉ codebooks of S inputs (D = C_in·k·k), so deep layers get more of them; "
               "S = 9 is one input channel of a 3×3 convolution.")


def table_setting(c_from: str, codebooks: int, subvector: int, centroids: int, encoder: str,
                  lut_dtype: str) -> LayerSetting:
    """The table setting of a C / K widget group: C given per layer, or from a sub-vector length S."""
    by_subvector = c_from == C_FROM[1]
    return LayerSetting("table", int(codebooks), int(centroids), encoder, lut_dtype,
                        int(subvector) if by_subvector else None)


def describe(setting: LayerSetting) -> str:
    """'C=8, K=64' or 'S=9 (C=⌈D/9⌉), K=64' or 'exact'."""
    if not setting.is_table:
        return "exact"
    if setting.subvector is not None:
        return f"S={setting.subvector} (C=⌈D/{setting.subvector}⌉), K={setting.centroids}"
    return f"C={setting.codebooks}, K={setting.centroids}"


def describe_resolved(setting: LayerSetting) -> str:
    """A layer's resolved setting: 'C=8, K=64', or 'C=7 (S=9), K=64' when C came from a sub-vector length."""
    if not setting.is_table:
        return "exact"
    from_s = f" (S={setting.subvector})" if setting.subvector is not None else ""
    return f"C={setting.codebooks}{from_s}, K={setting.centroids}"


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
    for row, edited in edited_rows.items():
        name = names[int(row)]
        change = {column: None if value in (NOT_APPLICABLE, "") else value for column, value in edited.items()}
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
    if "codebooks" in fields and "subvector" not in fields:
        fields["subvector"] = None  # a C typed in replaces the one a sub-vector length gave
    return base.with_(mode="table", **fields)


def _value(field: str, value: Any) -> Any:
    """Editor cells arrive as text ("16") or JSON numbers (maybe 4.0): C, K and S must be whole numbers."""
    if field in ("codebooks", "centroids", "subvector"):
        number = float(value) if isinstance(value, str) and _is_number(value) else value
        if not isinstance(number, int | float) or not float(number).is_integer():
            raise SettingError(f"{field} must be a whole number, got {value}")
        return int(number)
    return value


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True
