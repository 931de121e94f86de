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
=============  ========  ======================  ===========================================

Encoding is the float32 value of the input (other float dtypes are converted to float32
first, so a float64 input is rounded twice) converted with PyTorch's own round-to-nearest-even
casts (``x.float().to(torch.float16)`` etc.), which are bit-exact with numpy / ml_dtypes for
every finite in-range value.  Overflow follows torch, not ml_dtypes:

* ``fp16``, ``bf16``, ``fp8_e5m2``: values that round beyond ``max`` become +-inf (IEEE);
* ``fp8_e4m3``: *saturates*: finite overflow and +-inf become +-448 (``0x7E`` / ``0xFE``), as
  torch 2.13's cast does (torch 2.11 gives NaN, so qfi clamps first and does not depend on the
  version); ml_dtypes' ``float8_e4m3fn`` returns NaN there instead.

NaN inputs are written as one canonical quiet NaN carrying the input's sign bit (exponent all
ones, top mantissa bit set: fp16 ``0x7E00``, bf16 ``0x7FC0``, fp8_e5m2 ``0x7E``, and the only
NaN of fp8_e4m3, ``0x7F``), so codes do not depend on which device or kernel ran the cast.
``fp32`` codes are the input's bits exactly, NaN payloads included.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from quant_schemes._bits import check_qdata, field_names, roles_of, signed_codes
from quant_schemes.base import Encoded, FormatError, check_float_tensor

# (exp_bits, man_bits, finite) -> (canonical name, torch dtype)
_SUPPORTED: dict[tuple[int, int, bool], tuple[str, torch.dtype]] = {
    (8, 23, False): ("fp32", torch.float32),
    (5, 10, False): ("fp16", torch.float16),
    (8, 7, False): ("bf16", torch.bfloat16),
    (4, 3, True): ("fp8_e4m3", torch.float8_e4m3fn),
    (5, 2, False): ("fp8_e5m2", torch.float8_e5m2),
}

# same-width integer dtype to reinterpret each float dtype's bits
_INT_VIEW = {32: torch.int32, 16: torch.int16, 8: torch.uint8}


@dataclass(frozen=True)
class FloatFormat:
    """A binary floating-point format with ``1 + exp_bits + man_bits`` bits.

    ``finite=True`` is the OCP "fn" variant: no infinities, the all-ones exponent holds normal
    numbers, and only ``S.1...1.1...1`` is NaN.  Only the five combinations in
    ``quant_schemes.floats`` (fp32, fp16, bf16, fp8_e4m3, fp8_e5m2) are supported, since
    encoding uses PyTorch's casts.
    """

    exp_bits: int
    man_bits: int
    finite: bool = False

    def __post_init__(self) -> None:
        if (self.exp_bits, self.man_bits, self.finite) not in _SUPPORTED:
            valid = ", ".join(
                f"{n} (E{e}M{m}{', finite' if f else ''})" for (e, m, f), (n, _) in _SUPPORTED.items()
            )
            raise FormatError(
                f"unsupported float format E{self.exp_bits}M{self.man_bits} finite={self.finite}; "
                f"valid: {valid}"
            )

    # -- derived quantities -------------------------------------------------------------------
    @property
    def name(self) -> str:
        return _SUPPORTED[(self.exp_bits, self.man_bits, self.finite)][0]

    @property
    def torch_dtype(self) -> torch.dtype:
        return _SUPPORTED[(self.exp_bits, self.man_bits, self.finite)][1]

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
        frac_ulps = 2 if self.finite else 1  # the fn variant loses the all-ones mantissa to NaN
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
    def nan_code(self) -> int:
        """Canonical positive quiet NaN code (see module docstring)."""
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

    def decode(self, enc: Encoded) -> Tensor:
        """float32 values of ``enc.qdata`` (bits above ``bits`` are ignored); exact."""
        q = check_qdata(enc.qdata, self.name)
        if self.bits == 32:
            pattern = q if q.dtype == torch.int32 else signed_codes(q, 32).to(torch.int32)
            return pattern.view(torch.float32).clone()
        if self.bits == 16:
            pattern = signed_codes(q, 16).to(torch.int16)
        else:
            pattern = (q & 0xFF).to(torch.uint8)
        return pattern.view(self.torch_dtype).to(torch.float32)

    def quantize(self, x: Tensor, scale: Tensor | None = None) -> Tensor:
        """``decode(encode(x))``: x rounded to this format, as float32."""
        return self.decode(self.encode(x, scale))

    def __str__(self) -> str:
        return self.name


FP32 = FloatFormat(8, 23)
FP16 = FloatFormat(5, 10)
BF16 = FloatFormat(8, 7)
FP8_E4M3 = FloatFormat(4, 3, finite=True)
FP8_E5M2 = FloatFormat(5, 2)
