"""Golden bit patterns for edge values, and the value of every single-bit flip against a spec
decoder written with Python integers (and ``struct`` where it knows the format)."""

from __future__ import annotations

import math
import struct

import pytest
import torch

from quant_schemes import FORMATS, Encoded, FixedPoint, FloatFormat, IntSymmetric, get_format

INF, NAN = math.inf, math.nan

# (format, input value, scale for integer formats or None, expected code)
GOLDEN = [
    # fp32: bits exactly
    ("fp32", 1.0, None, 0x3F800000),
    ("fp32", -0.0, None, 0x80000000),
    ("fp32", 2.0**-149, None, 0x00000001),  # smallest subnormal
    ("fp32", 3.4028234663852886e38, None, 0x7F7FFFFF),  # max
    ("fp32", -INF, None, 0xFF800000),
    # fp16: IEEE binary16, round half to even, overflow to inf
    ("fp16", 0.0, None, 0x0000),
    ("fp16", -0.0, None, 0x8000),
    ("fp16", 1.0, None, 0x3C00),
    ("fp16", 65504.0, None, 0x7BFF),
    ("fp16", -65504.0, None, 0xFBFF),
    ("fp16", 2.0**-24, None, 0x0001),  # smallest subnormal
    ("fp16", 2.0**-25, None, 0x0000),  # half of it: tie to even (0)
    ("fp16", 3 * 2.0**-25, None, 0x0002),  # 1.5 subnormal ulps: tie to even (2)
    ("fp16", 2.0**-14, None, 0x0400),  # smallest normal
    ("fp16", 1 + 2.0**-11, None, 0x3C00),  # tie -> even mantissa 0
    ("fp16", 1 + 3 * 2.0**-11, None, 0x3C02),  # tie -> even mantissa 2
    ("fp16", 65519.0, None, 0x7BFF),  # below the midpoint to 65536
    ("fp16", 65520.0, None, 0x7C00),  # midpoint: ties to even = overflow to inf
    ("fp16", INF, None, 0x7C00),
    ("fp16", -INF, None, 0xFC00),
    ("fp16", NAN, None, 0x7E00),
    ("fp16", -NAN, None, 0xFE00),
    # bf16: S1E8M7, round half to even
    ("bf16", 1.0, None, 0x3F80),
    ("bf16", -0.0, None, 0x8000),
    ("bf16", 2.0**-133, None, 0x0001),  # smallest subnormal
    ("bf16", 1 + 2.0**-8, None, 0x3F80),  # tie -> even
    ("bf16", 1 + 3 * 2.0**-8, None, 0x3F82),  # tie -> even
    ("bf16", 3.3895313892515355e38, None, 0x7F7F),  # max
    ("bf16", 3.4028234663852886e38, None, 0x7F80),  # float32 max rounds to inf
    ("bf16", NAN, None, 0x7FC0),
    # fp8_e4m3 (OCP E4M3, torch float8_e4m3fn): no inf; torch saturates on overflow
    ("fp8_e4m3", 1.0, None, 0x38),
    ("fp8_e4m3", 448.0, None, 0x7E),
    ("fp8_e4m3", -448.0, None, 0xFE),
    ("fp8_e4m3", 2.0**-9, None, 0x01),  # smallest subnormal
    ("fp8_e4m3", 2.0**-6, None, 0x08),  # smallest normal
    ("fp8_e4m3", 1 + 2.0**-4, None, 0x38),  # tie -> even
    ("fp8_e4m3", 1 + 3 * 2.0**-4, None, 0x3A),  # tie -> even
    ("fp8_e4m3", 464.0, None, 0x7E),  # tie between 448 and (NaN) 480 -> 448
    ("fp8_e4m3", 480.0, None, 0x7E),  # overflow saturates (torch; ml_dtypes gives NaN)
    ("fp8_e4m3", INF, None, 0x7E),
    ("fp8_e4m3", -INF, None, 0xFE),
    ("fp8_e4m3", NAN, None, 0x7F),
    ("fp8_e4m3", -NAN, None, 0xFF),
    # fp8_e5m2 (OCP E5M2): IEEE-like, overflow to inf
    ("fp8_e5m2", 1.0, None, 0x3C),
    ("fp8_e5m2", 57344.0, None, 0x7B),
    ("fp8_e5m2", 2.0**-16, None, 0x01),
    ("fp8_e5m2", 1.125, None, 0x3C),  # tie -> even
    ("fp8_e5m2", 1.375, None, 0x3E),  # tie -> even
    ("fp8_e5m2", 61439.0, None, 0x7B),
    ("fp8_e5m2", 61440.0, None, 0x7C),  # tie -> even = inf
    ("fp8_e5m2", -INF, None, 0xFC),
    ("fp8_e5m2", NAN, None, 0x7E),
    # fp6_e3m2 (OCP FP6 E3M2, bias 3): no inf/NaN, RNE, saturating at 28
    ("fp6_e3m2", 1.0, None, 0x0C),
    ("fp6_e3m2", -0.0, None, 0x20),
    ("fp6_e3m2", 28.0, None, 0x1F),  # max
    ("fp6_e3m2", -28.0, None, 0x3F),
    ("fp6_e3m2", 30.0, None, 0x1F),  # beyond max saturates (ml_dtypes too)
    ("fp6_e3m2", INF, None, 0x1F),
    ("fp6_e3m2", 2.0**-4, None, 0x01),  # smallest subnormal
    ("fp6_e3m2", 0.25, None, 0x04),  # smallest normal
    ("fp6_e3m2", 2.0**-5, None, 0x00),  # half a subnormal step: tie -> even 0
    ("fp6_e3m2", 3 * 2.0**-5, None, 0x02),  # tie -> even 2
    ("fp6_e3m2", 1.125, None, 0x0C),  # tie -> even mantissa 0
    ("fp6_e3m2", 1.375, None, 0x0E),  # tie -> even mantissa 2
    # fp6_e2m3 (OCP FP6 E2M3, bias 1): no inf/NaN, RNE, saturating at 7.5
    ("fp6_e2m3", 1.0, None, 0x08),
    ("fp6_e2m3", -0.0, None, 0x20),
    ("fp6_e2m3", 7.5, None, 0x1F),  # max
    ("fp6_e2m3", -INF, None, 0x3F),
    ("fp6_e2m3", 7.75, None, 0x1F),  # tie above max saturates
    ("fp6_e2m3", 0.125, None, 0x01),  # smallest subnormal
    ("fp6_e2m3", 1.0625, None, 0x08),  # tie -> even
    ("fp6_e2m3", 1.1875, None, 0x0A),  # tie -> even
    # fp4_e2m1 (OCP FP4, bias 1): values 0, 0.5, 1, 1.5, 2, 3, 4, 6
    ("fp4_e2m1", 1.0, None, 0x2),
    ("fp4_e2m1", -0.0, None, 0x8),
    ("fp4_e2m1", 6.0, None, 0x7),  # max
    ("fp4_e2m1", -6.0, None, 0xF),
    ("fp4_e2m1", 0.5, None, 0x1),  # the only subnormal
    ("fp4_e2m1", 0.25, None, 0x0),  # tie -> even 0
    ("fp4_e2m1", 0.75, None, 0x2),  # tie -> even 1.0
    ("fp4_e2m1", 1.75, None, 0x4),  # tie -> even 2.0
    ("fp4_e2m1", 2.5, None, 0x4),  # tie -> even 2.0
    ("fp4_e2m1", 5.0, None, 0x6),  # tie -> even 4.0
    ("fp4_e2m1", 7.0, None, 0x7),  # saturates
    ("fp4_e2m1", 1e9, None, 0x7),
    ("fp4_e2m1", -INF, None, 0xF),
    # fixed point: two's complement, round half to even, saturate
    ("q3.13", 1.5, None, 0x3000),
    ("q3.13", -1.5, None, 0xD000),
    ("q3.13", -0.0, None, 0x0000),
    ("q3.13", 4 - 2.0**-13, None, 0x7FFF),  # max
    ("q3.13", -4.0, None, 0x8000),  # min
    ("q3.13", 5.0, None, 0x7FFF),  # saturates
    ("q3.13", -5.0, None, 0x8000),
    ("q3.13", INF, None, 0x7FFF),
    ("q3.13", -INF, None, 0x8000),
    ("q3.13", 2.0**-13, None, 0x0001),  # one LSB
    ("q3.13", 2.0**-14, None, 0x0000),  # 0.5 LSB -> even 0
    ("q3.13", 3 * 2.0**-14, None, 0x0002),  # 1.5 LSB -> even 2
    ("q3.13", 5 * 2.0**-14, None, 0x0002),  # 2.5 LSB -> even 2
    ("q3.13", -(3 * 2.0**-14), None, 0xFFFE),  # -1.5 LSB -> -2
    ("q3.13", 4 - 2.0**-14, None, 0x7FFF),  # tie above max saturates
    ("q1.7", 0.5, None, 0x40),
    ("q1.7", -1.0, None, 0x80),
    ("q1.7", 1.0, None, 0x7F),
    ("q1.7", 127 / 128, None, 0x7F),
    ("q1.7", -1 / 256, None, 0x00),  # -0.5 LSB -> 0
    # symmetric integers with a given scale
    ("int8", 1.0, 1.0, 0x01),
    ("int8", 2.5, 1.0, 0x02),  # tie -> even
    ("int8", 3.5, 1.0, 0x04),
    ("int8", -2.5, 1.0, 0xFE),
    ("int8", -0.5, 1.0, 0x00),
    ("int8", 127.4, 1.0, 0x7F),
    ("int8", 300.0, 1.0, 0x7F),  # clamp to +127
    ("int8", -300.0, 1.0, 0x81),  # clamp to -127, never -128
    ("int8", 0.75, 0.25, 0x03),
    ("int8_per_channel", -1.0, 0.5, 0xFE),
    ("int4", 7.6, 1.0, 0x7),
    ("int4", -9.0, 1.0, 0x9),  # clamp to -7
    ("int4", 0.5, 1.0, 0x0),
]


