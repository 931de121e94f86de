"""Numeric formats as small frozen values: float tensor <-> integer bit view, bit-exact.

>>> import torch
>>> from quant_schemes import get_format
>>> fmt = get_format("q3.13")
>>> enc = fmt.encode(torch.tensor([1.5]))      # enc.qdata == tensor([0x3000])
>>> fmt.decode(enc)                             # tensor([1.5])
"""

from quant_schemes.affine import IntAffine
from quant_schemes.base import (
    PARTS,
    Encoded,
    Format,
    FormatError,
    QParams,
    bits_per_value,
    check_float_tensor,
    gather_scale,
    part_bit_names,
    part_bit_roles,
    part_bits,
    stored_parts,
)
from quant_schemes.block import (
    MXFP4,
    MXFP6_E2M3,
    MXFP6_E3M2,
    MXFP8_E4M3,
    MXFP8_E5M2,
    MXINT8,
    NVFP4,
    BlockFormat,
)
from quant_schemes.fixed import FixedPoint
from quant_schemes.floats import (
    BF16,
    E8M0,
    FP4_E2M1,
    FP6_E2M3,
    FP6_E3M2,
    FP8_E4M3,
    FP8_E5M2,
    FP16,
    FP32,
    FloatFormat,
)
from quant_schemes.granularity import Granularity, PerChannel, PerGroup, PerTensor
from quant_schemes.integer import IntSymmetric
from quant_schemes.registry import ALL_FORMATS, BLOCK_FORMATS, FORMATS, get_format

__all__ = [
    "ALL_FORMATS",
    "BF16",
    "BLOCK_FORMATS",
    "BlockFormat",
    "E8M0",
    "Encoded",
    "FORMATS",
    "FP16",
    "FP32",
    "FP4_E2M1",
    "FP6_E2M3",
    "FP6_E3M2",
    "FP8_E4M3",
    "FP8_E5M2",
    "FixedPoint",
    "FloatFormat",
    "Format",
    "FormatError",
    "Granularity",
    "IntAffine",
    "IntSymmetric",
    "MXFP4",
    "MXFP6_E2M3",
    "MXFP6_E3M2",
    "MXFP8_E4M3",
    "MXFP8_E5M2",
    "MXINT8",
    "NVFP4",
    "PARTS",
    "PerChannel",
    "PerGroup",
    "PerTensor",
    "QParams",
    "bits_per_value",
    "check_float_tensor",
    "gather_scale",
    "get_format",
    "part_bit_names",
    "part_bit_roles",
    "part_bits",
    "stored_parts",
]
