"""The formats of 2026 against independent oracles.

* FP6 / FP4 element types and E8M0: every code against ``ml_dtypes`` (decode), every value,
  midpoint and neighbour of a midpoint against ml_dtypes' rounding (encode), torch's e8m0 cast;
* MX block formats against a scalar implementation written from the OCP MX v1.0 text (Python
  ``Fraction`` maths, element grids decoded by ml_dtypes) and against torchao's reference;
* NVFP4 against a scalar float32 implementation of NVIDIA's two-level recipe, and torchao;
* group-wise and asymmetric integers against ``torch.quantize_per_tensor`` /
  ``quantize_per_channel`` (quint8, qint8), ``MinMaxObserver`` and Python integer maths.
"""

from __future__ import annotations

import math
import warnings
from fractions import Fraction

import numpy as np
import pytest
import torch

from quant_schemes import (
    BlockFormat,
    Encoded,
    FormatError,
    IntAffine,
    PerChannel,
    PerGroup,
    PerTensor,
    QParams,
    bits_per_value,
    get_format,
    part_bit_names,
    part_bits,
    stored_parts,
)

ml_dtypes = pytest.importorskip("ml_dtypes")

ELEMENTS = {
    "fp6_e3m2": ml_dtypes.float6_e3m2fn,
    "fp6_e2m3": ml_dtypes.float6_e2m3fn,
    "fp4_e2m1": ml_dtypes.float4_e2m1fn,
}


def np_bits(a: np.ndarray) -> np.ndarray:
    return a.astype(np.float32).view(np.uint32)


def grid(dtype, bits: int) -> np.ndarray:
    """float32 value of every code of an ml_dtypes type (code order)."""
    return np.arange(2**bits, dtype=np.uint8).view(dtype).astype(np.float32)


def probes(values: np.ndarray) -> np.ndarray:
    """Every finite value, every midpoint of neighbours, and the float32 neighbours of both."""
    v = np.unique(values[np.isfinite(values)].astype(np.float64))
    mids = (v[1:] + v[:-1]) / 2
    pts = np.concatenate([v, mids]).astype(np.float32)
    up, down = np.nextafter(pts, np.float32(np.inf)), np.nextafter(pts, np.float32(-np.inf))
    return np.concatenate([pts, up, down])


# -- element types ---------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(ELEMENTS))
def test_element_decode_every_code(name):
    """decode(code) is ml_dtypes' value of the same bits, for all 2**bits codes (bit 0 = LSB)."""
    fmt = get_format(name)
    codes = torch.arange(2**fmt.bits, dtype=torch.int32)
    got = fmt.decode(Encoded(codes)).numpy()
    assert np.array_equal(np_bits(got), np_bits(grid(ELEMENTS[name], fmt.bits)))


@pytest.mark.parametrize("name", list(ELEMENTS))
def test_element_encode_matches_ml_dtypes(name):
    """Every value, every tie (round half to even) and the float32 neighbours of both, random
    values over 60 binades, and overflow (+-inf and beyond max saturate) encode as ml_dtypes."""
    fmt = get_format(name)
    dt = ELEMENTS[name]
    rng = np.random.default_rng(0)
    rand = (rng.standard_normal(20000) * np.exp2(rng.uniform(-30, 30, 20000))).astype(np.float32)
    x = np.concatenate([probes(grid(dt, fmt.bits)), rand, np.float32([np.inf, -np.inf, 3e38, -1e-45, -0.0])])
    got = fmt.encode(torch.from_numpy(x)).qdata.numpy().astype(np.uint8)
    assert np.array_equal(got, x.astype(dt).view(np.uint8))
    q = fmt.quantize(torch.from_numpy(x)).numpy()
    assert np.array_equal(np_bits(q), np_bits(x.astype(dt).astype(np.float32)))