def as_pattern(qdata: torch.Tensor, bits: int) -> list[int]:
    return (qdata.long() & ((1 << bits) - 1)).tolist()


@pytest.mark.parametrize(
    ("name", "value", "scale", "code"), GOLDEN, ids=[f"{n}-{v!r}-{hex(c)}" for n, v, _, c in GOLDEN]
)
def test_golden_codes(name, value, scale, code):
    """Edge values encode to the bit pattern written in the table (ml_dtypes / IEEE / spec)."""
    fmt = get_format(name)
    s = None if scale is None else torch.tensor([scale])
    enc = fmt.encode(torch.tensor([value], dtype=torch.float32), s)
    assert as_pattern(enc.qdata, fmt.bits) == [code], (
        f"{name}({value}) = {as_pattern(enc.qdata, fmt.bits)[0]:#x}"
    )


def test_golden_table_covers_every_format():
    """The golden table has rows for every canonical format."""
    assert {row[0] for row in GOLDEN} == set(FORMATS)


# -- spec decoders (Python integers only) ------------------------------------------------------
def spec_float(pattern: int, exp_bits: int, man_bits: int, finite: bool, nan: bool = True) -> float:
    """Value of a binary float pattern from its definition: (-1)^s * 2^(e-bias) * 1.m, subnormals,
    all-ones exponent = inf/NaN (or, for 'fn' formats, NaN only when the mantissa is all ones; for
    the FP6/FP4 element types, ``nan=False``, every pattern is a number)."""
    sign = -1.0 if pattern >> (exp_bits + man_bits) & 1 else 1.0
    e = (pattern >> man_bits) & ((1 << exp_bits) - 1)
    m = pattern & ((1 << man_bits) - 1)
    bias = (1 << (exp_bits - 1)) - 1
    top = (1 << exp_bits) - 1
    if finite and nan and e == top and m == (1 << man_bits) - 1:
        return math.nan
    if not finite and e == top:
        return sign * math.inf if m == 0 else math.nan
    if e == 0:
        return sign * math.ldexp(m, 1 - bias - man_bits)
    return sign * math.ldexp((1 << man_bits) | m, e - bias - man_bits)


