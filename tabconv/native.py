"""The native table-layer kernels: building them once, loading them, and running a table layer through them.

`tabconv/csrc/lookup.c` encodes rows straight from the feature map and sums int8 tables with in-register shuffles
(vpermb on AVX-512 VBMI, vpshufb on AVX2) or adds whole table rows (any K, float tables, any CPU); the ISA is
chosen at run time. It is compiled with the system's C compiler into `build/native/<hash>/` (the hash covers the
source, the compiler and the flags, so a changed source or compiler builds anew and an unchanged one never
rebuilds). Without a compiler, or on a build error, every table layer keeps the torch path and this is said once.

A layer runs natively when its kernel choice (`auto` or `native`, see `set_kernel`) allows it, it is in eval mode
with no gradient wanted, and `unsupported(quantizer)` is None. `python -m tabconv.native` builds and reports.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

from tabconv.lowering import im2col
from tabconv.quantizer import ProductQuantizer

KERNELS = ("auto", "native", "torch")
ISAS = ("portable", "avx2", "avx512-vbmi")  # tc_isa() values 0, 1, 2
PATHS = ("rows", "vpshufb", "vpermb", "rows-avx512")  # tc_lookup_path() values 0, 1, 2, 3
CSRC = Path(__file__).resolve().parent / "csrc"
SOURCE = CSRC / "lookup.c"
HEADER = CSRC / "lookup.h"
LIBRARY = "libtabconv_lookup.so"
FLAGS = ("-O3", "-std=c11", "-fPIC", "-shared", "-fopenmp")
_INDEX_LIMIT = 2**31 - 1  # the kernels index the input with int32 offsets
NATIVE_WIDTH = 16  # exhaustive encoding at K=16 runs natively up to this sub-vector width (one register of distances)


class NativeUnavailable(RuntimeError):
    """`--kernel native` was asked for where the native kernels cannot run."""


GEOMETRY = ("in_channels", "kh", "kw", "sy", "sx", "py", "px", "dy", "dx")
FIELDS = (*GEOMETRY, "groups", "codebooks", "centroids", "width", "out_features", "encoder", "depth", "lut")
ARRAYS = ("column_channel", "column_ky", "column_kx", "split_dims", "thresholds", "prototypes", "tables", "scale",
          "bias")


class _Desc(ctypes.Structure):
    """tc_desc of lookup.h: the integer fields, then the arrays' addresses."""

    _fields_ = [(name, ctypes.c_int32) for name in FIELDS] + [(name, ctypes.c_void_p) for name in ARRAYS]


_chosen: str | None = None  # use_kernel's choice for this process


def default_kernel() -> str:
    """The kernel of table layers that were given none: `use_kernel`'s, else $TABCONV_KERNEL, else auto."""
    return _chosen or _environment_kernel()


def _environment_kernel() -> str:
    kernel = os.environ.get("TABCONV_KERNEL") or "auto"
    if kernel not in KERNELS:
        raise ValueError(f"TABCONV_KERNEL={kernel!r} is not one of {', '.join(KERNELS)}")
    return kernel


def use_kernel(kernel: str | None) -> str:
    """Make `kernel` (auto | native | torch) this process's default (None: back to $TABCONV_KERNEL, else auto);
    `native` fails here, with the reason, when the kernels cannot be loaded. Returns what table layers will run
    on: native or torch."""
    global _chosen
    if kernel is not None:
        _check_choice(kernel)
    _chosen = kernel
    return runs_on()


def runs_on(kernel: str | None = None) -> str:
    """What table layers given `kernel` (default: the process's) run on: "native" or "torch"."""
    return "torch" if (kernel or default_kernel()) == "torch" or library() is None else "native"


def _check_choice(kernel: str) -> None:
    if kernel not in KERNELS:
        raise ValueError(f"kernel must be one of {', '.join(KERNELS)}, got {kernel!r}")
    if kernel == "native" and library() is None:
        raise NativeUnavailable(f"--kernel native: {failure()}; use --kernel auto or torch")


def build_dir() -> Path:
    """$TABCONV_BUILD_DIR, else the repository's build/native/ (git-ignored)."""
    return Path(os.environ.get("TABCONV_BUILD_DIR") or Path(__file__).resolve().parent.parent / "build" / "native")


