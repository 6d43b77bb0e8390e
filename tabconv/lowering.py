"""Lowering: convolutions as matrix multiplies (im2col) and batch norm folded into convs.

Everything here is vectorised over rows and taps; PyTorch's own conv is the reference the tests
compare against.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn
from torch.nn import functional as F

LOWERABLE = (nn.Conv2d, nn.Linear)


class LoweringError(ValueError):
    """A layer that cannot be lowered to a single matrix multiply."""


def check_lowerable(name: str, module: nn.Module) -> None:
    """Refuse layers whose product is not A @ B on im2col rows (one product per group of a grouped conv)."""
    if isinstance(module, nn.Conv2d):
        if module.padding_mode != "zeros":
            raise LoweringError(f"{name}: padding_mode={module.padding_mode!r} is not supported")
        if isinstance(module.padding, str):
            raise LoweringError(f"{name}: string padding {module.padding!r} is not supported")
    elif not isinstance(module, nn.Linear):
        raise LoweringError(f"{name}: {type(module).__name__} is not a Conv2d or Linear layer")


def im2col(x: torch.Tensor, conv: nn.Conv2d) -> torch.Tensor:
    """Rows of A: one per output position (n, h_out, w_out), columns ordered (c_in, ky, kx).

    A strided view of the padded input copied once into row order; F.unfold would copy twice (its
    (N, D, L) layout must be transposed) and was measured 5-30x slower on this machine's 2 threads.
    """
    (ph, pw), (sh, sw), (dh, dw), (kh, kw) = conv.padding, conv.stride, conv.dilation, conv.kernel_size
    if ph or pw:
        x = F.pad(x, (pw, pw, ph, ph))
    batch, channels = x.shape[:2]
    height, width = output_hw(conv, x.shape[2] - 2 * ph, x.shape[3] - 2 * pw)
    s_n, s_c, s_h, s_w = x.stride()
    view = x.as_strided((batch, height, width, channels, kh, kw),
                        (s_n, s_h * sh, s_w * sw, s_c, s_h * dh, s_w * dw), x.storage_offset())
    return view.reshape(batch * height * width, channels * kh * kw)


def patch_columns(x: torch.Tensor, conv: nn.Module, columns: torch.Tensor) -> torch.Tensor:
    """im2col(x, conv)[:, columns].t() (len(columns), N H_out W_out) read straight from the padded input: one gather,
    whose backward is one index_add, in place of every row's copy (fine-tuning's hash trees read a few columns). Columns
    past D = C_in kh kw read a zero, as a quantizer's zero padding columns do."""
    (ph, pw), (sh, sw), (dh, dw), (kh, kw) = conv.padding, conv.stride, conv.dilation, conv.kernel_size
    padded = F.pad(x, (pw, pw, ph, ph)).contiguous()
    batch, channels, height, width = padded.shape
    out_h, out_w = output_hw(conv, x.shape[2], x.shape[3])
    flat = torch.cat([padded.reshape(-1), padded.new_zeros(1)])  # the last element: the padding columns' zero
    channel, tap = columns.div(kh * kw, rounding_mode="floor"), columns.remainder(kh * kw)
    ky, kx = tap.div(kw, rounding_mode="floor"), tap.remainder(kw)
    offset = (channel * height + ky * dh) * width + kx * dw  # (columns,) within one image
    ys = torch.arange(out_h, device=x.device) * sh * width
    xs = torch.arange(out_w, device=x.device) * sw
    origin = (torch.arange(batch, device=x.device) * (channels * height * width)).view(-1, 1, 1) + (ys.view(-1, 1) + xs)
    index = offset.unsqueeze(1) + origin.reshape(1, -1)
    index = torch.where((channel < channels).unsqueeze(1), index, flat.shape[0] - 1)
    return flat.index_select(0, index.reshape(-1)).reshape(len(columns), -1)


def output_hw(conv: nn.Conv2d, height: int, width: int) -> tuple[int, int]:
    """Spatial output size of a conv, by PyTorch's formula."""
    sizes = []
    for i, size in enumerate((height, width)):
        span = conv.dilation[i] * (conv.kernel_size[i] - 1) + 1
        sizes.append((size + 2 * conv.padding[i] - span) // conv.stride[i] + 1)
    return sizes[0], sizes[1]


def rows_to_nchw(rows: torch.Tensor, batch: int, height: int, width: int) -> torch.Tensor:
    """Inverse of the row layout of :func:`im2col` for an output matrix (N*Ho*Wo, C_out).

    The result is a view in channels-last memory order (no copy), the layout the session runs in.
    """
    return rows.reshape(batch, height, width, -1).permute(0, 3, 1, 2)


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


class ModuleCall(NamedTuple):
    """One leaf module's first call in a traced forward: what it read and wrote (shapes per image)."""

    name: str
    module: nn.Module
    input_id: int
    output_id: int
    input_shape: tuple[int, ...]
    output_shape: tuple[int, ...]


def example_input(model: nn.Module, input_shape: tuple[int, ...]) -> torch.Tensor:
    """A zeros batch of one image on the model's device and dtype, for tracing."""
    param = next(model.parameters(), None)
    if param is None:
        return torch.zeros((1, *input_shape))
    return torch.zeros((1, *input_shape), device=param.device, dtype=param.dtype)


@torch.no_grad()
def trace_modules(model: nn.Module, example: torch.Tensor) -> list[ModuleCall]:
    """Leaf modules in call order, each recorded at its first call (ids tie producers to consumers)."""
    calls: list[ModuleCall] = []
    keep: list[object] = []  # holds every input and output so no id() is reused during the trace
    seen: set[str] = set()
    handles = []
    for name, module in model.named_modules():
        if name and not list(module.children()):

            def hook(mod, inputs, output, name=name):
                keep.append((inputs, output))  # a freed input's id could come back as a later output's
                if name not in seen:
                    seen.add(name)
                    first = inputs[0] if inputs else None
                    calls.append(ModuleCall(name, mod, id(first) if first is not None else 0, id(output),
                                            tuple(first.shape[1:]) if first is not None else (),
                                            tuple(output.shape[1:])))

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


def conv_bn_pairs(calls: list[ModuleCall]) -> dict[str, str]:
    """Map conv name -> name of the BatchNorm2d that directly consumes its output (foldable pairs)."""
    producer = {call.output_id: call for call in calls}
    pairs: dict[str, str] = {}
    for call in calls:
        conv = producer.get(call.input_id)
        if isinstance(call.module, nn.BatchNorm2d) and conv is not None and isinstance(conv.module, nn.Conv2d):
            pairs[conv.name] = call.name
    return pairs


def unlowerable_layers(calls: list[ModuleCall]) -> dict[str, str]:
    """Conv2d/Linear layers that run but cannot become table layers, with the reason (they stay exact)."""
    reasons = {}
    for call in calls:
        if isinstance(call.module, LOWERABLE):
            try:
                check_lowerable(call.name, call.module)
            except LoweringError as err:
                reasons[call.name] = str(err)
    return reasons


def lowerable_layers(calls: list[ModuleCall]) -> list[str]:
    """Qualified names of Conv2d/Linear layers that can become table layers, in forward order."""
    names = []
    for call in calls:
        if isinstance(call.module, LOWERABLE):
            try:
                check_lowerable(call.name, call.module)
            except LoweringError:
                continue
            names.append(call.name)
    return names
