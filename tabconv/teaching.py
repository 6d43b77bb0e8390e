"""One output value of a table layer, taken apart step by step (the explorer's teaching view).

For a layer, an evaluation image and an output position: the im2col row (patch) the layer sees in
the exact network, its split into C subspaces, the prototype each subspace is encoded to, the table
entries that get summed, and the exact dot product of the BN-folded layer on the same patch. Every
number is computed with the library's own quantizer, so it is what the table layer really does.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from tabconv.calibrate import folded_layer, layer_rows
from tabconv.lowering import bias_vector, weight_matrix
from tabconv.quantizer import ProductQuantizer, pad_columns
from tabconv.session import Session
from tabconv.settings import LayerSetting
from tabconv.structure import LayerInfo

GLOSSARY: dict[str, str] = {
    "im2col": "Lowering a convolution to a matrix product: every output position's input window (all input "
              "channels × kernel taps) is unrolled into one row of D numbers, so the convolution becomes "
              "rows × weight matrix. A linear layer needs no lowering: its row is an image's feature vector.",
    "subspace / codebook": "The D columns of a row are cut into C consecutive pieces (subspaces); each piece has "
                           "its own codebook of K prototypes.",
    "prototype": "A typical value of one piece, learned by k-means on calibration images; a piece is replaced by "
                 "its nearest prototype.",
    "table": "Computed offline: every prototype times the weights of every output channel, T[c, k, m]. At run "
             "time the layer looks entries up and adds them instead of multiplying.",
    "encoding": "Finding each piece's prototype at run time (nearest by squared distance, or a hash tree's "
                "comparisons); only the prototype's index is kept.",
    "folded batch norm": "A batch norm after a convolution is a per-channel scale and shift, so it is merged "
                         "exactly into the convolution's weights and bias before the tables are built.",
    "FLOPs, paper convention": "Encoding counted as free, as the TabConv paper counted: exact layers' "
                               "multiply-adds plus the tables' lookups and additions.",
    "FLOPs, full convention": "Encoding counted too (a nearest-prototype search costs about D·K multiply-adds "
                              "per row): the honest cost on ordinary hardware.",
}


def explain(session: Session, layer_name: str, image_index: int = 0, position: int | tuple[int, int] | None = None,
            settings: Mapping[str, LayerSetting] | None = None, channel: int | None = None) -> dict[str, Any]:
    """Everything needed to show how one output of `layer_name` is computed from tables.

    `settings` is the configuration whose tables are used (default: the session's current one); the
    layer must be a table layer in it. `position` is a row of the layer's im2col matrix for one image,
    or (h, w) of a conv output (default: the row whose exact output is largest, so that a newcomer sees
    a non-trivial sum). `channel` picks the output channel whose sum is itemised (default: the one with
    the largest exact magnitude).
    """
    info = session.structure.layer(layer_name)
    settings = dict(settings if settings is not None else session.current.settings)
    setting = settings.get(layer_name)
    if setting is None or not setting.is_table:
        raise ValueError(f"layer {layer_name!r} is exact in this configuration: give it a table setting to explain it")
    if info.groups > 1:
        raise ValueError(f"layer {layer_name!r} is a grouped convolution (groups={info.groups}); the walkthrough "
                         "explains ungrouped layers: pick another layer")
    if not 0 <= image_index < len(session.eval_set):
        raise ValueError(f"image_index must be in 0..{len(session.eval_set) - 1}, got {image_index}")
    quantizer = _quantizer(session, info, settings)
    layer = folded_layer(session.model, info)
    rows = layer_rows(layer, _layer_input(session, info, image_index)).float()
    weight, bias = weight_matrix(layer).float(), bias_vector(layer).float()
    if position is None:
        position = int((rows @ weight + bias).norm(dim=1).argmax())
    row, hw = _row_index(info, position)
    patch = rows[row]
    exact = patch @ weight + bias
    codes = quantizer.encode(patch[None])[0]
    table_terms = table_entries(quantizer, codes)
    table_sum = table_terms.sum(0)
    channel = int(exact.abs().argmax()) if channel is None else channel
    if not 0 <= channel < info.out_features:
        raise ValueError(f"channel must be in 0..{info.out_features - 1}, got {channel}")
    padded = pad_columns(patch[None], quantizer.padded_dim(info.inner_dim))[0]
    width = padded.numel() // setting.codebooks
    w_padded = pad_columns(weight.t(), padded.numel()).t()
    exact_terms = torch.einsum("cs,csm->cm", padded.reshape(setting.codebooks, width),
                               w_padded.reshape(setting.codebooks, width, -1))
    exact_terms[0] += bias  # the tables carry the bias in codebook 0
    table_terms, exact_terms = table_terms[:, channel].tolist(), exact_terms[:, channel].tolist()
    return {
        "layer": layer_name, "kind": info.kind, "bn": info.bn, "setting": setting.to_dict(),
        "image_index": image_index, "label": int(session.eval_set.labels[image_index]),
        "position": {"row": row, "h": hw[0] if hw else None, "w": hw[1] if hw else None},
        "input_shape": list(info.input_shape), "output_shape": list(info.output_shape),
        "kernel": _kernel(layer), "inner_dim": info.inner_dim, "padded_dim": padded.numel(),
        "codebooks": setting.codebooks, "centroids": setting.centroids, "subspace_width": width,
        "patch": patch.tolist(),
        "subspaces": _subspaces(quantizer, padded, codes, width),
        "channel": channel,
        "table_terms": table_terms, "exact_terms": exact_terms,
        "contributions": contributions(table_terms, exact_terms),
        "table_value": float(table_sum[channel]), "exact_value": float(exact[channel]),
        "table_sum": table_sum.tolist(), "exact": exact.tolist(),
        **_errors(table_sum, exact),
    }


def contributions(table_terms: list[float], exact_terms: list[float]) -> list[dict[str, float]]:
    """Per subspace: its table entry, the exact partial dot product it stands for, and their gap.

    The gaps add up to the channel's error (table sum − exact value), so the largest ones say which
    subspaces' prototypes are to blame."""
    return [{"subspace": c, "table": t, "exact": e, "gap": t - e}
            for c, (t, e) in enumerate(zip(table_terms, exact_terms, strict=True))]


def worst_subspace(result: Mapping[str, Any]) -> int:
    """The subspace whose gap is largest in magnitude: the one worth looking at first."""
    return max(result["contributions"], key=lambda item: abs(item["gap"]))["subspace"]


def error_summary(result: Mapping[str, Any], top: int = 3) -> dict[str, Any]:
    """The channel's approximation error and how much of it its `top` largest subspace gaps make up."""
    error = result["table_value"] - result["exact_value"]
    ranked = sorted(result["contributions"], key=lambda item: abs(item["gap"]), reverse=True)[:top]
    return {"error": error, "relative": abs(error) / abs(result["exact_value"]) if result["exact_value"] else None,
            "largest": ranked, "largest_sum": sum(item["gap"] for item in ranked)}


def column_labels(result: Mapping[str, Any], start: int, stop: int) -> list[str]:
    """What each patch column in [start, stop) is: an input channel and kernel tap of a conv window,
    a feature of a linear layer's input, or zero padding."""
    labels = []
    for col in range(start, stop):
        if col >= result["inner_dim"]:
            labels.append(f"{col}: zero padding")
        elif result["kernel"]:
            _, kh, kw = result["kernel"]
            c_in, tap = divmod(col, kh * kw)
            labels.append(f"{col}: input channel {c_in}, tap ({tap // kw}, {tap % kw})")
        else:
            labels.append(f"{col}: feature {col}")
    return labels


def table_entries(quantizer: ProductQuantizer, codes: torch.Tensor) -> torch.Tensor:
    """(C, M) float table rows T[c, codes[c], :] (int8 tables dequantized); their sum is the output."""
    return quantizer.table_values()[torch.arange(quantizer.n_codebooks), codes.to(quantizer.tables_.device)]


def _quantizer(session: Session, info: LayerInfo, settings: dict[str, LayerSetting]) -> ProductQuantizer:
    """The layer's tables; only it and the layers before it are built (sequential mode needs those)."""
    upto = session.structure.index(info.name)
    needed = {n: s for n, s in settings.items() if session.structure.index(n) <= upto}
    with torch.no_grad():
        return session.builder.build_all(needed)[info.name]


@torch.no_grad()
def _layer_input(session: Session, info: LayerInfo, image_index: int) -> torch.Tensor:
    """The layer's input in the exact network for one evaluation image."""
    captured: dict[str, torch.Tensor] = {}

    def keep(mod: nn.Module, inputs: tuple, output: torch.Tensor) -> None:  # returns None: output unchanged
        captured.setdefault("x", inputs[0].clone())  # later in-place ops must not change it

    handle = session.model.get_submodule(info.name).register_forward_hook(keep)
    try:
        session.model(session.eval_set.batch(slice(image_index, image_index + 1)).to(session.device))
    finally:
        handle.remove()
    return captured["x"]


def _row_index(info: LayerInfo, position: int | tuple[int, int]) -> tuple[int, tuple[int, int] | None]:
    """The im2col row of a position, and its (h, w) for a conv."""
    if isinstance(position, tuple):
        if info.kind != "conv":
            raise ValueError(f"{info.name} is a linear layer: give its position as a row index")
        h, w = position
        height, width = info.output_shape[1], info.output_shape[2]
        if not (0 <= h < height and 0 <= w < width):
            raise ValueError(f"position (h, w) must be within the {height}x{width} output, got {position}")
        return h * width + w, (h, w)
    if not 0 <= position < info.rows_per_image:
        raise ValueError(f"position must be a row in 0..{info.rows_per_image - 1}, got {position}")
    if info.kind == "conv":
        return position, divmod(position, info.output_shape[2])
    return position, None


def _kernel(layer: nn.Module) -> list[int] | None:
    """(C_in, kh, kw): how the patch's columns are ordered (None for a linear layer)."""
    return [layer.in_channels, *layer.kernel_size] if isinstance(layer, nn.Conv2d) else None


def _subspaces(quantizer: ProductQuantizer, padded: torch.Tensor, codes: torch.Tensor,
               width: int) -> list[dict[str, Any]]:
    """Per subspace: its columns, values, chosen prototype (restricted to these columns) and distances."""
    prototypes = quantizer.prototypes_.float()
    items = []
    for c in range(quantizer.n_codebooks):
        cols = slice(c * width, (c + 1) * width)
        values = padded[cols]
        # the tree encoder refits full-width prototypes: show their part on this subspace's columns
        candidates = prototypes[c][:, cols] if prototypes.shape[-1] == padded.numel() else prototypes[c]
        distances = ((candidates - values) ** 2).sum(-1)
        code = int(codes[c])
        runner_up = distances.clone()
        runner_up[code] = float("inf")
        items.append({"index": c, "columns": [cols.start, cols.stop],
                      "values": values.tolist(), "code": code, "prototype": candidates[code].tolist(),
                      "distance": float(distances[code]), "runner_up_distance": float(runner_up.min())
                      if quantizer.n_centroids > 1 else None})
    return items


def _errors(approx: torch.Tensor, exact: torch.Tensor) -> dict[str, float]:
    """Relative error and cosine of the layer's whole output vector at this position."""
    norm = float(exact.norm())
    cosine = float(torch.nn.functional.cosine_similarity(approx, exact, dim=0)) if norm > 0 else 1.0
    return {"relative_error": float((approx - exact).norm()) / norm if norm > 0 else 0.0, "cosine": cosine}