@pytest.mark.parametrize("name", list(ELEMENTS))
def test_element_nan_raises_unlike_ml_dtypes(name):
    """No NaN code: encode raises naming the count (ml_dtypes silently writes -0, 0b1...0)."""
    fmt = get_format(name)
    x = torch.tensor([1.0, math.nan, math.nan])
    with pytest.raises(FormatError, match=rf"{name}: cannot encode 2 NaN"):
        fmt.encode(x)
    assert np.float32(np.nan).astype(ELEMENTS[name]).view(np.uint8) == 1 << (fmt.bits - 1)
    assert fmt.quantize(x, strict=False).isnan().tolist() == [False, True, True]


def test_element_properties():
    """Ranges as the OCP MX specification lists them."""
    table = {"fp6_e3m2": (28.0, 0.25, 2.0**-4), "fp6_e2m3": (7.5, 1.0, 0.125), "fp4_e2m1": (6.0, 1.0, 0.5)}
    for name, (mx, normal, sub) in table.items():
        f = get_format(name)
        assert (f.max, f.smallest_normal, f.smallest_subnormal) == (mx, normal, sub)
        assert not f.has_inf and not f.has_nan and f.nan_code is None
        assert float(ml_dtypes.finfo(ELEMENTS[name]).max) == mx


# -- E8M0 --------------------------------------------------------------------------------------
def test_e8m0_decode_every_code():
    """2**(c - 127) for every code (code 0 is the float32 subnormal 2^-127), NaN for 0xFF."""
    fmt = get_format("e8m0")
    got = fmt.decode(Encoded(torch.arange(256, dtype=torch.int32))).numpy()
    want = np.arange(256, dtype=np.uint8).view(ml_dtypes.float8_e8m0fnu).astype(np.float32)
    assert np.array_equal(np.isnan(got), np.isnan(want))
    assert np.array_equal(np_bits(got[:255]), np_bits(want[:255])) and got[0] == 2.0**-127


def test_e8m0_encode_matches_ml_dtypes_and_torch_in_range():
    """Every power of two, every tie 1.5 * 2**k (rounded up, as both oracles do) and the float32
    neighbours of both, and random values: the codes ml_dtypes and torch's cast give."""
    fmt = get_format("e8m0")
    k = np.arange(-127, 128, dtype=np.float64)
    pts = np.concatenate([np.exp2(k), 1.5 * np.exp2(k[:-1])]).astype(np.float32)
    rng = np.random.default_rng(1)
    rand = np.exp2(rng.uniform(-126, 126, 20000)).astype(np.float32)
    x = np.concatenate([pts, np.nextafter(pts, np.float32(np.inf)), np.nextafter(pts, np.float32(0)), rand])
    x = x[(x > 0) & (x < 1.5 * 2.0**127)]
    got = fmt.encode(torch.from_numpy(x)).qdata
    assert np.array_equal(got.numpy().astype(np.uint8), x.astype(ml_dtypes.float8_e8m0fnu).view(np.uint8))
    assert torch.equal(got, torch.from_numpy(x).to(torch.float8_e8m0fnu).view(torch.uint8).to(torch.int32))


def test_e8m0_out_of_range_policy():
    """Saturation, documented where it differs from ml_dtypes: >= 1.5 * 2^127 and +inf give
    2^127 (ml_dtypes: NaN), zero and tiny values give 2^-127 (ml_dtypes: NaN for zero), NaN gives
    0xFF, a negative value raises."""
    fmt = get_format("e8m0")
    x = torch.tensor([1.5 * 2.0**127, 3e38, math.inf, 0.0, -0.0, 1e-45, 2.0**-128, math.nan])
    assert fmt.encode(x).qdata.tolist() == [0xFE, 0xFE, 0xFE, 0, 0, 0, 0, 0xFF]
    with pytest.raises(FormatError, match="e8m0: cannot encode 1 negative"):
        fmt.encode(torch.tensor([1.0, -2.0]))
    assert fmt.bit_names == tuple(f"exp{i}" for i in range(8)) and fmt.bits == 8


