"""Per-layer settings: how one named layer is computed (exact or by table lookups)."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

MODES = ("exact", "table")
ENCODERS = ("exhaustive", "tree")
# The ranges an interface offers for C, K and S: the library itself only needs C, K, S >= 1 (and a tree's
# K = 2**depth); a sub-vector length can still resolve to more codebooks than C_LIMITS (ceil(D / S), large D).
C_LIMITS = (1, 256)
K_LIMITS = (2, 65536)
S_LIMITS = (1, 4096)
LUT_DTYPES = ("float32", "float16", "int8")
LUT_BYTES = {"float32": 4, "float16": 2, "int8": 1}


class SettingError(ValueError):
    """An invalid layer setting; the message names the offending value."""


@dataclass(frozen=True)
class LayerSetting:
    """One layer's choice. C (codebooks) and K (centroids) matter only in table mode."""

    mode: str = "exact"
    codebooks: int = 8
    centroids: int = 64
    encoder: str = "exhaustive"
    lut_dtype: str = "float32"
    subvector: int | None = None  # when set, C is ceil(D / subvector) per layer (resolved by the structure)

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise SettingError(f"mode must be one of {MODES}, got {self.mode!r}")
        for field, value in (("codebooks", self.codebooks), ("centroids", self.centroids)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise SettingError(f"{field} must be a positive integer, got {value!r}")
        if self.subvector is not None and (isinstance(self.subvector, bool) or not isinstance(self.subvector, int)
                                           or self.subvector < 1):
            raise SettingError(f"subvector must be a positive integer or null, got {self.subvector!r}")
        if self.encoder not in ENCODERS:
            raise SettingError(f"encoder must be one of {ENCODERS}, got {self.encoder!r}")
        if self.lut_dtype not in LUT_DTYPES:
            raise SettingError(f"lut_dtype must be one of {LUT_DTYPES}, got {self.lut_dtype!r}")
        if self.encoder == "tree" and self.centroids & (self.centroids - 1):
            raise SettingError(
                f"the tree encoder needs K to be a power of two (K = 2**depth), got {self.centroids}"
            )

    @property
    def is_table(self) -> bool:
        return self.mode == "table"

    @property
    def tree_depth(self) -> int:
        return int(math.log2(self.centroids))

    def for_inner_dim(self, inner_dim: int) -> LayerSetting:
        """This setting for a layer of D = inner_dim inputs: C = ceil(D / subvector) when a sub-vector
        length is set (the literature's way to give C: 9 = one input channel of a 3x3 conv). Every exact setting
        becomes EXACT, whatever table fields it carries, so one configuration has one key."""
        if not self.is_table:
            return EXACT
        if self.subvector is None:
            return self
        return self.with_(codebooks=math.ceil(inner_dim / self.subvector))

    def to_dict(self) -> dict:
        return asdict(self)

    def with_(self, **changes: object) -> LayerSetting:
        """A copy with some fields changed (settings are immutable so they can key caches)."""
        return LayerSetting(**{**asdict(self), **changes})


EXACT = LayerSetting()
