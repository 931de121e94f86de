"""The Format contract (quant_schemes/base.py), checked for every format in ALL_FORMATS: the
element-wise formats (FORMATS) and those that store their scales (BLOCK_FORMATS: MX, NVFP4,
group-wise and asymmetric integers)."""

from __future__ import annotations

import math

import pytest
import torch

from quant_schemes import (
    ALL_FORMATS,
    BlockFormat,
    Encoded,
    FixedPoint,
    FloatFormat,
    Format,
    FormatError,
    IntAffine,
    IntSymmetric,
    PerChannel,
    PerGroup,
    PerTensor,
    QParams,
    gather_scale,
    get_format,
    stored_parts,
)

ROLES = {"sign", "exponent", "mantissa", "integer", "fraction", "magnitude"}
STORED = (IntAffine, BlockFormat)  # formats that store their scales


@pytest.fixture(params=ALL_FORMATS)
def fmt(request) -> Format:
    return get_format(request.param)


def unsigned(fmt: Format) -> bool:
    return isinstance(fmt, IntAffine) and not fmt.symmetric


def sample(shape=(6, 5, 3), seed=0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g) * 1.7


def every_code(fmt: Format) -> torch.Tensor:
    """All 2**bits codes up to 16 bits; for 32 bits every 65537th pattern plus the extremes."""
    if fmt.bits <= 16:
        return torch.arange(2**fmt.bits, dtype=torch.int32)
    u = torch.cat([torch.arange(0, 2**32, 65537), torch.tensor([0, 1, 2**31 - 1, 2**31, 2**32 - 1])])
    return (u - ((u >> 31) << 32)).to(torch.int32)


def fixed_scale(fmt: Format, codes: torch.Tensor):
    """Parameters for codes-only tests (1-D ``codes``): per-channel formats get one scale per code;
    formats that store their scales get stored ones (MX 2^-3, NVFP4 0.5 * e4m3 1.0, integers
    0.037 rounded to their scale format, zero point 3)."""
    if isinstance(fmt, IntSymmetric):
        if isinstance(fmt.granularity, PerChannel):
            return torch.full(codes.shape, 0.037, dtype=torch.float32)
        return torch.tensor(0.037)
    if not isinstance(fmt, STORED):
        return None
    shape = fmt.scale_shape(tuple(codes.shape))
    if isinstance(fmt, BlockFormat):
        if fmt.scale == "e8m0":
            sc = torch.full(shape, 127 - 3, dtype=torch.int32)
            return QParams(fmt.decode_scale(sc), sc)
        sc, ts = torch.full(shape, 0x38, dtype=torch.int32), torch.tensor(0.5)
        return QParams(fmt.decode_scale(sc, ts), sc, None, ts)
    sc = fmt.scale_fmt.encode(torch.full(shape, 0.037)).qdata
    zp = None if fmt.symmetric else torch.full(shape, 3, dtype=torch.int32)
    return QParams(fmt.decode_scale(sc), sc, zp)


def encoded(codes: torch.Tensor, qp) -> Encoded:
    """An Encoded of ``codes`` with the parameters of ``fixed_scale``."""
    if isinstance(qp, QParams):
        return Encoded(codes, qp.scale, qp.scale_codes, qp.zero_point, qp.tensor_scale)
    return Encoded(codes, qp)