def compiler() -> str | None:
    """$CC, else cc, gcc or clang on PATH; None when there is none."""
    names = [os.environ["CC"]] if os.environ.get("CC") else ["cc", "gcc", "clang"]
    return next((found for name in names if (found := shutil.which(name))), None)


def _build_key(cc: str, sources: tuple[Path, ...]) -> str:
    version = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=60).stdout
    digest = hashlib.sha256()
    for source in (*sources, HEADER):
        digest.update(source.read_bytes())
    digest.update(version.encode())
    digest.update(" ".join(FLAGS).encode())
    return digest.hexdigest()[:16]


def build(sources: tuple[Path, ...] = (SOURCE,), name: str = LIBRARY) -> Path:
    """The library `name` compiled from `sources`, built when these sources, compiler and flags have none yet
    (atomically: a build that fails or is interrupted leaves nothing behind). Raises NativeUnavailable with the
    reason."""
    cc = compiler()
    if cc is None:
        raise NativeUnavailable("no C compiler (cc, gcc or clang; set CC to name one)")
    try:
        target = build_dir() / _build_key(cc, sources) / name
    except (OSError, subprocess.SubprocessError) as exc:
        raise NativeUnavailable(f"{cc} does not run ({exc})") from None
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as scratch:
        partial = Path(scratch) / target.name
        done = subprocess.run([cc, *FLAGS, "-o", str(partial), *map(str, sources), "-lm"], capture_output=True,
                              text=True)
        if done.returncode != 0:
            first = (done.stderr.strip().splitlines() or ["no message"])[0]
            raise NativeUnavailable(f"{cc} failed to build {name}: {first}")
        os.replace(partial, target)
    return target


_library: ctypes.CDLL | None = None
_failure: str | None = None


def library() -> ctypes.CDLL | None:
    """The loaded kernels, built on first use; None (with the reason said once) when they cannot be had."""
    global _library, _failure
    if _library is not None or _failure is not None:
        return _library
    try:
        lib = ctypes.CDLL(str(build()))
    except (NativeUnavailable, OSError) as exc:
        _failure = str(exc)
        print(f"tabconv: native table kernels unavailable ({_failure}); table layers run on the torch path",
              file=sys.stderr)
        return None
    _declare(lib)
    _library = lib
    return lib


def failure() -> str | None:
    """Why the kernels are unavailable (after `library()` was tried), else None."""
    return _failure


def _declare(lib: ctypes.CDLL) -> None:
    ptr, i64, i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
    lib.tc_plan_new.argtypes, lib.tc_plan_new.restype = [ctypes.POINTER(_Desc)], ptr
    lib.tc_plan_free.argtypes, lib.tc_plan_free.restype = [ptr], None
    for name in ("tc_forward", "tc_encode"):
        getattr(lib, name).argtypes = [ptr, ptr, i64, i64, i64, i64, i64, i64, i64, ptr, i32]
        getattr(lib, name).restype = i32
    lib.tc_lookup.argtypes, lib.tc_lookup.restype = [ptr, ptr, i64, ptr, i32], i32
    lib.tc_isa.restype = lib.tc_force_isa.restype = lib.tc_lookup_path.restype = i32
    lib.tc_force_isa.argtypes = [i32]
    lib.tc_lookup_path.argtypes = [ptr, i32]


def available() -> bool:
    return library() is not None


def _loaded() -> ctypes.CDLL:
    lib = library()
    if lib is None:
        raise NativeUnavailable(failure() or "native kernels unavailable")
    return lib


def isa() -> str:
    """The instruction set the kernels use on this CPU (after any `force_isa`)."""
    return ISAS[_loaded().tc_isa()]


@contextmanager
def force_isa(name: str) -> Iterator[str]:
    """Run the kernels at most at ISA `name` (tests compare every path); yields the ISA in force."""
    lib = _loaded()
    try:
        yield ISAS[lib.tc_force_isa(ISAS.index(name))]
    finally:
        lib.tc_force_isa(-1)


def unsupported(quantizer: ProductQuantizer) -> str | None:
    """Why this quantizer's layer cannot run natively, or None when it can."""
    if quantizer.tables_ is None:
        return "the layer has no tables"
    if quantizer.n_centroids > 65535:
        return f"K={quantizer.n_centroids} exceeds the kernels' 16-bit codes"
    return None