def spec_value(fmt, pattern: int, scale: float | None) -> float:
    bits = fmt.bits
    if isinstance(fmt, FloatFormat):
        v = spec_float(pattern, fmt.exp_bits, fmt.man_bits, fmt.finite, fmt.has_nan)
        if fmt.bits == 32:  # cross-check with the C library's reading of the bits
            ref = struct.unpack("<f", struct.pack("<I", pattern))[0]
            assert (math.isnan(v) and math.isnan(ref)) or v == ref
        if fmt.bits == 16 and fmt.exp_bits == 5:
            ref = struct.unpack("<e", struct.pack("<H", pattern))[0]
            assert (math.isnan(v) and math.isnan(ref)) or v == ref
        return v
    c = pattern - (1 << bits) if pattern >> (bits - 1) else pattern
    if isinstance(fmt, FixedPoint):
        return math.ldexp(c, -fmt.frac_bits)
    return c * scale  # exact in double for these small codes; compared after float32 rounding


FLIP_VALUES = [1.0, -1.5, 0.3, 0.0, 3.0e-3, -0.9]


@pytest.mark.parametrize("name", FORMATS)
def test_every_single_bit_flip_decodes_to_spec(name):
    """Flipping bit b of a code and decoding gives the value the format's definition gives for
    the flipped pattern (Python-integer spec decoder); flipping it back restores the code."""
    fmt = get_format(name)
    x = torch.tensor(FLIP_VALUES)
    enc = fmt.encode(x, None if not isinstance(fmt, IntSymmetric) else torch.tensor([0.0123]))
    scale = None if enc.scale is None else float(enc.scale.reshape(-1)[0])
    for b in range(fmt.bits):
        mask = torch.tensor(1, dtype=torch.int32) << b  # bit 31 gives INT32_MIN, as intended
        flipped = enc.replace(qdata=enc.qdata ^ mask)
        got = fmt.decode(flipped)
        want = [spec_value(fmt, p, scale) for p in as_pattern(flipped.qdata, fmt.bits)]
        want32 = torch.tensor(want, dtype=torch.float64).to(torch.float32)
        assert torch.equal(got.nan_to_num(), want32.nan_to_num()), (name, b)
        assert torch.equal(got.isnan(), want32.isnan()), (name, b)
        back = flipped.replace(qdata=flipped.qdata ^ mask)
        assert torch.equal(back.qdata, enc.qdata)