# -- shape of things ---------------------------------------------------------------------------
def test_is_a_format_with_consistent_width(fmt):
    """Every format satisfies the Format protocol; bit_names/bit_roles have one entry per bit,
    index 0 = LSB, the sign is bit bits-1 (unsigned asymmetric codes have none), labels are
    unique; the stored scale and zero-point parts name their bits too."""
    assert isinstance(fmt, Format)
    assert len(fmt.bit_names) == fmt.bits == len(set(fmt.bit_names))
    if unsigned(fmt):
        assert "sign" not in fmt.bit_names and set(fmt.bit_roles) == {"magnitude"}
    else:
        assert fmt.bit_names[-1] == "sign" and fmt.bit_roles[-1] == "sign"
    assert len(fmt.bit_roles) == fmt.bits and set(fmt.bit_roles) <= ROLES
    assert fmt.bit_names[0].endswith("0")
    parts = stored_parts(fmt)
    assert parts[0] == "codes" and (len(parts) > 1) == isinstance(fmt, STORED)
    for part in parts[1:]:
        names, roles = fmt.part_bit_names(part), fmt.part_bit_roles(part)
        assert len(names) == len(roles) == fmt.part_bits(part) == len(set(names))
        assert all(n.startswith({"scales": "scale.", "zero_points": "zp."}[part]) for n in names)


def test_name_round_trips_through_registry(fmt):
    """get_format(fmt.name) == fmt, get_format(fmt) is fmt; formats are hashable frozen values."""
    assert get_format(fmt.name) == fmt
    assert get_format(fmt) is fmt
    assert get_format(fmt.name.upper()) == fmt
    assert hash(fmt) == hash(get_format(fmt.name))
    with pytest.raises(AttributeError):
        fmt.bits = 3  # type: ignore[misc]


@pytest.mark.parametrize("shape", [(6, 5, 3), (7,), (1, 1), (3, 70)])
def test_encode_decode_shapes_and_dtypes(fmt, shape):
    """qdata is int32 of x's shape, in [0, 2**bits) below 32 bits; decode is float32 of that shape;
    stored scale and zero-point codes lie within their widths."""
    x = sample(shape)
    enc = fmt.encode(x)
    assert enc.qdata.dtype == torch.int32 and enc.qdata.shape == x.shape
    if fmt.bits < 32:
        assert int(enc.qdata.min()) >= 0 and int(enc.qdata.max()) < 2**fmt.bits
    out = fmt.decode(enc)
    assert out.dtype == torch.float32 and out.shape == x.shape
    assert torch.equal(fmt.quantize(x), out)
    for part, words in (("scales", enc.scale_codes), ("zero_points", enc.zero_point)):
        if part in stored_parts(fmt):
            w = fmt.part_bits(part)
            lo = -(2**31) if w == 32 else 0
            assert words.dtype == torch.int32 and lo <= int(words.min()) and int(words.max()) < 2**w


def test_scale_shapes(fmt):
    """Float/fixed formats have no scale; int<k> gives a 0-d float32 scale, per-channel (C,1,1);
    formats that store their scales give QParams whose arrays have the granularity's shape
    (groups along the last axis: (6, 5, ceil(3 / G))), int32 stored codes and float32 values."""
    x = sample()
    scale = fmt.choose_qparams(x)
    enc = fmt.encode(x)
    if isinstance(fmt, IntSymmetric):
        assert torch.equal(enc.scale, scale) and scale.dtype == torch.float32
        assert scale.shape == (() if isinstance(fmt.granularity, PerTensor) else (6, 1, 1))
    elif isinstance(fmt, STORED):
        want = {PerTensor: (), PerChannel: (6, 1, 1), PerGroup: (6, 5, 1)}[type(fmt.granularity)]
        assert scale.scale.shape == scale.scale_codes.shape == want
        assert scale.scale.dtype == torch.float32 and scale.scale_codes.dtype == torch.int32
        assert torch.equal(enc.scale_codes, scale.scale_codes) and torch.equal(enc.scale, scale.scale)
        assert (scale.zero_point is None) == (not unsigned(fmt))
        assert (scale.tensor_scale is None) == (fmt.name != "nvfp4")
        assert torch.equal(fmt.decode_scale(scale.scale_codes, scale.tensor_scale), scale.scale)
    else:
        assert scale is None and enc.scale is None


