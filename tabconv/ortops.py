"""The tabled network for onnxruntime with the native kernels as a custom operator.

`model.onnx` (tabconv/graphform.py) is portable: standard operators only, which any ONNX runtime reads, but its
Gathers are what the kernels replace, and it runs many times slower than the exact network. `model-ops.onnx` is
the same network where each table layer is one `TableLayer` node of domain `tabconv`, computed by
`tabconv/csrc/ort_ops.c` on the same kernels (and plans) as PyTorch's native path; everything else stays standard
ONNX. It needs that operator library: `library()` builds it (like the kernels, once per source and compiler) and
`inference_session` registers it.

How the graph is made: the tabled network with every table layer swapped for a placeholder Conv2d / Linear of the
same geometry is exported by `torch.onnx.export` (which names each initializer after its module), and each
placeholder's Conv / Gemm node is then replaced by a TableLayer node whose inputs are the layer's arrays, the
ones `tabconv.native.describe` gives the kernels.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import onnx
import onnxruntime
import torch
from onnx import helper, numpy_helper
from torch import nn

from tabconv import native
from tabconv.convert import set_module
from tabconv.layers import TABLE_LAYERS

if TYPE_CHECKING:
    from tabconv.export import TabledNetwork

DOMAIN, OP_TYPE = "tabconv", "TableLayer"
SOURCE = native.CSRC / "ort_ops.c"
LIBRARY = "libtabconv_ort.so"
# numpy dtypes of the TableLayer inputs after X, in order (ort_ops.c checks them); tables are int8 or float32
INPUT_DTYPES = {"column_channel": np.int32, "column_ky": np.int32, "column_kx": np.int32, "split_dims": np.int64,
                "thresholds": np.float32, "prototypes": np.float32, "tables": None, "scale": np.float32,
                "bias": np.float32}


def library() -> Path:
    """The onnxruntime operator library (ort_ops.c with the kernels), built when needed. Raises
    native.NativeUnavailable with the reason when it cannot be."""
    return native.build((native.SOURCE, SOURCE), LIBRARY)


def inference_session(data: bytes, threads: int, library_path: Path | None = None) -> onnxruntime.InferenceSession:
    """An onnxruntime session of a model-ops.onnx with the operator library registered, on `threads` threads.
    The kernels take their threads from OpenMP; onnxruntime's own threads are told not to spin between operators,
    so that the two do not fight over the cores."""
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = options.inter_op_num_threads = threads
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.register_custom_ops_library(str(library_path or library()))
    return onnxruntime.InferenceSession(data, options, providers=["CPUExecutionProvider"])


def ops_model(tabled: TabledNetwork, exported: onnx.ModelProto) -> onnx.ModelProto:
    """`exported` (the ONNX export of `placeholder_network(tabled)`) with each table layer's node replaced by a
    TableLayer node. Refused when a table layer's node cannot be found (the export named it otherwise)."""
    graph = exported.graph
    initializers = {tensor.name: tensor for tensor in graph.initializer}
    nodes = list(graph.node)
    for name, quantizer in tabled.quantizers.items():
        index = _node_of(nodes, name)
        layer = tabled.model.get_submodule(name)  # the exact layer: the same geometry as its table layer
        fields, arrays = native.describe(layer, quantizer)
        inputs = [nodes[index].input[0]]
        for key, dtype in INPUT_DTYPES.items():
            array = arrays[key]
            values = np.zeros(0, dtype or np.float32) if array is None else array.numpy()
            if dtype is not None:
                values = values.astype(dtype, copy=False)
            inputs.append(f"{name}.table_layer.{key}")
            graph.initializer.append(numpy_helper.from_array(values, inputs[-1]))
        replaced = helper.make_node(OP_TYPE, inputs, list(nodes[index].output), name=f"{name}.table_layer",
                                    domain=DOMAIN, conv=int(hasattr(layer, "kernel_size")), **fields)
        for unused in nodes[index].input[1:]:
            if unused in initializers:
                graph.initializer.remove(initializers.pop(unused))
        nodes[index] = replaced
    del graph.node[:]
    graph.node.extend(nodes)
    exported.opset_import.append(helper.make_opsetid(DOMAIN, 1))
    return exported


def placeholder_network(tabled: TabledNetwork) -> nn.Module:
    """The tabled network with each table layer swapped for a Conv2d / Linear of its geometry (zero weights):
    the export then has one Conv or Gemm node per table layer, its weight named `<layer>.weight`."""
    network = tabled.network()  # a copy already: its table layers can be swapped out
    for name, module in list(network.named_modules()):
        if isinstance(module, TABLE_LAYERS):
            set_module(network, name, _placeholder(module))
    return network.eval()


def _placeholder(layer: nn.Module) -> nn.Module:
    if hasattr(layer, "kernel_size"):
        made = nn.Conv2d(layer.in_channels, layer.out_channels, layer.kernel_size, layer.stride, layer.padding,
                         layer.dilation, layer.groups)
    else:
        made = nn.Linear(layer.in_features, layer.out_features)
    with torch.no_grad():
        for parameter in made.parameters():
            parameter.zero_()
    return made


def _node_of(nodes: list[onnx.NodeProto], name: str) -> int:
    weight = f"{name}.weight"
    for index, node in enumerate(nodes):
        if node.op_type in ("Conv", "Gemm") and weight in node.input[1:2]:
            return index
    raise ValueError(f"table layer {name}: no Conv or Gemm node reads {weight} in the exported graph")
