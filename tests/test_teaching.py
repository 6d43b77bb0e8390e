"""The teaching view's arithmetic is the table layer's arithmetic, and its exact value the folded layer's."""

from __future__ import annotations

import re

import pytest
import torch

from tabconv.calibrate import folded_layer
from tabconv.config import Calibration
from tabconv.convert import convert, table_module
from tabconv.data import load_dataset
from tabconv.models import build_model
from tabconv.session import Session
from tabconv.settings import LayerSetting
from tabconv.teaching import GLOSSARY, column_labels, error_summary, explain, worst_subspace

TABLE = LayerSetting("table", codebooks=4, centroids=16)


@pytest.fixture(scope="module")
def session() -> Session:
    """An untrained tiny CNN with non-trivial batch-norm statistics, so folding matters."""
    torch.manual_seed(0)
    model = build_model("tiny", 10, 1).eval()
    for bn in (model.bn1, model.bn2):
        bn.running_mean.uniform_(-0.5, 0.5)
        bn.running_var.uniform_(0.5, 2.0)
        bn.weight.data.uniform_(0.5, 1.5)
        bn.bias.data.uniform_(-0.2, 0.2)
    meta = {"model": "tiny", "dataset": "digits", "num_classes": 10, "input_shape": [1, 32, 32], "sha256": "t"}
    return Session(model, meta, load_dataset("digits", "train"), load_dataset("digits", "test").head(40),
                   Calibration(images=64))


