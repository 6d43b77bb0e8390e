"""Cost model: the paper's baselines to the unit, an independent MAC counter, and table-layer arithmetic."""

from __future__ import annotations

import json
from collections import OrderedDict

import pytest
import torch
import torchvision
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from tabconv.cost import CONVENTIONS, model_cost, table_layer_counts
from tabconv.lowering import output_hw
from tabconv.models import build_model
from tabconv.settings import LayerSetting

TABLE = LayerSetting(mode="table", codebooks=10, centroids=16)


@pytest.mark.parametrize(
    ("name", "classes", "expected"),
    [
        ("resnet18", 1000, 37_673_472),
        ("resnet34", 1000, 75_486_208),
        ("nin", 10, 223_897_472),
        # the 10-class head drops 512 * 990 MACs from the 1000-class count
        ("resnet18", 10, 37_673_472 - 512 * 990),
        ("resnet34", 10, 75_486_208 - 512 * 990),
    ],
)
def test_paper_baselines_exactly(name: str, classes: int, expected: int) -> None:
    model = build_model(name, classes, 3)
    for convention in CONVENTIONS:
        assert model_cost(model, (3, 32, 32), convention=convention).flops == expected


def test_ten_class_resnets_round_to_the_stated_millions() -> None:
    r18 = model_cost(build_model("resnet18", 10, 3), (3, 32, 32)).flops
    r34 = model_cost(build_model("resnet34", 10, 3), (3, 32, 32)).flops
    assert (round(r18 / 1e6, 2), round(r34 / 1e6, 2)) == (37.17, 74.98)


def _random_stack(seed: int) -> tuple[nn.Module, tuple[int, int, int]]:
    """Convs with varied kernel/stride/padding/dilation/bias, then a linear head."""
    gen = torch.Generator().manual_seed(seed)

    def pick(*options: int) -> int:
        return options[int(torch.randint(len(options), (1,), generator=gen))]

    shape = (pick(1, 3, 5), pick(17, 24, 32), pick(17, 24, 32))
    channels, height, width = shape
    layers: list[nn.Module] = []
    while len(layers) < 6:
        conv = nn.Conv2d(
            channels, pick(4, 7, 16), (pick(1, 3, 5), pick(1, 3)), stride=pick(1, 2),
            padding=pick(0, 1, 2), dilation=pick(1, 2), bias=bool(pick(0, 1)),
        )
        if min(output_hw(conv, height, width)) < 1:
            continue  # too large a receptive field for what is left: draw again
        height, width = output_hw(conv, height, width)
        layers += [conv, nn.ReLU()]
        channels = conv.out_channels
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(channels, pick(3, 10))]
    return nn.Sequential(*layers), shape


def _independent_macs(model: nn.Module, shape: tuple[int, int, int]) -> int:
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model.eval()(torch.zeros(1, *shape))
    return counter.get_total_flops() // 2


@pytest.mark.parametrize("seed", range(6))
def test_macs_agree_with_torch_flop_counter_on_random_stacks(seed: int) -> None:
    model, shape = _random_stack(seed)
    report = model_cost(model, shape)
    assert sum(layer.exact_macs for layer in report.layers) == _independent_macs(model, shape)


@pytest.mark.parametrize(
    ("name", "shape"),
    [("tiny", (3, 32, 32)), ("resnet18", (1, 28, 28)), ("resnet34", (3, 32, 32)), ("nin", (1, 28, 28))],
)
def test_macs_agree_with_torch_flop_counter_on_models(name: str, shape: tuple[int, int, int]) -> None:
    model = build_model(name, 10, shape[0])
    report = model_cost(model, shape)
    assert sum(layer.exact_macs for layer in report.layers) == _independent_macs(model, shape)


def test_relu_called_twice_is_counted_once() -> None:
    report = model_cost(build_model("resnet18", 10, 3), (3, 32, 32))
    relu = report.layer("layer1.0.relu")
    assert relu.output_shape == (64, 8, 8)
    assert relu.other_ops == 64 * 8 * 8
    assert [layer.name for layer in report.layers].count("layer1.0.relu") == 1


def test_pooling_counts_input_elements() -> None:
    report = model_cost(build_model("resnet18", 10, 3), (3, 32, 32))
    assert report.layer("maxpool").other_ops == 64 * 16 * 16
    assert report.layer("avgpool").other_ops == 512 * 1 * 1


def _conv_bn_relu(bias: bool = True) -> nn.Module:
    """R = 8*8 = 64 rows, D = 16*3*3 = 144, M = 32."""
    return nn.Sequential(
        OrderedDict(
            [
                ("conv", nn.Conv2d(16, 32, 3, padding=1, bias=bias)),
                ("bn", nn.BatchNorm2d(32)),
                ("relu", nn.ReLU()),
            ]
        )
    )


SHAPE = (16, 8, 8)


