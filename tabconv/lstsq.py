"""Least-squares table corrections: the ridge problem behind `ProductQuantizer.refit_tables`.

With the codes fixed, a table layer computes G T, G (N, C*K) the one-hot of the codes of all C
codebooks. Refitting T toward targets Y, pulled toward the current tables T0, is
    min ||G T - Y||^2 + lam ||T - T0||^2  <=>  T = T0 + D,  min ||G D - R||^2 + lam ||D||^2,  R = Y - G T0,
one ridge problem per output channel sharing one matrix. It is solved in whichever form is smaller:
primal (G^T G + lam I) D = G^T R with C*K unknowns, or dual D = G^T (G G^T + lam I)^-1 R with N
unknowns - deep layers see few rows per image while sub-vector settings give thousands of codes.
G is never held whole: G^T G comes from one-hot row chunks multiplied by BLAS (an index_add over the
C^2 code pairs of every row was measured far slower at C = 512); so does G G^T.
"""

from __future__ import annotations

import torch

_CHUNK_ELEMENTS = 1 << 23  # bounds the one-hot / comparison blocks held at once


def table_correction(flat: torch.Tensor, residual: torch.Tensor, size: int, lam: float) -> torch.Tensor:
    """D (size, M) float64 for flat codes (N, C) (code + c*K per codebook) and residuals R (N, M)."""
    rows = flat.shape[0]
    residual = residual.double()
    if rows >= size:
        gram = code_gram(flat, size)
        gram.diagonal().add_(lam)
        return torch.cholesky_solve(bucket_sums(residual, flat, size), torch.linalg.cholesky(gram))
    shared = shared_codes(flat, size)
    shared.diagonal().add_(lam)
    alpha = torch.cholesky_solve(residual, torch.linalg.cholesky(shared))
    return bucket_sums(alpha, flat, size)


def code_gram(flat: torch.Tensor, size: int) -> torch.Tensor:
    """G^T G (size, size) float64: how many rows use code a of one codebook and b of another."""
    rows = flat.shape[0]
    gram = torch.zeros(size, size, dtype=torch.float32, device=flat.device)
    step = max(1, _CHUNK_ELEMENTS // size)
    for start in range(0, rows, step):
        block = flat[start:start + step]
        onehot = torch.zeros(block.shape[0], size, dtype=torch.float32, device=flat.device)
        onehot.scatter_(1, block, 1.0)
        gram.addmm_(onehot.t(), onehot)  # integer counts < 2**24: exact in float32
    return gram.double()


def shared_codes(flat: torch.Tensor, size: int) -> torch.Tensor:
    """G G^T (N, N) float64: in how many codebooks two rows share their code (used when N < size,
    so the dense one-hot G, N * size floats, stays below size**2)."""
    onehot = torch.zeros(flat.shape[0], size, dtype=torch.float32, device=flat.device)
    onehot.scatter_(1, flat, 1.0)
    return (onehot @ onehot.t()).double()  # integer counts <= C: exact in float32


def bucket_sums(values: torch.Tensor, flat: torch.Tensor, size: int) -> torch.Tensor:
    """G^T V (size, M) float64: per code of every codebook, the sum of the rows' values that use it."""
    rows, features = values.shape
    sums = torch.zeros(size, features, dtype=torch.float64, device=values.device)
    step = max(1, _CHUNK_ELEMENTS // features)
    for start in range(0, rows, step):
        block = values[start:start + step].double()
        for column in flat[start:start + step].t():
            sums.index_add_(0, column, block)
    return sums
