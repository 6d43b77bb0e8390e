"""MADDNESS-style hash trees: traversal, split optimality, reconstruction and multiplication-free encoding."""

from __future__ import annotations

import itertools

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from tabconv import hashtree
from tabconv.hashtree import (
    encode_hash_trees,
    fit_hash_trees,
    learn_trees,
    ridge_prototypes,
)
from tabconv.quantizer import ProductQuantizer, pad_columns, split_subspaces


def _subspaces(x: torch.Tensor, codebooks: int) -> torch.Tensor:
    padded = codebooks * -(-x.shape[1] // codebooks)
    return split_subspaces(pad_columns(x, padded), codebooks).contiguous()


def _random_trees(xs: torch.Tensor, depth: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Random split dims and thresholds drawn from the data's own values (so both branches get used)."""
    codebooks, rows, width = xs.shape
    dims = torch.randint(width, (codebooks, depth), generator=gen)
    picks = torch.randint(rows, (codebooks, 2**depth - 1), generator=gen)
    levels = torch.cat([torch.full((2**lvl,), lvl) for lvl in range(depth)]).long()
    thresholds = xs[torch.arange(codebooks).unsqueeze(1), picks, dims[:, levels]]
    return dims, thresholds


def _reference_codes(xs: torch.Tensor, dims: torch.Tensor, thresholds: torch.Tensor) -> torch.Tensor:
    """The traversal spelled out row by row, as the specification states it."""
    codebooks, rows, _ = xs.shape
    out = torch.zeros(rows, codebooks, dtype=torch.long)
    for n, c in itertools.product(range(rows), range(codebooks)):
        i = 0
        for level in range(dims.shape[1]):
            go_right = xs[c, n, dims[c, level]] > thresholds[c, 2**level - 1 + i]
            i = 2 * i + 1 if go_right else 2 * i
        out[n, c] = i
    return out


def _clusters(rows: int, dim: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    centers = 4 * torch.randn(6, dim, generator=gen)
    return centers[torch.randint(6, (rows,), generator=gen)] + 0.1 * torch.randn(rows, dim, generator=gen)


def _rel_error(approx: torch.Tensor, exact: torch.Tensor) -> float:
    return ((approx - exact).norm() / exact.norm()).item()


def _reconstruct(prototypes: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
    """Sum over codebooks of each row's full-width prototype."""
    return prototypes[torch.arange(codes.shape[1]), codes].sum(1)


def test_encoding_matches_reference_traversal() -> None:
    gen = torch.Generator().manual_seed(1)
    xs = torch.randn(3, 25, 5, generator=gen)
    dims, thresholds = _random_trees(xs, 4, gen)
    codes = encode_hash_trees(xs, dims, thresholds)
    assert codes.dtype == torch.long and codes.shape == (25, 3)
    assert torch.equal(codes, _reference_codes(xs, dims, thresholds))


@pytest.mark.parametrize("k", [1, 2, 16])
def test_codes_in_range_and_shapes(k: int) -> None:
    x = _clusters(200, 12, seed=2)
    xs = _subspaces(x, 4)
    dims, thresholds, prototypes = fit_hash_trees(x, xs, k, seed=0)
    depth = k.bit_length() - 1
    assert dims.shape == (4, depth) and dims.dtype == torch.long
    assert thresholds.shape == (4, k - 1) and thresholds.dtype == torch.float32
    assert prototypes.shape == (4, k, 12) and prototypes.dtype == torch.float32
    codes = encode_hash_trees(xs, dims, thresholds)
    assert codes.min() >= 0 and codes.max() < k
    if k == 1:
        assert not codes.any()
    if k == 2:  # one comparison per subspace
        column = xs[torch.arange(4), :, dims[:, 0]]
        assert torch.equal(codes, (column > thresholds).t().long())


def _sse(rows: torch.Tensor, right: torch.Tensor) -> float:
    return sum(((part - part.mean(0)) ** 2).sum().item() for part in (rows[right], rows[~right]) if len(part))


def test_level_split_matches_brute_force() -> None:
    """Depth 1, 3 dims (all candidates): per dim the cut minimising that dim's SSE, then the dim whose
    cut leaves the lowest SSE over all dims, both found by brute force over every dim and cut."""
    gen = torch.Generator().manual_seed(3)
    xs = torch.randn(2, 30, 3, generator=gen) * torch.tensor([1.0, 3.0, 0.5])
    codes, dims, thresholds = learn_trees(xs, depth=1)
    for c in range(2):
        cuts = [min(xs[c, :, d], key=lambda t, d=d: _sse(xs[c, :, d : d + 1], xs[c, :, d] > t)) for d in range(3)]
        brute = min(_sse(xs[c], xs[c, :, d] > cuts[d]) for d in range(3))
        assert _sse(xs[c], codes[:, c].bool()) == pytest.approx(brute, rel=1e-6)
        assert torch.equal(codes[:, c], (xs[c, :, dims[c, 0]] > thresholds[c, 0]).long())


def test_structured_data_reconstructs_product_far_better_than_random_trees() -> None:
    x = _clusters(2000, 32, seed=4)
    w = torch.randn(32, 10, generator=torch.Generator().manual_seed(5))
    xs = _subspaces(x, 4)
    dims, thresholds, prototypes = fit_hash_trees(x, xs, 16, seed=0)
    learned = _rel_error(_reconstruct(prototypes, encode_hash_trees(xs, dims, thresholds)) @ w, x @ w)

    gen = torch.Generator().manual_seed(6)
    baseline = 0.0
    for _ in range(8):  # random trees vary a lot (0.04 to 0.22 here): compare with their mean
        rand_codes = encode_hash_trees(xs, *_random_trees(xs, 4, gen))
        baseline += _rel_error(_reconstruct(ridge_prototypes(x, rand_codes, 16, 32), rand_codes) @ w, x @ w) / 8
    assert learned < 0.04  # k-means (exhaustive encoder) reaches 0.026 on this data
    assert learned < 0.35 * baseline


def test_ridge_refinement_beats_bucket_means() -> None:
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(1500, 24, generator=gen) @ torch.randn(24, 24, generator=gen)  # correlated subspaces
    xs = _subspaces(x, 4)
    codes, _, _ = learn_trees(xs, depth=3)
    sums = torch.zeros(4, 8, 6).index_put_((torch.arange(4), codes), xs.transpose(0, 1), accumulate=True)
    counts = torch.zeros(4, 8).index_put_((torch.arange(4), codes), torch.ones(codes.shape), accumulate=True)
    means = sums / counts.clamp(min=1).unsqueeze(-1)  # (C, K, s), subspace prototypes
    from_means = torch.cat(list(means[torch.arange(4), codes].unbind(1)), dim=1)  # concatenated subspaces
    from_ridge = _reconstruct(ridge_prototypes(x, codes, 8, 24), codes)
    assert _rel_error(from_ridge, x) < 0.9 * _rel_error(from_means, x)


def test_training_codes_equal_encoding_and_chunking_changes_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    x = torch.randn(300, 20, generator=torch.Generator().manual_seed(12)).relu()  # ties at zero
    xs = _subspaces(x, 4)
    codes, dims, thresholds = learn_trees(xs, depth=4)
    assert torch.equal(codes, encode_hash_trees(xs, dims, thresholds))
    whole = fit_hash_trees(x, xs, 16, seed=0)
    monkeypatch.setattr(hashtree, "_CHUNK_ELEMENTS", 64)  # forces column strips and many row chunks
    strips = fit_hash_trees(x, xs, 16, seed=0)
    assert torch.equal(whole[0], strips[0]) and torch.equal(whole[1], strips[1])
    torch.testing.assert_close(whole[2], strips[2])


def test_k_must_be_a_power_of_two() -> None:
    x = torch.randn(50, 8)
    with pytest.raises(ValueError, match="power of two"):
        fit_hash_trees(x, _subspaces(x, 2), 12, seed=0)


def test_fit_is_deterministic() -> None:
    x = _clusters(500, 20, seed=8)
    first = fit_hash_trees(x, _subspaces(x, 5), 8, seed=3)
    second = fit_hash_trees(x.clone(), _subspaces(x, 5), 8, seed=3)
    for a, b in zip(first, second, strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize(
    ("x", "max_error"),
    [
        (torch.cat([torch.ones(40, 3), torch.randn(40, 6)], 1), 0.5),  # subspace 0 constant, 40 rows in 16 buckets
        (torch.randn(5, 9), 1e-3),  # fewer rows than K: each row gets its own bucket and is memorised
    ],
    ids=["constant-columns", "fewer-rows-than-K"],
)
def test_degenerate_inputs_do_not_crash(x: torch.Tensor, max_error: float) -> None:
    xs = _subspaces(x, 3)
    dims, thresholds, prototypes = fit_hash_trees(x, xs, 16, seed=0)
    codes = encode_hash_trees(xs, dims, thresholds)
    assert codes.min() >= 0 and codes.max() < 16
    assert torch.isfinite(prototypes).all() and not torch.isnan(thresholds).any()
    assert _rel_error(_reconstruct(prototypes, codes), x) < max_error
    constant = (xs == xs[:, :1]).flatten(1).all(1)
    assert torch.isinf(thresholds[constant]).all() and not codes[:, constant].any()


def test_all_zero_rows_give_a_single_bucket() -> None:
    x = torch.zeros(50, 9)
    dims, thresholds, prototypes = fit_hash_trees(x, _subspaces(x, 3), 16, seed=0)
    assert torch.isinf(thresholds).all() and not prototypes.any()
    assert not encode_hash_trees(_subspaces(x, 3), dims, thresholds).any()


def test_encoding_uses_no_multiplications() -> None:
    """Integer rows give the same codes (only comparisons touch x) and no FLOPs are counted (no matmul)."""
    gen = torch.Generator().manual_seed(9)
    xs = torch.randint(-50, 50, (4, 100, 6), generator=gen)
    dims, thresholds = _random_trees(xs.float(), 5, gen)
    thresholds = thresholds + 0.5
    with FlopCounterMode(display=False) as counter:
        codes = encode_hash_trees(xs, dims, thresholds)
    assert counter.get_total_flops() == 0
    assert torch.equal(codes, encode_hash_trees(xs.float(), dims, thresholds))


@pytest.mark.parametrize("lut_dtype", ["float32", "int8"])
def test_product_quantizer_tree_end_to_end(lut_dtype: str) -> None:
    x = _clusters(1000, 30, seed=10)  # D = 30 is padded to 32 for C = 8
    gen = torch.Generator().manual_seed(11)
    w, b = torch.randn(30, 7, generator=gen), torch.randn(7, generator=gen)
    pq = ProductQuantizer(n_codebooks=8, n_centroids=16, encoder="tree", lut_dtype=lut_dtype).fit(x)
    pq.set_weight(w, b)
    assert pq.prototypes_.shape == (8, 16, 32)
    assert _rel_error(pq(x), x @ w + b) < 0.1
    restored = ProductQuantizer(**pq.get_params())
    restored.load_state_dict(pq.state_dict())
    assert torch.equal(restored(x), pq(x))
    assert torch.equal(restored.thresholds_, pq.thresholds_) and restored.split_dims_.dtype == torch.int64
