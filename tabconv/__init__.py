"""TabConv: approximate CNN layers by product-quantization table lookups."""

__version__ = "0.1.0"