# -- round trips -----------------------------------------------------------------------------
def test_every_finite_code_round_trips(fmt):
    """encode(decode(c)) == c for every code whose value is not NaN (exhaustive up to 16 bits,
    sampled for 32), with the parameters the codes were decoded with.  Symmetric integers: the
    code -2**(k-1), reachable only by a fault, re-encodes saturated to -(2**(k-1) - 1); MX E5M2:
    an inf element (only a fault makes one) re-encodes saturated."""
    codes = every_code(fmt)
    scale = fixed_scale(fmt, codes)
    values = fmt.decode(encoded(codes, scale))
    keep = ~values.isnan()
    if isinstance(fmt, BlockFormat):
        keep &= values.isfinite()
    if isinstance(fmt, IntSymmetric) or isinstance(fmt, IntAffine) and fmt.symmetric:
        keep &= codes != 2 ** (fmt.bits - 1)
    if isinstance(fmt, STORED):  # parameters are per group: re-encode the whole tensor with them
        again = fmt.encode(torch.where(keep, values, 0.0), scale)
        assert torch.equal(again.qdata[keep], codes[keep])
        return
    again = fmt.encode(values[keep], scale[keep] if scale is not None and scale.dim() else scale)
    assert torch.equal(again.qdata, codes[keep])


def test_quantize_is_idempotent(fmt):
    """Quantizing an already quantized tensor with the same scale changes nothing."""
    x = sample()
    scale = fmt.choose_qparams(x)
    once = fmt.quantize(x, scale)
    assert torch.equal(fmt.quantize(once, scale), once)


def error_bound(fmt: Format, x: torch.Tensor) -> torch.Tensor:
    """Largest error quantizing ``x`` may make, element by element."""
    if isinstance(fmt, FloatFormat):
        return x.abs() * fmt.eps / 2 + fmt.smallest_subnormal / 2
    if isinstance(fmt, FixedPoint):
        return torch.full_like(x, fmt.resolution / 2)
    if isinstance(fmt, IntSymmetric):
        return fmt.choose_qparams(x) / 2 * (1 + 1e-6)
    s = fmt.expand_qparams(fmt.choose_qparams(x), tuple(x.shape)).scale
    if isinstance(fmt, IntAffine):  # half a step, plus what rounding the scale may clamp
        return s / 2 * (1 + 1e-6) + x.abs() * 2.0**-7
    if fmt.scale == "e4m3":  # NVFP4: half the widest step (2), or saturation of a rounded scale
        return s + x.abs() * 2.0**-3
    e = fmt.element
    top = 2.0**-6 if isinstance(e, FixedPoint) else 2.0 ** (fmt.emax_elem - e.man_bits)
    sat = 2.0 ** (fmt.emax_elem + 1) - e.max  # the spec's floor(log2) scale saturates the top
    return s * max(sat, top / 2)


def test_quantization_error_bounded(fmt):
    """Values inside the range are within half a step of their quantized value (block formats:
    or the saturation at the top of a block that the specification's scale choice implies)."""
    x = sample() * 0.5  # inside q1.7's range [-1, 1) and far from float overflow
    x = x.clamp(-0.99, 0.99)
    err = (fmt.quantize(x) - x).abs()
    assert bool((err <= error_bound(fmt, x)).all())


def test_subset_encode_with_gathered_scale(fmt):
    """Encoding a 1-D subset of elements with its per-element parameters (gather_scale, or
    fmt.gather_qparams for formats that store their scales) gives the same codes as encoding the
    whole tensor (what the fault layer does), and decoding them too."""
    x = sample((6, 5, 3), seed=3)
    full = fmt.encode(x)
    idx = torch.tensor([0, 7, 44, 89, 15, 60])
    vals = x.reshape(-1).index_select(0, idx)
    want = full.qdata.reshape(-1).index_select(0, idx)
    if isinstance(fmt, STORED):
        qpe = fmt.gather_qparams(full.qparams, x.shape, idx)
        assert torch.equal(fmt.encode_elements(vals, qpe), want)
        assert torch.equal(fmt.decode_elements(want, qpe), fmt.decode(full).reshape(-1).index_select(0, idx))
        return
    s = gather_scale(full.scale, x.shape, idx)
    assert (s is None) == (full.scale is None)
    part = fmt.encode(vals, s)
    assert torch.equal(part.qdata, want)
    assert torch.equal(fmt.decode(part), fmt.decode(full).reshape(-1).index_select(0, idx))


