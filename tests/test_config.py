"""Configuration files: round trip, and every kind of bad file refused with a specific message."""

from __future__ import annotations

import json

import pytest

from tabconv import config
from tabconv.config import Calibration, ConfigError, Configuration
from tabconv.settings import EXACT, LayerSetting
from tabconv.structure import ModelStructure
from tests.helpers import model


@pytest.fixture(scope="module")
def structure():
    return ModelStructure(model("tiny"), (1, 8, 8))


def good(structure) -> Configuration:
    layers = {n: EXACT for n in structure.names}
    layers["conv2"] = LayerSetting("table", 4, 32, "exhaustive", "int8")
    return Configuration("tiny", "digits", 10, (1, 8, 8), layers, Calibration(images=100, mode="sequential"),
                         "f" * 64, {"accuracy": 0.5, "eval_images": 10})


def test_round_trip_keys_layers_by_module_name(structure, tmp_path):
    cfg = good(structure)
    path = cfg.save(tmp_path / "c.json")
    data = json.loads(path.read_text())
    assert data["schema_version"] == config.SCHEMA_VERSION == 2 and set(data["layers"]) == set(structure.names)
    assert data["software"]["torch"] and data["layers"]["conv2"]["centroids"] == 32
    back = config.load(path)
    assert back.layers == cfg.layers and back.calibration == cfg.calibration
    assert back.checkpoint_sha256 == cfg.checkpoint_sha256 and back.metrics == cfg.metrics
    assert back.validate_against(structure, "f" * 64) is back


def mutate(structure, change) -> str:
    data = good(structure).to_dict()
    change(data)
    return json.dumps(data)


@pytest.mark.parametrize("change,message", [
    (lambda d: d.update(schema="other"), "not a TabConv configuration"),
    (lambda d: d.update(schema_version=99), "schema_version 99"),
    (lambda d: d.pop("model"), "'model' is missing"),
    (lambda d: d.update(input_shape=[1, 8]), "input_shape"),
    (lambda d: d["layers"].update(conv2={"mode": "table", "codebooks": 0}), "layers.conv2: codebooks"),
    (lambda d: d["layers"].update(conv2={"mode": "fast"}), "layers.conv2: mode"),
    (lambda d: d["layers"].update(conv2={"mode": "table", "centroids": "64"}), "layers.conv2: centroids"),
    (lambda d: d["layers"].update(conv2={"mode": "table", "colour": 1}), "layers.conv2: unknown key"),
    (lambda d: d["layers"].update(conv2=[1]), "layers.conv2: must be an object"),
    (lambda d: d["calibration"].update(mode="magic"), "calibration.mode"),
    (lambda d: d["calibration"].update(images=-3), "calibration.images"),
    (lambda d: d.update(metrics=[]), "'metrics' must be an object"),
])
def test_malformed_files_name_the_offending_item(structure, change, message):
    with pytest.raises(ConfigError, match=message):
        config.from_json(mutate(structure, change))


def test_not_json_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="not valid JSON.*line 1"):
        config.from_json("{oops")
    with pytest.raises(ConfigError, match="no such configuration file"):
        config.load(tmp_path / "absent.json")
    with pytest.raises(ConfigError, match="must be a JSON object"):
        config.from_json("[1, 2]")


def test_unknown_layer_and_other_checkpoint_are_refused(structure):
    cfg = good(structure)
    cfg.layers["layer3.5.conv2"] = EXACT
    with pytest.raises(ConfigError, match="unknown layer 'layer3.5.conv2'"):
        cfg.validate_against(structure)
    with pytest.raises(ConfigError, match="another checkpoint"):
        good(structure).validate_against(structure, "0" * 64)
    cfg = good(structure)
    with pytest.raises(ConfigError, match=f"made for {cfg.model} on {cfg.dataset}, but resnet34 on mnist is loaded"):
        cfg.validate_against(structure, model="resnet34", dataset="mnist")
    with pytest.raises(ConfigError, match=f"made for {cfg.model} on {cfg.dataset}, but {cfg.model} on other"):
        cfg.validate_against(structure, model=cfg.model, dataset="other")
    assert cfg.validate_against(structure, model=cfg.model, dataset=cfg.dataset) is cfg
    other = good(structure)
    other.input_shape = (3, 8, 8)
    with pytest.raises(ConfigError, match="input_shape"):
        other.validate_against(structure)


def test_missing_layers_default_to_exact(structure):
    cfg = config.from_json(mutate(structure, lambda d: d.update(layers={"conv2": {"mode": "table"}})))
    cfg.validate_against(structure)
    assert list(cfg.layers) == structure.names and cfg.layers["conv1"] == EXACT
