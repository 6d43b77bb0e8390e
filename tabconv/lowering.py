"""Lowering: convolutions as matrix multiplies (im2col) and batch norm folded into convs.

Everything here is vectorised over rows and taps; PyTorch's own conv is the reference the tests
compare against.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

LOWERABLE = (nn.Conv2d, nn.Linear)


class LoweringError(ValueError):
    """A layer that cannot be lowered to a single matrix multiply."""


def check_lowerable(name: str, module: nn.Module) -> None:
    """Refuse layers whose product is not one dense A @ B (grouped or non-zero-padded convs)."""
    if isinstance(module, nn.Conv2d):
        if module.groups != 1:
            raise LoweringError(
                f"{name}: grouped convolutions (groups={module.groups}) are not supported; "
                "keep this layer exact"
            )
        if module.padding_mode != "zeros":
            raise LoweringError(f"{name}: padding_mode={module.padding_mode!r} is not supported")
        if isinstance(module.padding, str):
            raise LoweringError(f"{name}: string padding {module.padding!r} is not supported")
    elif not isinstance(module, nn.Linear):
        raise LoweringError(f"{name}: {type(module).__name__} is not a Conv2d or Linear layer")


def im2col(x: torch.Tensor, conv: nn.Conv2d) -> torch.Tensor:
    """Rows of A: one per output position (n, h_out, w_out), columns ordered (c_in, ky, kx)."""
    cols = F.unfold(x, conv.kernel_size, conv.dilation, conv.padding, conv.stride)
    return cols.transpose(1, 2).reshape(-1, cols.shape[1])


def output_hw(conv: nn.Conv2d, height: int, width: int) -> tuple[int, int]:
    """Spatial output size of a conv, by PyTorch's formula."""
    sizes = []
    for i, size in enumerate((height, width)):
        span = conv.dilation[i] * (conv.kernel_size[i] - 1) + 1
        sizes.append((size + 2 * conv.padding[i] - span) // conv.stride[i] + 1)
    return sizes[0], sizes[1]


def rows_to_nchw(rows: torch.Tensor, batch: int, height: int, width: int) -> torch.Tensor:
    """Inverse of the row layout of :func:`im2col` for an output matrix (N*Ho*Wo, C_out)."""
    return rows.reshape(batch, height, width, -1).permute(0, 3, 1, 2).contiguous()


def weight_matrix(layer: nn.Conv2d | nn.Linear) -> torch.Tensor:
    """B of shape (D, C_out) so that the layer is A @ B (+ bias)."""
    return layer.weight.detach().reshape(layer.weight.shape[0], -1).t().contiguous()


def bias_vector(layer: nn.Conv2d | nn.Linear) -> torch.Tensor:
    """The layer's bias, zeros when it has none."""
    if layer.bias is None:
        return torch.zeros(layer.weight.shape[0], dtype=layer.weight.dtype, device=layer.weight.device)
    return layer.bias.detach().clone()


def fold_batchnorm(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> nn.Conv2d:
    """A new conv computing bn(conv(x)) in eval mode: scale the weight per output channel, shift the bias."""
    scale = bn.weight.detach() / torch.sqrt(bn.running_var + bn.eps)
    folded = nn.Conv2d(
        conv.in_channels,
        conv.out_channels,
        conv.kernel_size,
        stride=conv.stride,
        padding=conv.padding,
        dilation=conv.dilation,
        groups=conv.groups,
        bias=True,
    ).to(device=conv.weight.device, dtype=conv.weight.dtype)
    with torch.no_grad():
        folded.weight.copy_(conv.weight * scale.reshape(-1, 1, 1, 1))
        folded.bias.copy_((bias_vector(conv) - bn.running_mean) * scale + bn.bias.detach())
    return folded.eval()


@torch.no_grad()
def trace_modules(model: nn.Module, example: torch.Tensor) -> list[tuple[str, nn.Module, int, int]]:
    """Leaf modules in call order as (name, module, id(input), id(output)); each counted at first call."""
    calls: list[tuple[str, nn.Module, int, int]] = []
    keep: list[object] = []  # holds every output so no id() is reused during the trace
    seen: set[str] = set()
    handles = []
    for name, module in model.named_modules():
        if name and not list(module.children()):

            def hook(mod, inputs, output, name=name):
                keep.append(output)
                if name not in seen:
                    seen.add(name)
                    calls.append((name, mod, id(inputs[0]) if inputs else 0, id(output)))

            handles.append(module.register_forward_hook(hook))
    was_training = model.training
    try:
        model.eval()
        model(example)
    finally:
        model.train(was_training)
        for handle in handles:
            handle.remove()
    return calls


def conv_bn_pairs(model: nn.Module, example: torch.Tensor) -> dict[str, str]:
    """Map conv name -> name of the BatchNorm2d that directly consumes its output (foldable pairs)."""
    calls = trace_modules(model, example)
    producer = {out_id: (name, mod) for name, mod, _, out_id in calls}
    pairs: dict[str, str] = {}
    for name, mod, in_id, _ in calls:
        if isinstance(mod, nn.BatchNorm2d) and in_id in producer:
            conv_name, conv = producer[in_id]
            if isinstance(conv, nn.Conv2d):
                pairs[conv_name] = name
    return pairs


def lowerable_layers(model: nn.Module, example: torch.Tensor) -> list[str]:
    """Qualified names of Conv2d/Linear layers that can become table layers, in forward order."""
    names = []
    for name, mod, _, _ in trace_modules(model, example):
        if isinstance(mod, LOWERABLE):
            try:
                check_lowerable(name, mod)
            except LoweringError:
                continue
            names.append(name)
    return names
