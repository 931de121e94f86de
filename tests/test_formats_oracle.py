"""Every format against an independent oracle, exhaustively where that is cheap.

Oracles: numpy ``float16``, ``ml_dtypes`` (bfloat16, float8_e4m3fn, float8_e5m2), torch's float8
dtypes, ``bitstring`` and ``struct`` for fp32, Python ``int`` / ``Fraction`` maths for fixed
point, ``torch.quantize_per_tensor`` / ``quantize_per_channel`` for int8.
"""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import pytest
import torch

from quant_schemes import Encoded, FixedPoint, FormatError, IntSymmetric, PerChannel, get_format

ml_dtypes = pytest.importorskip("ml_dtypes")

ALL16 = np.arange(2**16, dtype=np.uint16)
ALL8 = np.arange(2**8, dtype=np.uint8)
# float formats with their numpy oracle dtype
NP_ORACLE = {
    "fp16": np.float16,
    "bf16": ml_dtypes.bfloat16,
    "fp8_e4m3": ml_dtypes.float8_e4m3fn,
    "fp8_e5m2": ml_dtypes.float8_e5m2,
}
TORCH_FP8 = {"fp8_e4m3": torch.float8_e4m3fn, "fp8_e5m2": torch.float8_e5m2}


def codes_tensor(codes: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(codes.astype(np.int64)).to(torch.int32)


def same_floats(got: torch.Tensor, want: np.ndarray) -> bool:
    """Equal as float32 bit patterns, except that any NaN matches any NaN."""
    got_np = got.numpy()
    with np.errstate(invalid="ignore"):  # ml_dtypes warns when casting its NaNs
        want = want.astype(np.float32)
    both_nan = np.isnan(got_np) & np.isnan(want)
    return bool(np.all(both_nan | (got_np.view(np.uint32) == want.view(np.uint32))))


def random_float32(n: int, seed: int, lo_exp: int, hi_exp: int) -> np.ndarray:
    """Signed values with log-uniform magnitude 2**lo_exp..2**hi_exp and random low bits (no ties bias)."""
    rng = np.random.default_rng(seed)
    mag = np.exp2(rng.uniform(lo_exp, hi_exp, n)).astype(np.float32)
    bits = mag.view(np.uint32) ^ rng.integers(0, 2**16, n, dtype=np.uint32)  # scramble low mantissa
    sign = rng.choice(np.array([-1, 1], dtype=np.float32), n)
    return bits.view(np.float32) * sign


def ties_float32(name: str) -> np.ndarray:
    """Exact midpoints between neighbouring finite codes of a float format (round-half-even cases)."""
    oracle = NP_ORACLE[name]
    codes = ALL8 if np.dtype(oracle).itemsize == 1 else ALL16
    with np.errstate(invalid="ignore"):
        vals = codes.view(oracle).astype(np.float64)
    vals = np.unique(vals[np.isfinite(vals)])
    mids = ((vals[1:] + vals[:-1]) / 2).astype(np.float32)
    assert np.all(mids.astype(np.float64) == (vals[1:] + vals[:-1]) / 2), "midpoints exact in float32"
    return mids


# -- 16-bit floats: all 2**16 codes ---------------------------------------------------------
@pytest.mark.parametrize("name", ["fp16", "bf16"])
def test_decode_every_16bit_code(name):
    """decode(code) equals numpy/ml_dtypes' view of the same 16 bits, for all 2**16 codes."""
    fmt = get_format(name)
    got = fmt.decode(Encoded(codes_tensor(ALL16)))
    assert got.dtype == torch.float32
    assert same_floats(got, ALL16.view(NP_ORACLE[name]))


@pytest.mark.parametrize("name", ["fp16", "bf16"])
def test_encode_every_finite_16bit_value(name):
    """encode(value of code) gives back that code, for every non-NaN 16-bit code (incl. -0, inf)."""
    fmt = get_format(name)
    with np.errstate(invalid="ignore"):
        vals = ALL16.view(NP_ORACLE[name]).astype(np.float32)
    keep = ~np.isnan(vals)
    got = fmt.encode(torch.from_numpy(vals[keep])).qdata
    assert torch.equal(got, codes_tensor(ALL16[keep]))


@pytest.mark.parametrize("name", ["fp16", "bf16", "fp8_e4m3", "fp8_e5m2"])
def test_encode_random_and_ties_match_numpy_rounding(name):
    """Round-to-nearest-even of float32 inputs (random and exact ties) equals numpy/ml_dtypes' cast.

    Inputs are limited to values ml_dtypes does not overflow (fp8_e4m3 overflow differs, see
    the golden table: torch saturates, ml_dtypes gives NaN).
    """
    fmt = get_format(name)
    oracle = NP_ORACLE[name]
    hi = {"fp16": 17, "bf16": 128, "fp8_e4m3": 9, "fp8_e5m2": 16.5}[name]
    x = np.concatenate([random_float32(50_000, 1, fmt.bias * -1 - fmt.man_bits - 2, hi), ties_float32(name)])
    if name == "fp8_e4m3":
        x = x[np.abs(x) <= 464]  # 464 is the last tie that rounds down to 448
    with np.errstate(over="ignore", invalid="ignore"):
        want = x.astype(oracle)
    want_codes = want.view(np.uint16 if fmt.bits == 16 else np.uint8)
    got = fmt.encode(torch.from_numpy(x)).qdata
    assert torch.equal(got, codes_tensor(want_codes))


# -- fp8: all 256 codes, two oracles ---------------------------------------------------------
@pytest.mark.parametrize("name", ["fp8_e4m3", "fp8_e5m2"])
def test_decode_every_fp8_code(name):
    """decode of all 256 codes equals torch's float8 dtype view and ml_dtypes' view."""
    fmt = get_format(name)
    got = fmt.decode(Encoded(codes_tensor(ALL8)))
    torch_vals = torch.from_numpy(ALL8).view(TORCH_FP8[name]).float()
    assert same_floats(got, torch_vals.numpy())
    assert same_floats(got, ALL8.view(NP_ORACLE[name]))


@pytest.mark.parametrize("name", ["fp8_e4m3", "fp8_e5m2"])
def test_fp8_encode_matches_torch_cast_everywhere(name):
    """encode equals torch's ``x.to(float8)`` bits for all non-NaN inputs, overflow and inf included."""
    fmt = get_format(name)
    x = torch.from_numpy(random_float32(50_000, 2, -20, 20))
    x = torch.cat([x, torch.tensor([math.inf, -math.inf, 0.0, -0.0, 1e30, -1e30])])
    want = x.to(TORCH_FP8[name]).view(torch.uint8).to(torch.int32)
    assert torch.equal(fmt.encode(x).qdata, want)


# -- fp32 -------------------------------------------------------------------------------------
FP32_SPECIALS = [
    0,
    0x80000000,
    1,
    0x80000001,
    0x007FFFFF,
    0x00800000,
    0x3F800000,
    0x7F7FFFFF,
    0xFF7FFFFF,
    0x7F800000,
    0xFF800000,
    0x7FC00000,
    0xFFC00000,
    0x7F800001,
    0xFFFFFFFF,
]


def fp32_sample_codes() -> np.ndarray:
    """Every 65537th 32-bit pattern plus specials (zeros, subnormals, max, inf, NaNs)."""
    return np.concatenate([np.arange(0, 2**32, 65537, dtype=np.uint64), np.array(FP32_SPECIALS, np.uint64)])


def test_fp32_codes_are_the_bits():
    """fp32 qdata is the float32 bit pattern as signed int32; decode restores it bit for bit (NaNs too)."""
    fmt = get_format("fp32")
    u = fp32_sample_codes().astype(np.uint32)
    signed = torch.from_numpy(u.view(np.int32).copy())
    dec = fmt.decode(Encoded(signed))
    assert torch.equal(dec.view(torch.int32), signed)
    assert torch.equal(fmt.encode(dec).qdata, signed)


def test_fp32_against_bitstring():
    """fp32 codes of a sample of values equal bitstring's IEEE single-precision packing."""
    bitstring = pytest.importorskip("bitstring")
    fmt = get_format("fp32")
    x = random_float32(300, 3, -149, 127).tolist() + [0.0, -0.0, 2.0**-149, 3.4028234663852886e38, -math.inf]
    got = (fmt.encode(torch.tensor(x, dtype=torch.float32)).qdata.long() & 0xFFFFFFFF).tolist()
    want = [bitstring.BitArray(float=v, length=32).uint for v in x]
    assert got == want


# -- fixed point: every code against integer maths -------------------------------------------
FIXED_EXHAUSTIVE = [(m, w - m) for w in range(2, 9) for m in range(1, w + 1)] + [
    (1, 8),
    (4, 6),
    (2, 10),
    (1, 11),
    (12, 0),
    (5, 8),
    (2, 12),
    (3, 13),
    (1, 15),
    (8, 8),
    (16, 0),
]


def signed(code: int, bits: int) -> int:
    return code - (1 << bits) if code >> (bits - 1) else code


def fixed_oracle_encode(x: float, m: int, n: int) -> int:
    """Python ``round`` on a Fraction is round-half-even; clamp; unsigned pattern."""
    bits = m + n
    if math.isinf(x):
        c = (1 << (bits - 1)) - 1 if x > 0 else -(1 << (bits - 1))
    else:
        c = round(Fraction(x) * 2**n)
        c = max(-(1 << (bits - 1)), min((1 << (bits - 1)) - 1, c))
    return c & ((1 << bits) - 1)


@pytest.mark.parametrize(("m", "n"), FIXED_EXHAUSTIVE, ids=[f"q{m}.{n}" for m, n in FIXED_EXHAUSTIVE])
def test_fixed_every_code_against_integer_maths(m, n):
    """Every code c of q<m>.<n> decodes to signed(c) * 2**-n; every code value and every exact
    midpoint encodes as integer round-half-even + saturation says."""
    fmt = FixedPoint(m, n)
    bits = m + n
    codes = list(range(1 << bits))
    want = [math.ldexp(signed(c, bits), -n) for c in codes]
    got = fmt.decode(Encoded(torch.tensor(codes, dtype=torch.int32)))
    assert got.tolist() == want
    # values on the grid, midpoints (ties), and values beyond the range
    lsb = math.ldexp(1, -n)
    xs = want + [v + lsb / 2 for v in want] + [fmt.max + lsb, fmt.min - 3 * lsb, math.inf, -math.inf]
    enc = fmt.encode(torch.tensor(xs, dtype=torch.float32)).qdata.tolist()
    assert enc == [fixed_oracle_encode(x, m, n) for x in xs]


@pytest.mark.parametrize(("m", "n"), [(16, 16), (1, 31), (32, 0), (8, 24)])
def test_fixed_32bit_samples(m, n):
    """32-bit fixed point on samples: encode = integer round-half-even/saturate (signed int32
    qdata), decode = signed code * 2**-n rounded once to float32."""
    fmt = FixedPoint(m, n)
    rng = np.random.default_rng(m)
    x = np.concatenate([random_float32(2000, m, -n - 2, m + 1), [0.5 * 2.0**-n, 1.5 * 2.0**-n]]).astype(
        np.float32
    )
    got = (fmt.encode(torch.from_numpy(x)).qdata.long() & 0xFFFFFFFF).tolist()
    assert got == [fixed_oracle_encode(float(v), m, n) for v in x]
    codes = rng.integers(-(2**31), 2**31, 5000, dtype=np.int64).tolist() + [-(2**31), 2**31 - 1, 0, -1, 1]
    dec = fmt.decode(Encoded(torch.tensor(codes, dtype=torch.int32))).numpy()
    want = np.array([math.ldexp(c, -n) for c in codes]).astype(np.float32)  # exact double, one rounding
    assert np.array_equal(dec, want)


# -- int8 against torch's quantizers ---------------------------------------------------------
def near_ties(scale: torch.Tensor, qmax: int) -> torch.Tensor:
    """Float32 values at and one ulp around (k + 1/2) * scale: where x/s and x*(1/s) disagree."""
    k = torch.arange(-qmax, qmax, dtype=torch.float64) + 0.5
    mid = (k * scale.double()).float()
    return torch.cat(
        [mid, torch.nextafter(mid, torch.tensor(math.inf)), torch.nextafter(mid, torch.tensor(-math.inf))]
    )


def signed8(qdata: torch.Tensor) -> torch.Tensor:
    return (qdata - ((qdata & 0x80) << 1)).to(torch.int8)


def test_int8_per_tensor_equals_torch_quantize_per_tensor():
    """int8 codes equal torch.quantize_per_tensor(x, scale, 0, qint8).int_repr() bit for bit,
    including values next to rounding ties, where dividing by the scale would differ."""
    fmt = get_format("int8")
    g = torch.Generator().manual_seed(0)
    base = torch.randn(8, 3, 5, 5, generator=g) * 0.2
    scale = fmt.choose_qparams(base)
    assert scale.shape == () and scale.dtype == torch.float32
    assert scale.item() == (base.abs().max() / 127).item()
    ties = near_ties(scale, 127)
    x = torch.cat([base.flatten(), ties])
    assert torch.equal(fmt.choose_qparams(x), scale)  # ties stay inside max|x|
    by_div = torch.round(ties / scale)
    assert not torch.equal(by_div, torch.round(ties * torch.reciprocal(scale))), "data must tell / from *"
    want = torch.quantize_per_tensor(x, scale.item(), 0, torch.qint8)
    enc = fmt.encode(x)
    assert torch.equal(signed8(enc.qdata), want.int_repr())
    assert torch.equal(fmt.decode(enc), want.dequantize())


def test_int8_per_channel_equals_torch_quantize_per_channel():
    """int8_per_channel codes equal torch.quantize_per_channel(x, scales, 0, axis=0, qint8).int_repr()."""
    fmt = get_format("int8_per_channel")
    g = torch.Generator().manual_seed(1)
    C = 6
    base = torch.randn(C, 4, 3, 3, generator=g) * torch.logspace(-3, 1, C).reshape(C, 1, 1, 1)
    base[2] = 0.0  # an all-zero channel
    scale = fmt.choose_qparams(base)
    assert scale.shape == (C, 1, 1, 1)
    ties = torch.stack([near_ties(scale[c].reshape(()), 127) for c in range(C)])
    ties[2] = 0.0
    x = torch.cat([base.reshape(C, -1), ties], dim=1)
    s2 = scale.reshape(C, 1)
    assert torch.equal(fmt.choose_qparams(x), s2)
    assert not torch.equal(torch.round(x / s2), torch.round(x * torch.reciprocal(s2))), (
        "data must tell / from *"
    )
    want = torch.quantize_per_channel(
        x, scale.flatten().double(), torch.zeros(C, dtype=torch.long), 0, torch.qint8
    )
    enc = fmt.encode(x)
    assert torch.equal(signed8(enc.qdata), want.int_repr())
    assert torch.equal(fmt.decode(enc), want.dequantize())


def test_every_int8_code_decodes_to_code_times_scale():
    """All 256 int8 codes, -128 included (reachable only by a fault), decode to code * scale,
    the exact product rounded once to float32."""
    fmt = IntSymmetric(8, PerChannel(0))
    scale = torch.tensor([[0.0123], [3.7e-5]], dtype=torch.float32)
    codes = torch.arange(256, dtype=torch.int32).expand(2, 256)
    got = fmt.decode(Encoded(codes, scale))
    for row in range(2):
        s = float(scale[row])
        want = np.array([signed(c, 8) * s for c in range(256)]).astype(np.float32)
        assert np.array_equal(got[row].numpy(), want)


def test_int8_nan_raises():
    """int8 cannot encode NaN/inf: FormatError counting them; the input is not modified."""
    x = torch.tensor([1.0, math.nan, math.inf, math.nan])
    before = x.clone()
    with pytest.raises(FormatError, match=r"int8: cannot encode 2 NaN and 1 inf"):
        get_format("int8").encode(x)
    assert torch.equal(x.isnan(), before.isnan()) and torch.equal(x.nan_to_num(), before.nan_to_num())
