"""Measured latency of the exact and the tabled network on this CPU, beside their counted FLOPs.

python bench/latency.py --checkpoint checkpoints/resnet18-mnist.pt --data-root DIR --setting C=8,K=16
                        [--config CFG.json] [--batches 1,64] [--repeats 30] [--warmup 5] [--threads N]
                        [--kernel auto|native|torch] [--no-int8] [--no-ops] [--out F.json]

Both networks run in PyTorch eager and in onnxruntime (the files `tabconv export` writes), on the first test
images, at each batch size: end to end, and per layer in eager (forward hooks around each layer and its batch
norm: the exact layer is conv + BN, the table layer replaces both). Every number is the median over --repeats
runs after --warmup runs; ratios are tabled / exact from the same run (below 1: the tabled network is faster).
Before timing, each runtime's outputs are checked against eager PyTorch. The thread count is the same for
both runtimes (default: PyTorch's). Timings need a quiet machine: other work on the cores inflates them.
Table layers run on --kernel (auto: the native kernels when they are built). What a user would otherwise pick is
timed too: the exact network quantised to int8 in onnxruntime (static QDQ quantisation, calibrated on the timed
images; --no-int8 skips it). onnxruntime runs the tabled network twice: the standard-operator graph (model.onnx,
portable) and model-ops.onnx, whose table layers are tabconv's onnxruntime operator on the native kernels
(tabconv/ortops.py; --no-ops skips it).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime
import torch
from torch import nn

from tabconv import config as config_file
from tabconv import native, ortops
from tabconv.atomic import atomic_write_text
from tabconv.cache import TableCache
from tabconv.config import Calibration
from tabconv.export import TabledNetwork, onnx_bytes, ops_onnx_bytes
from tabconv.latency import images, median_ms, ort_session
from tabconv.latency import measure as measure_end_to_end
from tabconv.session import Session
from tabconv.settings import LayerSetting

SETTING_KEYS = {"C": "codebooks", "K": "centroids", "S": "subvector", "encoder": "encoder", "lut": "lut_dtype"}


def parse_setting(text: str) -> LayerSetting:
    """'C=8,K=16' (or 'C=8 K=16', optionally S=9, encoder=tree, lut=int8) -> a table setting."""
    fields: dict[str, Any] = {}
    for part in text.replace(",", " ").split():
        key, _, value = part.partition("=")
        if key not in SETTING_KEYS or not value:
            raise argparse.ArgumentTypeError(f"setting items look like C=8 K=16 S=9 encoder=tree lut=int8, "
                                             f"got {part!r}")
        fields[SETTING_KEYS[key]] = int(value) if key in ("C", "K", "S") else value
    return LayerSetting("table", **fields)


class LayerTimer:
    """Forward pre/post hooks summing each layer's wall time (its modules' calls) within one forward."""

    def __init__(self, model: nn.Module, layers: Mapping[str, list[str]]) -> None:
        self.totals: dict[str, float] = dict.fromkeys(layers, 0.0)
        self._started: dict[str, float] = {}
        self._handles = []
        for layer, modules in layers.items():
            for name in modules:
                module = model.get_submodule(name)
                self._handles.append(module.register_forward_pre_hook(self._start(name)))
                self._handles.append(module.register_forward_hook(self._stop(name, layer)))

    def _start(self, name: str) -> Callable:
        def hook(module, args) -> None:
            self._started[name] = time.perf_counter()
        return hook

    def _stop(self, name: str, layer: str) -> Callable:
        def hook(module, args, output) -> None:
            self.totals[layer] += time.perf_counter() - self._started.pop(name)
        return hook

    def per_layer_ms(self, run: Callable[[], object], repeats: int, warmup: int) -> dict[str, float]:
        """Median per layer over `repeats` forwards, in milliseconds; the hooks are removed afterwards."""
        samples: dict[str, list[float]] = {layer: [] for layer in self.totals}
        try:
            for i in range(warmup + repeats):
                self.totals = dict.fromkeys(self.totals, 0.0)
                run()
                if i >= warmup:
                    for layer, seconds in self.totals.items():
                        samples[layer].append(seconds)
        finally:
            for handle in self._handles:
                handle.remove()
        return {layer: statistics.median(values) * 1e3 for layer, values in samples.items()}


def table_quantizers(session: Session, args: argparse.Namespace) -> tuple[dict, dict[str, LayerSetting]]:
    """The tables to time: a configuration file's (its tables file when fine-tuned) or the uniform setting's."""
    if args.config:
        loaded, tuned = session.load_configuration(args.config)
        return (tuned.quantizers if tuned is not None else session.tables(loaded.layers)), loaded.layers
    settings = session.complete(session.uniform(args.setting))
    return session.tables(settings), settings


def open_session(args: argparse.Namespace, batch: int) -> Session:
    calibration = (config_file.load(args.config).calibration if args.config
                   else Calibration(images=args.calibration_images))
    cache = None if args.no_cache else TableCache(args.cache_dir)
    return Session.from_checkpoint(args.checkpoint, calibration=calibration, eval_images=batch,
                                   data_root=args.data_root, cache=cache)


def eager(model: nn.Module, layout: torch.memory_format) -> nn.Module:
    return model.to(memory_format=layout).eval()


def agreement(reference: np.ndarray, other: np.ndarray) -> dict[str, float]:
    """How far another runtime's logits are from eager PyTorch's: the check that both time the same network."""
    scale = float(np.abs(reference).max()) or 1.0
    return {"max_abs_diff_relative": float(np.abs(other - reference).max()) / scale,
            "same_predictions": float((other.argmax(1) == reference.argmax(1)).mean())}


def ort_int8_session(exact_onnx: bytes, calibration: torch.Tensor, threads: int) -> onnxruntime.InferenceSession:
    """The exact network quantised to int8 by onnxruntime's static QDQ quantisation (per-channel weights, uint8
    activations calibrated on `calibration`): what a user who wants a fast CPU network would otherwise pick."""
    import tempfile

    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.batches = iter([{"input": calibration[i:i + 16].numpy()} for i in range(0, len(calibration), 16)])

        def get_next(self) -> dict | None:
            return next(self.batches, None)

    with tempfile.TemporaryDirectory() as folder:
        raw, source, target = (Path(folder) / name for name in ("raw.onnx", "exact.onnx", "exact-int8.onnx"))
        raw.write_bytes(exact_onnx)
        quant_pre_process(str(raw), str(source))  # shape inference and graph optimisation, as onnxruntime advises
        quantize_static(str(source), str(target), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
        return ort_session(target.read_bytes(), threads)


def measure(args: argparse.Namespace) -> dict[str, Any]:
    torch.set_num_threads(args.threads)
    kernel = native.use_kernel(args.kernel)
    session = open_session(args, max(args.batches))
    quantizers, settings = table_quantizers(session, args)
    specs = {name: TabledNetwork.from_session(session, tables)
             for name, tables in (("exact", {}), ("tabled", quantizers))}
    layout = torch.channels_last if args.layout == "channels_last" else torch.contiguous_format
    networks = {name: eager(spec.network(), layout) for name, spec in specs.items()}
    native.set_kernel(networks["tabled"], args.kernel)
    runtimes = {name: ort_session(onnx_bytes(spec), args.threads) for name, spec in specs.items()}
    int8 = None if args.no_int8 else ort_int8_session(onnx_bytes(specs["exact"]), images(session, 64), args.threads)
    ops = None if args.no_ops else ops_session(specs["tabled"], args.threads)
    groups = {info.name: [info.name] + ([info.bn] if info.bn else []) for info in session.structure.layers}
    results: dict[str, Any] = {"end_to_end": [], "per_layer": {}, "checks": {}}
    for batch in args.batches:
        x = images(session, batch)
        results["checks"].update(check(networks, runtimes, x, layout))
        timed = measure_end_to_end(networks["exact"], networks["tabled"], x, args.repeats, args.warmup, runtimes,
                                   layout)
        row = {"batch": batch, **timed.row()}
        if int8 is not None:
            feed = {"input": x.contiguous().numpy()}
            with torch.inference_mode():
                reference = networks["exact"](x.contiguous(memory_format=layout)).numpy()
            results["checks"][f"exact int8, onnxruntime, batch {batch}"] = agreement(reference,
                                                                                    int8.run(None, feed)[0])
            row["onnxruntime_int8_exact_ms"] = median_ms(lambda feed=feed: int8.run(None, feed), args.repeats,
                                                         args.warmup)
            row["pytorch_tabled_vs_onnxruntime_int8"] = row["pytorch_tabled_ms"] / row["onnxruntime_int8_exact_ms"]
        if ops is not None:
            row.update(time_ops(ops, networks["tabled"], x, layout, args, results["checks"]))
            row["onnxruntime_ops_ratio"] = row["onnxruntime_ops_tabled_ms"] / row["onnxruntime_exact_ms"]
            if int8 is not None:
                row["onnxruntime_ops_vs_int8"] = row["onnxruntime_ops_tabled_ms"] / row["onnxruntime_int8_exact_ms"]
        results["end_to_end"].append(row)
        results["per_layer"][str(batch)] = {
            name: per_layer(net, groups, x.contiguous(memory_format=layout), args) for name, net in networks.items()}
    tables = {n: s for n, s in settings.items() if s.is_table}
    results["layers"] = layer_rows(session, tables, results["per_layer"])
    results["flops"] = {"exact": session.baseline_cost.flops,
                        **{f"tabled_{c}": session.cost_model.report(tables, c).flops for c in ("paper", "full")}}
    results["setup"] = {**setup(args, session, tables), "kernel": args.kernel, "table_layers_run_on": kernel,
                        "isa": native.isa() if kernel == "native" else None}
    return results


def ops_session(tabled: TabledNetwork, threads: int) -> onnxruntime.InferenceSession | None:
    """model-ops.onnx in onnxruntime with tabconv's operator; None (said on stderr) where it cannot be built."""
    try:
        return ortops.inference_session(ops_onnx_bytes(tabled), threads)
    except native.NativeUnavailable as exc:
        print(f"onnxruntime with tabconv's operator not timed: {exc}", file=sys.stderr)
        return None