def test_exact_conv_layer_by_hand() -> None:
    report = model_cost(_conv_bn_relu(), SHAPE)
    conv = report.layer("conv")
    assert (conv.mode, conv.rows, conv.inner_dim, conv.out_features) == ("exact", 64, 144, 32)
    assert conv.exact_macs == 64 * 144 * 32
    assert conv.other_ops == 64 * 32  # bias adds
    assert conv.weight_bytes == (32 * 144 + 32) * 4
    assert report.layer("bn").other_ops == 2 * 64 * 32
    assert report.layer("bn").weight_bytes == 4 * 32 * 4  # weight, bias, running mean and var
    assert report.layer("relu").mode == "-"
    assert report.flops == 64 * 144 * 32 + 64 * 32 + 2 * 64 * 32 + 64 * 32


def test_exhaustive_float32_table_layer_by_hand() -> None:
    paper = model_cost(_conv_bn_relu(), SHAPE, {"conv": TABLE})
    conv = paper.layer("conv")
    assert conv.mode == "table"
    assert (conv.exact_macs, conv.other_ops, conv.weight_bytes) == (0, 0, 0)
    assert conv.lookup_adds == 64 * 32 * 9  # C - 1 = 9 additions per output
    assert conv.lookups == 64 * 10 * 32
    assert conv.encoding_macs == 64 * 16 * 150  # D = 144 padded to 150 for C = 10
    assert conv.encoding_comparisons == 64 * 10 * 15
    assert conv.table_bytes == 10 * 16 * 32 * 4
    assert conv.prototype_bytes == 16 * 150 * 4
    bn = paper.layer("bn")
    assert (bn.mode, bn.flops("full"), bn.storage_bytes) == ("folded", 0, 0)
    assert paper.flops == 64 * 32 * 9 + 64 * 32  # lookups + the ReLU
    full = model_cost(_conv_bn_relu(), SHAPE, {"conv": TABLE}, convention="full")
    assert full.flops == paper.flops + 64 * 16 * 150 + 64 * 10 * 15
    assert full.flops > paper.flops


def test_tree_int8_table_layer_by_hand() -> None:
    setting = TABLE.with_(encoder="tree", lut_dtype="int8")
    full = model_cost(_conv_bn_relu(bias=False), SHAPE, {"conv": setting}, convention="full")
    conv = full.layer("conv")
    assert conv.lookup_adds == 64 * 32 * 9 + 2 * 64 * 32  # plus dequantize multiply-add
    assert conv.encoding_macs == 0
    assert conv.encoding_comparisons == 64 * 10 * 4  # log2(16) comparisons per codebook
    assert conv.table_bytes == 10 * 16 * 32 * 1 + 2 * 4 * 32  # per output: one float32 scale and one bias
    assert conv.prototype_bytes == 10 * 15 * 4 + 10 * 4 * 4
    assert full.encoding_ops == 64 * 10 * 4
    assert full.storage_bytes == conv.table_bytes + conv.prototype_bytes


def test_float16_tables_take_two_bytes_per_entry() -> None:
    counts = table_layer_counts(64, 144, 32, TABLE.with_(lut_dtype="float16"))
    assert counts["table_bytes"] == 10 * 16 * 32 * 2
    assert counts["lookup_adds"] == 64 * 32 * 9


def test_table_linear_has_one_row_per_image() -> None:
    model = build_model("tiny", 10, 3)
    fc = model_cost(model, (3, 32, 32), {"fc": TABLE.with_(codebooks=4)}).layer("fc")
    assert (fc.rows, fc.inner_dim, fc.out_features) == (1, 16, 10)
    assert fc.lookup_adds == 10 * 3
    assert fc.encoding_macs == 16 * 16


def test_batchnorm_after_exact_conv_is_not_folded() -> None:
    report = model_cost(build_model("tiny", 10, 3), (3, 32, 32), {"conv2": TABLE})
    assert report.layer("bn1").mode == "exact"
    assert report.layer("bn2").mode == "folded"


def test_no_tables_paper_equals_full_equals_baseline() -> None:
    model = build_model("tiny", 10, 3)
    baseline = model_cost(model, (3, 32, 32)).flops
    exact = {"conv1": LayerSetting(), "fc": LayerSetting()}
    for convention in CONVENTIONS:
        report = model_cost(model, (3, 32, 32), exact, convention)
        assert report.flops == baseline == report.exact_ops
        assert report.encoding_ops == report.lookup_ops == 0


def test_breakdown_sums_to_flops_and_storage_to_bytes() -> None:
    model = build_model("resnet18", 10, 3)
    settings = {"layer1.0.conv1": TABLE, "fc": TABLE.with_(encoder="tree", lut_dtype="int8")}
    for convention in CONVENTIONS:
        report = model_cost(model, (3, 32, 32), settings, convention)
        assert report.flops == report.exact_ops + report.encoding_ops + report.lookup_ops
        assert report.flops == sum(layer.flops(convention) for layer in report.layers)
        assert report.storage_bytes == report.weight_bytes + report.table_bytes + report.prototype_bytes
    paper = model_cost(model, (3, 32, 32), settings)
    assert paper.encoding_ops == 0