def set_kernel(model: nn.Module, kernel: str) -> nn.Module:
    """Give every table layer of `model` the kernel choice auto | native | torch (in place; returns model).

    `native` fails here, with the reason, when the kernels cannot be loaded; `auto` falls back quietly."""
    from tabconv.layers import TABLE_LAYERS

    _check_choice(kernel)
    for module in model.modules():
        if isinstance(module, TABLE_LAYERS):
            module.kernel = kernel
    return model


# -- plans: one per table layer, rebuilt when its tables change ----------------------------------------------
class Plan:
    """A layer's arrays laid out for the kernels (owned by the C side; freed with this object)."""

    def __init__(self, lib: ctypes.CDLL, layer: nn.Module, quantizer: ProductQuantizer) -> None:
        self._lib = lib
        self.quantizer = quantizer
        self._buffers = quantizer._buffers  # read directly: nn.Module's attribute lookup is the slow part of a check
        self._watched = _watched(quantizer)
        self.conv = hasattr(layer, "kernel_size")  # a TableConv2d keeps its conv's geometry
        fields, arrays = describe(layer, quantizer)  # the arrays stay alive until tc_plan_new has copied them
        desc = _Desc(**fields, **{name: array.data_ptr() if array is not None else None
                                  for name, array in arrays.items()})
        self.out_features = quantizer.out_features_
        self.handle = lib.tc_plan_new(ctypes.byref(desc))
        if not self.handle:
            raise MemoryError("the native kernels could not allocate a layer plan")
        weakref.finalize(self, lib.tc_plan_free, self.handle)
        self.geometry = {name: fields[name] for name in GEOMETRY}
        self._forward, self._encode, self._lookup = lib.tc_forward, lib.tc_encode, lib.tc_lookup
        self._sizes: dict[tuple[int, int], tuple[int, int]] = {}
        self._calls: dict[tuple, tuple] = {}  # per input shape and strides: the kernel's arguments, the output's
        # Exhaustive distances over wide sub-vectors or many prototypes are a matrix product, which PyTorch's BLAS /
        # oneDNN does faster than the kernels' row-at-a-time loop: there PyTorch encodes and the kernels look up.
        self.encodes = quantizer.encoder == "tree" or (quantizer.n_centroids == 16 and desc.width <= NATIVE_WIDTH)

    def current(self) -> bool:
        """Whether the quantizer still holds the tensors this plan was made from, unedited (a refit or a
        fine-tuned copy replaces them; an in-place edit bumps their version). Called on every forward."""
        buffers = self._buffers
        for name, tensor, version in self._watched:
            now = buffers.get(name)
            if now is None:  # not (or no longer) a buffer: the ordinary attribute
                now = getattr(self.quantizer, name, None)
            if now is not tensor or (version is not None and now._version != version):
                return False
        return True

    def output_hw(self, h: int, w: int) -> tuple[int, int]:
        if (h, w) not in self._sizes:
            g = self.geometry
            self._sizes[h, w] = ((h + 2 * g["py"] - g["dy"] * (g["kh"] - 1) - 1) // g["sy"] + 1,
                                 (w + 2 * g["px"] - g["dx"] * (g["kw"] - 1) - 1) // g["sx"] + 1)
        return self._sizes[h, w]

    def _shape(self, x: torch.Tensor) -> tuple[int, int, int, int, int, int, int]:
        """(n, h, w, and the four strides) of a conv's NCHW input or a linear layer's (N, D) rows."""
        if self.conv:
            return (x.shape[0], x.shape[2], x.shape[3], *x.stride())
        return x.shape[0], 1, 1, x.stride(0), x.stride(1), 0, 0

    def forward(self, x: torch.Tensor, layer: nn.Module) -> torch.Tensor:
        """The layer's output: (N, M, H_out, W_out) in channels-last memory for a conv (the kernels write rows, as
        the torch path's view does), (N, M) for a linear layer. Called on every forward: kept lean."""
        if x.dtype is not torch.float32:  # on the CPU (_active_plan checked), at any strides
            x = x.float()
        if not self.encodes:
            return self._lookup_codes(x, layer)
        key = (x.shape, x.stride())
        call = self._calls.get(key)
        if call is None:
            call = self._calls[key] = self._call_for(x)
        arguments, size, stride = call
        out = torch.empty_strided(size, stride)
        rc = self._forward(self.handle, x.data_ptr(), *arguments, out.data_ptr(), torch.get_num_threads())
        if rc != 0:
            raise RuntimeError(f"the native table kernel failed (code {rc})")
        return out

    def _call_for(self, x: torch.Tensor) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
        """(n, h, w, the four strides), and the output's size and strides, for inputs of x's shape and strides."""
        n, h, w, *strides = self._shape(x)
        m = self.out_features
        if not self.conv:
            return (n, h, w, *strides), (n, m), (m, 1)
        height, width = self.output_hw(h, w)  # (N, M, H, W) in channels-last memory: the rows the kernels write
        return (n, h, w, *strides), (n, m, height, width), (height * width * m, 1, width * m, m)

    def _lookup_codes(self, x: torch.Tensor, layer: nn.Module) -> torch.Tensor:
        """PyTorch's encoder (the library's own), then the kernels' lookups."""
        if self.conv:
            direct = layer.score_weight is not None
            codes = layer.encode_by_conv(x) if direct else self.quantizer.encode(im2col(x, layer))
            height, width = self.output_hw(x.shape[2], x.shape[3])
            out = torch.empty(x.shape[0], height, width, self.out_features)
        else:
            codes = self.quantizer.encode(x)
            out = torch.empty(x.shape[0], self.out_features)
        codes = codes.to(torch.int32).contiguous()
        rc = self._lookup(self.handle, codes.data_ptr(), codes.shape[0], out.data_ptr(), torch.get_num_threads())
        if rc != 0:
            raise RuntimeError(f"the native table lookup failed (code {rc})")
        return out.permute(0, 3, 1, 2) if self.conv else out

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """The codes (rows, C') the native encoder picks, rows ordered (n, h_out, w_out) as im2col's."""
        x = x.detach().to("cpu", torch.float32).contiguous()
        n, h, w, *strides = self._shape(x)
        height, width = self.output_hw(h, w) if self.conv else (1, 1)
        codes = torch.empty(n * height * width, self.quantizer.total_codebooks, dtype=torch.int32)
        rc = self._encode(self.handle, x.data_ptr(), n, h, w, *strides, codes.data_ptr(), torch.get_num_threads())
        if rc != 0:
            raise RuntimeError(f"the native table encoder failed (code {rc})")
        return codes.long()

    def lookup_path(self, rows: int) -> str:
        """Which lookup a tile of `rows` rows takes at the ISA in force: vpermb, vpshufb or rows."""
        return PATHS[self._lib.tc_lookup_path(self.handle, rows)]


def _watched(quantizer: ProductQuantizer) -> tuple[tuple[str, torch.Tensor | None, int | None], ...]:
    """(name, tensor, in-place version) of what a plan is made from: the tables, the encoder and the int8 scale.
    Inference-mode tensors have no version (they cannot change outside that mode)."""
    encoder = "thresholds_" if quantizer.encoder == "tree" else "prototypes_"
    watched = []
    for name in ("tables_", encoder, "table_scale_"):
        tensor = getattr(quantizer, name, None)
        version = None if tensor is None or tensor.is_inference() else tensor._version
        watched.append((name, tensor, version))
    return tuple(watched)


def describe(layer: nn.Module, quantizer: ProductQuantizer) -> tuple[dict[str, int], dict[str, torch.Tensor | None]]:
    """What the kernels run a table layer from (tc_desc in lookup.h): its integer fields (FIELDS) and its arrays
    (ARRAYS, None where the encoder or table type has none), on the CPU and contiguous."""
    geometry = _geometry(layer, hasattr(layer, "kernel_size"))
    fields = dict(**geometry, groups=quantizer.groups, codebooks=quantizer.n_codebooks,
                  centroids=quantizer.n_centroids,
                  width=quantizer.padded_dim(quantizer.in_features_) // quantizer.total_codebooks,
                  out_features=quantizer.out_features_, encoder=int(quantizer.encoder == "tree"),
                  depth=0 if quantizer.split_dims_ is None else quantizer.split_dims_.shape[1],
                  lut=int(quantizer.lut_dtype == "int8"))
    return fields, _arrays(layer, quantizer, geometry)


def _geometry(layer: nn.Module, conv: bool) -> dict[str, int]:
    if not conv:
        return dict(in_channels=layer.in_features, kh=1, kw=1, sy=1, sx=1, py=0, px=0, dy=1, dx=1)
    (kh, kw), (sy, sx), (py, px), (dy, dx) = layer.kernel_size, layer.stride, layer.padding, layer.dilation
    return dict(in_channels=layer.in_channels, kh=kh, kw=kw, sy=sy, sx=sx, py=py, px=px, dy=dy, dx=dx)


def _arrays(layer: nn.Module, quantizer: ProductQuantizer, geometry: dict[str, int]) -> dict[str, torch.Tensor | None]:
    """The arrays a plan copies."""
    groups, taps = quantizer.groups, geometry["kh"] * geometry["kw"]
    per_group = geometry["in_channels"] // groups * taps
    width = quantizer.padded_dim(quantizer.in_features_) // groups  # padded columns of one group
    column = torch.arange(width).repeat(groups)
    group = torch.arange(groups).repeat_interleave(width)
    real = column < per_group
    channel = torch.where(real, group * (geometry["in_channels"] // groups) + column // taps, -1)
    tap = column % taps
    arrays: dict[str, torch.Tensor | None] = {
        "column_channel": channel.int().contiguous(), "column_ky": (tap // geometry["kw"]).int().contiguous(),
        "column_kx": (tap % geometry["kw"]).int().contiguous(), "split_dims": None, "thresholds": None,
        "prototypes": None, "scale": None, "bias": None}
    if quantizer.encoder == "tree":
        arrays["split_dims"] = quantizer.split_dims_.long().cpu().contiguous()
        arrays["thresholds"] = quantizer.thresholds_.float().cpu().contiguous()
    else:
        arrays["prototypes"] = quantizer.prototypes_.float().cpu().contiguous()
    if quantizer.lut_dtype == "int8":
        arrays["tables"] = quantizer.tables_.cpu().contiguous()
        scale, bias = quantizer.int8_affine()[0], quantizer.int8_bias()
        arrays["scale"], arrays["bias"] = scale.float().cpu().contiguous(), bias.float().cpu().contiguous()
    else:
        arrays["tables"] = quantizer.tables_.float().cpu().contiguous()
    return arrays


_plans: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def plan(layer: nn.Module) -> Plan | None:
    """The layer's current plan (made or remade when its tables changed), or None when the layer runs on torch."""
    if getattr(layer, "kernel", None) == "torch":
        return None
    lib = library()
    if lib is None or unsupported(layer.quantizer) is not None:
        return None
    made = _plans.get(layer)
    if made is None or not made.current():
        made = _plans[layer] = Plan(lib, layer, layer.quantizer)
    return made


def _active_plan(layer: nn.Module, x: torch.Tensor) -> Plan | None:
    """The plan this eval-mode forward of `layer` on `x` runs, or None when it takes the torch path (kernel torch,
    a gradient wanted, not on the CPU, unsupported tables or no kernels)."""
    kernel = layer.kernel or _chosen or _environment_kernel()
    if kernel == "torch" or (x.requires_grad and torch.is_grad_enabled()):
        return None
    if x.device.type != "cpu" or x.numel() >= _INDEX_LIMIT:
        return None
    made = _plans.get(layer)  # the common case first: a current plan, without the checks that made it
    return made if made is not None and made.current() else plan(layer)


def forward(layer: nn.Module, x: torch.Tensor) -> torch.Tensor | None:
    """The output of a table layer in eval mode on the native kernels, or None when this forward takes the torch
    path."""
    made = _active_plan(layer, x)
    return None if made is None else made.forward(x, layer)


def runs_natively(layer: nn.Module, x: torch.Tensor) -> bool:
    """Whether a forward of `layer` on `x` takes the native kernels."""
    return not layer.training and _active_plan(layer, x) is not None


def main() -> int:
    """Build (when needed) and report: `python -m tabconv.native`. Builds the onnxruntime operator library too
    (tabconv/ortops.py), so that neither is compiled on first use."""
    lib = library()
    if lib is None:
        return 0  # the reason was printed; the torch path serves every table layer
    print(f"tabconv: native table kernels ready ({ISAS[lib.tc_isa()]}, {SOURCE.name} built under {build_dir()})")
    from tabconv import ortops

    try:
        print(f"tabconv: onnxruntime operator library ready ({ortops.library()})")
    except NativeUnavailable as exc:
        print(f"tabconv: no onnxruntime operator library ({exc}); model-ops.onnx will not run here", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