@torch.inference_mode()
def time_ops(ops: onnxruntime.InferenceSession, tabled: nn.Module, x: torch.Tensor, layout: torch.memory_format,
             args: argparse.Namespace, checks: dict[str, Any]) -> dict[str, float]:
    """model-ops.onnx (table layers as tabconv's onnxruntime operator) timed, after checking it against eager."""
    feed = {"input": x.contiguous().numpy()}
    reference = tabled(x.contiguous(memory_format=layout)).numpy()
    checks[f"tabled, onnxruntime + tabconv operator, batch {len(x)}"] = agreement(reference, ops.run(None, feed)[0])
    return {"onnxruntime_ops_tabled_ms": median_ms(lambda: ops.run(None, feed), args.repeats, args.warmup)}


@torch.inference_mode()
def check(networks: Mapping[str, nn.Module], runtimes: Mapping[str, onnxruntime.InferenceSession], x: torch.Tensor,
          layout: torch.memory_format) -> dict[str, dict[str, float]]:
    """Each ONNX network's logits against its eager twin's on this batch."""
    return {f"{name}, onnxruntime, batch {len(x)}": agreement(
        networks[name](x.contiguous(memory_format=layout)).numpy(), runtime.run(None, {"input": x.numpy()})[0])
        for name, runtime in runtimes.items()}


