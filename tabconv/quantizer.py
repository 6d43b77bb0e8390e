"""Product quantization of a matrix product: A @ B approximated by summed table lookups.

`ProductQuantizer` follows scikit-learn's estimator shape (constructor stores parameters, `fit`
returns self, learned attributes end in `_`) and is also an `nn.Module` whose learned tensors are
registered buffers: they move with `.to(device)` and round-trip through `state_dict()` /
`load_state_dict()`, which is how the table cache, the tables file and the exported model store them.
"""

from __future__ import annotations

import inspect
import math
import warnings
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from tabconv.lowering import im2col
from tabconv.settings import LayerSetting, SettingError

KMEANS_BACKENDS = ("torch", "sklearn")
INT8_SCHEME = "per-output scale, per-codebook-and-output offset"  # part of cached int8 tables' keys
_CHUNK_ELEMENTS = 1 << 23  # bounds the (C, rows, K) distance block held at once


class DegenerateCodebookWarning(UserWarning):
    """K is at least the number of calibration rows: k-means would only memorise rows."""


def pad_columns(x: torch.Tensor, padded_dim: int) -> torch.Tensor:
    """Zero columns appended so that C subspaces of equal width cover D."""
    return F.pad(x, (0, padded_dim - x.shape[-1])) if padded_dim > x.shape[-1] else x


def split_subspaces(x: torch.Tensor, codebooks: int) -> torch.Tensor:
    """(N, D_pad) -> (C, N, D_pad / C): contiguous column blocks, one per codebook."""
    return x.reshape(x.shape[0], codebooks, -1).transpose(0, 1)


def _sq_distances(xs: torch.Tensor, centers: torch.Tensor) -> torch.Tensor:
    """Squared distances (C, n, K) between rows (C, n, s) and centers (C, K, s), batched over C."""
    c_norm = (centers * centers).sum(-1).unsqueeze(1)
    x_norm = (xs * xs).sum(-1, keepdim=True)
    return torch.baddbmm(c_norm, xs, centers.transpose(1, 2), alpha=-2.0).add_(x_norm).clamp_(min=0)


