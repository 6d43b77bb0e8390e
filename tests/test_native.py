"""The native kernels against the library's own path: same codes, same outputs up to summation order.

Every layer kind (stem, strided, 1x1, grouped, depthwise, linear), both encoders, int8 / float16 / float32
tables, K below, at and above 16, batch 1 and 64, at every instruction set this CPU can run (vpermb, vpshufb,
the portable path), and end to end on the embedded default. Without a compiler the torch path serves, saying so
once (a subprocess with CC pointing nowhere).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from tabconv import native
from tabconv.layers import TableConv2d, TableLinear
from tabconv.lowering import im2col
from tabconv.quantizer import ProductQuantizer
from tabconv.settings import LayerSetting

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.skipif(not native.available(), reason=f"native kernels unavailable: {native.failure()}")


def _isas() -> list[str]:
    """Every ISA this CPU runs: the best one and each one below it."""
    if not native.available():
        return []
    return list(native.ISAS[: native.ISAS.index(native.isa()) + 1])


# (name, in, out, kernel, stride, padding, groups, height, width)
CONVS = [
    ("stem", 1, 64, 7, 2, 3, 1, 28, 28),
    ("strided", 16, 32, 3, 2, 1, 1, 13, 11),
    ("odd", 5, 7, 3, 1, 1, 1, 9, 10),
    ("pointwise", 24, 40, 1, 1, 0, 1, 7, 7),
    ("grouped", 12, 18, 3, 1, 1, 3, 8, 9),
    ("depthwise", 8, 8, 3, 1, 1, 8, 10, 10),
]


def _table_conv(spec: tuple, encoder: str, lut: str, centroids: int, seed: int = 0) -> tuple[TableConv2d, nn.Conv2d]:
    _, c_in, c_out, kernel, stride, padding, groups, height, width = spec
    torch.manual_seed(seed)
    conv = nn.Conv2d(c_in, c_out, kernel, stride, padding, groups=groups).eval()
    columns = c_in // groups * kernel * kernel
    codebooks = max(1, min(8, columns // 3))
    quantizer = ProductQuantizer(codebooks, centroids, encoder, lut, groups=groups)
    quantizer.fit(im2col(torch.randn(8, c_in, height, width), conv))
    setting = LayerSetting("table", codebooks, centroids, encoder, lut)
    return TableConv2d.from_conv(conv, quantizer, setting).eval(), conv


def _both(layer: nn.Module, x: torch.Tensor, isa: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(library's torch path, native path at `isa`) outputs of one layer."""
    with torch.no_grad():
        layer.kernel = "torch"
        want = layer(x)
        layer.kernel = "native"
        with native.force_isa(isa):
            got = layer(x)
    return want, got


def _close(got: torch.Tensor, want: torch.Tensor) -> None:
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * want.abs().max().item())


@pytest.mark.parametrize("isa", _isas())
@pytest.mark.parametrize("spec", CONVS, ids=[c[0] for c in CONVS])
@pytest.mark.parametrize("encoder,lut,centroids", [
    ("tree", "int8", 16), ("exhaustive", "int8", 16), ("tree", "int8", 64), ("exhaustive", "int8", 8),
    ("exhaustive", "int8", 256), ("tree", "float32", 16), ("exhaustive", "float16", 32)])
@pytest.mark.parametrize("batch", [1, 64])
def test_conv_layers_match_the_library(spec, encoder, lut, centroids, batch, isa):
    if encoder == "tree" and spec[6] > 1:
        pytest.skip("the hash tree does not support grouped convolutions")
    layer, conv = _table_conv(spec, encoder, lut, centroids)
    x = torch.randn(batch, spec[1], spec[7], spec[8])
    want, got = _both(layer, x, isa)
    assert got.shape == want.shape == conv(x).shape
    with native.force_isa(isa):
        codes = native.plan(layer).encode(x)
    library = layer.quantizer.encode(im2col(x, conv))
    if encoder == "tree":  # comparisons of the same float values: the very same codes
        assert torch.equal(codes, library)
        _close(got, want)
    else:  # distances summed in another order: a near-tie may flip, and then only that row differs
        differ = (codes != library).any(1)
        assert differ.float().mean() <= 0.01
        rows = want.permute(0, 2, 3, 1).reshape(-1, want.shape[1])[~differ]
        _close(got.permute(0, 2, 3, 1).reshape(-1, got.shape[1])[~differ], rows)


