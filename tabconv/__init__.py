"""TabConv: approximate CNN layers by product-quantization table lookups."""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"
__all__ = ["__version__", "load_tabled"]


def __getattr__(name: str) -> Any:
    """`tabconv.load_tabled`, imported on first use: `import tabconv` stays free of torch."""
    if name == "load_tabled":
        from tabconv.export import load_tabled

        return load_tabled
    raise AttributeError(f"module 'tabconv' has no attribute {name!r}")
