"""Multiplication-free PQ encoder: one complete binary hash tree per subspace (MADDNESS-style).

Exhaustive nearest-prototype encoding costs N*K*D multiply-adds, which dwarfs the lookups it feeds.
Following Blalock & Guttag (ICML 2021), each subspace instead gets a tree of depth log2(K) whose
level l compares one input dimension (shared by all 2**l nodes of the level) against a per-node
threshold, so encoding a row costs log2(K) comparisons per subspace and no arithmetic at all.

Learning, greedily level by level and vectorised over subspaces and rows:
  * candidate dimensions: the few dimensions with the largest within-bucket SSE (where a split can
    still remove the most error);
  * per candidate, every current bucket is cut at the threshold minimising its SSE along that
    dimension (prefix sums of the sorted values score all cuts at once), and the resulting split
    is scored by its SSE over all dimensions of the subspace (one pass of bucket sums);
  * the candidate with the lowest total SSE becomes the level's dimension.
MADDNESS scores every cut by the SSE over all dimensions, which needs prefix sums of whole rows per
candidate and level: on im2col rows of random-init ResNet-18 convs (C=16, K=16 and 256) that exact
scan was 3-5x slower and its held-out error no lower. Bucket medians were as cheap but cut through
well-separated clusters (relative error 0.12 against 0.027 on the tests' clustered data).
A bucket that cannot be split (empty, or constant on that dimension) gets threshold +inf: all its
rows go left, its right subtree is unreachable, so every reachable leaf holds calibration rows.

Prototypes are then refit jointly by ridge regression of the rows onto all C codebooks' bucket
indicators, in full width, which lets codebooks correct each other's errors (as MADDNESS does).
"""

from __future__ import annotations

import math

import torch
from torch.nn import functional as F

from tabconv.lstsq import table_correction

N_CANDIDATE_DIMS = 4  # as in MADDNESS: more candidates cost time and rarely pick a better dimension
RIDGE_SCALE = 1e-3  # lam = RIDGE_SCALE * mean bucket size: removes the gauge freedom, barely shrinks
_CHUNK_ELEMENTS = 1 << 21  # bounds the float64 blocks (row chunks, pair counts) held at once