# -- MX: a scalar implementation of the specification ----------------------------------------
def element_grid(name: str) -> tuple[list[Fraction], Fraction, Fraction]:
    """Non-negative magnitudes of an MX element type in code order (ml_dtypes decodes them), the
    spec's largest normal, and the most negative value."""
    if name == "int8":
        mags = [Fraction(k, 64) for k in range(128)]
        return mags, mags[-1], Fraction(-2)
    dt = {"fp8_e4m3": ml_dtypes.float8_e4m3fn, "fp8_e5m2": ml_dtypes.float8_e5m2, "fp6_e3m2":
          ml_dtypes.float6_e3m2fn, "fp6_e2m3": ml_dtypes.float6_e2m3fn, "fp4": ml_dtypes.float4_e2m1fn}[name]
    bits = 4 if name == "fp4" else 6 if name.startswith("fp6") else 8
    with np.errstate(invalid="ignore"):
        vals = np.arange(2 ** (bits - 1), dtype=np.uint8).view(dt).astype(np.float64)
    mags = [Fraction(float(v)) for v in vals if np.isfinite(v)]
    return mags, max(mags), -max(mags)


def ref_round(q: Fraction, mags: list[Fraction], top: Fraction, low: Fraction, name: str) -> Fraction:
    """The element nearest ``q`` (ties to the even code), clamped to the element's range."""
    if name == "int8":  # two's complement q2.6: round half to even on the 2^-6 grid, saturate
        k = q * 64
        n = math.floor(k)
        r = n + 1 if k - n > Fraction(1, 2) or (k - n == Fraction(1, 2) and n % 2) else n
        return Fraction(max(-128, min(127, r)), 64)
    a = min(abs(q), top)
    best = min(range(len(mags)), key=lambda i: (abs(mags[i] - a), i % 2))
    return best and mags[best] * (1 if q > 0 else -1) or Fraction(0)