def test_given_scale_is_used(fmt):
    """encode(x, scale) uses the given scale (faulty codes decode with the clean scale); a format
    that stores its scales takes QParams and says so when given a bare tensor."""
    x = sample()
    if isinstance(fmt, STORED):
        other = fmt.choose_qparams(x * 4)
        enc = fmt.encode(x, other)
        assert torch.equal(enc.scale_codes, other.scale_codes)
        assert not torch.equal(enc.qdata, fmt.encode(x).qdata)
        with pytest.raises(FormatError, match="QParams"):
            fmt.encode(x, other.scale)
        return
    if not isinstance(fmt, IntSymmetric):
        assert torch.equal(fmt.encode(x, torch.tensor(5.0)).qdata, fmt.encode(x).qdata)
        return
    clean = fmt.choose_qparams(x)
    doubled = fmt.encode(x, clean * 2)
    assert torch.equal(doubled.scale, clean * 2)
    assert not torch.equal(doubled.qdata, fmt.encode(x).qdata)


def test_stored_words_are_what_decode_reads(fmt):
    """Formats that store their scales decode from ``scale_codes`` (and ``zero_point``): a flipped
    scale bit changes every value of its group and no other; ``Encoded.scale`` is informational."""
    if not isinstance(fmt, STORED):
        pytest.skip("no stored scales")
    x = sample((4, 64), seed=5)
    enc = fmt.encode(x)
    clean = fmt.decode(enc)
    assert torch.equal(fmt.decode(enc.replace(scale=enc.scale * 2)), clean)
    w = fmt.part_bits("scales")
    flipped = enc.scale_codes.reshape(-1).clone()
    flipped[0] ^= 1 << (w - 2)  # a high exponent bit of every scale format here
    out = fmt.decode(enc.replace(scale_codes=flipped.reshape(enc.scale_codes.shape))).reshape(-1)
    members, _ = fmt.scale_members(tuple(x.shape), torch.tensor([0]))
    others = torch.ones(x.numel(), dtype=torch.bool).index_fill_(0, members, False)
    assert torch.equal(out[others], clean.reshape(-1)[others])
    moved = out[members] != clean.reshape(-1)[members]
    assert bool(moved[clean.reshape(-1)[members] != 0].all())


# -- inputs ------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.bfloat16])
def test_other_float_dtypes_go_through_float32(fmt, dtype):
    """Inputs of other float dtypes are converted to float32 first."""
    x = sample().to(dtype)
    assert torch.equal(fmt.encode(x).qdata, fmt.encode(x.float()).qdata)


def test_non_contiguous_and_zero_dim(fmt):
    """Non-contiguous views and 0-d tensors encode like their contiguous copies; 0.75 comes back
    from every format that can hold it (fp4_e2m1 rounds it to 1.0, a tie to even; an fp16/bf16
    scale of 0.75/7 gives it back only within the scale's precision)."""
    x = sample((6, 5, 3))
    xt = x.transpose(0, 2)
    scale = fmt.choose_qparams(xt.contiguous())
    assert torch.equal(fmt.encode(xt, scale).qdata, fmt.encode(xt.contiguous(), scale).qdata)
    if isinstance(getattr(fmt, "granularity", None), PerChannel):
        with pytest.raises(FormatError, match="axis 0"):
            fmt.encode(torch.tensor(1.0))
        return
    one = torch.tensor(0.75)
    assert fmt.encode(one).qdata.shape == () and fmt.quantize(one).shape == ()
    if isinstance(fmt, IntAffine) and fmt.scale_format != "fp32":
        assert abs(float(fmt.quantize(one)) - 0.75) < 0.75 * 2.0**-7
    else:
        assert float(fmt.quantize(one)) == (1.0 if fmt.name == "fp4_e2m1" else 0.75)


