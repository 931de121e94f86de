"""The Format contract (quant_schemes/base.py), checked for every format in FORMATS."""

from __future__ import annotations

import math

import pytest
import torch

from quant_schemes import (
    FORMATS,
    Encoded,
    FixedPoint,
    FloatFormat,
    Format,
    FormatError,
    IntSymmetric,
    PerChannel,
    PerTensor,
    gather_scale,
    get_format,
)

ROLES = {"sign", "exponent", "mantissa", "integer", "fraction", "magnitude"}


@pytest.fixture(params=FORMATS)
def fmt(request) -> Format:
    return get_format(request.param)


def sample(shape=(6, 5, 3), seed=0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g) * 1.7


def every_code(fmt: Format) -> torch.Tensor:
    """All 2**bits codes up to 16 bits; for 32 bits every 65537th pattern plus the extremes."""
    if fmt.bits <= 16:
        return torch.arange(2**fmt.bits, dtype=torch.int32)
    u = torch.cat([torch.arange(0, 2**32, 65537), torch.tensor([0, 1, 2**31 - 1, 2**31, 2**32 - 1])])
    return (u - ((u >> 31) << 32)).to(torch.int32)


def fixed_scale(fmt: Format, codes: torch.Tensor) -> torch.Tensor | None:
    """A scale for codes-only tests: per-channel formats get one scale per code (1-D axis 0)."""
    if not isinstance(fmt, IntSymmetric):
        return None
    if isinstance(fmt.granularity, PerChannel):
        return torch.full(codes.shape, 0.037, dtype=torch.float32)
    return torch.tensor(0.037)


# -- shape of things ---------------------------------------------------------------------------
def test_is_a_format_with_consistent_width(fmt):
    """Every format satisfies the Format protocol; bit_names/bit_roles have one entry per bit,
    index 0 = LSB, the sign is bit bits-1, labels are unique."""
    assert isinstance(fmt, Format)
    assert len(fmt.bit_names) == fmt.bits == len(set(fmt.bit_names))
    assert fmt.bit_names[-1] == "sign" and fmt.bit_roles[-1] == "sign"
    assert len(fmt.bit_roles) == fmt.bits and set(fmt.bit_roles) <= ROLES
    assert fmt.bit_names[0].endswith("0")


def test_name_round_trips_through_registry(fmt):
    """get_format(fmt.name) == fmt, get_format(fmt) is fmt; formats are hashable frozen values."""
    assert get_format(fmt.name) == fmt
    assert get_format(fmt) is fmt
    assert get_format(fmt.name.upper()) == fmt
    assert hash(fmt) == hash(get_format(fmt.name))
    with pytest.raises(AttributeError):
        fmt.bits = 3  # type: ignore[misc]


@pytest.mark.parametrize("shape", [(6, 5, 3), (7,), (1, 1)])
def test_encode_decode_shapes_and_dtypes(fmt, shape):
    """qdata is int32 of x's shape, in [0, 2**bits) below 32 bits; decode is float32 of that shape."""
    x = sample(shape)
    enc = fmt.encode(x)
    assert enc.qdata.dtype == torch.int32 and enc.qdata.shape == x.shape
    if fmt.bits < 32:
        assert int(enc.qdata.min()) >= 0 and int(enc.qdata.max()) < 2**fmt.bits
    out = fmt.decode(enc)
    assert out.dtype == torch.float32 and out.shape == x.shape
    assert torch.equal(fmt.quantize(x), out)


def test_scale_shapes(fmt):
    """Float/fixed formats have no scale; per-tensor gives a 0-d float32 scale, per-channel (C,1,1)."""
    x = sample()
    scale = fmt.choose_qparams(x)
    assert fmt.encode(x).scale is None if scale is None else torch.equal(fmt.encode(x).scale, scale)
    if isinstance(fmt, IntSymmetric):
        assert scale.dtype == torch.float32
        assert scale.shape == (() if isinstance(fmt.granularity, PerTensor) else (6, 1, 1))
    else:
        assert scale is None


# -- round trips -----------------------------------------------------------------------------
def test_every_finite_code_round_trips(fmt):
    """encode(decode(c)) == c for every code that is not NaN (exhaustive up to 16 bits, sampled
    for 32).  For integer formats the code -2**(k-1), reachable only by a fault, re-encodes
    saturated to -(2**(k-1) - 1)."""
    codes = every_code(fmt)
    scale = fixed_scale(fmt, codes)
    values = fmt.decode(Encoded(codes, scale))
    keep = ~values.isnan()
    if isinstance(fmt, IntSymmetric):
        keep &= codes != 2 ** (fmt.bits - 1)
    again = fmt.encode(values[keep], scale[keep] if scale is not None and scale.dim() else scale)
    assert torch.equal(again.qdata, codes[keep])


def test_quantize_is_idempotent(fmt):
    """Quantizing an already quantized tensor with the same scale changes nothing."""
    x = sample()
    scale = fmt.choose_qparams(x)
    once = fmt.quantize(x, scale)
    assert torch.equal(fmt.quantize(once, scale), once)