def ref_mx(x: np.ndarray, name: str, block: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """Decoded values and E8M0 codes of the OCP MX v1.0 conversion, one block at a time:
    shared_exp = floor(log2(max|V|)) - emax_elem (clamped to E8M0's -127..127), X = 2^shared_exp,
    P_i = quantize(V_i / X) with clamping; blocks along the last axis, the last one partial."""
    mags, top, low = element_grid(name)
    emax = math.floor(math.log2(top))
    rows = x.reshape(-1, x.shape[-1])
    out = np.zeros(rows.shape, dtype=np.float64)
    codes = []
    for r, row in enumerate(rows):
        for s in range(0, row.size, block):
            vals = [float(v) for v in row[s : s + block]]
            if any(not math.isfinite(v) for v in vals):
                out[r, s : s + block] = np.nan
                codes.append(255)
                continue
            amax = max(abs(v) for v in vals)
            shared = -127 if amax == 0 else max(-127, math.frexp(amax)[1] - 1 - emax)
            codes.append(shared + 127)
            scale = Fraction(2) ** shared
            for j, v in enumerate(vals):
                q = float(ref_round(Fraction(v) / scale, mags, top, low, name) * scale)
                # a float element keeps the sign of a value that rounds to zero (-0.0)
                out[r, s + j] = math.copysign(0.0, v) if q == 0 and name != "int8" else q
    return out.astype(np.float32).reshape(x.shape), np.array(codes).reshape(*x.shape[:-1], -1)


MX = ["mxfp8_e4m3", "mxfp8_e5m2", "mxfp6_e3m2", "mxfp6_e2m3", "mxfp4", "mxint8"]


def adversarial(seed: int = 0) -> torch.Tensor:
    """Rows of 70 values (blocks of 32, 32 and a partial 6): random over 40 binades, an all-zero
    block, a block holding one huge value, blocks in float32's subnormal range and just above
    2^-127 * 2^emax, exact ties, negative zero."""
    g = torch.Generator().manual_seed(seed)
    binade = torch.randint(-20, 20, (12, 1), generator=g).float()
    x = torch.randn(12, 70, generator=g) * torch.pow(2.0, binade)
    x[0, :32] = 0.0
    x[1, :32] = torch.randn(32, generator=g) * 1e-3
    x[1, 5] = 3e4
    x[2, :32] = torch.randn(32, generator=g) * 2.0**-140  # float32 subnormals
    x[3, :32] = torch.randn(32, generator=g) * 2.0**-120
    x[4, 32:64] = torch.tensor([0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 6.0, -6.0] * 4)  # fp4 ties
    x[5, 64:] = -0.0
    x[6, :32] = torch.randn(32, generator=g) * 1e30
    return x


@pytest.mark.parametrize("name", MX)
def test_mx_matches_scalar_spec_implementation(name):
    """Scale codes and decoded values equal the scalar implementation of the spec text on
    random and adversarial blocks (zero block, one huge value, subnormal ranges, ties, -0, a
    partial last block)."""
    fmt = get_format(name)
    x = adversarial()
    enc = fmt.encode(x)
    want, codes = ref_mx(x.numpy(), name[2:])
    assert enc.scale_codes.tolist() == codes.tolist()
    assert np.array_equal(np_bits(fmt.decode(enc).numpy()), np_bits(want))


@pytest.mark.parametrize("name", MX)
def test_mx_nan_and_inf_blocks(name):
    """A block holding NaN or +-inf gets the NaN scale 0xFF and decodes to NaN, zero element
    codes; the other blocks of the row are untouched."""
    fmt = get_format(name)
    x = adversarial(1)[:3].clone()
    x[0, 3], x[1, 40], x[2, 66] = math.nan, math.inf, -math.inf
    enc = fmt.encode(x)
    want, codes = ref_mx(x.numpy(), name[2:])
    assert enc.scale_codes.tolist() == codes.tolist()
    out = fmt.decode(enc).numpy()
    assert np.array_equal(np.isnan(out), np.isnan(want)) and np.isnan(out).sum() == 32 + 32 + 6
    assert int(enc.qdata[0, :32].abs().sum()) == 0


def test_padding_rule_is_zero_padding():
    """A last axis that is not a multiple of the block quantizes like the zero-padded tensor,
    sliced back: the partial block's scale comes from its own values."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(5, 40, generator=g)
    padded = torch.cat([x, torch.zeros(5, 24)], dim=1)
    for name in ("mxfp4", "nvfp4", "int4_g32", "uint4_asym_g32"):
        fmt = get_format(name)
        got = fmt.quantize(x)
        if name == "nvfp4":  # one tensor scale for both: the padding changes no maximum
            assert torch.equal(got, fmt.quantize(padded)[:, :40])
        else:
            assert torch.equal(got, fmt.quantize(padded)[:, :40])
        assert fmt.encode(x).scale_codes.shape[-1] == (2 if name != "nvfp4" else 3)


# -- NVFP4 ---------------------------------------------------------------------------------------
def ref_nvfp4(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """NVIDIA's two-level NVFP4 recipe, scalar, in numpy float32: t = amax / (448 * 6); per block
    of 16, s = e4m3(clamp(amax_b / 6 / t, 2^-6, 448)); P = e2m1(clamp(x * ((1/t) / s), +-6));
    value = P * (t * s)."""
    f32 = np.float32
    t = max(f32(np.abs(x).max()) / f32(2688.0), f32(2.0**-120))
    rows = x.reshape(-1, x.shape[-1]).astype(np.float32)
    out = np.zeros_like(rows)
    codes = []
    for r, row in enumerate(rows):
        for s0 in range(0, row.size, 16):
            blk = row[s0 : s0 + 16]
            bs = f32(f32(np.abs(blk).max()) / f32(6.0)) / t
            bs8 = np.clip(bs, f32(2.0**-6), f32(448.0)).astype(ml_dtypes.float8_e4m3fn)
            codes.append(int(bs8.view(np.uint8)))
            bsf = bs8.astype(np.float32)
            rec = (f32(1.0) / t) / bsf
            p = np.clip(blk * rec, f32(-6.0), f32(6.0)).astype(ml_dtypes.float4_e2m1fn).astype(np.float32)
            out[r, s0 : s0 + 16] = p * f32(t * bsf)
    return out.reshape(x.shape), np.array(codes).reshape(*x.shape[:-1], -1)


def test_nvfp4_matches_scalar_recipe():
    """Block scale codes, the tensor scale and decoded values equal the scalar recipe."""
    fmt = get_format("nvfp4")
    x = adversarial(2)[:, :64].clone()
    x[2] = 0.0  # an all-zero row: the smallest block scale 2^-6
    enc = fmt.encode(x)
    want, codes = ref_nvfp4(x.numpy())
    assert enc.scale_codes.tolist() == codes.tolist()
    assert float(enc.tensor_scale) == max(float(np.float32(x.abs().max()) / np.float32(2688.0)), 2.0**-120)
    assert np.array_equal(np_bits(fmt.decode(enc).numpy()), np_bits(want))
    assert part_bit_names(fmt, "scales") == tuple(f"scale.{n}" for n in get_format("fp8_e4m3").bit_names)


def test_nvfp4_nan_block():
    """A block holding NaN gets the E4M3 NaN code 0x7F; the tensor scale ignores it."""
    fmt = get_format("nvfp4")
    x = torch.ones(2, 32)
    x[0, 20] = math.nan
    enc = fmt.encode(x)
    assert enc.scale_codes.tolist() == [[0x7E, 0x7F], [0x7E, 0x7E]]  # 448: amax 1 = tensor amax
    out = fmt.decode(enc)
    assert out[0, 16:].isnan().all() and not out[0, :16].isnan().any() and torch.equal(out[1], x[1])


# -- torchao's reference -------------------------------------------------------------------------
def torchao_mx():
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            from torchao.prototype.mx_formats import constants, mx_tensor, nvfp4_tensor
    except Exception as e:  # noqa: BLE001 - any failure to import the optional oracle skips
        pytest.skip(f"torchao is not installed or does not import here: {type(e).__name__}")
    return constants, mx_tensor, nvfp4_tensor


@pytest.mark.parametrize("name", ["mxfp8_e4m3", "mxfp8_e5m2", "mxfp6_e3m2", "mxfp6_e2m3", "mxfp4"])
def test_mx_matches_torchao(name):
    """torchao's MX reference (to_mx / to_dtype, FLOOR mode) gives the same E8M0 codes and values
    on blocks whose scale is above 2^-127 (for scale code 0 torchao divides by 2^-126 while its
    code says 2^-127; the spec and qfi use 2^-127)."""
    constants, mx_tensor, _ = torchao_mx()
    dt = {"mxfp8_e4m3": torch.float8_e4m3fn, "mxfp8_e5m2": torch.float8_e5m2,
          "mxfp6_e3m2": constants.DTYPE_FP6_E3M2, "mxfp6_e2m3": constants.DTYPE_FP6_E2M3,
          "mxfp4": torch.float4_e2m1fn_x2}[name]
    g = torch.Generator().manual_seed(4)
    x = torch.randn(64, 256, generator=g) * torch.logspace(-40, 40, 64, base=2).reshape(-1, 1)
    x[3, :32] = 0.0
    x[5, 7] = 1e30
    x[9, 64:96] = torch.tensor([0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 6.0, -6.0] * 4)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        scale, data = mx_tensor.to_mx(x, dt, 32)
        ref = mx_tensor.to_dtype(data, scale, dt, 32, torch.float32)
    fmt = get_format(name)
    enc = fmt.encode(x)
    assert torch.equal(enc.scale_codes, scale.view(torch.uint8).to(torch.int32))
    assert torch.equal(fmt.decode(enc), ref)


def test_nvfp4_matches_torchao():
    """torchao's NVFP4 reference with the per-tensor scale amax / (448 * 6) gives the same E4M3
    block scale codes and values."""
    _, mx_tensor, nv = torchao_mx()
    from torchao.prototype.mx_formats.kernels import f4_unpacked_to_f32, unpack_uint4

    g = torch.Generator().manual_seed(5)
    x = torch.randn(32, 128, generator=g) * torch.logspace(-12, 12, 32, base=2).reshape(-1, 1)
    x[4, :16] = 0.0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        t = nv.per_tensor_amax_to_scale(x.abs().amax())
        s, d = nv.nvfp4_quantize(x, 16, t)
    vals = f4_unpacked_to_f32(unpack_uint4(d.view(torch.uint8))).reshape(32, 8, 16)
    ref = (vals * (t * s.to(torch.float32)).reshape(32, 8, 1)).reshape(32, 128)
    fmt = get_format("nvfp4")
    enc = fmt.encode(x)
    assert torch.equal(enc.scale_codes, s.view(torch.uint8).to(torch.int32).reshape(32, 8))
    assert torch.equal(enc.tensor_scale, t) and torch.equal(fmt.decode(enc), ref)


# -- group-wise and asymmetric integers ---------------------------------------------------------
def rows(seed: int = 0, shape=(6, 96)) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g) * torch.logspace(-3, 3, shape[0]).reshape(-1, 1)
    x[1] = x[1].abs() + 0.5  # all positive: the zero point sits at the bottom
    x[2] = -(x[2].abs()) - 0.5
    return x


def test_stored_fp32_scale_is_bit_identical_to_int8():
    """int8_fp32 / int8_per_channel_fp32 quantize exactly as int8 / int8_per_channel; only the
    fault space differs (their scale words are stored)."""
    x = rows()
    for stored, plain in (("int8_fp32", "int8"), ("int8_per_channel_fp32", "int8_per_channel")):
        a, b = get_format(stored).encode(x), get_format(plain).encode(x)
        assert torch.equal(a.qdata, b.qdata) and torch.equal(a.scale, b.scale)
        assert torch.equal(a.scale_codes, b.scale.view(torch.int32))
        assert stored_parts(get_format(stored)) == ("codes", "scales")
        assert stored_parts(get_format(plain)) == ("codes",)


def test_uint8_asym_matches_torch_per_tensor_and_observer():
    """uint8_asym: scale and zero point as torch's MinMaxObserver (affine, quint8) chooses them,
    codes as torch.quantize_per_tensor(x, scale, zero_point, quint8), values as dequantize."""
    from torch.ao.quantization.observer import MinMaxObserver

    fmt = get_format("uint8_asym")
    for i in range(6):
        x = rows(i)[i]
        qp = fmt.choose_qparams(x)
        obs = MinMaxObserver(dtype=torch.quint8, qscheme=torch.per_tensor_affine)
        obs(x)
        s, z = obs.calculate_qparams()
        assert float(qp.scale) == float(s) and int(qp.zero_point) == int(z)
        q = torch.quantize_per_tensor(x, float(qp.scale), int(qp.zero_point), torch.quint8)
        enc = fmt.encode(x)
        assert torch.equal(enc.qdata, q.int_repr().to(torch.int32))
        assert torch.equal(fmt.decode(enc), q.dequantize())


def test_uint8_asym_per_channel_matches_torch():
    fmt = get_format("uint8_asym_per_channel")
    x = rows(1)
    enc = fmt.encode(x)
    q = torch.quantize_per_channel(x, enc.scale.reshape(-1).double(), enc.zero_point.reshape(-1).long(), 0,
                                   torch.quint8)
    assert torch.equal(enc.qdata, q.int_repr().to(torch.int32))
    assert torch.equal(fmt.decode(enc), q.dequantize())


@pytest.mark.parametrize(("name", "dtype"), [("int8_g32", torch.qint8), ("uint8_asym_g32", torch.quint8)])
def test_groups_are_per_channel_on_reshaped_rows(name, dtype):
    """A group of 32 along the last axis is a channel of the (rows * groups, 32) reshape: codes
    and values equal torch.quantize_per_channel there."""
    fmt = get_format(name)
    x = rows(2)
    enc = fmt.encode(x)
    flat = x.reshape(-1, 32)
    zp = torch.zeros(flat.shape[0]) if enc.zero_point is None else enc.zero_point.reshape(-1)
    q = torch.quantize_per_channel(flat, enc.scale.reshape(-1).double(), zp.long(), 0, dtype)
    codes = enc.qdata.reshape(-1, 32)
    if dtype == torch.qint8:
        codes = (codes ^ 0x80) - 0x80
    assert torch.equal(codes, q.int_repr().to(torch.int32))
    assert torch.equal(fmt.decode(enc).reshape(-1, 32), q.dequantize())


@pytest.mark.parametrize("name", ["int4_g32", "uint4_asym_g32", "int4_g32_fp16", "uint4_asym_g32_bf16"])
def test_four_bit_groups_against_integer_maths(name):
    """4-bit groups (no torch dtype): scale per group (amax/7, or (hi-lo)/15 with its zero point)
    rounded to the scale format, codes from Python integer maths on exact fractions."""
    fmt = get_format(name)
    x = rows(3)
    enc = fmt.encode(x)
    sf = fmt.scale_fmt
    for r in range(x.shape[0]):
        for gi in range(x.shape[1] // 32):
            v = x[r, gi * 32 : (gi + 1) * 32]
            if fmt.symmetric:
                s = sf.quantize((v.abs().max() / torch.tensor(7.0)).clamp(min=sf.smallest_normal))
                zp = 0
            else:
                lo, hi = min(float(v.min()), 0.0), max(float(v.max()), 0.0)
                s = sf.quantize((torch.tensor(hi, dtype=torch.float32) - lo) / torch.tensor(15.0))
                zp = max(0, min(15, -round(Fraction(lo) / Fraction(float(s)))))
            assert float(enc.scale[r, gi]) == float(s)
            r32 = float(torch.reciprocal(s))  # the float32 reciprocal torch multiplies by
            for j, val in enumerate(v.tolist()):
                prod = float(torch.tensor(val) * torch.tensor(r32))  # float32 product
                c = round(Fraction(prod)) + zp
                c = max(-7, min(7, c)) if fmt.symmetric else max(0, min(15, c))
                assert int(enc.qdata[r, gi * 32 + j]) == c & 0xF


def test_scale_formats_store_rounded_scales():
    """fp16 / bf16 scale words are the RNE patterns of the scale (numpy float16, ml_dtypes
    bfloat16), and decode reads them back exactly; an fp16 scale saturates at 65504."""
    x = rows(4)
    for name, np_dtype in (("int4_g32_fp16", np.float16), ("int4_g32_bf16", ml_dtypes.bfloat16)):
        enc = get_format(name).encode(x)
        want = enc.scale.numpy().astype(np_dtype).view(np.uint16)
        assert np.array_equal(enc.scale_codes.numpy().astype(np.uint16), want)
    big = get_format("int8_g32_fp16").encode(torch.full((1, 32), 1e8))
    assert float(big.scale[0, 0]) == 65504.0 and int(big.qdata.max()) == 127


def test_asym_zero_point_bits_are_a_part():
    """Asymmetric formats store k-bit zero points as their own part, named zp.mag<i>."""
    fmt = get_format("uint4_asym_g128")
    assert stored_parts(fmt) == ("codes", "scales", "zero_points")
    assert part_bits(fmt, "zero_points") == 4 and part_bit_names(fmt, "zero_points")[0] == "zp.mag0"
    assert part_bit_names(fmt, "scales")[-1] == "scale.sign" and part_bits(fmt, "scales") == 32
    with pytest.raises(FormatError, match="stores no 'zero_points'"):
        part_bits(get_format("mxfp4"), "zero_points")
    with pytest.raises(FormatError, match="stores no 'scales'"):
        part_bits(get_format("int8"), "scales")


# -- memory: bits per value --------------------------------------------------------------------
def test_bits_per_value_at_equal_memory():
    """Stored bits per value of a large tensor, scales and zero points included."""
    want = {"fp32": 32, "bf16": 16, "int8": 8, "int8_per_channel": 8, "fp8_e4m3": 8, "mxfp8_e4m3": 8.25,
            "mxfp6_e2m3": 6.25, "mxfp4": 4.25, "mxint8": 8.25, "nvfp4": 4.5, "int4_g128": 4.25,
            "int4_g128_fp16": 4.125, "uint4_asym_g128_fp16": 4 + 20 / 128, "uint8_asym": 8, "q3.13": 16}
    assert {n: bits_per_value(get_format(n)) for n in want} == want


@pytest.mark.parametrize(("name", "shape", "bits"), [
    ("mxfp4", (3, 40), 3 * 40 * 4 + 3 * 2 * 8),  # a partial block stores a whole scale
    ("nvfp4", (2, 32), 64 * 4 + 4 * 8 + 32),  # plus the float32 tensor scale
    ("int4_g128_fp16", (8, 256), 8 * 256 * 4 + 16 * 16),
    ("uint4_asym_g128", (8, 256), 8 * 256 * 4 + 16 * (32 + 4)),
    ("int8", (10, 10), 800 + 32),
    ("int8_per_channel", (10, 10), 800 + 320),
    ("fp16", (10, 10), 1600),
])
def test_stored_bits_exact(name, shape, bits):
    assert get_format(name).stored_bits(shape) == bits


# -- geometry -----------------------------------------------------------------------------------
@pytest.mark.parametrize("gran", [PerTensor(), PerChannel(0), PerChannel(1), PerGroup(4), PerGroup(5)])
def test_scale_index_and_members_are_inverse(gran):
    """Every element belongs to exactly the scale word scale_index names, and scale_members of all
    words lists every element once, sorted."""
    shape = (3, 7, 6)
    n = 3 * 7 * 6
    idx = torch.arange(n)
    words = gran.scale_index(shape, idx)
    nw = int(torch.Size(gran.scale_shape(shape)).numel())
    assert int(words.max()) == nw - 1 and words.unique().numel() == nw
    elems, owner = gran.scale_members(shape, torch.arange(nw))
    assert torch.equal(elems.sort().values, idx) and torch.equal(gran.scale_index(shape, elems), owner)
    some = torch.tensor([0, nw - 1])
    e, _ = gran.scale_members(shape, some)
    assert set(gran.scale_index(shape, e).tolist()) == {0, nw - 1}


def test_qparams_are_checked():
    fmt = get_format("mxfp4")
    x = torch.randn(2, 64)
    qp = fmt.choose_qparams(torch.randn(2, 32))
    with pytest.raises(FormatError, match=r"qparams for scale shape \(2, 1\) do not fit x of shape \(2, 64"):
        fmt.encode(x, qp)
    enc = fmt.encode(x)
    with pytest.raises(FormatError, match="scale_codes is None"):
        fmt.decode(Encoded(enc.qdata))
    with pytest.raises(FormatError, match="tensor_scale is None"):
        get_format("nvfp4").decode(get_format("nvfp4").encode(x).replace(tensor_scale=None))
    with pytest.raises(FormatError, match="zero_point is None"):
        f = get_format("uint8_asym")
        f.decode(f.encode(x).replace(zero_point=None))
    assert isinstance(fmt, BlockFormat) and isinstance(get_format("int4_g128"), IntAffine)
    assert isinstance(fmt.choose_qparams(x), QParams)


def test_saturated_reports_the_clamped_values():
    """saturated(x, qparams): MX's floor(log2) scale saturates a block maximum above 448 * X
    (1.9 in a block of ones: 1.9 / 2^-8 = 486.4 > 448); integer groups saturate exactly the
    values whose code would leave the range under other parameters; limits are the reachable
    magnitude."""
    mx = get_format("mxfp8_e4m3")
    x = torch.ones(1, 32)
    x[0, 5] = 1.9
    mask, limit = mx.saturated(x, mx.choose_qparams(x))
    assert mask[0].nonzero().flatten().tolist() == [5] and limit == 448 * 2.0**-8
    assert float(mx.quantize(x)[0, 5]) == limit
    g = get_format("int4_g32")
    y = torch.linspace(-4, 4, 64).reshape(1, 64)
    qp = g.choose_qparams(y / 2)
    mask, limit = g.saturated(y, qp)
    q = g.quantize(y, qp)
    assert torch.equal(mask, (q.abs() < y.abs() - qp.scale.max() / 2))
    assert limit == pytest.approx(7 * float(qp.scale.max()))
    assert not g.saturated(y, g.choose_qparams(y))[0].any()