def test_the_fast_paths_are_the_ones_taken():
    """A K=16 int8 layer takes vpermb on AVX-512 VBMI, vpshufb on AVX2, and rows on the portable path."""
    layer, _ = _table_conv(CONVS[1], "tree", "int8", 16)
    expected = {"avx512-vbmi": "vpermb", "avx2": "vpshufb", "portable": "rows"}
    for isa in _isas():
        with native.force_isa(isa):
            assert native.plan(layer).lookup_path(64) == expected[isa]
            assert native.plan(layer).lookup_path(4) == ("rows-avx512" if isa == "avx512-vbmi" else "rows")


@pytest.mark.parametrize("isa", _isas())
@pytest.mark.parametrize("encoder,lut,centroids", [("tree", "int8", 16), ("exhaustive", "int8", 16),
                                                    ("exhaustive", "float32", 64)])
@pytest.mark.parametrize("batch", [1, 64])
def test_linear_layers_match_the_library(encoder, lut, centroids, batch, isa):
    torch.manual_seed(1)
    linear = nn.Linear(50, 10).eval()
    quantizer = ProductQuantizer(5, centroids, encoder, lut).fit(torch.randn(600, 50))
    layer = TableLinear.from_linear(linear, quantizer, LayerSetting("table", 5, centroids, encoder, lut)).eval()
    x = torch.randn(batch, 50)
    want, got = _both(layer, x, isa)
    with native.force_isa(isa):
        assert torch.equal(native.plan(layer).encode(x), quantizer.encode(x)) or encoder == "exhaustive"
    _close(got, want)


@pytest.mark.parametrize("spec", [CONVS[2], CONVS[1]], ids=["5-channels", "16-channels"])
@pytest.mark.parametrize("batch", [6, 37])  # below 16 images: output positions in lanes; from 16: images in lanes
def test_channels_last_and_sliced_inputs_give_the_same_outputs(spec, batch):
    layer, _ = _table_conv(spec, "tree", "int8", 16)
    x = torch.randn(batch, spec[1], spec[7], spec[8])
    want, got = _both(layer, x, native.isa())
    _close(got, want)
    with torch.no_grad():
        assert torch.equal(layer(x.contiguous(memory_format=torch.channels_last)), got)
        sliced = torch.randn(batch + 1, *x.shape[1:])
        layer.kernel = "torch"
        expected = layer(sliced[1:])
        layer.kernel = "native"
        _close(layer(sliced[1:]), expected)


@pytest.mark.parametrize("isa", _isas())
@pytest.mark.parametrize("batch", [1, 2, 3])  # 4, 8 and 12 output rows: codebooks in lanes up to 8 rows, then rows
def test_deep_layers_at_batch_1_pick_the_library_codes(batch, isa):
    """A deep layer at batch 1 has a handful of output rows: the encoder then puts 20 codebooks (a full and a part
    lane group) of one row side by side; border taps read padding. Same codes and outputs as the library's."""
    torch.manual_seed(3)
    conv = nn.Conv2d(40, 24, 3, 2, 1).eval()
    quantizer = ProductQuantizer(20, 16, "tree", "int8").fit(im2col(torch.randn(16, 40, 4, 3), conv))
    layer = TableConv2d.from_conv(conv, quantizer, LayerSetting("table", 20, 16, "tree", "int8")).eval()
    x = torch.randn(batch, 40, 4, 3)
    want, got = _both(layer, x, isa)
    with native.force_isa(isa):
        assert torch.equal(native.plan(layer).encode(x), quantizer.encode(im2col(x, conv)))
    _close(got, want)


def test_one_layer_fed_many_input_sizes():
    """A plan keeps the taps of a few input stride patterns; more than it keeps are made per call: every size and
    layout (image lanes from 16 images, codebook lanes for a few rows) still matches the library."""
    layer, _ = _table_conv(CONVS[1], "tree", "int8", 16)
    for size in range(3, 10):
        for batch in (1, 17):
            x = torch.randn(batch, 16, size, size + 1)
            if size % 2:
                x = x.contiguous(memory_format=torch.channels_last)
            want, got = _both(layer, x, native.isa())
            _close(got, want)