@pytest.mark.parametrize(
    ("name", "value", "bit", "expected"),
    [
        ("fp32", 1.0, 30, INF),  # 0x3F800000 ^ 0x40000000 = 0x7F800000
        ("fp32", 1.0, 31, -1.0),
        ("fp32", 1.0, 23, 0.5),  # exponent LSB
        ("fp32", 1.0, 22, 1.5),  # mantissa MSB
        ("fp16", 1.0, 14, INF),  # 0x3C00 ^ 0x4000 = 0x7C00
        ("bf16", 1.0, 14, INF),
        ("fp8_e4m3", 1.0, 6, 256.0),  # 0x38 ^ 0x40 = 0x78: the all-ones exponent is normal in E4M3
        ("fp8_e4m3", 448.0, 0, NAN),  # 0x7E ^ 0x01 = 0x7F, the only NaN
        ("fp8_e5m2", 1.0, 6, INF),  # 0x3C ^ 0x40 = 0x7C
        ("fp4_e2m1", 1.0, 2, 4.0),  # 0x2 ^ 0x4 = 0x6
        ("fp4_e2m1", 6.0, 3, -6.0),
        ("fp6_e2m3", 1.0, 4, 4.0),  # exponent MSB: 0x08 ^ 0x10 = 0x18
        ("fp6_e3m2", 1.0, 4, 16.0),  # 0x0C ^ 0x10 = 0x1C: no NaN, the top exponent is normal
        ("q3.13", 1.5, 15, -2.5),  # 1.5 - 4
        ("q3.13", 1.5, 14, 3.5),  # 1.5 + 2
        ("q1.7", 0.5, 6, 0.0),
        ("int8", 127.0, 7, -1.0),  # code 127 ^ 0x80 = -1
        ("int8", 0.0, 7, -128.0),  # -128 is reachable by a fault
        ("int4", 7.0, 3, -1.0),
    ],
)
def test_named_flips(name, value, bit, expected):
    """Worked examples of single-bit faults (scale 1 for integer formats)."""
    fmt = get_format(name)
    enc = fmt.encode(torch.tensor([value]), torch.tensor([1.0]) if isinstance(fmt, IntSymmetric) else None)
    got = fmt.decode(enc.replace(qdata=enc.qdata ^ (torch.tensor(1, dtype=torch.int32) << bit)))
    assert got.isnan().item() if math.isnan(expected) else got.tolist() == [expected]


def test_decode_ignores_bits_above_width():
    """Bits above ``bits`` in qdata do not change the decoded value (codes are masked)."""
    for name in FORMATS:
        fmt = get_format(name)
        if fmt.bits == 32:
            continue
        scale = torch.tensor(0.5) if isinstance(fmt, IntSymmetric) else None
        codes = torch.arange(2**fmt.bits, dtype=torch.int32)
        a = fmt.decode(Encoded(codes, scale))
        b = fmt.decode(Encoded(codes | (1 << fmt.bits), scale))
        assert torch.equal(a.nan_to_num(), b.nan_to_num()), name


def test_unsigned_pattern_encoding_documented_example():
    """q3.13: 1.5 -> 0x3000; int32 qdata for 32-bit formats is the signed reinterpretation."""
    assert get_format("q3.13").encode(torch.tensor(1.5)).qdata.item() == 0x3000
    assert get_format("fp32").encode(torch.tensor(-1.0)).qdata.item() == 0xBF800000 - 2**32
    assert get_format("q16.16").encode(torch.tensor(-1.0)).qdata.item() == -(2**16)
    assert get_format("int32").encode(torch.tensor([-1.0])).qdata.item() == -(2**31 - 1)
