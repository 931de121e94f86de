"""Numeric formats as small frozen values: float tensor <-> integer bit view, bit-exact."""
from quant_schemes.base import Encoded, Format, FormatError, gather_scale

__all__ = ["Encoded", "Format", "FormatError", "gather_scale"]