@torch.inference_mode()
def per_layer(net: nn.Module, groups: Mapping[str, list[str]], x: torch.Tensor,
              args: argparse.Namespace) -> dict[str, float]:
    return LayerTimer(net, groups).per_layer_ms(lambda: net(x), args.repeats, args.warmup)


def layer_rows(session: Session, tables: Mapping[str, LayerSetting], per_layer: Mapping[str, dict]) -> list[dict]:
    """Per layer: counted FLOPs (per image) beside measured eager times and ratios at every batch size."""
    full = session.cost_model.report(tables, "full")
    rows = []
    for info in session.structure.layers:
        row: dict[str, Any] = {"layer": info.name, "table": info.name in tables,
                               "exact_flops": session.baseline_cost.layer(info.name).flops("paper"),
                               "tabled_flops_full": full.layer(info.name).flops("full")}
        for batch, times in per_layer.items():
            exact, tabled = times["exact"][info.name], times["tabled"][info.name]
            row.update({f"b{batch}_exact_ms": exact, f"b{batch}_tabled_ms": tabled, f"b{batch}_ratio": tabled / exact})
        rows.append(row)
    return rows


def setup(args: argparse.Namespace, session: Session, tables: Mapping[str, LayerSetting]) -> dict[str, Any]:
    return {"checkpoint": args.checkpoint, "model": session.info.model, "dataset": session.info.dataset,
            "config": args.config, "setting": None if args.config else args.setting.to_dict(),
            "table_layers": len(tables), "layers": len(session.structure.layers), "batches": args.batches,
            "repeats": args.repeats, "warmup": args.warmup, "threads": args.threads, "layout": args.layout,
            "cpu_count": os.cpu_count(), "processor": platform.processor() or platform.machine(),
            "torch": torch.__version__, "onnxruntime": onnxruntime.__version__}