def test_exact_weight_bytes_are_parameters_and_running_stats() -> None:
    model = build_model("tiny", 10, 3)
    params = sum(p.numel() for p in model.parameters())
    stats = sum(b.numel() for n, b in model.named_buffers() if "running" in n)
    assert model_cost(model, (3, 32, 32)).weight_bytes == 4 * (params + stats)


def test_layers_in_forward_order_with_shapes() -> None:
    report = model_cost(build_model("tiny", 10, 3), (3, 32, 32))
    assert [layer.name for layer in report.layers][:3] == ["conv1", "bn1", "relu1"]
    conv2 = report.layer("conv2")
    assert (conv2.input_shape, conv2.output_shape, conv2.kind) == ((8, 32, 32), (16, 16, 16), "Conv2d")
    with pytest.raises(KeyError):
        report.layer("conv3")


def test_to_dict_is_json_ready() -> None:
    report = model_cost(build_model("tiny", 10, 3), (3, 32, 32), {"conv1": TABLE}, "full")
    data = json.loads(json.dumps(report.to_dict()))
    assert data["convention"] == "full" and data["flops"] == report.flops
    assert {"exact_ops", "encoding_ops", "lookup_ops", "storage_bytes"} <= set(data)
    assert data["layers"][0]["name"] == "conv1"
    assert data["layers"][0]["flops"] == report.layers[0].flops("full")


def test_cost_keeps_the_training_flag() -> None:
    model = build_model("tiny", 10, 3).train()
    model_cost(model, (3, 32, 32))
    assert model.training


@pytest.mark.parametrize(
    ("settings", "convention", "message"),
    [
        ({}, "exact", "convention"),
        ({"conv9": TABLE}, "paper", "conv9"),
        ({"bn1": TABLE}, "paper", "bn1"),
        ({"relu1": LayerSetting()}, "paper", "relu1"),
    ],
)
def test_invalid_requests_are_refused(settings: dict, convention: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        model_cost(build_model("tiny", 10, 3), (3, 32, 32), settings, convention)


def test_grouped_conv_is_costed_per_group() -> None:
    """A grouped conv is G products of D = C_in / G * k * k inputs and M / G outputs; as tables, every group has
    its own C codebooks (encoding and prototypes G times), and its tables cover its M / G outputs."""
    model = nn.Sequential(OrderedDict([("dw", nn.Conv2d(4, 8, 3, groups=4)), ("relu", nn.ReLU())]))
    report = model_cost(model, (4, 8, 8), {"dw": LayerSetting()})
    rows, inner, out = 36, 9, 8
    assert report.layer("dw").exact_macs == rows * inner * out
    setting = LayerSetting("table", 3, 16)
    table = model_cost(model, (4, 8, 8), {"dw": setting}, "full").layer("dw")
    assert (table.rows, table.inner_dim, table.out_features) == (rows, inner, out)
    assert table.encoding_macs == rows * 16 * 9 * 4 and table.encoding_comparisons == rows * 3 * 15 * 4
    assert table.lookups == rows * 3 * out and table.lookup_adds == rows * out * 2
    assert table.table_bytes == 4 * 3 * 16 * (out // 4) * 4 and table.prototype_bytes == 16 * 9 * 4 * 4


@pytest.mark.parametrize("arch", ["resnet50", "mobilenet_v2", "mobilenet_v3_small", "efficientnet_b0", "vgg11_bn",
                                  "densenet121", "regnet_x_400mf", "convnext_tiny", "shufflenet_v2_x0_5"])
def test_torchvision_macs_match_flop_counter(arch: str) -> None:
    """Every family's multiply-accumulates equal what torch's FlopCounterMode counts (it reports 2 per MAC), and
    every module type these networks use has a cost rule (none left uncounted)."""
    model = torchvision.models.get_model(arch, num_classes=10).eval()
    report = model_cost(model, (3, 64, 64))
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(torch.zeros(1, 3, 64, 64))
    assert sum(layer.exact_macs for layer in report.layers) * 2 == counter.get_total_flops()
    assert report.uncounted == []
    assert report.flops > counter.get_total_flops() // 2  # activations, norms and pools come on top


def test_squeeze_excitation_multiply_is_counted() -> None:
    from torchvision.ops import SqueezeExcitation

    block = SqueezeExcitation(8, 2).eval()
    report = model_cost(block, (8, 4, 4))
    multiply = report.layer("")
    assert multiply.kind == "SqueezeExcitation multiply" and multiply.other_ops == 8 * 4 * 4


def test_module_without_a_rule_is_listed_not_hidden() -> None:
    model = nn.Sequential(OrderedDict([("conv", nn.Conv2d(3, 4, 3)), ("soft", nn.Softmax2d())]))
    report = model_cost(model, (3, 8, 8))
    assert report.uncounted == ["Softmax2d"] and report.layer("soft").mode == "uncounted"
