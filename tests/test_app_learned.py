"""The explorer's learned-tables flows (issue 10), headless on the embedded default (ResNet-18 on digits):
table fitting in the sidebar, C from a sub-vector length, fine-tuning, and the fine-tuned export/import pair.

Like tests/test_app.py, every test shares the process's cached Session (its history only grows), so each
checks what its own action changed. Download buttons are read back from AppTest's in-memory media store.
"""

from __future__ import annotations

import hashlib
import json
import math
import re

import pytest
from streamlit.runtime.memory_media_file_storage import MemoryMediaFileStorage
from streamlit.testing.v1 import AppTest
from streamlit.testing.v1 import app_test as app_test_module

from explorer import charts, editing
from tabconv.settings import LayerSetting
from tests.helpers import no_failure

TABLE = LayerSetting("table")


@pytest.fixture
def media(monkeypatch: pytest.MonkeyPatch) -> list[MemoryMediaFileStorage]:
    """The media stores of AppTest's runs (one per run), where download buttons keep their bytes."""
    stores: list[MemoryMediaFileStorage] = []

    class Recording(MemoryMediaFileStorage):
        def __init__(self, *args: object, **kwargs: object) -> None:
            super().__init__(*args, **kwargs)
            stores.append(self)

    monkeypatch.setattr(app_test_module, "MemoryMediaFileStorage", Recording)
    return stores


def _downloaded(at: AppTest, stores: list[MemoryMediaFileStorage], label: str) -> bytes:
    button = next(b for b in at.download_button if b.label == label)
    return bytes(stores[-1].get_file(button.proto.url.rsplit("/", 1)[-1]).content)


def _current_label(at: AppTest) -> str:
    return next(m.value for m in at.markdown if m.value.startswith("**Current configuration"))


def _history(at: AppTest):
    return next(d.value for d in at.dataframe if "origin" in d.value.columns)


def test_fine_tune_export_and_import_round_trip(app: AppTest, media: list[MemoryMediaFileStorage]) -> None:
    assert "start: every layer tabled" in _current_label(app)
    parent_id = app.session_state["current_id"]
    app.number_input(key="tune_steps").set_value(5)
    app.number_input(key="tune_images").set_value(64)
    app.button(key="run_finetune").click().run()
    assert not app.exception, [e.value for e in app.exception]
    tuned_id = app.session_state["current_id"]
    assert tuned_id != parent_id and "fine-tuned (start: every layer tabled)" in _current_label(app)
    history = _history(app).set_index("id")
    assert history.loc[tuned_id, "origin"] == charts.FINE_TUNED
    compare = next(m.value for m in app.markdown if m.value.startswith(f"**Fine-tuned #{tuned_id} from #{parent_id}"))
    # checked on the first 100 of the 200 evaluation images, judged on the other 100
    accuracy = re.search(r"→ (\d+\.\d+%) on the 100 test images the held-out checks did not use", compare).group(1)
    assert "distillation loss" in compare and "5 steps on 64 calibration images" in compare
    assert "(digits test images 0-99)" in compare and "(on all 200: " in compare
    assert [b.label for b in app.download_button] == ["Export configuration", "Export tables file",
                                                    "Export model (zip)"]
    assert any("Keep both files together" in c.value for c in app.caption)
    config_text = _downloaded(app, media, "Export configuration").decode()
    tables = _downloaded(app, media, "Export tables file")
    config = json.loads(config_text)
    assert config["tables_file"] == f"tabconv-resnet18-digits-config{tuned_id}.tables.pt"
    assert config["tables_sha256"] == hashlib.sha256(tables).hexdigest() and config["finetune"]["steps"] == 5

    app.selectbox(key="group_target").set_value("fc")  # a toggle: an ordinary configuration, no fine-tuning
    app.button(key="group_exact").click().run()
    no_failure(app)
    label = _current_label(app)  # a new configuration, or the same one an earlier test on this server evaluated
    assert "fc → exact" in label or "all but fc tabled" in label, label
    toggled = app.session_state["current_id"]
    assert _history(app).set_index("id").loc[toggled, "origin"] != charts.FINE_TUNED
    assert [b.label for b in app.download_button] == ["Export configuration", "Export model (zip)"]

    app.file_uploader(key="import_file").set_value(("tuned.json", config_text.encode(), "application/json")).run()
    no_failure(app)
    assert any(config["tables_file"] in i.value for i in app.info)
    edited = bytearray(tables)
    edited[len(edited) // 2] ^= 0xFF
    app.file_uploader(key="import_tables").set_value((config["tables_file"], bytes(edited), "application/octet-stream"))
    app.run()
    app.button(key="import_tuned").click().run()
    assert not app.exception
    errors = [e.value for e in app.error]
    assert len(errors) == 1 and "sha256 does not match" in errors[0] and "\n" not in errors[0], errors
    assert app.session_state["current_id"] == toggled and _current_label(app) == label  # the page keeps its workbench
    app.file_uploader(key="import_tables").set_value((config["tables_file"], tables, "application/octet-stream")).run()
    app.button(key="import_tuned").click().run()
    no_failure(app)
    assert app.session_state["current_id"] == tuned_id  # the same tables: the same configuration, same accuracy
    assert any(m.value.startswith(f"**Fine-tuned #{tuned_id}") and f"→ {accuracy} on the 100" in m.value
               for m in app.markdown)
    assert [b.label for b in app.download_button] == ["Export configuration", "Export tables file",
                                                    "Export model (zip)"]


def test_sub_vector_length_gives_each_layer_its_own_c(app: AppTest) -> None:
    app.selectbox(key="group_target").set_value("fc")
    app.selectbox(key="group_c_from").set_value(editing.C_FROM[1]).run()
    app.number_input(key="group_s").set_value(16)
    app.button(key="group_table").click().run()
    no_failure(app)
    assert "fc → S=16" in _current_label(app)
    row = app.data_editor[0].value.set_index("layer").loc["fc"]
    assert (row["C"], row["S"], row["D"]) == (str(math.ceil(512 / 16)), "16", 512)


def test_editing_c_drops_the_sub_vector_length_and_editing_s_sets_it() -> None:
    by_s = TABLE.with_(subvector=9)
    new, _, messages = editing.apply_row_edits({"a": by_s, "b": TABLE}, ["a", "b"], {0: {"C": 4.0}, 1: {"S": 9}},
                                               TABLE, frozenset())
    assert not messages and new["a"] == TABLE.with_(codebooks=4) and new["b"] == by_s
    assert editing.table_setting(editing.C_FROM[1], 8, 9, 64, "exhaustive", "float32") == by_s
    assert editing.describe(by_s) == "S=9 (C=⌈D/9⌉), K=64"


def test_least_squares_fitting_from_the_sidebar(app: AppTest) -> None:
    app.selectbox(key="choose_fit").set_value("least-squares")
    next(b for b in app.button if b.label == "Open").click().run()
    no_failure(app)
    assert app.session_state["spec"].calibration.fit == "least-squares"
    assert any("least-squares, ridge 0.01" in c.value for c in app.caption)
    assert "start: every layer tabled" in _current_label(app)
    assert next(m.value for m in app.metric if m.label.startswith("Accuracy (200 images)"))