def test_input_never_modified_nor_aliased(fmt):
    """encode leaves x untouched, and writing into qdata or the decoded tensor never changes x."""
    x = sample()
    before = x.clone()
    enc = fmt.encode(x)
    enc.qdata.bitwise_xor_(1)
    fmt.decode(enc).fill_(7.0)
    fmt.quantize(x).fill_(7.0)
    assert torch.equal(x, before)


def test_quantize_out_and_in_place(fmt):
    """quantize(x, scale, out=...) writes the same values into ``out`` (x itself included: the
    activation hooks' in-place path) and returns it."""
    x = sample((4, 40), seed=2)
    scale = fmt.choose_qparams(x)
    want = fmt.quantize(x, scale)
    out = torch.empty_like(x)
    assert fmt.quantize(x, scale, out=out) is out and torch.equal(out, want)
    y = x.clone()
    assert fmt.quantize(y, scale, out=y) is y and torch.equal(y, want)


def test_quantize_in_place_piece_by_piece(fmt, monkeypatch):
    """Large in-place passes run piece by piece (quant_schemes.base.CHUNK elements at a time):
    with pieces of 16 elements, a ragged last piece, and NaN/inf let through (strict=False), the
    values are those of the whole-tensor quantize."""
    import quant_schemes.base as base

    x = sample((7, 41), seed=3)
    x.view(-1)[[5, 100, 286]] = torch.tensor([float("nan"), float("inf"), -float("inf")])
    scale = fmt.choose_qparams(torch.nan_to_num(x, 0.0, 0.0, 0.0))
    want = fmt.quantize(x, scale, strict=False)
    calls = []
    real = base.in_pieces

    def spy(t, fn):
        calls.append(t.numel())
        return real(t, fn)

    monkeypatch.setattr(base, "CHUNK", 16)
    for mod in ("quant_schemes.floats", "quant_schemes.integer"):
        monkeypatch.setattr(f"{mod}.in_pieces", spy)
    y = x.clone()
    assert fmt.quantize(y, scale, out=y, strict=False) is y
    assert torch.equal(y.isnan(), want.isnan()) and torch.equal(y.nan_to_num(), want.nan_to_num())
    # the formats whose in-place pass is elementwise with one scale take the piecewise path
    piecewise = {"fp16", "bf16", "fp8_e4m3", "fp8_e5m2", "int8", "int4"}
    assert calls == ([x.numel()] if fmt.name in piecewise else [])


def test_quantize_in_place_in_pieces_takes_any_one_element_scale(monkeypatch):
    """A one-element scale of any shape ((1, 1, 1, 1): a per-channel scale of one channel, or a
    per-tensor scale kept 4-D) works on the piecewise path; so does a tensor autograd tracks."""
    import quant_schemes.base as base
    from quant_schemes import get_format

    monkeypatch.setattr(base, "CHUNK", 16)
    x = sample((1, 3, 8, 8), seed=4)
    for name in ("int8_per_channel", "int8"):
        f = get_format(name)
        scale = f.choose_qparams(x).reshape(1, 1, 1, 1)
        want = f.quantize(x, scale)
        y = x.clone()
        assert torch.equal(f.quantize(y, scale, out=y), want)
    f = get_format("fp16")
    y = x.clone()
    leaf = torch.ones_like(x, requires_grad=True)
    z = leaf * x  # a non-leaf that requires grad: modified whole, as before
    assert torch.equal(f.quantize(z, out=z).detach(), f.quantize(x))
    assert torch.equal(f.quantize(y, out=y), f.quantize(x))


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
    """Float formats with a NaN code encode NaN as NaN; block formats give the NaN's block the
    NaN scale (the block decodes to NaN, other blocks are untouched); fixed point, integers and
    the FP6/FP4 element types (no NaN code) raise FormatError counting the NaNs, and leave the
    input unchanged; quantize(strict=False) lets NaN through instead."""
    x = torch.tensor([1.0, math.nan, -2.0, math.nan])
    if isinstance(fmt, FloatFormat) and fmt.has_nan:
        assert fmt.quantize(x).isnan().tolist() == [False, True, False, True]
        return
    if isinstance(fmt, BlockFormat):
        y = torch.cat([x, torch.ones(fmt.block)])  # the second block is clean
        q = fmt.quantize(y)
        assert q[: fmt.block].isnan().all() and not q[fmt.block :].isnan().any()
        return
    with pytest.raises(FormatError, match=r"2 NaN"):
        fmt.encode(x)
    assert x.isnan().sum() == 2 and x[0] == 1.0 and x[2] == -2.0
    if not isinstance(getattr(fmt, "granularity", None), PerChannel):
        lenient = fmt.quantize(x, strict=False)
        assert lenient.isnan().tolist() == [False, True, False, True]
        assert lenient[0] != 0 and lenient[2] != 0


