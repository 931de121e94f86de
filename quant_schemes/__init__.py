"""Numeric formats as small frozen values: float tensor <-> integer bit view, bit-exact.

>>> import torch
>>> from quant_schemes import get_format
>>> fmt = get_format("q3.13")
>>> enc = fmt.encode(torch.tensor([1.5]))      # enc.qdata == tensor([0x3000])
>>> fmt.decode(enc)                             # tensor([1.5])
"""

from quant_schemes.base import Encoded, Format, FormatError, check_float_tensor, gather_scale
from quant_schemes.fixed import FixedPoint
from quant_schemes.floats import BF16, FP8_E4M3, FP8_E5M2, FP16, FP32, FloatFormat
from quant_schemes.integer import Granularity, IntSymmetric, PerChannel, PerTensor
from quant_schemes.registry import FORMATS, get_format

__all__ = [
    "BF16",
    "Encoded",
    "FORMATS",
    "FP16",
    "FP32",
    "FP8_E4M3",
    "FP8_E5M2",
    "FixedPoint",
    "FloatFormat",
    "Format",
    "FormatError",
    "Granularity",
    "IntSymmetric",
    "PerChannel",
    "PerTensor",
    "check_float_tensor",
    "gather_scale",
    "get_format",
]