def fit_hash_trees(
    x: torch.Tensor, xs: torch.Tensor, n_centroids: int, seed: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Learn C hash trees on xs (C, N, s) and full-width ridge prototypes from x (N, D).

    Returns split_dims int64 (C, depth), thresholds float32 (C, K-1) in heap order and prototypes
    float32 (C, K, C*s). `seed` is accepted for the quantizer's interface: the fit draws nothing
    at random, so it is deterministic for every seed.
    """
    depth = _tree_depth(n_centroids)
    codes, split_dims, thresholds = learn_trees(xs, depth)
    prototypes = ridge_prototypes(x, codes, n_centroids, xs.shape[0] * xs.shape[2])
    return split_dims, thresholds, prototypes


def encode_hash_trees(xs: torch.Tensor, split_dims: torch.Tensor, thresholds: torch.Tensor) -> torch.Tensor:
    """Codes (N, C) of rows xs (C, N, s): one gather and one comparison per level, no arithmetic on x."""
    codebooks, rows, _ = xs.shape
    node = torch.zeros(codebooks, rows, dtype=torch.long, device=xs.device)
    for level in range(split_dims.shape[1]):
        value = _column(xs, split_dims[:, level])
        threshold = thresholds[:, 2**level - 1 :].gather(1, node)
        node = (node << 1) | (value > threshold)  # heap child: 2i (left) or 2i + 1 (right)
    return node.t().contiguous()


def learn_trees(xs: torch.Tensor, depth: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Greedy level-wise tree growth; returns the training codes (N, C), split_dims and thresholds."""
    codebooks, rows, width = xs.shape
    idx = torch.arange(codebooks, device=xs.device)
    square_sums = _square_sums(xs)
    node = torch.zeros(codebooks, rows, dtype=torch.long, device=xs.device)
    explained = _explained_squares(xs, node.unsqueeze(0), 1)[0]
    split_dims = torch.zeros(codebooks, depth, dtype=torch.long, device=xs.device)
    thresholds = torch.empty(codebooks, 2**depth - 1, dtype=torch.float32, device=xs.device)
    for level in range(depth):
        nodes = 2**level
        sse = square_sums - explained  # within-bucket SSE per dimension
        candidates = sse.argsort(dim=1, descending=True, stable=True)[:, : min(N_CANDIDATE_DIMS, width)].t()
        values = torch.stack([_column(xs, dims) for dims in candidates])  # (R, C, N)
        cuts = torch.stack([_best_thresholds(value, node, nodes) for value in values])  # (R, C, nodes)
        children = (node << 1) | (values > cuts.gather(2, node.expand_as(values)))
        per_dim = _explained_squares(xs, children, 2 * nodes)  # (R, C, s)
        best = per_dim.sum(2).argmax(0)  # the candidate leaving the lowest SSE over all dimensions
        split_dims[:, level] = candidates[best, idx]
        thresholds[:, nodes - 1 : 2 * nodes - 1] = cuts[best, idx]
        node, explained = children[best, idx], per_dim[best, idx]
    return node.t().contiguous(), split_dims, thresholds


def ridge_prototypes(x: torch.Tensor, codes: torch.Tensor, n_centroids: int, padded_dim: int) -> torch.Tensor:
    """P (C, K, D_pad) = argmin ||X - G P||^2 + lam ||P||^2, G the (N, C*K) one-hot of all codebooks.

    The same ridge problem as a least-squares table refit with a zero prior (tabconv/lstsq.py), solved in
    float64: G^T G is rank-deficient by C-1 (each codebook's indicators sum to one), so lam is what makes
    it definite and the system is ill-conditioned in float32.
    """
    rows, codebooks = codes.shape
    size = codebooks * n_centroids
    flat = codes + torch.arange(codebooks, device=codes.device) * n_centroids  # column of G per (row, c)
    solution = table_correction(flat, x, size, RIDGE_SCALE * rows / n_centroids)  # mean diag(G^T G): N*C/(C*K)
    return F.pad(solution.float(), (0, padded_dim - x.shape[1])).reshape(codebooks, n_centroids, padded_dim)


def _tree_depth(n_centroids: int) -> int:
    if n_centroids < 1 or n_centroids & (n_centroids - 1):
        raise ValueError(f"hash trees need K to be a power of two, got {n_centroids}")
    return n_centroids.bit_length() - 1


def _column(xs: torch.Tensor, dims: torch.Tensor) -> torch.Tensor:
    """(C, N): per subspace c, column dims[c] of xs (C, N, s)."""
    codebooks, rows, _ = xs.shape
    return xs.gather(2, dims.view(codebooks, 1, 1).expand(codebooks, rows, 1)).squeeze(2)


def _blocks(xs: torch.Tensor) -> list[tuple[slice, slice]]:
    """(subspaces, columns) ranges whose (n, N, w) float64 copy stays within _CHUNK_ELEMENTS:
    whole subspaces when they fit (contiguous slices), else column strips of one subspace."""
    codebooks, rows, width = xs.shape
    if rows * width <= _CHUNK_ELEMENTS:
        step = _CHUNK_ELEMENTS // (rows * width)
        return [(slice(c, c + step), slice(None)) for c in range(0, codebooks, step)]
    step = max(1, _CHUNK_ELEMENTS // rows)
    return [(slice(c, c + 1), slice(j, j + step)) for c in range(codebooks) for j in range(0, width, step)]


def _square_sums(xs: torch.Tensor) -> torch.Tensor:
    """Sum of squares per subspace and dimension (C, s), float64."""
    out = torch.empty(xs.shape[0], xs.shape[2], dtype=torch.float64, device=xs.device)
    for subs, cols in _blocks(xs):
        out[subs, cols] = xs[subs, :, cols].double().square().sum(1)
    return out


def _explained_squares(xs: torch.Tensor, assignments: torch.Tensor, nodes: int) -> torch.Tensor:
    """Per bucketing (R, C, N) of the rows, sum over buckets of ||S_b||^2 / n_b per dimension (R, C, s),
    S_b the bucket's sum and n_b its size.

    Subtracted from the sum of squares it leaves the within-bucket SSE; float64 keeps that difference
    meaningful when the data's mean is large against its spread. Each chunk is converted once for all
    R bucketings (the candidate splits of one level).
    """
    out = torch.empty(*assignments.shape[:2], xs.shape[2], dtype=torch.float64, device=xs.device)
    for subs, cols in _blocks(xs):
        part = xs[subs, :, cols].double()
        group, rows, width = part.shape
        offsets = torch.arange(group, device=xs.device).unsqueeze(1) * nodes
        for r, node in enumerate(assignments[:, subs]):
            flat = (node + offsets).flatten()
            sums = torch.zeros(group * nodes, width, dtype=torch.float64, device=xs.device)
            sums.index_add_(0, flat, part.reshape(group * rows, width))
            counts = torch.bincount(flat, minlength=group * nodes).clamp(min=1).unsqueeze(1)
            out[r, subs, cols] = (sums.square() / counts).reshape(group, nodes, width).sum(1)
    return out


def _best_thresholds(value: torch.Tensor, node: torch.Tensor, nodes: int) -> torch.Tensor:
    """Per bucket (C, nodes) the threshold that minimises the bucket's SSE along `value` (C, N).

    With rows sorted by (bucket, value), a cut after sorted position p leaves the least SSE when
    S_left^2 / n_left + S_right^2 / n_right is largest (S: sums of the values), so prefix sums score
    every cut of every bucket at once. A cut between equal values is not expressible as a threshold;
    a bucket without any valid cut gets +inf (all rows left, the right subtree unreachable).
    """
    codebooks, rows = value.shape
    ordered, order = value.sort(dim=1)
    by_bucket = node.gather(1, order).argsort(dim=1, stable=True)
    ordered, bucket = ordered.gather(1, by_bucket), node.gather(1, order.gather(1, by_bucket))
    counts = torch.zeros(codebooks, nodes, dtype=torch.long, device=value.device)
    counts.scatter_add_(1, node, torch.ones_like(node))
    ends = counts.cumsum(1)  # one past each bucket's last sorted row
    start, end = (ends - counts).gather(1, bucket), ends.gather(1, bucket)
    prefix = F.pad(ordered.double().cumsum(1), (1, 0))  # prefix[:, p]: sum of the first p sorted values
    left, right = prefix[:, 1:] - prefix.gather(1, start), prefix.gather(1, end) - prefix[:, 1:]
    position = torch.arange(rows, device=value.device).expand(codebooks, rows)
    n_left, n_right = position - start + 1, end - position - 1
    valid = (n_right > 0) & (ordered.roll(-1, 1) > ordered)
    gain = (left.square() / n_left + right.square() / n_right.clamp(min=1)).masked_fill(~valid, -math.inf)
    best = torch.full((codebooks, nodes), -math.inf, dtype=gain.dtype, device=value.device)
    best = best.scatter_reduce_(1, bucket, gain, "amax")
    first_best = torch.where(valid & (gain == best.gather(1, bucket)), position, rows)
    cut = torch.full_like(counts, rows).scatter_reduce_(1, bucket, first_best, "amin")
    at = cut.clamp(max=rows - 1)
    low, high = ordered.gather(1, at), ordered.gather(1, (at + 1).clamp(max=rows - 1))
    midpoint = low + (high - low) / 2
    threshold = torch.where(midpoint < high, midpoint, low)  # a midpoint rounded onto `high` would move it left
    return threshold.where(cut < rows, math.inf)