def _outputs(model: torch.nn.Module, name: str, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(input, output) of one module of `model` on `images`."""
    seen: dict[str, torch.Tensor] = {}
    handle = model.get_submodule(name).register_forward_hook(
        lambda mod, inputs, output: seen.update(x=inputs[0].clone(), y=output.clone()))
    with torch.no_grad():
        model(images)
    handle.remove()
    return seen["x"], seen["y"]


@pytest.mark.parametrize(("layer", "position"), [("conv1", (5, 7)), ("conv2", (3, 2)), ("fc", 0)])
def test_table_sum_is_the_table_layer_output(session: Session, layer: str, position: object) -> None:
    settings = session.uniform(TABLE)
    info = session.structure.layer(layer)
    result = explain(session, layer, image_index=3, position=position, settings=settings)
    x, _ = _outputs(session.model, layer, session.eval_set.batch(slice(3, 4)))  # its input, exact network
    with torch.no_grad():
        approx = table_module(session.model, info, session.tables(settings)[layer])(x)
        exact = folded_layer(session.model, info)(x)
    if info.kind == "conv":
        h, w = position
        approx, exact = approx[0, :, h, w], exact[0, :, h, w]
    else:
        approx, exact = approx[0], exact[0]
    assert torch.allclose(torch.tensor(result["table_sum"]), approx, atol=1e-4)
    assert torch.allclose(torch.tensor(result["exact"]), exact, atol=1e-4)
    channel = result["channel"]
    assert result["table_value"] == pytest.approx(sum(result["table_terms"]), abs=1e-4)
    assert result["exact_value"] == pytest.approx(sum(result["exact_terms"]), abs=1e-4)
    assert result["exact_value"] == pytest.approx(float(exact[channel]), abs=1e-4)


def test_first_layer_matches_the_converted_network(session: Session) -> None:
    """conv1 sees the image itself, so the converted model's own table layer must give the same numbers."""
    settings = session.uniform(TABLE)
    result = explain(session, "conv1", image_index=1, position=(2, 9), settings=settings)
    converted = convert(session.model, session.structure, session.tables(settings))
    _, out = _outputs(converted, "conv1", session.eval_set.batch(slice(1, 2)))
    assert torch.allclose(torch.tensor(result["table_sum"]), out[0, :, 2, 9], atol=1e-4)


def test_subspaces_split_the_patch_and_pick_the_nearest_prototype(session: Session) -> None:
    result = explain(session, "conv2", image_index=0, position=4, settings=session.uniform(TABLE), channel=2)
    assert result["channel"] == 2
    assert result["position"] == {"row": 4, "h": 0, "w": 4}
    assert result["inner_dim"] == 8 * 3 * 3 and result["kernel"] == [8, 3, 3]
    subspaces = result["subspaces"]
    assert len(subspaces) == 4 and subspaces[-1]["columns"][1] == result["padded_dim"]
    joined = [v for s in subspaces for v in s["values"]][: result["inner_dim"]]
    assert joined == pytest.approx(result["patch"])
    for item in subspaces:
        assert item["distance"] <= item["runner_up_distance"]


def test_int8_tables_are_dequantized_before_summing(session: Session) -> None:
    settings = session.uniform(TABLE.with_(lut_dtype="int8"))
    result = explain(session, "fc", settings=settings)
    quantizer = session.tables(settings)["fc"]
    x, _ = _outputs(session.model, "fc", session.eval_set.batch(slice(0, 1)))
    assert torch.allclose(torch.tensor(result["table_sum"]), quantizer(x)[0], atol=1e-4)


def test_exact_layers_and_bad_positions_are_refused(session: Session) -> None:
    with pytest.raises(ValueError, match="exact in this configuration"):
        explain(session, "conv1", settings={})
    with pytest.raises(ValueError, match="within the 32x32 output"):
        explain(session, "conv1", position=(32, 0), settings=session.uniform(TABLE))


def test_tree_encoder_codes_are_the_quantizer_codes(session: Session) -> None:
    settings = session.uniform(TABLE.with_(encoder="tree"))
    result = explain(session, "conv2", image_index=2, position=(1, 1), settings=settings)
    quantizer = session.tables(settings)["conv2"]
    patch = torch.tensor(result["patch"])[None]
    assert [s["code"] for s in result["subspaces"]] == quantizer.encode(patch)[0].tolist()
    assert torch.allclose(torch.tensor(result["table_sum"]), quantizer(patch)[0], atol=1e-4)


def test_contributions_add_up_to_the_table_sum_and_the_error(session: Session) -> None:
    """The per-subspace contributions are the table layer's own sum, as PyTorch's tabled conv computes it."""
    settings = session.uniform(TABLE)
    result = explain(session, "conv2", image_index=5, settings=settings)
    info = session.structure.layer("conv2")
    x, _ = _outputs(session.model, "conv2", session.eval_set.batch(slice(5, 6)))
    with torch.no_grad():
        approx = table_module(session.model, info, session.tables(settings)["conv2"])(x)[0]
        exact = folded_layer(session.model, info)(x)[0]
    h, w, m = result["position"]["h"], result["position"]["w"], result["channel"]
    parts = result["contributions"]
    assert [p["subspace"] for p in parts] == list(range(4))
    assert sum(p["table"] for p in parts) == pytest.approx(float(approx[m, h, w]), abs=1e-4)
    assert sum(p["exact"] for p in parts) == pytest.approx(float(exact[m, h, w]), abs=1e-4)
    summary = error_summary(result, top=4)
    assert summary["error"] == pytest.approx(float(approx[m, h, w] - exact[m, h, w]), abs=1e-4)
    assert summary["largest_sum"] == pytest.approx(summary["error"], abs=1e-4)  # all 4 gaps: the whole error
    assert abs(summary["largest"][0]["gap"]) == max(abs(p["gap"]) for p in parts)
    assert summary["largest"][0]["subspace"] == worst_subspace(result)


def test_the_default_position_is_the_largest_output_and_the_default_channel_its_largest_value(session: Session
                                                                                               ) -> None:
    result = explain(session, "conv2", image_index=2, settings=session.uniform(TABLE))
    x, _ = _outputs(session.model, "conv2", session.eval_set.batch(slice(2, 3)))
    with torch.no_grad():
        exact = folded_layer(session.model, session.structure.layer("conv2"))(x)[0]
    norms = exact.norm(dim=0)
    h, w = result["position"]["h"], result["position"]["w"]
    assert float(norms[h, w]) == pytest.approx(float(norms.max()))
    assert result["channel"] == int(exact[:, h, w].abs().argmax())


def test_column_labels_name_the_input_channel_and_tap_of_each_patch_value(session: Session) -> None:
    result = explain(session, "conv2", image_index=1, position=(3, 4), settings=session.uniform(TABLE))
    conv = session.model.get_submodule("conv2")
    x, _ = _outputs(session.model, "conv2", session.eval_set.batch(slice(1, 2)))
    padded = torch.nn.functional.pad(x[0], [conv.padding[1]] * 2 + [conv.padding[0]] * 2)
    labels = column_labels(result, 0, result["inner_dim"])
    for col, label in enumerate(labels):
        channel, ky, kx = map(int, re.fullmatch(r"\d+: input channel (\d+), tap \((\d+), (\d+)\)", label).groups())
        value = padded[channel, 3 * conv.stride[0] + ky, 4 * conv.stride[1] + kx]
        assert result["patch"][col] == pytest.approx(float(value), abs=1e-6)
    fc = explain(session, "fc", settings=session.uniform(TABLE))
    assert column_labels(fc, fc["inner_dim"] - 1, fc["inner_dim"]) == [f"{fc['inner_dim'] - 1}: feature "
                                                                       f"{fc['inner_dim'] - 1}"]
    assert fc["kernel"] is None and fc["bn"] is None and fc["position"]["h"] is None


def test_the_glossary_explains_every_word_the_view_uses() -> None:
    for term in ("im2col", "subspace / codebook", "prototype", "table", "encoding", "folded batch norm",
                 "FLOPs, paper convention", "FLOPs, full convention"):
        assert len(GLOSSARY[term]) > 40
