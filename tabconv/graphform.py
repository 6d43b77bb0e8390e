"""The table layers written as plain tensor operations, for `torch.onnx.export`.

`TableConv2d` / `TableLinear` compute with `embedding_bag`, strided im2col views and chunked loops:
fast in PyTorch, but not a graph an ONNX runtime or another framework can read. These modules compute
the same codes and sums with standard operators only:

* im2col is a convolution whose kernels are the identity (one output channel per im2col column,
  in the (c_in, ky, kx) order of `tabconv.lowering.im2col`, zero channels for the padding of D);
* exhaustive encoding is ||p||^2 - 2 <x, p> as a grouped convolution (or batched MatMul) + ArgMin,
  taken straight on the input when subspaces are whole input channels (as `TableConv2d` does);
* tree encoding is one Gather of a column, one Gather of a node's threshold and one Greater per level;
* the lookup is a Gather of table rows + ReduceSum over codebooks; int8 and float16 tables are widened
  to float32 before the sum and int8 sums dequantized as `ProductQuantizer.lookup` does.

Codes equal the library's up to float rounding of distances (ties between prototypes); sums differ by
float32 summation order. tests/test_export.py checks both against onnxruntime.
"""

from __future__ import annotations

import copy

import torch
from torch import nn
from torch.nn import functional as F

from tabconv.layers import TableConv2d, TableLinear
from tabconv.quantizer import ProductQuantizer


class _GraphTables(nn.Module):
    """Encoder constants and tables of one quantizer, laid out for Gather-based lookup."""

    def __init__(self, quantizer: ProductQuantizer) -> None:
        super().__init__()
        codebooks, centroids = quantizer.n_codebooks, quantizer.n_centroids
        self.codebooks, self.centroids = codebooks, centroids
        self.padded_dim = quantizer.padded_dim(quantizer.in_features_)
        self.width = self.padded_dim // codebooks
        self.int8 = quantizer.lut_dtype == "int8"
        self.register_buffer("tables", quantizer.tables_.reshape(codebooks * centroids, -1).clone())
        self.register_buffer("code_offsets", torch.arange(codebooks) * centroids)
        if self.int8:
            scale, bias = quantizer.int8_affine()[0], quantizer.int8_bias()
            self.register_buffer("scale", scale.clone())
            self.register_buffer("offset", bias.clone())
        self.tree = quantizer.encoder == "tree"
        if self.tree:
            nodes = centroids - 1
            self.depth = quantizer.split_dims_.shape[1]
            self.register_buffer("columns", quantizer.split_dims_.t() + torch.arange(codebooks) * self.width)
            self.register_buffer("thresholds", quantizer.thresholds_.reshape(-1).clone())
            levels = torch.tensor([2**level - 1 for level in range(self.depth)])
            self.register_buffer("node_offsets", levels.unsqueeze(1) + torch.arange(codebooks) * nodes)  # (L, C)
        else:
            prototypes = quantizer.prototypes_.float()
            self.register_buffer("prototypes_t", -2 * prototypes.transpose(1, 2).contiguous())  # (C, s, K)
            self.register_buffer("norms", (prototypes * prototypes).sum(-1))  # (C, K)

    def tree_codes(self, columns: torch.Tensor, axis: int) -> torch.Tensor:
        """Codes from im2col columns laid along `axis`; codebooks take that axis's place."""
        shape = [1] * columns.dim()
        shape[axis] = self.codebooks
        node = torch.zeros((), dtype=torch.long, device=columns.device)
        for level in range(self.depth):
            value = columns.index_select(axis, self.columns[level])
            threshold = self.thresholds[node + self.node_offsets[level].reshape(shape)]
            node = node * 2 + (value > threshold).long()
        return node

    def lookup(self, codes: torch.Tensor, axis: int) -> torch.Tensor:
        """Sum over codebooks (on `axis` of codes) of the looked-up table rows; outputs go last."""
        shape = [1] * codes.dim()
        shape[axis] = self.codebooks
        picked = F.embedding(codes + self.code_offsets.reshape(shape), self.tables).float()
        summed = picked.sum(axis)
        return self.scale * summed + self.offset if self.int8 else summed


