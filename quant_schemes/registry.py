"""``get_format(name)``: names carry their parameters (``fp16``, ``q3.13``, ``int8_per_channel``,
``mxfp4``, ``int4_g128_fp16``, ``uint8_asym_per_channel``).

Grammar of the scaled integers (k bits, G elements per group along the last axis, scale format
``fp32`` (default), ``fp16`` or ``bf16``):

* ``int<k>``, ``int<k>_per_channel[_axis<A>]``: symmetric, float32 scale kept outside the fault
  space (``IntSymmetric``); add ``_fp32`` / ``_fp16`` / ``_bf16`` to store the scale in that
  format as a word of the fault space (``IntAffine``);
* ``int<k>_g<G>[_<scale format>]``: symmetric, one stored scale per group (``int4_g128``);
* ``uint<k>_asym[_per_channel[_axis<A>] | _g<G>][_<scale format>]``: asymmetric, unsigned codes,
  a stored scale and a k-bit zero point per tensor / channel / group (``uint4_asym_g128``).

Block formats: ``mxfp8_e4m3``, ``mxfp8_e5m2``, ``mxfp6_e3m2``, ``mxfp6_e2m3``, ``mxfp4``, ``mxint8``
(OCP MX, blocks of 32, E8M0 scales) and ``nvfp4`` (blocks of 16, E4M3 scales, a float32 tensor
scale); ``_b<N>`` changes the block size (``mxfp4_b16``).
"""

from __future__ import annotations

import re

from quant_schemes.affine import IntAffine
from quant_schemes.base import Format, FormatError
from quant_schemes.block import MX_ELEMENTS, BlockFormat
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
from quant_schemes.granularity import PerChannel, PerGroup, PerTensor
from quant_schemes.integer import IntSymmetric

#: canonical example names, one per kind of format (tests parametrise over these)
FORMATS: tuple[str, ...] = (
    "fp32",
    "fp16",
    "bf16",
    "fp8_e4m3",
    "fp8_e5m2",
    "q3.13",
    "q1.7",
    "int8",
    "int8_per_channel",
    "int4",
    "fp6_e3m2",
    "fp6_e2m3",
    "fp4_e2m1",
)

#: canonical examples of the formats that store their scales (block, group-wise, asymmetric);
#: ``ALL_FORMATS`` is both lists (the format tests run every contract on all of them)
BLOCK_FORMATS: tuple[str, ...] = (
    "mxfp8_e4m3",
    "mxfp8_e5m2",
    "mxfp6_e3m2",
    "mxfp6_e2m3",
    "mxfp4",
    "mxint8",
    "nvfp4",
    "int4_g128",
    "int4_g32_fp16",
    "int8_g64_bf16",
    "int8_fp32",
    "int8_per_channel_fp16",
    "uint8_asym",
    "uint8_asym_per_channel",
    "uint4_asym_g128",
    "uint4_asym_g32_fp16",
)
ALL_FORMATS: tuple[str, ...] = FORMATS + BLOCK_FORMATS

_FLOATS: dict[str, FloatFormat] = {
    "fp32": FP32,
    "float32": FP32,
    "fp16": FP16,
    "float16": FP16,
    "half": FP16,
    "bf16": BF16,
    "bfloat16": BF16,
    "fp8_e4m3": FP8_E4M3,
    "fp8_e4m3fn": FP8_E4M3,
    "float8_e4m3fn": FP8_E4M3,
    "fp8_e5m2": FP8_E5M2,
    "float8_e5m2": FP8_E5M2,
    "fp6_e3m2": FP6_E3M2,
    "float6_e3m2fn": FP6_E3M2,
    "fp6_e2m3": FP6_E2M3,
    "float6_e2m3fn": FP6_E2M3,
    "fp4_e2m1": FP4_E2M1,
    "fp4": FP4_E2M1,
    "float4_e2m1fn": FP4_E2M1,
}
_OTHER = {"e8m0": E8M0(), "fp8_e8m0": E8M0(), "float8_e8m0fnu": E8M0()}
_MX = {"mx" + k: v for k, v in MX_ELEMENTS.items()} | {"mxfp4_e2m1": MX_ELEMENTS["fp4"]}

_FIXED = re.compile(r"q(-?\d+)\.(-?\d+)")
_GRAN = r"(?:(_per_channel(?:_axis(\d+))?)|_g(\d+))?"
_SF = r"(?:_(fp32|fp16|bf16))?"
_INT = re.compile(r"int(-?\d+)" + _GRAN + _SF)
_UINT = re.compile(r"uint(-?\d+)_asym" + _GRAN + _SF)
_BLOCK = re.compile(r"(mx[a-z0-9_]+?|nvfp4)(?:_b(\d+))?")

VALID = (
    "fp32, fp16, bf16, fp8_e4m3, fp8_e5m2, fp6_e3m2, fp6_e2m3, fp4_e2m1, e8m0, q<m>.<n> (m>=1 "
    "integer bits including the sign, 2<=m+n<=32, e.g. q3.13), int<k> / int<k>_per_channel "
    "(2<=k<=32, e.g. int8), int<k>_g<G> (e.g. int4_g128), uint<k>_asym[_per_channel|_g<G>] (e.g. "
    "uint8_asym), each scaled integer with an optional stored-scale suffix _fp32/_fp16/_bf16 "
    "(int4_g128_fp16, int8_fp32), mxfp8_e4m3, mxfp8_e5m2, mxfp6_e3m2, mxfp6_e2m3, mxfp4, mxint8, "
    "nvfp4 (optional block size _b<N>)"
)

FormatLike = str | Format


def get_format(name: str | Format) -> Format:
    """The format called ``name`` (case-insensitive), or ``name`` itself if it is a format.

    >>> get_format("q3.13").bits, get_format("int8_per_channel").granularity
    (16, PerChannel(axis=0))
    """
    if isinstance(name, (FloatFormat, FixedPoint, IntSymmetric, IntAffine, BlockFormat, E8M0)):
        return name
    if not isinstance(name, str):
        if isinstance(name, Format):
            return name
        raise FormatError(f"expected a format name or Format, got {type(name).__name__}; valid: {VALID}")
    key = name.strip().lower()
    if key in _FLOATS:
        return _FLOATS[key]
    if m := _FIXED.fullmatch(key):
        return FixedPoint(int(m[1]), int(m[2]))
    if key in _OTHER:
        return _OTHER[key]
    if m := _INT.fullmatch(key):
        granularity = PerChannel(int(m[3] or 0)) if m[2] else PerGroup(int(m[4])) if m[4] else PerTensor()
        if m[5] is None and not m[4]:
            return IntSymmetric(int(m[1]), granularity)
        return IntAffine(int(m[1]), granularity, True, m[5] or "fp32")
    if m := _UINT.fullmatch(key):
        granularity = PerChannel(int(m[3] or 0)) if m[2] else PerGroup(int(m[4])) if m[4] else PerTensor()
        return IntAffine(int(m[1]), granularity, False, m[5] or "fp32")
    if (m := _BLOCK.fullmatch(key)) and (m[1] in _MX or m[1] == "nvfp4"):
        if m[1] == "nvfp4":
            return BlockFormat(FP4_E2M1, int(m[2] or 16), "e4m3")
        return BlockFormat(_MX[m[1]], int(m[2] or 32))
    raise FormatError(f"unknown format {name!r}; valid: {VALID}")
