"""IEEE-style binary floating-point formats: fp32, fp16, bf16 and the OCP FP8 pair.

Bit encodings (bit 0 = LSB, sign = bit ``bits - 1``), as in the ml_dtypes README:

=============  ========  ======================  ===========================================
name           layout    bits                    specials
=============  ========  ======================  ===========================================
``fp32``       S1E8M23   ``0bSEEEEEEEEM...M``    IEEE binary32: inf, NaN, subnormals
``fp16``       S1E5M10   ``0bSEEEEEMMMMMMMMMM``  IEEE binary16: inf, NaN, subnormals
``bf16``       S1E8M7    ``0bSEEEEEEEEMMMMMMM``  bfloat16: inf, NaN, subnormals
``fp8_e4m3``   S1E4M3    ``0bSEEEEMMM``          OCP E4M3 (``float8_e4m3fn``): no inf,
                                                 NaN only at ``S.1111.111``, max 448
``fp8_e5m2``   S1E5M2    ``0bSEEEEEMM``          OCP E5M2 (``float8_e5m2``): IEEE-like
``fp6_e3m2``   S1E3M2    ``0bSEEEMM``            OCP FP6 E3M2 (``float6_e3m2fn``): no inf, no
                                                 NaN, max 28, min subnormal 2^-4
``fp6_e2m3``   S1E2M3    ``0bSEEMMM``            OCP FP6 E2M3 (``float6_e2m3fn``): no inf, no
                                                 NaN, max 7.5, min subnormal 2^-3
``fp4_e2m1``   S1E2M1    ``0bSEEM``              OCP FP4 E2M1 (``float4_e2m1fn``): no inf, no
                                                 NaN; values 0, 0.5, 1, 1.5, 2, 3, 4, 6
=============  ========  ======================  ===========================================

Encoding is the float32 value of the input (other float dtypes are converted to float32
first, so a float64 input is rounded twice) converted with PyTorch's own round-to-nearest-even
casts (``x.float().to(torch.float16)`` etc.), which are bit-exact with numpy / ml_dtypes for
every finite in-range value.  Overflow follows torch, not ml_dtypes:

* ``fp16``, ``bf16``, ``fp8_e5m2``: values that round beyond ``max`` become +-inf (IEEE);
* ``fp8_e4m3``: *saturates*: finite overflow and +-inf become +-448 (``0x7E`` / ``0xFE``), as
  torch 2.13's cast does (torch 2.11 gives NaN, so qfi clamps first and does not depend on the
  version); ml_dtypes' ``float8_e4m3fn`` returns NaN there instead.

The OCP FP6 and FP4 element types (the elements of MXFP6 / MXFP4 / NVFP4) have no torch cast:
they are rounded in software (round to nearest, ties to even, exact: the grid step is a power of
two) and **saturate**: finite overflow and +-inf become +-max, as the OCP MX specification asks
of conversions and as ml_dtypes does.  They have no NaN code: encoding NaN raises
``FormatError`` naming how many (ml_dtypes writes -0 there); ``quantize(x, strict=False)`` lets a
NaN through as NaN instead (what an activation hook wants).  ``-0.0`` keeps its sign bit.

NaN inputs are written as one canonical quiet NaN carrying the input's sign bit (exponent all
ones, top mantissa bit set: fp16 ``0x7E00``, bf16 ``0x7FC0``, fp8_e5m2 ``0x7E``, and the only
NaN of fp8_e4m3, ``0x7F``), so codes do not depend on which device or kernel ran the cast.
``fp32`` codes are the input's bits exactly, NaN payloads included.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
from torch import Tensor

from quant_schemes._bits import check_qdata, field_names, roles_of, signed_codes
from quant_schemes.base import Encoded, FormatError, check_float_tensor, in_pieces

# (exp_bits, man_bits, finite, nan) -> (canonical name, torch dtype or None: rounded in software)
_SUPPORTED: dict[tuple[int, int, bool, bool], tuple[str, torch.dtype | None]] = {
    (8, 23, False, True): ("fp32", torch.float32),
    (5, 10, False, True): ("fp16", torch.float16),
    (8, 7, False, True): ("bf16", torch.bfloat16),
    (4, 3, True, True): ("fp8_e4m3", torch.float8_e4m3fn),
    (5, 2, False, True): ("fp8_e5m2", torch.float8_e5m2),
    (3, 2, True, False): ("fp6_e3m2", None),
    (2, 3, True, False): ("fp6_e2m3", None),
    (2, 1, True, False): ("fp4_e2m1", None),
}

# same-width integer dtype to reinterpret each float dtype's bits
_INT_VIEW = {32: torch.int32, 16: torch.int16, 8: torch.uint8}


@dataclass(frozen=True)
class FloatFormat:
    """A binary floating-point format with ``1 + exp_bits + man_bits`` bits.

    ``finite=True`` is the OCP "fn" variant: no infinities, the all-ones exponent holds normal
    numbers, and (with ``nan=True``) only ``S.1...1.1...1`` is NaN; ``nan=False`` (the FP6 and FP4
    element types) has no NaN either, so every code is a number.  Only the combinations in
    ``quant_schemes.floats`` are supported: fp32, fp16, bf16, fp8_e4m3, fp8_e5m2 (encoded with
    PyTorch's casts) and fp6_e3m2, fp6_e2m3, fp4_e2m1 (rounded in software).
    """

    exp_bits: int
    man_bits: int
    finite: bool = False
    nan: bool = True

    def __post_init__(self) -> None:
        if self._key not in _SUPPORTED:
            valid = ", ".join(
                f"{n} (E{e}M{m}{', finite' if f else ''}{'' if a else ', no NaN'})"
                for (e, m, f, a), (n, _) in _SUPPORTED.items()
            )
            raise FormatError(
                f"unsupported float format E{self.exp_bits}M{self.man_bits} finite={self.finite} "
                f"nan={self.nan}; valid: {valid}"
            )

    @property
    def _key(self) -> tuple[int, int, bool, bool]:
        return (self.exp_bits, self.man_bits, self.finite, self.nan)

    # -- derived quantities -------------------------------------------------------------------
    @property
    def name(self) -> str:
        return _SUPPORTED[self._key][0]

    @property
    def torch_dtype(self) -> torch.dtype | None:
        """The torch dtype whose cast encodes this format, or None (rounded in software)."""
        return _SUPPORTED[self._key][1]

    @property
    def bits(self) -> int:
        return 1 + self.exp_bits + self.man_bits

    @property
    def layout(self) -> str:
        """ml_dtypes-style layout, e.g. ``S1E5M10``."""
        return f"S1E{self.exp_bits}M{self.man_bits}"

    @property
    def bias(self) -> int:
        return 2 ** (self.exp_bits - 1) - 1

    @property
    def emax(self) -> int:
        """Exponent of the largest finite value."""
        top = 2**self.exp_bits - 1  # all-ones exponent field
        return (top if self.finite else top - 1) - self.bias

    @property
    def max(self) -> float:
        """Largest finite value."""
        frac_ulps = 2 if self.finite and self.nan else 1  # e4m3 loses the all-ones mantissa to NaN
        return (2.0 - frac_ulps * 2.0**-self.man_bits) * 2.0**self.emax

    @property
    def eps(self) -> float:
        """Distance from 1.0 to the next larger value (relative resolution)."""
        return 2.0**-self.man_bits

    resolution = eps

    @property
    def smallest_normal(self) -> float:
        return 2.0 ** (1 - self.bias)

    @property
    def smallest_subnormal(self) -> float:
        return 2.0 ** (1 - self.bias - self.man_bits)

    @property
    def has_inf(self) -> bool:
        return not self.finite

    @property
    def has_nan(self) -> bool:
        return self.nan

    @property
    def bits_per_value(self) -> float:
        return float(self.bits)

    def stored_bits(self, shape: tuple[int, ...]) -> int:
        """Bits a tensor of ``shape`` occupies in this format."""
        return _numel(shape) * self.bits

    @property
    def nan_code(self) -> int | None:
        """Canonical positive quiet NaN code (see module docstring); None without NaN."""
        if not self.nan:
            return None
        exp_ones = (2**self.exp_bits - 1) << self.man_bits
        if self.finite:
            return exp_ones | (2**self.man_bits - 1)
        return exp_ones | (1 << (self.man_bits - 1))

    @property
    def bit_names(self) -> tuple[str, ...]:
        return field_names("man", self.man_bits) + field_names("exp", self.exp_bits) + ("sign",)

    @property
    def bit_roles(self) -> tuple[str, ...]:
        return roles_of(self.bit_names)

    # -- the Format protocol -----------------------------------------------------------------
    def choose_qparams(self, x: Tensor) -> None:
        """Float formats have no parameters: always None."""
        check_float_tensor(x, self.name)
        return None

    def encode(self, x: Tensor, scale: Tensor | None = None) -> Encoded:
        """Bit patterns of ``x`` rounded to this format (``scale`` is ignored).

        The returned ``qdata`` never aliases ``x``.
        """
        x32 = check_float_tensor(x, self.name).to(torch.float32)
        if self.bits == 32:
            return Encoded(x32.view(torch.int32).clone())
        if self.torch_dtype is None:
            self._refuse_nan(x32)
            return Encoded(self._soft_codes(x32))
        y = self.cast(x32).view(_INT_VIEW[self.bits]).to(torch.int32) & ((1 << self.bits) - 1)
        sign = (x32.view(torch.int32) < 0).to(torch.int32) << (self.bits - 1)
        return Encoded(torch.where(torch.isnan(x32), sign | self.nan_code, y))

    def cast(self, x32: Tensor) -> Tensor:
        """``x32`` (float32) rounded to ``torch_dtype`` with round-to-nearest-even; a format without
        infinities (``fp8_e4m3``) saturates explicitly, because torch's own cast changed from NaN
        (2.11) to saturation (2.13) for overflow."""
        if self.finite:
            x32 = x32.clamp(-self.max, self.max)  # NaN stays NaN
        return x32.to(self.torch_dtype)

    # -- software rounding (FP6 / FP4: no torch cast) -------------------------------------------
    def _refuse_nan(self, x32: Tensor) -> None:
        if bool(torch.isnan(x32).any()):
            n_nan = int(torch.isnan(x32).sum())
            raise FormatError(
                f"{self.name}: cannot encode {n_nan} NaN value(s); {self.name} has no NaN code "
                "(quantize(x, strict=False) lets NaN through as a value)"
            )

    def _soft_round(self, a: Tensor) -> Tensor:
        """``a`` (float32, >= 0 or NaN) rounded to this format's grid, ties to even, saturating at
        ``max`` (+inf too); exact: the step is a power of two and the quotient is small."""
        emin = 1 - self.bias
        e = ((a.view(torch.int32) >> 23) & 0xFF) - 127  # floor(log2 a) for normal a
        e = e.clamp_(min=emin)
        step = ((e - self.man_bits + 127) << 23).view(torch.float32)  # 2**(e - man_bits)
        q = torch.round(a / step).mul_(step)
        return q.clamp_(max=self.max)

    def _soft_codes(self, x32: Tensor) -> Tensor:
        q = self._soft_round(x32.abs())
        qb = q.view(torch.int32)
        m = self.man_bits
        normal = q >= self.smallest_normal
        code_n = ((((qb >> 23) & 0xFF) - 127 + self.bias) << m) | ((qb >> (23 - m)) & ((1 << m) - 1))
        code_s = (q * 2.0 ** (m + self.bias - 1)).to(torch.int32)  # q / smallest_subnormal
        sign = (x32.view(torch.int32) < 0).to(torch.int32) << (self.bits - 1)
        return torch.where(normal, code_n, code_s) | sign

    def _table(self, device: torch.device) -> Tensor:
        key = (self.exp_bits, self.man_bits, device)
        table = _TABLES.get(key)
        if table is None:  # a dict lookup per decode: the fault layer decodes a few words at a time
            table = _TABLES[key] = _value_table(self.exp_bits, self.man_bits, self.bias, str(device))
        return table

    def decode(self, enc: Encoded) -> Tensor:
        """float32 values of ``enc.qdata`` (bits above ``bits`` are ignored); exact."""
        q = check_qdata(enc.qdata, self.name)
        if self.torch_dtype is None:
            idx = (q & ((1 << self.bits) - 1)).to(torch.int64)
            return self._table(q.device).index_select(0, idx.reshape(-1)).reshape(q.shape)
        if self.bits == 32:
            pattern = q if q.dtype == torch.int32 else signed_codes(q, 32).to(torch.int32)
            return pattern.view(torch.float32).clone()
        if self.bits == 16:
            pattern = signed_codes(q, 16).to(torch.int16)
        else:
            pattern = (q & 0xFF).to(torch.uint8)
        return pattern.view(self.torch_dtype).to(torch.float32)

    def quantize(
        self, x: Tensor, scale: Tensor | None = None, *, out: Tensor | None = None, strict: bool = True
    ) -> Tensor:
        """``decode(encode(x))``: x rounded to this format, as float32, computed without codes.

        ``out`` (a float32 tensor of x's shape, ``x`` itself allowed) receives the result and is
        returned: no allocation beyond the cast's own.  ``strict=False`` lets NaN through as NaN
        in the formats without a NaN code instead of raising.  The values equal
        ``decode(encode(x))`` except that NaN payloads are not canonicalised."""
        x = check_float_tensor(x, self.name)
        if self.bits == 32:
            q = x.to(torch.float32)
        elif self.torch_dtype is None:
            x32 = x.to(torch.float32)
            if strict:
                self._refuse_nan(x32)
            q = torch.copysign(self._soft_round(x32.abs()), x32)
        elif out is x and x.dtype == torch.float32:  # in place, piece by piece: one pass, no temporary
            return in_pieces(x, lambda piece: piece.copy_(self.cast(piece)))
        else:
            q = self.cast(x.to(torch.float32))
            if out is not None:  # widened straight into ``out``: no float32 temporary
                return out.copy_(q)
            q = q.to(torch.float32)
        if out is None:
            return q if q is not x else q.clone()
        return out.copy_(q)

    def __str__(self) -> str:
        return self.name


_TABLES: dict[tuple[int, int, torch.device], Tensor] = {}


@functools.lru_cache(maxsize=64)
def _value_table(exp_bits: int, man_bits: int, bias: int, device: str) -> Tensor:
    """float32 value of every code of a no-inf, no-NaN format (exact: few significant bits)."""
    bits = 1 + exp_bits + man_bits
    c = torch.arange(2**bits, dtype=torch.int64)
    e, m = (c >> man_bits) & ((1 << exp_bits) - 1), c & ((1 << man_bits) - 1)
    frac = torch.where(e > 0, m + (1 << man_bits), m).to(torch.float64)
    val = frac * torch.pow(2.0, (e.clamp(min=1) - bias - man_bits).to(torch.float64))
    val = torch.where((c >> (bits - 1)) == 1, -val, val)
    return val.to(torch.float32).to(device)


def _numel(shape: tuple[int, ...]) -> int:
    out = 1
    for s in shape:
        out *= int(s)
    return out


FP32 = FloatFormat(8, 23)
FP16 = FloatFormat(5, 10)
BF16 = FloatFormat(8, 7)
FP8_E4M3 = FloatFormat(4, 3, finite=True)
FP8_E5M2 = FloatFormat(5, 2)
FP6_E3M2 = FloatFormat(3, 2, finite=True, nan=False)
FP6_E2M3 = FloatFormat(2, 3, finite=True, nan=False)
FP4_E2M1 = FloatFormat(2, 1, finite=True, nan=False)


@dataclass(frozen=True)
class E8M0:
    """OCP E8M0 (``float8_e8m0fnu``), the scale type of the MX formats: 8 unsigned exponent bits,
    no sign, no mantissa; code ``c`` is ``2**(c - 127)`` (2^-127 .. 2^127), ``0xFF`` is NaN; no
    zero and no infinity.  Layout ``0bEEEEEEEE``.

    Encoding rounds to the nearest power of two, ties (``1.5 * 2**k``) **up**, as ml_dtypes and
    torch's ``float8_e8m0fnu`` cast both do (with no mantissa bit there is no even neighbour to
    prefer); like both, a float32 subnormal input above 2^-127 gives 2^-126.  Out of range it
    saturates: values at or above ``1.5 * 2**127`` and +inf give 2^127
    (``0xFE``; ml_dtypes gives NaN), values below 2^-127, zero included, give 2^-127 (``0x00``;
    ml_dtypes gives NaN for zero).  NaN gives ``0xFF``; a negative value has no code
    (``FormatError``).
    """

    @property
    def name(self) -> str:
        return "e8m0"

    @property
    def bits(self) -> int:
        return 8

    layout = "E8M0"
    bias = 127
    emax = 127
    nan_code = 0xFF
    max = 2.0**127
    min = 2.0**-127
    smallest_normal = 2.0**-127

    @property
    def bit_names(self) -> tuple[str, ...]:
        return field_names("exp", 8)

    @property
    def bit_roles(self) -> tuple[str, ...]:
        return roles_of(self.bit_names)

    @property
    def bits_per_value(self) -> float:
        return 8.0

    def stored_bits(self, shape: tuple[int, ...]) -> int:
        return _numel(shape) * 8

    def choose_qparams(self, x: Tensor) -> None:
        check_float_tensor(x, self.name)
        return None

    def encode(self, x: Tensor, scale: Tensor | None = None) -> Encoded:
        """Codes of ``x`` (see the class docstring); ``scale`` is ignored."""
        x32 = check_float_tensor(x, self.name).to(torch.float32)
        if bool((x32 < 0).any()):
            n = int((x32 < 0).sum())
            raise FormatError(f"e8m0: cannot encode {n} negative value(s); e8m0 is unsigned (2^-127..2^127)")
        b = x32.view(torch.int32)
        field, frac = (b >> 23) & 0xFF, b & 0x7FFFFF
        up = torch.where(field == 0, frac > 0x400000, frac >= 0x400000).to(torch.int32)
        code = (field + up).clamp_(max=0xFE)
        return Encoded(torch.where(torch.isnan(x32), torch.full_like(code, 0xFF), code))

    def decode(self, enc: Encoded) -> Tensor:
        """``2**(code - 127)`` as float32 (exact; code 0 is the float32 subnormal 2^-127), NaN for
        ``0xFF``; bits above 8 are ignored."""
        c = check_qdata(enc.qdata, self.name) & 0xFF
        c = c if c.dtype == torch.int32 else c.to(torch.int32)
        v = torch.where(c == 0, torch.full_like(c, 0x00400000), c << 23).view(torch.float32)
        return torch.where(c == 0xFF, torch.full_like(v, math.nan), v)

    def quantize(
        self, x: Tensor, scale: Tensor | None = None, *, out: Tensor | None = None, strict: bool = True
    ) -> Tensor:
        q = self.decode(self.encode(x))
        return q if out is None else out.copy_(q)

    def __str__(self) -> str:
        return self.name
