"""Drop-in table-lookup versions of Conv2d and Linear.

They keep the geometry of the layer they replace and hold a fitted ProductQuantizer whose
tables already include the layer's bias (and any batch norm folded into it).

Exhaustive encoding of a conv whose subspaces are whole input channels (C divides C_in) needs no
im2col at all: ||p||^2 - 2 <x, p> for every prototype is a grouped convolution of the input with
the prototypes as kernels (one group per subspace), and the code is its argmin. That reads the
input once instead of materialising k*k copies of it (measured 3-10x faster than im2col + GEMM on
this machine); other layers take the im2col route. Both give the same codes up to float rounding.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from tabconv import native
from tabconv.lowering import bias_vector, im2col, output_hw, rows_to_nchw, weight_matrix
from tabconv.quantizer import ProductQuantizer
from tabconv.settings import LayerSetting


class TableConv2d(nn.Module):
    """Conv2d computed as im2col rows -> codes -> summed table rows."""

    def __init__(self, conv: nn.Conv2d, quantizer: ProductQuantizer, setting: LayerSetting) -> None:
        super().__init__()
        self.in_channels, self.out_channels = conv.in_channels, conv.out_channels
        self.kernel_size, self.stride = conv.kernel_size, conv.stride
        self.padding, self.dilation, self.groups = conv.padding, conv.dilation, conv.groups
        if quantizer.groups != conv.groups:
            raise ValueError(f"tables in {quantizer.groups} group(s) for a conv with groups={conv.groups}")
        self.quantizer = quantizer
        self.setting = setting
        kernels = _prototype_kernels(quantizer, conv)
        self.register_buffer("score_weight", kernels[0] if kernels else None, persistent=False)
        self.register_buffer("score_bias", kernels[1] if kernels else None, persistent=False)
        self.kernel: str | None = None  # auto | native | torch (tabconv.native.set_kernel); None: the default
        self.train(conv.training)  # the mode of the layer it replaces: eval uses the direct, chunked encoder

    @classmethod
    def from_conv(cls, conv: nn.Conv2d, quantizer: ProductQuantizer, setting: LayerSetting) -> TableConv2d:
        """Tables for this conv (already BN-folded if it had a BN) from a quantizer fitted on its rows."""
        quantizer.set_weight(weight_matrix(conv), bias_vector(conv))
        return cls(conv, quantizer, setting)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            out = native.forward(self, x)  # None: this forward takes the torch path below
            if out is not None:
                return out if out.dtype == x.dtype else out.to(x.dtype)
        height, width = output_hw(self, x.shape[2], x.shape[3])
        if self.training:  # fine-tuning: the quantizer is trainable and reads the conv's input itself
            return rows_to_nchw(self.quantizer.forward_conv(x, self), x.shape[0], height, width)
        step = self._images_per_chunk(height * width)
        parts = [self._lookup_rows(x[start:start + step]) for start in range(0, x.shape[0], step)]
        rows = parts[0] if len(parts) == 1 else torch.cat(parts)
        return rows_to_nchw(rows, x.shape[0], height, width).to(x.dtype)

    def _lookup_rows(self, x: torch.Tensor) -> torch.Tensor:
        """Output rows (N*H_out*W_out, C_out) of some images: codes, then summed table rows."""
        codes = self.encode_by_conv(x) if self.score_weight is not None else self.quantizer.encode(im2col(x, self))
        return self.quantizer.lookup(codes)

    def _images_per_chunk(self, positions: int) -> int:
        """Images encoded at once, so that their im2col rows, codes and outputs stay within _ROW_ELEMENTS (a
        depthwise layer at 112x112 with C=8 has 768 codebooks per row: 55 images at once took 4 GB of codes)."""
        quantizer = self.quantizer
        per_image = positions * (quantizer.padded_dim(quantizer.in_features_) + 2 * quantizer.total_codebooks
                                 + self.out_channels)
        return max(1, _ROW_ELEMENTS // per_image)

    @torch.no_grad()
    def encode_by_conv(self, x: torch.Tensor) -> torch.Tensor:
        """Codes (N*H_out*W_out, C) from grouped-conv distance scores, in image chunks to bound memory."""
        codebooks, centroids = self.quantizer.total_codebooks, self.quantizer.n_centroids
        x = x.float()
        height, width = output_hw(self, x.shape[2], x.shape[3])
        step = max(1, _SCORE_ELEMENTS // (codebooks * centroids * height * width))
        codes = []
        for start in range(0, x.shape[0], step):
            scores = F.conv2d(x[start:start + step], self.score_weight, self.score_bias, self.stride, self.padding,
                              self.dilation, groups=codebooks)
            codes.append(scores.permute(0, 2, 3, 1).reshape(-1, codebooks, centroids).argmin(-1))
        return torch.cat(codes)

    def extra_repr(self) -> str:
        s = self.setting
        groups = f"groups={self.groups}, " if self.groups > 1 else ""
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
                f"{groups}C={s.codebooks}, K={s.centroids}, encoder={s.encoder}, lut={s.lut_dtype}")


_SCORE_ELEMENTS = 1 << 24  # bounds the (images, C*K, H_out, W_out) score block held at once
_ROW_ELEMENTS = 1 << 25  # bounds the rows, codes (int64: 2 elements) and outputs of the images encoded at once


def _prototype_kernels(quantizer: ProductQuantizer, conv: nn.Conv2d) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(-2 * prototypes as grouped-conv kernels, ||p||^2 as bias), or None when subspaces split channels.
    A grouped conv's codebooks never straddle its groups, so the same holds with G * C codebooks."""
    codebooks, prototypes = quantizer.total_codebooks, getattr(quantizer, "prototypes_", None)
    taps = conv.kernel_size[0] * conv.kernel_size[1]
    if (quantizer.encoder != "exhaustive" or prototypes is None or conv.in_channels % codebooks
            or prototypes.shape[-1] != conv.in_channels // codebooks * taps):
        return None
    kernels = prototypes.reshape(codebooks * quantizer.n_centroids, conv.in_channels // codebooks, *conv.kernel_size)
    return -2 * kernels, (prototypes * prototypes).sum(-1).reshape(-1)


class TableLinear(nn.Module):
    """Linear computed as codes -> summed table rows."""

    def __init__(self, linear: nn.Linear, quantizer: ProductQuantizer, setting: LayerSetting) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.quantizer = quantizer
        self.setting = setting
        self.kernel: str | None = None  # auto | native | torch (tabconv.native.set_kernel); None: the default
        self.train(linear.training)

    @classmethod
    def from_linear(cls, linear: nn.Linear, quantizer: ProductQuantizer, setting: LayerSetting) -> TableLinear:
        quantizer.set_weight(weight_matrix(linear), bias_vector(linear))
        return cls(linear, quantizer, setting)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        rows = x.reshape(-1, self.in_features)
        out = None if self.training else native.forward(self, rows)  # None: the torch path
        return (self.quantizer(rows) if out is None else out).reshape(*lead, self.out_features).to(x.dtype)

    def extra_repr(self) -> str:
        s = self.setting
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"C={s.codebooks}, K={s.centroids}, encoder={s.encoder}, lut={s.lut_dtype}")


TABLE_LAYERS = (TableConv2d, TableLinear)