def report(results: Mapping[str, Any]) -> str:
    """The tables printed: end to end per batch and runtime, then per layer in eager PyTorch."""
    s = results["setup"]
    flops = results["flops"]
    lines = [f"{s['model']} on {s['dataset']}: {s['table_layers']}/{s['layers']} layers tabled; median of "
             f"{s['repeats']} runs, {s['threads']} threads; ratio = tabled / exact (< 1: tabled faster)",
             f"counted FLOPs per image: exact {flops['exact']:,}, tabled {flops['tabled_paper']:,} (paper convention), "
             f"{flops['tabled_full']:,} (full convention)", "",
             f"{'batch':>5}  {'runtime':12s} {'exact ms':>10} {'tabled ms':>10} {'ratio':>7}"]
    for row in results["end_to_end"]:
        for runtime in ("pytorch", "onnxruntime"):
            lines.append(f"{row['batch']:>5}  {runtime:12s} {row[f'{runtime}_exact_ms']:>10.3f} "
                         f"{row[f'{runtime}_tabled_ms']:>10.3f} {row[f'{runtime}_ratio']:>7.2f}")
        if "onnxruntime_ops_tabled_ms" in row:
            lines.append(f"{row['batch']:>5}  {'ort + ops':12s} {row['onnxruntime_exact_ms']:>10.3f} "
                         f"{row['onnxruntime_ops_tabled_ms']:>10.3f} {row['onnxruntime_ops_ratio']:>7.2f}  tabled "
                         "network with tabconv's onnxruntime operator (model-ops.onnx)")
        if "onnxruntime_int8_exact_ms" in row:
            lines.append(f"{row['batch']:>5}  {'ort int8':12s} {row['onnxruntime_int8_exact_ms']:>10.3f} "
                         f"{'(eager)':>10} {row['pytorch_tabled_vs_onnxruntime_int8']:>7.2f}  exact network in int8 "
                         "(onnxruntime) against the tabled network in eager PyTorch")
    batches = list(results["per_layer"])
    lines += ["", "per layer, PyTorch eager (exact: conv + its batch norm); FLOPs per image: exact, tabled (full)",
              f"{'layer':24s} {'exact FLOPs':>12} {'tab. FLOPs':>12}"
              + "".join(f" {f'b{b} exact':>9} {f'b{b} table':>9} {f'b{b} ratio':>8}" for b in batches)]
    for row in results["layers"]:
        lines.append(f"{row['layer']:24s} {row['exact_flops']:>12,} {row['tabled_flops_full']:>12,}" + "".join(
            f" {row[f'b{b}_exact_ms']:>9.3f} {row[f'b{b}_tabled_ms']:>9.3f} {row[f'b{b}_ratio']:>8.2f}"
            for b in batches))
    lines += ["", "checks (onnxruntime against eager PyTorch): " + "; ".join(
        f"{k}: max diff {v['max_abs_diff_relative']:.1e} of the largest logit, same predictions "
        f"{v['same_predictions']:.0%}" for k, v in results["checks"].items())]
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", required=True)
    what = parser.add_mutually_exclusive_group(required=True)
    what.add_argument("--config", help="a configuration file (a fine-tuned one brings its tables file)")
    what.add_argument("--setting", type=parse_setting, help="every layer tabled, e.g. C=8,K=16")
    parser.add_argument("--data-root", default=None)
    parser.add_argument("--calibration-images", type=int, default=Calibration.images, help="with --setting")
    parser.add_argument("--batches", type=lambda t: [int(b) for b in t.split(",")], default=[1, 64])
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--layout", choices=("channels_last", "contiguous"), default="channels_last",
                        help="eager memory layout (channels-last: the session's, measured faster for ResNets)")
    parser.add_argument("--cache-dir", default=None)
    parser.add_argument("--no-cache", action="store_true")
    parser.add_argument("--kernel", choices=native.KERNELS, default="auto",
                        help="table layers in eager PyTorch: native kernels, torch, or auto (native when built)")
    parser.add_argument("--no-int8", action="store_true", help="skip the int8 onnxruntime exact network")
    parser.add_argument("--no-ops", action="store_true",
                        help="skip the tabled network on tabconv's onnxruntime operator (model-ops.onnx)")
    parser.add_argument("--out", default=None, help="also write the results as JSON here")
    return parser


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = build_parser().parse_args(argv)
    results = measure(args)
    print(report(results))
    if args.out:
        atomic_write_text(Path(args.out), json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    main()
