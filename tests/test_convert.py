"""Calibration, table building and conversion on real models; evaluation against the exact network."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from tabconv.calibrate import TableBuilder, capture_rows, folded_layer
from tabconv.config import Calibration
from tabconv.convert import convert, swaps
from tabconv.evaluate import evaluate
from tabconv.layers import TableConv2d, TableLinear
from tabconv.settings import LayerSetting
from tabconv.structure import ModelStructure, UnknownLayerError
from tests.helpers import model

TABLE = LayerSetting("table", 4, 16)


def builder(net: nn.Module, images: torch.Tensor, **calibration) -> TableBuilder:
    structure = ModelStructure(net, tuple(images.shape[1:]))
    return TableBuilder(net, structure, images, Calibration(images=len(images), **calibration), {"test": 1})


def test_conversion_swaps_modules_and_never_mutates_the_original():
    net = model("resnet18")
    before = {k: v.clone() for k, v in net.state_dict().items()}
    b = builder(net, torch.randn(16, 1, 32, 32))
    tables = b.build_all({"conv1": TABLE, "layer2.0.downsample.0": TABLE, "fc": TABLE})
    converted = convert(net, b.structure, tables)
    assert isinstance(converted.conv1, TableConv2d) and isinstance(converted.bn1, nn.Identity)
    assert isinstance(converted.layer2[0].downsample[0], TableConv2d)
    assert isinstance(converted.layer2[0].downsample[1], nn.Identity)
    assert isinstance(converted.fc, TableLinear)
    assert isinstance(net.conv1, nn.Conv2d) and isinstance(net.bn1, nn.BatchNorm2d)
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())
    assert converted(torch.randn(2, 1, 32, 32)).shape == (2, 10)


def test_one_swap_rule_serves_conversion_and_the_incremental_runner():
    structure = ModelStructure(model("resnet18"), (1, 32, 32))
    table, identity = nn.Linear(1, 1), nn.Identity()
    conv1, fc = structure.layer("conv1"), structure.layer("fc")
    assert swaps(conv1, table, identity) == {"conv1": table, "bn1": identity}
    assert isinstance(swaps(conv1, table)["bn1"], nn.Identity)
    assert swaps(fc, table) == {"fc": table}


def test_a_table_layer_with_k_above_the_rows_reproduces_conv_plus_bn():
    net = model("tiny")
    images = torch.randn(4, 1, 8, 8)  # conv1: 64 rows per image -> 256 rows < K
    b = builder(net, images)
    with pytest.warns(UserWarning, match="memorise"):
        tables = b.build_all({"conv1": LayerSetting("table", 3, 512)})
    converted = convert(net, b.structure, tables)
    info = b.structure.layer("conv1")
    want = net.bn1(net.conv1(images))
    got = converted.bn1(converted.conv1(images))
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(folded_layer(net, info)(images), want, rtol=1e-5, atol=1e-5)


def test_capture_rows_subsamples_deterministically():
    net = model("tiny")
    structure = ModelStructure(net, (1, 8, 8))
    images = torch.randn(10, 1, 8, 8)
    cal = Calibration(images=10, max_rows=100)
    rows = capture_rows(net, structure.layers, images, cal, batch_size=3)
    assert rows["conv1"].shape == (100, 9)  # 640 rows available
    assert rows["fc"].shape == (10, 16)  # fewer rows than max_rows: all kept
    again = capture_rows(net, structure.layers, images, cal, batch_size=7)
    assert torch.equal(rows["conv1"], again["conv1"])


def test_sequential_calibration_sees_approximated_upstream_activations():
    net = model("tiny")
    images = torch.randn(64, 1, 8, 8)
    settings = {"conv1": LayerSetting("table", 3, 2), "conv2": TABLE}
    independent = builder(net, images).build_all(settings)
    sequential = builder(net, images, mode="sequential").build_all(settings)
    assert torch.equal(independent["conv1"].prototypes_, sequential["conv1"].prototypes_)
    assert not torch.equal(independent["conv2"].prototypes_, sequential["conv2"].prototypes_)


def test_builder_memoises_per_layer_and_setting():
    net = model("tiny")
    b = builder(net, torch.randn(32, 1, 8, 8))
    b.build_all({"conv1": TABLE, "conv2": TABLE})
    assert b.fits == 2
    b.build_all({"conv1": TABLE, "conv2": TABLE.with_(centroids=8)})
    assert b.fits == 3


def test_unknown_layer_names_are_refused_with_suggestions():
    structure = ModelStructure(model("resnet18"), (1, 32, 32))
    with pytest.raises(UnknownLayerError, match="layer3.5.conv2.*did you mean layer3.1.conv2"):
        structure.layer("layer3.5.conv2")
    assert structure.expand("block:layer2.0") == ["layer2.0.conv1", "layer2.0.conv2", "layer2.0.downsample.0"]
    assert structure.expand("stage:layer4")[-1] == "layer4.1.conv2"
    assert structure.expand("classifier") == ["fc"] and structure.expand("stem") == ["conv1"]


def test_a_chooser_lists_every_group_and_layer_in_forward_order():
    structure = ModelStructure(model("resnet18"), (1, 32, 32))
    targets = structure.targets()
    assert sorted(targets) == sorted([*structure.groups, *structure.names])
    assert targets[:7] == ["all", "stem", "conv1", "stage:layer1", "block:layer1.0", "layer1.0.conv1", "layer1.0.conv2"]
    assert targets[-2:] == ["classifier", "fc"]


def test_evaluate_reports_per_layer_errors_against_exact():
    net = model("resnet18")
    images, labels = torch.randn(24, 1, 32, 32), torch.randint(0, 10, (24,))
    b = builder(net, torch.randn(32, 1, 32, 32))
    exact = evaluate(net, [(images[:10], labels[:10]), (images[10:], labels[10:])], net, b.structure)
    assert exact.images == 24 and all(abs(e.cosine - 1) < 1e-9 and e.relative_error == 0
                                      for e in exact.layers.values())
    converted = convert(net, b.structure, b.build_all({"layer3.0.conv1": TABLE}))
    approx = evaluate(converted, [(images, labels)], net, b.structure)
    names = b.structure.names
    first = names.index("layer3.0.conv1")
    assert all(approx.layers[n].relative_error == 0 for n in names[:first])
    assert approx.layers["layer3.0.conv1"].cosine < 0.999
    assert approx.layers["fc"].relative_error > 0


@pytest.mark.parametrize(("in_channels", "kernel", "stride", "direct"), [(16, 3, 1, True), (16, 1, 2, True),
                                                                         (6, 3, 2, False)])
def test_grouped_conv_encoding_gives_the_im2col_codes(in_channels, kernel, stride, direct):
    """When C divides C_in the codes come from a grouped conv; they match im2col + nearest prototype."""
    from tabconv.lowering import im2col
    from tabconv.quantizer import ProductQuantizer

    torch.manual_seed(0)
    conv = nn.Conv2d(in_channels, 12, kernel, stride, kernel // 2).eval()
    x = torch.randn(24, in_channels, 9, 9).relu()
    quantizer = ProductQuantizer(4, 16, random_state=0).fit(im2col(x, conv))
    layer = TableConv2d.from_conv(conv, quantizer, TABLE)
    assert (layer.score_weight is not None) is direct
    for fmt in (torch.contiguous_format, torch.channels_last):
        fresh = torch.randn(5, in_channels, 9, 9).relu().contiguous(memory_format=fmt)
        want = quantizer.encode(im2col(fresh, conv))
        if direct:  # the grouped-conv codes; float rounding may flip an exact near-tie, nothing more
            assert (layer.encode_by_conv(fresh) == want).float().mean() >= 0.999
        rows = quantizer.lookup(want)  # the layer's output: these codes' table rows, whichever route it took
        out = layer(fresh)
        torch.testing.assert_close(out.permute(0, 2, 3, 1).reshape(rows.shape), rows)