def test_changed_tables_rebuild_the_plan():
    """A refit changes the tables in place: the next forward must use the new ones, never a stale copy."""
    layer, _ = _table_conv(CONVS[1], "tree", "int8", 16)
    layer.kernel = "native"
    x = torch.randn(2, 16, 13, 11)
    with torch.no_grad():
        before = layer(x)
        layer.quantizer.tables_.mul_(-1)
        after = layer(x)
        layer.kernel = "torch"
        assert not torch.equal(before, after)
        _close(after, layer(x))


def test_tables_made_in_inference_mode_run_natively():
    with torch.inference_mode():
        layer, _ = _table_conv(CONVS[3], "tree", "int8", 16)
        layer.kernel = "native"
        x = torch.randn(3, 24, 7, 7)
        got = layer(x)
        assert native.runs_natively(layer, x)
        layer.kernel = "torch"
        _close(got, layer(x))


def test_training_and_gradients_take_the_torch_path():
    layer, _ = _table_conv(CONVS[1], "exhaustive", "float32", 16)
    layer.kernel = "native"
    x = torch.randn(2, 16, 13, 11, requires_grad=True)
    assert not native.runs_natively(layer, x)
    with torch.no_grad():
        assert native.runs_natively(layer, x)


def test_the_embedded_default_end_to_end(resnet18_digits):
    """ResNet-18 on digits, every layer tabled (tree, K=16, int8): the native network classifies as the torch one."""
    from tabconv.config import Calibration
    from tabconv.export import TabledNetwork
    from tabconv.session import Session

    session = Session.from_checkpoint(str(resnet18_digits), calibration=Calibration(images=256), eval_images=128)
    setting = LayerSetting("table", 8, 16, "tree", "int8", 9)
    settings = {info.name: setting for info in session.structure.layers}
    metrics = session.apply(settings).metrics
    tabled = TabledNetwork.from_session(session, session.quantizers(metrics)).network()
    x = session.eval_set.normalize(session.eval_set.images[:64]).float()
    with torch.no_grad():
        native.set_kernel(tabled, "torch")
        want = tabled(x)
        native.set_kernel(tabled, "native")
        got = tabled(x)
    assert torch.equal(got.argmax(1), want.argmax(1))
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4 * want.abs().max().item())


def test_the_build_is_cached():
    path = native.build()
    stamp = path.stat().st_mtime_ns
    assert native.build() == path and path.stat().st_mtime_ns == stamp


def _python(code: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                          env={**os.environ, "PYTHONPATH": str(ROOT), **env}, timeout=300)


def test_without_a_compiler_the_torch_path_serves_and_says_so_once(tmp_path):
    code = """
import torch
from torch import nn
from tabconv import native
from tabconv.layers import TableLinear
from tabconv.quantizer import ProductQuantizer
from tabconv.settings import LayerSetting
q = ProductQuantizer(4, 16, "tree", "int8").fit(torch.randn(300, 20))
layer = TableLinear.from_linear(nn.Linear(20, 3), q, LayerSetting("table", 4, 16, "tree", "int8")).eval()
x = torch.randn(5, 20)
with torch.no_grad():
    out = layer(x); again = layer(x)
assert torch.allclose(out, q(x)) and not native.available()
try:
    native.set_kernel(layer, "native")
except native.NativeUnavailable as exc:
    print("refused:", exc)
"""
    done = _python(code, CC=str(tmp_path / "no-such-cc"), TABCONV_BUILD_DIR=str(tmp_path / "build"))
    assert done.returncode == 0, done.stderr
    said = [line for line in done.stderr.splitlines() if "native table kernels unavailable" in line]
    assert len(said) == 1 and "torch path" in said[0], done.stderr
    assert "refused: --kernel native" in done.stdout


def test_a_kernel_choice_outside_the_three_is_refused():
    with pytest.raises(ValueError, match="auto, native, torch"):
        native.set_kernel(nn.Sequential(), "fast")