def test_quantization_error_bounded(fmt):
    """Values inside the range are within half a step of their quantized value."""
    x = sample() * 0.5  # inside q1.7's range [-1, 1) and far from float overflow
    x = x.clamp(-0.99, 0.99)
    err = (fmt.quantize(x) - x).abs()
    if isinstance(fmt, FloatFormat):
        bound = x.abs() * fmt.eps / 2 + fmt.smallest_subnormal / 2
    elif isinstance(fmt, FixedPoint):
        bound = torch.full_like(x, fmt.resolution / 2)
    else:
        bound = fmt.choose_qparams(x) / 2 * (1 + 1e-6)
    assert bool((err <= bound).all())


def test_subset_encode_with_gathered_scale(fmt):
    """Encoding a 1-D subset of elements with gather_scale's per-element scale gives the same
    codes as encoding the whole tensor (what the fault layer does), and decoding them too."""
    x = sample((6, 5, 3), seed=3)
    full = fmt.encode(x)
    idx = torch.tensor([0, 7, 44, 89, 15, 60])
    s = gather_scale(full.scale, x.shape, idx)
    assert (s is None) == (full.scale is None)
    part = fmt.encode(x.reshape(-1).index_select(0, idx), s)
    assert torch.equal(part.qdata, full.qdata.reshape(-1).index_select(0, idx))
    assert torch.equal(fmt.decode(part), fmt.decode(full).reshape(-1).index_select(0, idx))


def test_given_scale_is_used(fmt):
    """encode(x, scale) uses the given scale (faulty codes decode with the clean scale)."""
    x = sample()
    if not isinstance(fmt, IntSymmetric):
        assert torch.equal(fmt.encode(x, torch.tensor(5.0)).qdata, fmt.encode(x).qdata)
        return
    clean = fmt.choose_qparams(x)
    doubled = fmt.encode(x, clean * 2)
    assert torch.equal(doubled.scale, clean * 2)
    assert not torch.equal(doubled.qdata, fmt.encode(x).qdata)


# -- inputs ------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.bfloat16])
def test_other_float_dtypes_go_through_float32(fmt, dtype):
    """Inputs of other float dtypes are converted to float32 first."""
    x = sample().to(dtype)
    assert torch.equal(fmt.encode(x).qdata, fmt.encode(x.float()).qdata)


def test_non_contiguous_and_zero_dim(fmt):
    """Non-contiguous views and 0-d tensors encode like their contiguous copies."""
    x = sample((6, 5, 3))
    xt = x.transpose(0, 2)
    scale = fmt.choose_qparams(xt.contiguous())
    assert torch.equal(fmt.encode(xt, scale).qdata, fmt.encode(xt.contiguous(), scale).qdata)
    if isinstance(fmt, IntSymmetric) and isinstance(fmt.granularity, PerChannel):
        with pytest.raises(FormatError, match="axis 0"):
            fmt.encode(torch.tensor(1.0))
    else:
        one = torch.tensor(0.75)
        assert fmt.encode(one).qdata.shape == () and float(fmt.quantize(one)) == 0.75


def test_input_never_modified_nor_aliased(fmt):
    """encode leaves x untouched, and writing into qdata or the decoded tensor never changes x."""
    x = sample()
    before = x.clone()
    enc = fmt.encode(x)
    enc.qdata.bitwise_xor_(1)
    fmt.decode(enc).fill_(7.0)
    assert torch.equal(x, before)


def test_int_tensor_rejected(fmt):
    """A non-float tensor raises FormatError naming its dtype and is left unchanged."""
    x = torch.arange(6, dtype=torch.int32)
    with pytest.raises(FormatError, match="int32"):
        fmt.encode(x)
    with pytest.raises(FormatError, match="int64"):
        fmt.choose_qparams(x.long())
    assert torch.equal(x, torch.arange(6, dtype=torch.int32))


def test_non_tensor_rejected(fmt):
    """encode of a list or float raises FormatError naming the type."""
    with pytest.raises(FormatError, match="list"):
        fmt.encode([1.0, 2.0])  # type: ignore[arg-type]
    with pytest.raises(FormatError, match="float"):
        fmt.encode(1.0)  # type: ignore[arg-type]
    with pytest.raises(FormatError, match="float32"):
        fmt.decode(Encoded(torch.zeros(3), torch.tensor(1.0)))


def test_nan_policy(fmt):
    """Float formats encode NaN as NaN; fixed point and integers raise FormatError counting the
    NaNs, and leave the input unchanged."""
    x = torch.tensor([1.0, math.nan, -2.0, math.nan])
    if isinstance(fmt, FloatFormat):
        assert fmt.quantize(x).isnan().tolist() == [False, True, False, True]
        return
    with pytest.raises(FormatError, match=r"2 NaN"):
        fmt.encode(x)
    assert x.isnan().sum() == 2 and x[0] == 1.0 and x[2] == -2.0


