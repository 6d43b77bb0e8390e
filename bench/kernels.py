"""How close the native lookup kernel comes to the shuffle limit, per core, on ResNet-18's convolutions.

python bench/kernels.py [--layers layer3.1.conv1,layer1.0.conv1] [--batch 64] [--setting S=9,K=16,encoder=tree]
                        [--repeats 50] [--input-shape 1,28,28] [--out F.json]

One 32-byte shuffle per cycle looks up 32 table entries, so a core can do at most ~32 lookups a cycle (64 with a
64-byte vpermb). For each layer this times one table layer alone on one thread (median of --repeats runs after
warm-up), encoding included, and reports lookups per cycle = R * C * M / (seconds * clock), R the rows, C the
codebooks and M the outputs, against 32. The clock is the nominal one /proc/cpuinfo reports (turbo or a lower
AVX-512 clock would move the figure; it is an estimate, not a counter). The same layer in PyTorch eager (conv +
batch norm, channels-last) is timed beside it. Tables are fitted to random rows: the times do not depend on
their values. Needs a quiet machine.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import torch

from tabconv import native
from tabconv.atomic import atomic_write_text
from tabconv.latency import median_ms
from tabconv.latencytable import random_table_layer
from tabconv.models import build_model
from tabconv.settings import LayerSetting
from tabconv.structure import ModelStructure

SHUFFLE_LOOKUPS_PER_CYCLE = 32
WARMUP = 5


def nominal_hz() -> float:
    """The clock /proc/cpuinfo reports (MHz of the first core), in Hz."""
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("cpu MHz"):
            return float(line.split(":")[1]) * 1e6
    raise RuntimeError("no 'cpu MHz' in /proc/cpuinfo")


def parse_setting(text: str) -> LayerSetting:
    keys = {"C": "codebooks", "K": "centroids", "S": "subvector", "encoder": "encoder", "lut": "lut_dtype"}
    fields: dict[str, Any] = {"lut_dtype": "int8"}
    for part in text.replace(",", " ").split():
        key, _, value = part.partition("=")
        fields[keys[key]] = int(value) if key in ("C", "K", "S") else value
    return LayerSetting("table", **fields)


@torch.inference_mode()
def measure(args: argparse.Namespace) -> dict[str, Any]:
    torch.set_num_threads(1)
    model = build_model("resnet18", 10, args.input_shape[0]).eval().to(memory_format=torch.channels_last)
    structure = ModelStructure(model, tuple(args.input_shape))
    hz = nominal_hz()
    rows = []
    for name in args.layers:
        info = structure.layer(name)
        layer = model.get_submodule(name)
        table = random_table_layer(layer, info, args.setting)
        table.kernel = "native"
        x = torch.randn(args.batch, *info.input_shape)
        seconds = median_ms(lambda table=table, x=x: table(x), args.repeats, WARMUP) / 1e3
        bn = model.get_submodule(info.bn) if info.bn else torch.nn.Identity()
        x_cl = x.contiguous(memory_format=torch.channels_last)
        exact_s = median_ms(lambda bn=bn, layer=layer, x_cl=x_cl: bn(layer(x_cl)), args.repeats, WARMUP) / 1e3
        quantizer = table.quantizer
        r = args.batch * info.rows_per_image
        lookups = r * quantizer.total_codebooks * quantizer.out_features_ // quantizer.groups
        per_cycle = lookups / (seconds * hz)
        rows.append({"layer": name, "rows": r, "codebooks": quantizer.total_codebooks, "outputs": info.out_features,
                     "lookups": lookups, "native_ms": seconds * 1e3, "exact_ms": exact_s * 1e3,
                     "lookups_per_cycle": per_cycle, "of_shuffle_limit": per_cycle / SHUFFLE_LOOKUPS_PER_CYCLE,
                     "lookup_path": native.plan(table).lookup_path(64)})
    return {"setup": {"setting": args.setting.to_dict(), "batch": args.batch, "threads": 1, "isa": native.isa(),
                      "nominal_mhz": hz / 1e6, "repeats": args.repeats, "input_shape": args.input_shape},
            "layers": rows}


def report(results: dict[str, Any]) -> str:
    s = results["setup"]
    lines = [f"one core, batch {s['batch']}, {s['isa']}, nominal clock {s['nominal_mhz']:.0f} MHz; lookups per cycle "
             f"against one 32-byte shuffle per cycle (32), encoding included",
             f"{'layer':22s} {'rows':>6} {'C':>5} {'M':>5} {'lookups':>11} {'native ms':>10} {'exact ms':>9} "
             f"{'lookups/cycle':>13} {'of limit':>8}"]
    for r in results["layers"]:
        lines.append(f"{r['layer']:22s} {r['rows']:>6} {r['codebooks']:>5} {r['outputs']:>5} {r['lookups']:>11,} "
                     f"{r['native_ms']:>10.3f} {r['exact_ms']:>9.3f} {r['lookups_per_cycle']:>13.1f} "
                     f"{r['of_shuffle_limit']:>8.0%}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=lambda t: t.split(","),
                        default=["layer1.0.conv1", "layer2.1.conv1", "layer3.1.conv1", "layer4.1.conv1"])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--setting", type=parse_setting, default=parse_setting("S=9,K=16,encoder=tree"))
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--input-shape", type=lambda t: [int(v) for v in t.split(",")], default=[1, 28, 28])
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    if not native.available():
        raise SystemExit(f"native kernels unavailable: {native.failure()}")
    results = measure(args)
    print(report(results))
    if args.out:
        atomic_write_text(Path(args.out), json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    main()