def test_infinity_policy(fmt):
    """+-inf: IEEE formats keep inf; fp8_e4m3, FP6, FP4 and fixed point saturate to +-max;
    integers raise; block formats make the block NaN (no infinite scale exists)."""
    x = torch.tensor([math.inf, -math.inf])
    if isinstance(fmt, (IntSymmetric, IntAffine)):
        with pytest.raises(FormatError, match=r"0 NaN and 2 inf"):
            fmt.encode(x)
        return
    out = fmt.quantize(x).tolist()
    if isinstance(fmt, BlockFormat):
        assert all(math.isnan(v) for v in out)
    elif isinstance(fmt, FloatFormat) and fmt.has_inf:
        assert out == [math.inf, -math.inf]
    elif isinstance(fmt, FloatFormat):
        assert out == [fmt.max, -fmt.max]
    else:
        assert out == [fmt.max, fmt.min]


def test_all_zero_tensor(fmt):
    """An all-zero tensor (or channel, group, block) gets a positive finite scale (the smallest
    its scale format stores) and decodes to exact zeros."""
    x = torch.zeros(4, 3)
    scale = fmt.choose_qparams(x)
    if isinstance(scale, QParams):
        smallest = {"e8m0": 2.0**-127, "e4m3": 2.0**-6 * 2.0**-120, "fp16": 2.0**-14}
        key = fmt.scale if isinstance(fmt, BlockFormat) else fmt.scale_format
        assert bool((scale.scale == smallest.get(key, 2.0**-126)).all())
    elif scale is not None:
        assert bool((scale > 0).all()) and bool(scale.isfinite().all())
        assert float(scale.max()) == 2.0**-126
    assert torch.equal(fmt.quantize(x), x)


# -- devices ------------------------------------------------------------------------------------
def to_device(qp, device: str):
    if isinstance(qp, QParams):
        return QParams(*(None if t is None else t.to(device) for t in (
            qp.scale, qp.scale_codes, qp.zero_point, qp.tensor_scale)))
    return None if qp is None else qp.to(device)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu(fmt):
    """On CUDA, codes, scales and decoded values equal the CPU ones and stay on the device."""
    x = torch.cat([sample().flatten(), torch.tensor([1e-30, 3e5, -7e4, 0.0, -0.0])])
    if isinstance(fmt, FloatFormat) and fmt.has_nan:
        x = torch.cat([x, torch.tensor([math.inf, -math.inf, math.nan])])
    cpu = fmt.encode(x)
    gpu = fmt.encode(x.cuda())
    assert gpu.qdata.is_cuda and torch.equal(gpu.qdata.cpu(), cpu.qdata)
    for k in ("scale", "scale_codes", "zero_point", "tensor_scale"):
        a, b = getattr(cpu, k), getattr(gpu, k)
        assert (a is None) == (b is None) and (a is None or (b.is_cuda and torch.equal(b.cpu(), a))), k
    out = fmt.decode(gpu)
    assert out.is_cuda and torch.equal(out.cpu().nan_to_num(), fmt.decode(cpu).nan_to_num())
    codes = every_code(fmt)
    scale = fixed_scale(fmt, codes)
    want = fmt.decode(encoded(codes, scale))
    got = fmt.decode(encoded(codes.cuda(), to_device(scale, "cuda"))).cpu()
    assert torch.equal(got.nan_to_num(), want.nan_to_num()) and torch.equal(got.isnan(), want.isnan())
    assert torch.equal(fmt.quantize(x.cuda()).cpu().nan_to_num(), fmt.quantize(x).nan_to_num())


