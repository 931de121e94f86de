"""``get_format(name)``: names carry their parameters (``fp16``, ``q3.13``, ``int8_per_channel``)."""

from __future__ import annotations

import re

from quant_schemes.base import Format, FormatError
from quant_schemes.fixed import FixedPoint
from quant_schemes.floats import BF16, FP8_E4M3, FP8_E5M2, FP16, FP32, FloatFormat
from quant_schemes.integer import IntSymmetric, PerChannel, PerTensor

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
)

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
}

_FIXED = re.compile(r"q(-?\d+)\.(-?\d+)")
_INT = re.compile(r"int(-?\d+)(_per_channel(?:_axis(\d+))?)?")

VALID = (
    "fp32, fp16, bf16, fp8_e4m3, fp8_e5m2, q<m>.<n> (m>=1 integer bits including the sign, "
    "2<=m+n<=32, e.g. q3.13), int<k> / int<k>_per_channel (2<=k<=32, e.g. int8)"
)

FormatLike = str | Format


def get_format(name: str | Format) -> Format:
    """The format called ``name`` (case-insensitive), or ``name`` itself if it is a format.

    >>> get_format("q3.13").bits, get_format("int8_per_channel").granularity
    (16, PerChannel(axis=0))
    """
    if isinstance(name, (FloatFormat, FixedPoint, IntSymmetric)):
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
    if m := _INT.fullmatch(key):
        granularity = PerChannel(int(m[3] or 0)) if m[2] else PerTensor()
        return IntSymmetric(int(m[1]), granularity)
    raise FormatError(f"unknown format {name!r}; valid: {VALID}")