class GraphTableConv2d(nn.Module):
    """`TableConv2d` as Conv / ArgMin or Gather + Greater / Gather + ReduceSum."""

    def __init__(self, layer: TableConv2d) -> None:
        super().__init__()
        quantizer = layer.quantizer
        self.stride, self.padding, self.dilation = layer.stride, layer.padding, layer.dilation
        self.tables = _GraphTables(quantizer)
        codebooks, centroids = quantizer.n_codebooks, quantizer.n_centroids
        self.direct = layer.score_weight is not None  # scores straight from the input, as TableConv2d
        if self.direct:
            self.register_buffer("score_weight", layer.score_weight.clone())
            self.register_buffer("score_bias", layer.score_bias.clone())
        else:
            self.register_buffer("unfold_weight", _unfold_kernels(layer.in_channels, layer.kernel_size,
                                                                  self.tables.padded_dim))
            if not self.tables.tree:
                prototypes_t = self.tables.prototypes_t  # (C, s, K)
                self.register_buffer("score_weight", prototypes_t.transpose(1, 2).reshape(
                    codebooks * centroids, -1, 1, 1).contiguous())
                self.register_buffer("score_bias", self.tables.norms.reshape(-1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.float()
        tables = self.tables
        if self.direct:
            scores = F.conv2d(x, self.score_weight, self.score_bias, self.stride, self.padding, self.dilation,
                              groups=tables.codebooks)
            codes = self._argmin(scores)
        else:
            columns = F.conv2d(x, self.unfold_weight, None, self.stride, self.padding, self.dilation)
            if tables.tree:
                codes = tables.tree_codes(columns, 1)
            else:
                codes = self._argmin(F.conv2d(columns, self.score_weight, self.score_bias, groups=tables.codebooks))
        return tables.lookup(codes, 1).permute(0, 3, 1, 2)

    def _argmin(self, scores: torch.Tensor) -> torch.Tensor:
        """(N, C*K, H, W) scores -> (N, C, H, W) codes, the first minimum on ties (as torch and ONNX)."""
        tables = self.tables
        return scores.reshape(-1, tables.codebooks, tables.centroids, scores.shape[2], scores.shape[3]).argmin(2)


def _unfold_kernels(in_channels: int, kernel_size: tuple[int, int], padded_dim: int) -> torch.Tensor:
    """Identity kernels (D_pad, C_in, kh, kw): output channel d copies im2col column d, zeros past D."""
    inner = in_channels * kernel_size[0] * kernel_size[1]
    eye = torch.eye(padded_dim, inner)
    return eye.reshape(padded_dim, in_channels, *kernel_size)


class GraphTableLinear(nn.Module):
    """`TableLinear` as Pad / MatMul + ArgMin or Gather + Greater / Gather + ReduceSum."""

    def __init__(self, layer: TableLinear) -> None:
        super().__init__()
        self.in_features, self.out_features = layer.in_features, layer.out_features
        self.tables = _GraphTables(layer.quantizer)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tables = self.tables
        rows = F.pad(x.float().reshape(-1, self.in_features), (0, tables.padded_dim - self.in_features))
        if tables.tree:
            codes = tables.tree_codes(rows, 1)
        else:
            subspaces = rows.reshape(-1, tables.codebooks, tables.width).transpose(0, 1)  # (C, N, s)
            scores = torch.matmul(subspaces, tables.prototypes_t) + tables.norms.unsqueeze(1)  # (C, N, K)
            codes = scores.argmin(2).t()
        return tables.lookup(codes, 1).reshape(*x.shape[:-1], self.out_features)


def graph_form(network: nn.Module) -> nn.Module:
    """A copy of a tabled network whose table layers are their graph forms (eval mode)."""
    graph = copy.deepcopy(network).eval()
    for name, module in list(graph.named_modules()):
        if isinstance(module, TableConv2d | TableLinear):
            replacement = GraphTableConv2d(module) if isinstance(module, TableConv2d) else GraphTableLinear(module)
            parent_name, _, child = name.rpartition(".")
            setattr(graph.get_submodule(parent_name) if parent_name else graph, child, replacement)
    return graph