def test_infinity_policy(fmt):
    """+-inf: IEEE formats keep inf, fp8_e4m3 and fixed point saturate to +-max, integers raise."""
    x = torch.tensor([math.inf, -math.inf])
    if isinstance(fmt, IntSymmetric):
        with pytest.raises(FormatError, match=r"0 NaN and 2 inf"):
            fmt.encode(x)
        return
    out = fmt.quantize(x).tolist()
    if isinstance(fmt, FloatFormat) and fmt.has_inf:
        assert out == [math.inf, -math.inf]
    elif isinstance(fmt, FloatFormat):
        assert out == [fmt.max, -fmt.max]
    else:
        assert out == [fmt.max, fmt.min]


def test_all_zero_tensor(fmt):
    """An all-zero tensor (or channel) gets a positive finite scale and decodes to exact zeros."""
    x = torch.zeros(4, 3)
    scale = fmt.choose_qparams(x)
    if scale is not None:
        assert bool((scale > 0).all()) and bool(scale.isfinite().all())
        assert float(scale.max()) == 2.0**-126
    assert torch.equal(fmt.quantize(x), x)


# -- devices ------------------------------------------------------------------------------------
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu(fmt):
    """On CUDA, codes, scales and decoded values equal the CPU ones and stay on the device."""
    x = torch.cat([sample().flatten(), torch.tensor([1e-30, 3e5, -7e4, 0.0, -0.0])])
    if isinstance(fmt, FloatFormat):
        x = torch.cat([x, torch.tensor([math.inf, -math.inf, math.nan])])
    cpu = fmt.encode(x)
    gpu = fmt.encode(x.cuda())
    assert gpu.qdata.is_cuda and torch.equal(gpu.qdata.cpu(), cpu.qdata)
    assert (gpu.scale is None) or torch.equal(gpu.scale.cpu(), cpu.scale)
    out = fmt.decode(gpu)
    assert out.is_cuda and torch.equal(out.cpu().nan_to_num(), fmt.decode(cpu).nan_to_num())
    codes = every_code(fmt)
    scale = fixed_scale(fmt, codes)
    want = fmt.decode(Encoded(codes, scale))
    got = fmt.decode(Encoded(codes.cuda(), None if scale is None else scale.cuda())).cpu()
    assert torch.equal(got.nan_to_num(), want.nan_to_num()) and torch.equal(got.isnan(), want.isnan())


# -- registry ----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("fp33", r"unknown format 'fp33'; valid: fp32, fp16, bf16, fp8_e4m3, fp8_e5m2, q<m>\.<n>"),
        ("", r"unknown format ''"),
        ("int8_per_tensor", r"unknown format 'int8_per_tensor'.*int<k> / int<k>_per_channel \(2<=k<=32"),
        ("q0.8", r"q0\.8: integer bits m=0 must be >= 1"),
        ("q20.20", r"q20\.20: width m\+n=40 is outside 2\.\.32"),
        ("q1.0", r"q1\.0: width m\+n=1 is outside 2\.\.32"),
        ("int1", r"int1: width k=1 is outside 2\.\.32"),
        ("int33", r"int33: width k=33 is outside 2\.\.32"),
    ],
)
def test_bad_names(name, message):
    """Unknown names list what is valid; bad parameters name the value and the allowed range."""
    with pytest.raises(FormatError, match=message):
        get_format(name)


def test_registry_parses_parameters():
    """Names carry their parameters; the width lives in one place."""
    assert get_format("q3.13") == FixedPoint(int_bits=3, frac_bits=13)
    assert get_format("Q16.16").bits == 32
    assert get_format("int4") == IntSymmetric(4)
    assert get_format("int8_per_channel") == IntSymmetric(bits=8, granularity=PerChannel(0))
    assert get_format("int16_per_channel_axis1").granularity == PerChannel(1)
    assert get_format("float8_e4m3fn") == get_format("fp8_e4m3")
    with pytest.raises(FormatError, match="got int"):
        get_format(8)  # type: ignore[arg-type]
    assert isinstance(FormatError("x"), ValueError)


@pytest.mark.parametrize("shape", [(0,), (4, 0), (0, 3, 2)])
def test_zero_size_tensors(fmt, shape):
    """Empty tensors (a zero-size weight) get a scale and encode/decode to empty tensors of their
    shape; a per-channel scale has one (smallest) entry per channel, even when channels are empty."""
    x = torch.empty(shape)
    scale = fmt.choose_qparams(x)
    enc = fmt.encode(x, scale)
    assert enc.qdata.shape == x.shape and fmt.decode(enc).shape == x.shape
    if isinstance(fmt, IntSymmetric) and isinstance(fmt.granularity, PerChannel):
        assert scale.shape == (shape[0],) + (1,) * (len(shape) - 1)
        assert bool((scale == 2.0**-126).all())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gather_scale_with_cpu_indices_for_a_cuda_scale():
    """The fault layer samples sites on the CPU: gather_scale accepts CPU indices for a CUDA
    per-channel scale and returns the scales on the scale's device."""
    scale = torch.rand(4, 1, device="cuda") + 0.1
    got = gather_scale(scale, (4, 3), torch.tensor([0, 5, 11]))
    assert got.is_cuda and torch.equal(got.cpu(), scale.cpu().reshape(-1)[[0, 1, 3]])