def nearest_codes(xs: torch.Tensor, centers: torch.Tensor) -> torch.Tensor:
    """Index (N, C) of the nearest center per subspace, computed in row chunks to bound memory."""
    codebooks, rows, _ = xs.shape
    k = centers.shape[1]
    chunk = max(1, _CHUNK_ELEMENTS // (codebooks * k))
    c_norm = (centers * centers).sum(-1).unsqueeze(1)
    out = torch.empty(rows, codebooks, dtype=torch.long, device=xs.device)
    for start in range(0, rows, chunk):
        block = xs[:, start : start + chunk]
        # ||x||^2 is constant per row, so the argmin needs only ||p||^2 - 2 x.p
        scores = torch.baddbmm(c_norm, block, centers.transpose(1, 2), alpha=-2.0)
        out[start : start + chunk] = scores.argmin(-1).t()
    return out


def _kmeanspp_init(xs: torch.Tensor, k: int, generator: torch.Generator) -> torch.Tensor:
    """k-means++ seeding, batched over subspaces (inverse-CDF sampling keeps it vectorised)."""
    codebooks, rows, _ = xs.shape
    idx = torch.arange(codebooks, device=xs.device)
    x_norm = (xs * xs).sum(-1)  # (C, N)
    pick = torch.randint(rows, (codebooks,), generator=generator).to(xs.device)
    centers = torch.empty(codebooks, k, xs.shape[2], dtype=xs.dtype, device=xs.device)
    closest = torch.full_like(x_norm, float("inf"))
    for j in range(k):
        new = xs[idx, pick]  # (C, s)
        centers[:, j] = new
        dist = x_norm - 2 * torch.bmm(xs, new.unsqueeze(-1)).squeeze(-1) + (new * new).sum(-1, keepdim=True)
        closest = torch.minimum(closest, dist.clamp_(min=0))
        cdf = closest.cumsum(1)
        draw = torch.rand(codebooks, 1, generator=generator).to(xs.device) * cdf[:, -1:]
        pick = torch.searchsorted(cdf, draw).squeeze(1).clamp_(max=rows - 1)
    return centers


def kmeans_torch(xs: torch.Tensor, k: int, iters: int, seed: int) -> torch.Tensor:
    """Lloyd's k-means for all C subspaces at once, seeded by k-means++ on a row subsample.

    Stops early once fewer than 0.1% of rows change cluster; empty clusters are re-seeded on far rows.
    """
    generator = torch.Generator().manual_seed(seed)
    codebooks, rows, width = xs.shape
    seed_rows = min(rows, max(4096, 16 * k))
    subset = torch.randperm(rows, generator=generator)[:seed_rows].to(xs.device) if seed_rows < rows else None
    centers = _kmeanspp_init(xs if subset is None else xs[:, subset], k, generator)
    codes = None
    offsets = torch.arange(codebooks, device=xs.device).unsqueeze(1) * k
    flat = xs.reshape(codebooks * rows, width)
    for _ in range(iters):
        new_codes = nearest_codes(xs, centers).t()  # (C, N)
        if codes is not None and (new_codes != codes).float().mean() < 1e-3:
            break
        codes = new_codes
        # sums by index_add over (codebook, centroid) slots: 3-4x faster than scatter_add on wide subspaces,
        # and a (C, K, rows) one-hot would need C*K*rows floats (19 GB for a depthwise layer's C = 4608
        # codebooks of 16,384 rows at K = 64)
        slots = (codes + offsets).flatten()
        sums = torch.zeros(codebooks * k, width, dtype=xs.dtype, device=xs.device).index_add_(0, slots, flat)
        counts = torch.bincount(slots, minlength=codebooks * k).to(xs.dtype).view(codebooks, k)
        new = sums.view(codebooks, k, width) / counts.clamp(min=1).unsqueeze(-1)
        empty = counts == 0
        if empty.any():
            new = _reseed_empty(xs, new, empty, centers)
        centers = new
    return centers


def _reseed_empty(xs: torch.Tensor, new: torch.Tensor, empty: torch.Tensor, old: torch.Tensor) -> torch.Tensor:
    """Move each empty cluster onto the row farthest from its current center."""
    dist = _sq_distances(xs, old).min(-1).values  # (C, N)
    for c in torch.nonzero(empty.any(1)).flatten().tolist():
        slots = torch.nonzero(empty[c]).flatten()
        far = dist[c].topk(len(slots)).indices
        new[c, slots] = xs[c, far]
    return new


def kmeans_sklearn(xs: torch.Tensor, k: int, iters: int, seed: int) -> torch.Tensor:
    """scikit-learn's KMeans per subspace (the reference backend)."""
    from sklearn.cluster import KMeans

    centers = []
    for sub in xs.cpu().numpy():
        km = KMeans(n_clusters=k, n_init=1, max_iter=iters, random_state=seed).fit(sub)
        centers.append(torch.from_numpy(km.cluster_centers_).to(xs.dtype))
    return torch.stack(centers).to(xs.device)


LEARNED_TENSORS = ("prototypes_", "split_dims_", "thresholds_", "tables_", "table_scale_", "table_offset_")
LEARNED_SCALARS = ("in_features_", "fit_rows_", "out_features_")


class NotFittedError(ValueError, AttributeError):
    """A quantizer used before `fit` (or `set_weight`, for what needs tables): scikit-learn's shape of the error."""


class ProductQuantizer(nn.Module):
    """Learn K prototypes in each of C subspaces; approximate X @ W + b by summed table entries.

    A grouped convolution (`groups` G > 1) is G independent products: each group's D / G input columns get
    their own C codebooks (G * C in all, none straddling two groups) and its tables cover only its M / G
    outputs, so "C" always means codebooks per product, as for an ungrouped layer.

    Attributes (None until learned; D_pad = G * C * ceil(D / (G * C)), M = out_features_, C' = G * C):
        prototypes_: float32 (C', K, D_pad / C'); the tree encoder's ridge prototypes are (C, K, D_pad).
        split_dims_: int64 (C, log2 K), tree only: the dimension (within its subspace) compared at each level.
        thresholds_: float32 (C, K - 1), tree only: per-node thresholds in heap order (+inf: never go right).
        tables_: (C', K, M / G) in lut_dtype, the bias folded into each group's first codebook.
        table_scale_, table_offset_: int8 only: one float32 scale () and an offset per codebook (C',).
        in_features_, fit_rows_, out_features_: ints; D, the calibration rows, M. In `state_dict` they
            travel as 0-d int64 tensors (`_version` 1), so an unfitted quantizer loads a fitted one's state.
    """

    _version = 1

    def __init__(
        self,
        n_codebooks: int = 8,
        n_centroids: int = 64,
        encoder: str = "exhaustive",
        lut_dtype: str = "float32",
        kmeans_iter: int = 12,
        kmeans_backend: str = "torch",
        random_state: int = 0,
        groups: int = 1,
    ) -> None:
        super().__init__()  # parameters are stored as given and checked by fit (scikit-learn's estimator shape)
        self.n_codebooks = n_codebooks
        self.n_centroids = n_centroids
        self.encoder = encoder
        self.lut_dtype = lut_dtype
        self.kmeans_iter = kmeans_iter
        self.kmeans_backend = kmeans_backend
        self.random_state = random_state
        self.groups = groups
        for name in LEARNED_TENSORS:
            self.register_buffer(name, None)
        self.in_features_: int | None = None
        self.fit_rows_: int | None = None
        self.out_features_: int | None = None

    @classmethod
    def from_setting(cls, setting: LayerSetting, random_state: int = 0, groups: int = 1) -> ProductQuantizer:
        return cls(setting.codebooks, setting.centroids, setting.encoder, setting.lut_dtype, random_state=random_state,
                   groups=groups)

    @property
    def setting(self) -> LayerSetting:
        return LayerSetting("table", self.n_codebooks, self.n_centroids, self.encoder, self.lut_dtype)

    @classmethod
    def _param_names(cls) -> tuple[str, ...]:
        return tuple(name for name in inspect.signature(cls.__init__).parameters if name != "self")

    def get_params(self) -> dict[str, Any]:
        """Every constructor parameter (scikit-learn convention, read from the signature: a new one is never left
        out), e.g. to rebuild from a cache entry or to key one."""
        return {name: getattr(self, name) for name in self._param_names()}

    def validate_params(self) -> None:
        """Refuse parameters that cannot be fitted, naming the value (fit and a state load call it)."""
        LayerSetting("table", self.n_codebooks, self.n_centroids, self.encoder, self.lut_dtype)  # validates these
        if self.kmeans_backend not in KMEANS_BACKENDS:
            raise SettingError(f"kmeans_backend must be one of {KMEANS_BACKENDS}, got {self.kmeans_backend!r}")
        groups = self.groups
        if isinstance(groups, bool) or not isinstance(groups, int) or groups < 1:
            raise SettingError(f"groups must be a positive integer, got {groups!r}")
        if groups > 1 and self.encoder == "tree":
            raise SettingError(f"the hash-tree encoder does not support grouped convolutions (groups={groups}); "
                               "use the exhaustive encoder for this layer")

    # -- fitting -------------------------------------------------------------------------------
    @property
    def total_codebooks(self) -> int:
        """C' = G * C: the codebooks of every group together."""
        return self.groups * self.n_codebooks

    def padded_dim(self, in_features: int) -> int:
        """D_pad: each group's columns padded to a multiple of C."""
        return self.total_codebooks * math.ceil(in_features // self.groups / self.n_codebooks)

    def pad(self, x: torch.Tensor) -> torch.Tensor:
        """Rows (N, D) -> (N, D_pad), zero columns at the end of each group's columns."""
        if self.groups == 1:
            return pad_columns(x, self.padded_dim(x.shape[-1]))
        grouped = x.reshape(x.shape[0], self.groups, -1)
        width = self.padded_dim(x.shape[-1]) // self.groups
        return pad_columns(grouped, width).reshape(x.shape[0], -1)

    def subspaces(self, x: torch.Tensor) -> torch.Tensor:
        """Rows (N, D) -> (C', N, D_pad / C'), one block of columns per codebook."""
        return split_subspaces(self.pad(x.float()), self.total_codebooks)

    @torch.no_grad()
    def fit(self, x: torch.Tensor) -> ProductQuantizer:
        """Learn prototypes (exhaustive) or a hash tree (tree) from calibration rows x of shape (N, D)."""
        self.validate_params()
        if x.ndim != 2 or x.shape[0] == 0:
            raise ValueError(f"fit expects a non-empty (rows, features) matrix, got shape {tuple(x.shape)}")
        rows, in_features = x.shape
        if in_features % self.groups:
            raise ValueError(f"{in_features} features do not split into {self.groups} groups")
        self.in_features_ = in_features
        self.fit_rows_ = rows
        if self.n_centroids >= rows:
            warnings.warn(
                f"K={self.n_centroids} centroids but only {rows} calibration rows: k-means would memorise "
                "rows; use more calibration images or a smaller K",
                DegenerateCodebookWarning,
                stacklevel=3,
            )
        xs = self.subspaces(x).contiguous()
        if self.encoder == "exhaustive":
            self.prototypes_ = self._kmeans(xs)
        else:
            self._fit_tree(x.float(), xs)
        return self

    def _kmeans(self, xs: torch.Tensor) -> torch.Tensor:
        k = min(self.n_centroids, xs.shape[1])
        fit = kmeans_torch if self.kmeans_backend == "torch" else kmeans_sklearn
        centers = fit(xs, k, self.kmeans_iter, self.random_state)
        if k < self.n_centroids:  # unused slots: copies never chosen first by argmin
            centers = torch.cat([centers, centers[:, :1].expand(-1, self.n_centroids - k, -1)], dim=1)
        return centers

    def _fit_tree(self, x: torch.Tensor, xs: torch.Tensor) -> None:
        from tabconv.hashtree import fit_hash_trees

        self.split_dims_, self.thresholds_, self.prototypes_ = fit_hash_trees(
            x, xs, self.n_centroids, self.random_state
        )

    # -- encoding and tables -------------------------------------------------------------------
    @torch.no_grad()
    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Codes (N, C): which prototype / bucket each row falls in, per subspace."""
        self._check_fitted("prototypes_")
        xs = self.subspaces(x)
        if self.encoder == "exhaustive":
            return nearest_codes(xs, self.prototypes_)  # strided (C, N, s): BLAS reads it in place
        from tabconv.hashtree import encode_hash_trees

        return encode_hash_trees(xs, self.split_dims_, self.thresholds_)

    @torch.no_grad()
    def set_weight(self, weight: torch.Tensor, bias: torch.Tensor | None = None) -> ProductQuantizer:
        """Precompute tables T[c, k, m] = <prototype(c, k), W[subspace c, m]>, the bias folded into each group's
        first codebook. `weight` is (D / G, M): a grouped conv's weight matrix, every group's columns side by side."""
        self._check_fitted("prototypes_")
        if weight.shape[0] * self.groups != self.in_features_ or weight.shape[1] % self.groups:
            raise ValueError(f"weight of shape {tuple(weight.shape)} does not fit a quantizer fitted on "
                             f"{self.in_features_} features in {self.groups} group(s)")
        tables = self.float_tables(weight.float())
        if bias is not None:
            tables.view(self.groups, self.n_codebooks, self.n_centroids, -1)[:, 0] += bias.float().view(
                self.groups, 1, -1)
        self.out_features_ = weight.shape[1]
        self._store_tables(tables)
        return self

    def float_tables(self, weight: torch.Tensor) -> torch.Tensor:
        """Exact float32 tables (C', K, M / G) for a weight matrix (D / G, M)."""
        if self.groups > 1:  # (D/G, M) -> per group (D/G padded, M/G), stacked along the codebooks
            per_group = weight.reshape(weight.shape[0], self.groups, -1).permute(1, 2, 0)  # (G, M/G, D/G)
            width = self.padded_dim(self.in_features_) // self.groups
            w_sub = pad_columns(per_group, width).reshape(self.groups, -1, self.n_codebooks, width // self.n_codebooks)
            return torch.bmm(self.prototypes_, w_sub.permute(0, 2, 3, 1).reshape(self.total_codebooks, -1,
                                                                                   w_sub.shape[1]))
        w = pad_columns(weight.t(), self.padded_dim(self.in_features_)).t()
        if self.prototypes_.shape[-1] == w.shape[0]:  # full-width prototypes (tree + ridge refinement)
            return torch.einsum("ckd,dm->ckm", self.prototypes_, w)
        w_sub = w.reshape(self.n_codebooks, -1, w.shape[1])
        return torch.bmm(self.prototypes_, w_sub)

    @torch.no_grad()
    def refit_tables(self, x: torch.Tensor, target: torch.Tensor, ridge: float = 1.0) -> ProductQuantizer:
        """Least-squares tables: argmin_T ||G T - Y||^2 + lam ||T - T0||^2, with the codes fixed.

        G (N, C*K) is the one-hot of the codes of x (e.g. rows coming out of an approximated upstream
        network), Y the exact layer output wanted for those rows, T0 the current tables (prototypes x
        weights) and lam = ridge * N / K (the mean bucket size, so `ridge` is scale-free). Every output
        channel is its own ridge problem in C*K unknowns; they share one Cholesky factor (per group, for a
        grouped conv: a group's outputs depend on its own codebooks only). When K covers every distinct row
        and ridge -> 0 the layer reproduces Y exactly. See tabconv/lstsq.py.
        """
        self._check_fitted("tables_")
        if target.shape != (x.shape[0], self.out_features_):
            raise ValueError(f"refit_tables needs targets of shape {(x.shape[0], self.out_features_)}, "
                             f"got {tuple(target.shape)}")
        if ridge <= 0:
            raise ValueError(f"ridge must be positive, got {ridge}")
        from tabconv.lstsq import table_correction

        size = self.n_codebooks * self.n_centroids
        codes = self.encode(x)
        prior = self.table_values()
        residual = (target.float() - self._sum_tables(prior, codes)).reshape(x.shape[0], self.groups, -1)
        lam = ridge * x.shape[0] / self.n_centroids
        offsets = torch.arange(self.n_codebooks, device=codes.device) * self.n_centroids
        solved = []
        for group, group_prior in enumerate(prior.reshape(self.groups, size, -1)):
            group_codes = codes[:, group * self.n_codebooks:(group + 1) * self.n_codebooks]
            solved.append(group_prior.double() + table_correction(group_codes + offsets, residual[:, group], size, lam))
        self._store_tables(torch.stack(solved).float().reshape(self.total_codebooks, self.n_centroids, -1))
        return self

    def table_values(self) -> torch.Tensor:
        """The tables as float32 (C', K, M / G), dequantized when they are stored as int8."""
        self._check_fitted("tables_")
        if self.lut_dtype == "int8":
            scale, offset = self.int8_affine()
            width = self.tables_.shape[-1]
            q = self.tables_.float().reshape(self.groups, self.n_codebooks, self.n_centroids, width)
            values = scale.reshape(self.groups, 1, 1, width) * (q + 128.0) + offset.reshape(
                self.groups, self.n_codebooks, 1, width)
            return values.reshape(self.tables_.shape)
        return self.tables_.float()

    def int8_affine(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(scale per output (M,), offset per codebook and output column (C', M / G)) of int8 tables.

        Tables quantised before per-output scales (one scale per layer, one offset per codebook) are broadcast to
        these shapes, so files written then still load and compute what they did."""
        self._check_fitted("table_scale_")
        width = self.tables_.shape[-1]
        scale, offset = self.table_scale_.float(), self.table_offset_.float()
        if scale.dim() == 0:
            scale = scale.expand(self.groups * width)
        if offset.dim() == 1:
            offset = offset.unsqueeze(1).expand(-1, width)
        return scale, offset

    def int8_bias(self) -> torch.Tensor:
        """Per output (M,), what dequantising an integer sum adds: scale * 128 C + the sum of its offsets."""
        scale, offset = self.int8_affine()
        offset_sums = offset.reshape(self.groups, self.n_codebooks, -1).sum(1).reshape(-1)
        return scale * (128.0 * self.n_codebooks) + offset_sums

    def _store_tables(self, tables: torch.Tensor) -> None:
        if self.lut_dtype == "int8":
            self.tables_, self.table_scale_, self.table_offset_ = quantize_tables_int8(tables, self.groups)
        else:
            self.tables_ = tables.to(getattr(torch, self.lut_dtype))

    def lookup(self, codes: torch.Tensor) -> torch.Tensor:
        """Sum over each group's codebooks of the looked-up table rows: (N, C') codes -> (N, M) outputs."""
        self._check_fitted("tables_")
        summed = self._sum_tables(self.tables_.float(), codes)
        if self.lut_dtype == "int8":
            # integer sums are exact in float32 (|sum| <= 128*C << 2**24): this is int accumulation
            return dequantize_sum(summed, self.int8_affine()[0], self.int8_bias())
        return summed

    def _code_offsets(self, device: torch.device) -> torch.Tensor:
        return torch.arange(self.total_codebooks, device=device) * self.n_centroids

    def _sum_tables(self, tables: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
        """Per group, the sum over its codebooks of the rows of float tables (C', K, M / G) picked by codes (N, C')."""
        flat = tables.reshape(-1, tables.shape[-1])
        bags = (codes + self._code_offsets(codes.device)).reshape(-1, self.n_codebooks)
        return F.embedding_bag(bags, flat, mode="sum").reshape(codes.shape[0], -1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lookup(self.encode(x))

    def forward_conv(self, x: torch.Tensor, conv: nn.Module) -> torch.Tensor:
        """A conv's output rows (N H_out W_out, M) from its input: what a trainable quantizer computes without
        im2col (`tabconv.finetune.TrainableTables`), here through it."""
        return self(im2col(x, conv))

    @torch.no_grad()
    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """The rows (N, D) that codes (N, C') stand for: each codebook's prototype in its own columns (exhaustive),
        or the sum of the codebooks' full-width prototypes (the hash tree's, fitted jointly by ridge regression).
        Tables are prototypes times the weights, so `decode(codes) @ W + b` is what float tables sum to."""
        self._check_fitted("prototypes_")
        picked = self.prototypes_[torch.arange(self.prototypes_.shape[0], device=codes.device), codes.long()]
        if self.prototypes_.shape[-1] == self.padded_dim(self.in_features_) and self.total_codebooks > 1:
            padded = picked.sum(1)  # full-width prototypes: (N, C, D_pad) summed over the codebooks
        else:
            padded = picked.reshape(len(codes), -1)  # (N, C', s): the subspaces side by side
        width = self.padded_dim(self.in_features_) // self.groups
        per_group = padded.reshape(len(codes), self.groups, width)[:, :, :self.in_features_ // self.groups]
        return per_group.reshape(len(codes), self.in_features_)

    def _check_fitted(self, attr: str) -> None:
        if getattr(self, attr) is None:
            raise NotFittedError(f"ProductQuantizer is not fitted: {attr} missing (call fit / set_weight first)")

    # -- persistence -----------------------------------------------------------------------------
    def expected_state(self, has_tables: bool = True) -> list[str]:
        """The `state_dict` keys of this quantizer once fitted (and given weights, when has_tables)."""
        keys = ["prototypes_", "in_features_", "fit_rows_"]
        keys += ["split_dims_", "thresholds_"] if self.encoder == "tree" else []
        keys += ["tables_", "out_features_"] if has_tables else []
        keys += ["table_scale_", "table_offset_"] if has_tables and self.lut_dtype == "int8" else []
        return keys

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)  # the tensors: non-None buffers
        for name in LEARNED_SCALARS:
            value = getattr(self, name)
            if value is not None:
                destination[prefix + name] = torch.tensor(value, dtype=torch.int64)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        """Learned tensors take the stored shapes (an unfitted quantizer has none); all or nothing under strict."""
        self.validate_params()  # a stored state is only as good as the parameters it is loaded into
        given = {key[len(prefix):]: value for key, value in state_dict.items() if key.startswith(prefix)}
        if not given:
            missing_keys.extend(prefix + name for name in self.expected_state())
            return
        unknown = [name for name in given if name not in LEARNED_TENSORS + LEARNED_SCALARS]
        unexpected_keys.extend(prefix + name for name in unknown)
        missing = [name for name in self.expected_state("tables_" in given) if name not in given]
        missing_keys.extend(prefix + name for name in missing)
        if strict and (unknown or missing):
            return
        for name, value in given.items():
            if name in LEARNED_SCALARS:
                setattr(self, name, int(value))
            elif name in LEARNED_TENSORS:
                current = getattr(self, name)
                device = current.device if current is not None else value.device
                setattr(self, name, value.detach().to(device, copy=True))


def quantize_tables_int8(tables: torch.Tensor, groups: int = 1) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """int8 tables (C', K, M / G) with one scale per output and one offset per codebook and output column.

    Every codebook summed into an output shares that output's scale, so the C looked-up int8 entries are summed
    as integers (no overflow in int32) and dequantised once per output m:
    sum_c T[c, :, m] ~= scale_m * (sum_c q_c + 128 C) + sum_c offset[c, m]. One scale per output (instead of one
    per layer) keeps a narrow output from being rounded on the scale of the widest; the offsets only matter to
    the lookup through their sum per output.
    """
    width = tables.shape[-1]
    low = tables.amin(dim=1)  # (C', M / G)
    span = (tables.amax(dim=1) - low).reshape(groups, -1, width).amax(1)  # (G, M / G): widest codebook per output
    scale = (span.clamp(min=1e-12) / 255.0).reshape(groups, 1, 1, width)
    grouped = tables.reshape(groups, -1, *tables.shape[1:])
    q = torch.round((grouped - low.reshape(groups, -1, 1, width)) / scale) - 128
    return q.clamp_(-128, 127).to(torch.int8).reshape(tables.shape), scale.reshape(-1), low


def dequantize_sum(summed: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """Turn per-output sums of int8 entries (N, M) back into the float sum of table values: scale * sum + bias, with
    `scale` and `bias` per output (see `ProductQuantizer.int8_bias`)."""
    return scale * summed + bias
