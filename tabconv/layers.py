"""Drop-in table-lookup versions of Conv2d and Linear.

They keep the geometry of the layer they replace and hold a fitted ProductQuantizer whose
tables already include the layer's bias (and any batch norm folded into it).
"""

from __future__ import annotations

import torch
from torch import nn

from tabconv.lowering import bias_vector, im2col, output_hw, rows_to_nchw, weight_matrix
from tabconv.quantizer import ProductQuantizer
from tabconv.settings import LayerSetting


class TableConv2d(nn.Module):
    """Conv2d computed as im2col rows -> codes -> summed table rows."""

    def __init__(self, conv: nn.Conv2d, quantizer: ProductQuantizer, setting: LayerSetting) -> None:
        super().__init__()
        self.in_channels, self.out_channels = conv.in_channels, conv.out_channels
        self.kernel_size, self.stride = conv.kernel_size, conv.stride
        self.padding, self.dilation = conv.padding, conv.dilation
        self.quantizer = quantizer
        self.setting = setting

    @classmethod
    def from_conv(cls, conv: nn.Conv2d, quantizer: ProductQuantizer, setting: LayerSetting) -> TableConv2d:
        """Tables for this conv (already BN-folded if it had a BN) from a quantizer fitted on its rows."""
        quantizer.set_weight(weight_matrix(conv), bias_vector(conv))
        return cls(conv, quantizer, setting)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        height, width = output_hw(self, x.shape[2], x.shape[3])
        out = self.quantizer(im2col(x, self))
        return rows_to_nchw(out, x.shape[0], height, width).to(x.dtype)

    def extra_repr(self) -> str:
        s = self.setting
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
                f"C={s.codebooks}, K={s.centroids}, encoder={s.encoder}, lut={s.lut_dtype}")


class TableLinear(nn.Module):
    """Linear computed as codes -> summed table rows."""

    def __init__(self, linear: nn.Linear, quantizer: ProductQuantizer, setting: LayerSetting) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.quantizer = quantizer
        self.setting = setting

    @classmethod
    def from_linear(cls, linear: nn.Linear, quantizer: ProductQuantizer, setting: LayerSetting) -> TableLinear:
        quantizer.set_weight(weight_matrix(linear), bias_vector(linear))
        return cls(linear, quantizer, setting)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        return self.quantizer(x.reshape(-1, self.in_features)).reshape(*lead, self.out_features).to(x.dtype)

    def extra_repr(self) -> str:
        s = self.setting
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"C={s.codebooks}, K={s.centroids}, encoder={s.encoder}, lut={s.lut_dtype}")


TABLE_LAYERS = (TableConv2d, TableLinear)


def make_table_layer(layer: nn.Module, quantizer: ProductQuantizer, setting: LayerSetting) -> nn.Module:
    """The table version of a (BN-folded) Conv2d or Linear."""
    if isinstance(layer, nn.Conv2d):
        return TableConv2d.from_conv(layer, quantizer, setting)
    return TableLinear.from_linear(layer, quantizer, setting)
