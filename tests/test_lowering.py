"""im2col and batch-norm folding are exact: proven against PyTorch's own conv and batch norm."""

from __future__ import annotations

import pytest
import torch
import torchvision
from torch import nn

from tabconv.lowering import (
    LoweringError,
    bias_vector,
    check_lowerable,
    conv_bn_pairs,
    fold_batchnorm,
    im2col,
    lowerable_layers,
    output_hw,
    rows_to_nchw,
    trace_modules,
    unlowerable_layers,
    weight_matrix,
)

CASES = [  # (in, out, kernel, stride, padding, dilation, height, width, bias)
    (3, 8, 3, 1, 1, 1, 9, 9, True),
    (4, 5, (3, 5), (2, 1), (1, 2), 1, 11, 8, False),
    (2, 6, 3, 2, 0, 2, 13, 12, True),
    (1, 64, 7, 2, 3, 1, 28, 28, False),
    (16, 4, 1, 1, 0, 1, 5, 7, True),
    (3, 3, 4, 3, 2, (2, 1), 17, 10, True),
]


@pytest.mark.parametrize("case", CASES)
def test_im2col_matmul_equals_conv2d(case):
    c_in, c_out, kernel, stride, padding, dilation, h, w, bias = case
    torch.manual_seed(0)
    conv = nn.Conv2d(c_in, c_out, kernel, stride, padding, dilation, bias=bias).double()
    x = torch.randn(3, c_in, h, w, dtype=torch.float64)
    rows = im2col(x, conv)
    ho, wo = output_hw(conv, h, w)
    assert rows.shape == (3 * ho * wo, conv.weight[0].numel())
    out = rows_to_nchw(rows @ weight_matrix(conv) + bias_vector(conv), 3, ho, wo)
    torch.testing.assert_close(out, conv(x), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("padding", [0, 1])
def test_im2col_of_non_contiguous_inputs_matches_unfold(padding):
    """Slices and channels-last tensors (strided views) give the same rows as F.unfold."""
    conv = nn.Conv2d(3, 4, 3, stride=2, padding=padding)
    base = torch.randn(2, 6, 11, 12)
    for x in (base[:, 1:4, 1:], base[:, :3].contiguous(memory_format=torch.channels_last)):
        cols = torch.nn.functional.unfold(x, 3, 1, padding, 2)
        assert torch.equal(im2col(x, conv), cols.transpose(1, 2).reshape(-1, cols.shape[1]))


def test_linear_weight_matrix():
    torch.manual_seed(0)
    fc = nn.Linear(7, 3)
    x = torch.randn(5, 7)
    torch.testing.assert_close(x @ weight_matrix(fc) + bias_vector(fc), fc(x))


@pytest.mark.parametrize("bias", [False, True])
def test_batchnorm_folding_is_exact(bias):
    torch.manual_seed(1)
    conv = nn.Conv2d(4, 6, 3, padding=1, bias=bias).double()
    bn = nn.BatchNorm2d(6).double()
    with torch.no_grad():
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.2, 3)
        bn.weight.uniform_(-2, 2)
        bn.bias.uniform_(-1, 1)
    bn.eval()
    x = torch.randn(2, 4, 8, 8, dtype=torch.float64)
    torch.testing.assert_close(fold_batchnorm(conv, bn)(x), bn(conv(x)), rtol=1e-12, atol=1e-12)


def test_unsupported_layers_are_refused_clearly():
    check_lowerable("dw", nn.Conv2d(4, 4, 3, groups=4))  # grouped: one product per group
    with pytest.raises(LoweringError, match="padding_mode"):
        check_lowerable("reflect", nn.Conv2d(4, 4, 3, padding=1, padding_mode="reflect"))
    with pytest.raises(LoweringError, match="not a Conv2d or Linear"):
        check_lowerable("bn", nn.BatchNorm2d(3))


def test_resnet_pairs_and_forward_order():
    model = torchvision.models.resnet18(num_classes=10)
    calls = trace_modules(model, torch.zeros(1, 3, 32, 32))
    pairs = conv_bn_pairs(calls)
    assert pairs["conv1"] == "bn1"
    assert pairs["layer2.0.downsample.0"] == "layer2.0.downsample.1"
    assert pairs["layer4.1.conv2"] == "layer4.1.bn2"
    names = lowerable_layers(calls)
    assert len(names) == 21 and names[0] == "conv1" and names[-1] == "fc"
    assert names.index("layer2.0.conv2") < names.index("layer2.0.downsample.0") < names.index("layer2.1.conv1")


def test_grouped_conv_is_a_table_layer_and_others_are_listed_with_a_reason():
    model = nn.Sequential(nn.Conv2d(3, 6, 3), nn.Conv2d(6, 6, 3, groups=3), nn.Conv2d(6, 6, 3, padding=1,
                          padding_mode="reflect"), nn.Flatten(), nn.LazyLinear(2))
    model(torch.zeros(1, 3, 8, 8))
    calls = trace_modules(model, torch.zeros(1, 3, 8, 8))
    assert lowerable_layers(calls) == ["0", "1", "4"]
    reasons = unlowerable_layers(calls)
    assert list(reasons) == ["2"] and "padding_mode" in reasons["2"]


def test_trace_pairs_survive_freed_inputs():
    """A batch norm reading a temporary (DenseNet's concatenations) must never pair with a conv whose output later
    took the freed temporary's address: every traced pair has matching channel counts."""
    model = torchvision.models.densenet121(num_classes=3).eval()
    for _ in range(3):
        pairs = conv_bn_pairs(trace_modules(model, torch.zeros(1, 3, 32, 32)))
        assert all(model.get_submodule(c).out_channels == model.get_submodule(b).num_features
                   for c, b in pairs.items())
