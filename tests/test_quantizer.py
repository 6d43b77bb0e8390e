"""ProductQuantizer: fit / encode / tables / lookup against direct computations."""

from __future__ import annotations

import copy
import inspect
import warnings

import pytest
import torch
from torch import nn

from tabconv.quantizer import (
    DegenerateCodebookWarning,
    NotFittedError,
    ProductQuantizer,
    nearest_codes,
    split_subspaces,
)
from tabconv.settings import SettingError


def clustered(n: int, d: int, clusters: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(clusters, d, generator=g) * 5
    return centers[torch.randint(clusters, (n,), generator=g)] + 0.01 * torch.randn(n, d, generator=g)


def test_estimator_shape_and_lookup_equals_explicit_sum():
    x = torch.randn(2000, 30)
    w, b = torch.randn(30, 7), torch.randn(7)
    pq = ProductQuantizer(n_codebooks=4, n_centroids=16, random_state=3)
    assert pq.fit(x) is pq and pq.set_weight(w, b) is pq
    assert pq.prototypes_.shape == (4, 16, 8)  # D=30 padded to 32
    codes = pq.encode(x[:50])
    assert codes.shape == (50, 4) and codes.dtype == torch.long and int(codes.max()) < 16
    explicit = sum(pq.tables_[c, codes[:, c]] for c in range(4))
    torch.testing.assert_close(pq.lookup(codes), explicit)
    # the table entries are prototype . weight over each subspace, bias in table 0
    w_pad = torch.cat([w, torch.zeros(2, 7)])
    recon = torch.cat([pq.prototypes_[c, codes[:, c]] for c in range(4)], dim=1)
    torch.testing.assert_close(pq(x[:50]), recon @ w_pad + b, rtol=1e-4, atol=1e-4)


def test_encoding_picks_the_nearest_prototype():
    x = torch.randn(300, 12)
    pq = ProductQuantizer(3, 8).fit(x)
    xs = split_subspaces(x, 3)
    dist = torch.cdist(xs, pq.prototypes_)  # (C, N, K)
    torch.testing.assert_close(pq.encode(x), dist.argmin(-1).t())
    torch.testing.assert_close(nearest_codes(xs.contiguous(), pq.prototypes_), dist.argmin(-1).t())


def test_clustered_data_is_reconstructed_almost_exactly():
    x = clustered(3000, 24, clusters=10)
    w = torch.randn(24, 5)
    pq = ProductQuantizer(4, 16).fit(x).set_weight(w)
    err = (pq(x) - x @ w).norm() / (x @ w).norm()
    assert err < 0.01


def test_more_centroids_reduce_error():
    x = torch.randn(4000, 32)
    w = torch.randn(32, 8)
    errors = [((ProductQuantizer(8, k).fit(x).set_weight(w)(x) - x @ w).norm() / (x @ w).norm()).item()
              for k in (2, 16, 128)]
    assert errors[0] > errors[1] > errors[2]


def test_k_larger_than_rows_warns_and_memorises_exactly():
    x = torch.randn(20, 9)
    w = torch.randn(9, 4)
    with pytest.warns(DegenerateCodebookWarning, match="only 20 calibration rows"):
        pq = ProductQuantizer(3, 64).fit(x)
    pq.set_weight(w)
    torch.testing.assert_close(pq(x), x @ w, rtol=1e-4, atol=1e-4)
    assert pq.tables_.shape == (3, 64, 4)


def test_k_equal_one_gives_the_mean_row():
    x = torch.randn(500, 6)
    w = torch.eye(6)
    pq = ProductQuantizer(2, 1).fit(x).set_weight(w)
    torch.testing.assert_close(pq(x[:3]), x.mean(0).expand(3, 6), rtol=1e-5, atol=1e-5)


def test_seeds_are_deterministic_and_matter():
    x = torch.randn(1500, 16)
    a = ProductQuantizer(4, 8, random_state=0).fit(x).prototypes_
    b = ProductQuantizer(4, 8, random_state=0).fit(x).prototypes_
    c = ProductQuantizer(4, 8, random_state=1).fit(x).prototypes_
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_sklearn_backend_agrees_in_quality():
    x = clustered(2000, 16, clusters=6, seed=2)
    w = torch.randn(16, 3)
    for backend in ("torch", "sklearn"):
        pq = ProductQuantizer(4, 8, kmeans_backend=backend).fit(x).set_weight(w)
        assert (pq(x) - x @ w).norm() / (x @ w).norm() < 0.02


@pytest.mark.parametrize("dtype,tolerance", [("float16", 1e-3), ("int8", 0.02)])
def test_compact_tables_reproduce_float_tables_within_quantization_error(dtype, tolerance):
    x = torch.randn(3000, 40)
    w, b = torch.randn(40, 12), torch.randn(12)
    ref = ProductQuantizer(8, 32).fit(x).set_weight(w, b)
    pq = ProductQuantizer(8, 32, lut_dtype=dtype).fit(x).set_weight(w, b)
    assert pq.tables_.dtype == getattr(torch, dtype)
    out, want = pq(x), ref(x)
    if dtype == "int8":
        # each of the C summed entries is off by at most half of its output's quantization step
        assert ((out - want).abs() <= 8 * pq.table_scale_ / 2 + 1e-4).all()
    assert ((out - want).norm() / want.norm()) < tolerance


def test_int8_scales_are_per_output_so_a_narrow_output_keeps_its_precision():
    x = torch.randn(3000, 40)
    w = torch.randn(40, 2)
    w[:, 1] *= 1e-3  # an output a thousand times narrower than the other
    ref = ProductQuantizer(8, 16).fit(x).set_weight(w)
    pq = ProductQuantizer(8, 16, lut_dtype="int8").fit(x).set_weight(w)
    assert pq.table_scale_.shape == (2,) and pq.table_offset_.shape == (8, 2)
    out, want = pq(x), ref(x)
    error = (out - want).norm(dim=0) / want.norm(dim=0)
    assert error.max() < 0.02  # one scale for the layer would round the narrow output to its offsets alone


def test_int8_tables_of_one_scale_per_layer_still_compute_what_they_did():
    x = torch.randn(500, 24)
    pq = ProductQuantizer(4, 16, lut_dtype="int8").fit(x).set_weight(torch.randn(24, 6), torch.randn(6))
    values = pq.table_values()
    old = copy.deepcopy(pq)  # the earlier storage: one scale per layer, one offset per codebook
    low = values.amin(dim=(1, 2))
    old.table_scale_ = ((values.amax(dim=(1, 2)) - low).max() / 255.0).reshape(())
    old.tables_ = (torch.round((values - low.reshape(-1, 1, 1)) / old.table_scale_) - 128).to(torch.int8)
    old.table_offset_ = low
    codes = old.encode(x)
    picked = old.table_scale_ * (old.tables_.float() + 128) + low.reshape(-1, 1, 1)
    want = picked[torch.arange(4), codes].sum(1)
    torch.testing.assert_close(old(x), want, rtol=1e-5, atol=1e-5)


def test_int8_accumulation_does_not_overflow_with_many_codebooks():
    x = torch.randn(400, 512) * 100
    w = torch.randn(512, 4) * 100
    ref = ProductQuantizer(256, 2).fit(x).set_weight(w)
    pq = ProductQuantizer(256, 2, lut_dtype="int8").fit(x).set_weight(w)
    assert ((pq(x) - ref(x)).norm() / ref(x).norm()) < 0.02


def test_invalid_parameters_are_refused_with_the_value():
    """As a scikit-learn estimator: the constructor stores, fit (and a state load) refuses, naming the value."""
    rows = torch.randn(40, 8)
    for params, message in [((0, 4), "codebooks must be a positive integer, got 0"), ((2, -1), "centroids"),
                            ((2, 12, "tree"), "power of two")]:
        quantizer = ProductQuantizer(*params)
        assert quantizer.get_params()["n_codebooks"] == params[0]  # stored as given
        with pytest.raises(SettingError, match=message):
            quantizer.fit(rows)
    with pytest.raises(SettingError, match="kmeans_backend"):
        ProductQuantizer(2, 4, kmeans_backend="faiss").fit(rows)
    fitted = ProductQuantizer(2, 4).fit(rows)
    with pytest.raises(SettingError, match="groups must be a positive integer"):
        ProductQuantizer(2, 4, groups=0).load_state_dict(fitted.state_dict())
    with pytest.raises(NotFittedError, match="not fitted") as refused:
        ProductQuantizer(2, 4).encode(torch.randn(3, 4))
    assert isinstance(refused.value, ValueError) and isinstance(refused.value, AttributeError)
    with pytest.raises(ValueError, match="non-empty"):
        ProductQuantizer(2, 4).fit(torch.randn(0, 4))


def test_state_dict_round_trip_into_an_unfitted_quantizer():
    x = torch.randn(800, 10)
    pq = ProductQuantizer(2, 8, lut_dtype="int8").fit(x).set_weight(torch.randn(10, 3))
    state = pq.state_dict()
    assert sorted(state) == sorted(pq.expected_state())
    assert state["in_features_"].ndim == 0 and int(state["out_features_"]) == 3
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        clone = ProductQuantizer(**pq.get_params())
        clone.load_state_dict(state)
    assert clone.in_features_ == 10 and isinstance(clone.fit_rows_, int)
    assert torch.equal(clone(x), pq(x))
    assert clone.to(torch.float64).tables_.dtype == torch.int8  # .to() moves buffers, int8 tables stay int8


def test_state_dict_loading_is_all_or_nothing():
    pq = ProductQuantizer(2, 8).fit(torch.randn(200, 6)).set_weight(torch.randn(6, 3))
    partial = {k: v for k, v in pq.state_dict().items() if k != "prototypes_"}
    with pytest.raises(RuntimeError, match="Missing key.*prototypes_"):
        ProductQuantizer(2, 8).load_state_dict(partial)
    with pytest.raises(RuntimeError, match="Unexpected key.*bogus_"):
        ProductQuantizer(2, 8).load_state_dict({**pq.state_dict(), "bogus_": torch.zeros(1)})
    with pytest.raises(RuntimeError, match="Missing key.*tables_"):
        ProductQuantizer(2, 8).load_state_dict({})


@pytest.mark.parametrize(("groups", "in_channels", "out_channels", "codebooks"),
                         [(4, 8, 16, 2), (8, 8, 8, 1), (8, 8, 16, 3)])
@pytest.mark.parametrize("lut_dtype", ["float32", "int8"])
def test_grouped_conv_tables_reproduce_the_conv(groups: int, in_channels: int, out_channels: int, codebooks: int,
                                                lut_dtype: str) -> None:
    """Grouped and depthwise convs: each group's own codebooks and tables; with K >= rows the table layer is the
    conv (int8: up to its rounding), by the direct and the im2col encoders alike."""
    from tabconv.layers import TableConv2d
    from tabconv.lowering import bias_vector, im2col, weight_matrix

    torch.manual_seed(0)
    conv = nn.Conv2d(in_channels, out_channels, 3, padding=1, groups=groups).eval()
    x = torch.randn(2, in_channels, 5, 5)
    rows = im2col(x, conv)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DegenerateCodebookWarning)
        quantizer = ProductQuantizer(codebooks, 64, lut_dtype=lut_dtype, groups=groups).fit(rows)
    quantizer.set_weight(weight_matrix(conv), bias_vector(conv))
    assert quantizer.tables_.shape == (groups * codebooks, 64, out_channels // groups)
    layer = TableConv2d(conv, quantizer, quantizer.setting).eval()
    tolerance = 2e-2 if lut_dtype == "int8" else 1e-5
    with torch.no_grad():
        expected = conv(x)
        assert (layer(x) - expected).norm() / expected.norm() < tolerance
        assert torch.equal(quantizer.encode(rows), layer.encode_by_conv(x)) if layer.score_weight is not None else True
    loaded = ProductQuantizer(**quantizer.get_params())
    loaded.load_state_dict(quantizer.state_dict())
    assert loaded.groups == groups and torch.equal(loaded.lookup(loaded.encode(rows)), quantizer.lookup(
        quantizer.encode(rows)))


def test_grouped_least_squares_fits_each_group() -> None:
    from tabconv.lowering import bias_vector, im2col, weight_matrix

    torch.manual_seed(0)
    conv = nn.Conv2d(8, 16, 3, padding=1, groups=4).eval()
    x = torch.randn(8, 8, 6, 6)
    rows = im2col(x, conv)
    with torch.no_grad():
        target = conv(x).permute(0, 2, 3, 1).reshape(-1, 16)
    quantizer = ProductQuantizer(2, 4, groups=4).fit(rows).set_weight(weight_matrix(conv), bias_vector(conv))
    before = (quantizer(rows) - target).square().sum()
    residual = quantizer.refit_tables(rows, target, ridge=1e-6)(rows) - target
    assert residual.square().sum() < before
    # the least-squares optimum: each group's residual sums to ~0 over the rows sharing any one of its codes
    codes = quantizer.encode(rows)
    for group in range(4):
        outputs = residual[:, group * 4:(group + 1) * 4]
        for codebook in range(group * 2, group * 2 + 2):
            for code in codes[:, codebook].unique():
                assert outputs[codes[:, codebook] == code].sum(0).abs().max() < 1e-2


def test_tree_encoder_refuses_groups() -> None:
    with pytest.raises(SettingError, match="grouped"):
        ProductQuantizer(2, 4, encoder="tree", groups=4).fit(torch.randn(40, 8))


def test_get_params_reads_every_constructor_parameter():
    quantizer = ProductQuantizer(4, 16, "tree", "int8", kmeans_iter=3, random_state=7)
    params = quantizer.get_params()
    assert set(params) == set(inspect.signature(ProductQuantizer).parameters)
    assert ProductQuantizer(**params).get_params() == params and params["random_state"] == 7


@pytest.mark.parametrize(("encoder", "groups"), [("exhaustive", 1), ("exhaustive", 2), ("tree", 1)])
def test_decode_gives_the_rows_the_tables_stand_for(encoder, groups):
    """Float tables are prototypes times the weights: summing the looked-up entries equals decoding the codes to
    rows and multiplying those by the weights (per group for a grouped product)."""
    from tabconv.calibrate import layer_output

    g = torch.Generator().manual_seed(5)
    x = torch.randn(300, 2 * 15, generator=g)
    weight, bias = torch.randn(15, 6, generator=g), torch.randn(6, generator=g)
    if groups == 1:
        weight = torch.randn(30, 6, generator=g)
    quantizer = ProductQuantizer(4, 16, encoder, groups=groups).fit(x).set_weight(weight, bias)
    codes = quantizer.encode(x)
    rows = quantizer.decode(codes)
    assert rows.shape == x.shape
    torch.testing.assert_close(quantizer.lookup(codes), layer_output(rows, weight, bias, groups), rtol=1e-4,
                               atol=1e-4)
    assert (rows - x).norm() < x.norm()  # and they are an approximation of the rows, not noise