# -- registry ----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("fp33", r"unknown format 'fp33'; valid: fp32, fp16, bf16, fp8_e4m3, fp8_e5m2, fp6_e3m2, fp6_e2m3, "
                 r"fp4_e2m1, e8m0, q<m>\.<n>.*mxfp4"),
        ("", r"unknown format ''"),
        ("int8_per_tensor", r"unknown format 'int8_per_tensor'.*int<k> / int<k>_per_channel \(2<=k<=32"),
        ("q0.8", r"q0\.8: integer bits m=0 must be >= 1"),
        ("q20.20", r"q20\.20: width m\+n=40 is outside 2\.\.32"),
        ("q1.0", r"q1\.0: width m\+n=1 is outside 2\.\.32"),
        ("int1", r"int1: width k=1 is outside 2\.\.32"),
        ("int33", r"int33: width k=33 is outside 2\.\.32"),
        ("mxfp5", r"unknown format 'mxfp5'"),
        ("int4_g0", r"PerGroup: size must be an int >= 1, got 0"),
        ("int17_g128", r"int17: width k=17 is outside 2\.\.16"),
        ("uint1_asym", r"uint1: width k=1 is outside 2\.\.16"),
        ("uint4_asym_g32_fp8", r"unknown format 'uint4_asym_g32_fp8'"),
        ("mxfp4_b0", r"block size must be an int >= 1, got 0"),
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
    assert get_format("int4_g128") == IntAffine(4, PerGroup(128)) == get_format("int4_g128_fp32")
    assert get_format("int4_g128_fp16").scale_format == "fp16"
    assert get_format("int8_fp32") == IntAffine(8, PerTensor(), True, "fp32") != get_format("int8")
    assert get_format("uint4_asym_per_channel_axis1_bf16") == IntAffine(4, PerChannel(1), False, "bf16")
    assert get_format("mxfp4") == get_format("mxfp4_e2m1") == BlockFormat(get_format("fp4_e2m1"))
    assert get_format("mxfp4_b16").block == 16 and get_format("nvfp4").block == 16
    assert get_format("float4_e2m1fn") == get_format("fp4") == get_format("fp4_e2m1")
    assert get_format("float8_e8m0fnu").name == "e8m0"
    with pytest.raises(FormatError, match="got int"):
        get_format(8)  # type: ignore[arg-type]
    with pytest.raises(FormatError, match=r"groups: IntAffine"):
        IntSymmetric(4, PerGroup(32))  # type: ignore[arg-type]
    with pytest.raises(FormatError, match="E4M3 block scale .* needs fp4_e2m1"):
        BlockFormat(get_format("fp6_e2m3"), 16, "e4m3")
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
    if isinstance(fmt, STORED):
        assert tuple(scale.scale_codes.shape) == fmt.scale_shape(shape)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gather_scale_with_cpu_indices_for_a_cuda_scale():
    """The fault layer samples sites on the CPU: gather_scale accepts CPU indices for a CUDA
    per-channel scale and returns the scales on the scale's device."""
    scale = torch.rand(4, 1, device="cuda") + 0.1
    got = gather_scale(scale, (4, 3), torch.tensor([0, 5, 11]))
    assert got.is_cuda and torch.equal(got.cpu(), scale.cpu().reshape(-1)[[0, 1, 3]])
