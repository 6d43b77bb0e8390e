"""The typed model description a session carries: its core fields checked, the rest of the record kept."""

from __future__ import annotations

import pytest

from tabconv.modelinfo import ModelInfo
from tabconv.train import load_checkpoint


def test_a_checkpoint_record_becomes_a_typed_description_and_back(resnet18_digits) -> None:
    _, meta = load_checkpoint(resnet18_digits)
    info = ModelInfo.from_meta(meta)
    assert (info.model, info.dataset, info.num_classes, info.input_shape) == ("resnet18", "digits", 10, (1, 32, 32))
    assert info.sha256 == meta["sha256"] and info.details["test_accuracy"] == meta["test_accuracy"]
    assert info.to_meta() == {**meta, "input_shape": list(meta["input_shape"])}


def test_a_record_without_what_rebuilds_the_network_is_refused() -> None:
    with pytest.raises(ValueError, match="needs num_classes, input_shape"):
        ModelInfo.from_meta({"model": "tiny"})
    with pytest.raises(ValueError, match=r"input_shape must be \[C, H, W\], got \[32, 32\]"):
        ModelInfo.from_meta({"model": "tiny", "num_classes": 10, "input_shape": [32, 32]})
    assert ModelInfo.from_meta({"model": "tiny", "num_classes": 10, "input_shape": [1, 8, 8]}).dataset is None
