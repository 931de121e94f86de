"""Two's complement fixed point ``q<m>.<n>``.

``FixedPoint(int_bits=m, frac_bits=n)`` has ``m + n`` bits (2..32): ``m`` integer bits
*including* the sign bit, ``n`` fraction bits.  A code ``c`` (signed) stands for ``c * 2**-n``;
the range is ``[-2**(m-1), 2**(m-1) - 2**-n]`` in steps of ``2**-n``.  Layout of ``q3.13``:
``0bSIIFFFFFFFFFFFFF`` (bit 15 sign, bits 14-13 integer, bits 12-0 fraction).

Encoding (exact for every width: float32 maths up to 24 bits, float64 above):
``round_half_even(x * 2**n)`` clamped to
``[-2**(m+n-1), 2**(m+n-1) - 1]`` (saturating; +-inf saturate too).  NaN has no code: encoding
a tensor holding NaN raises ``FormatError`` naming how many.  Inputs of other float dtypes are
converted to float32 first.

Decoding sign-extends and multiplies by ``2**-n``: exact for ``m + n <= 24``; wider codes are
scaled in float64 and rounded once to the nearest float32 (float32 has 24 significant bits).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from quant_schemes._bits import check_qdata, field_names, pack_signed, roles_of, signed_codes
from quant_schemes.base import Encoded, FormatError, check_float_tensor

MIN_BITS, MAX_BITS = 2, 32


@dataclass(frozen=True)
class FixedPoint:
    """Signed fixed point with ``int_bits`` (sign included) + ``frac_bits`` bits."""

    int_bits: int
    frac_bits: int

    def __post_init__(self) -> None:
        m, n = self.int_bits, self.frac_bits
        if not (isinstance(m, int) and isinstance(n, int)):
            raise FormatError(f"q{m}.{n}: int_bits and frac_bits must be integers")
        if m < 1:
            raise FormatError(
                f"q{m}.{n}: integer bits m={m} must be >= 1 (m counts the sign bit, e.g. q1.7 is 8-bit)"
            )
        if n < 0:
            raise FormatError(f"q{m}.{n}: fraction bits n={n} must be >= 0")
        if not MIN_BITS <= m + n <= MAX_BITS:
            raise FormatError(f"q{m}.{n}: width m+n={m + n} is outside {MIN_BITS}..{MAX_BITS}")

    @property
    def name(self) -> str:
        return f"q{self.int_bits}.{self.frac_bits}"

    @property
    def bits(self) -> int:
        return self.int_bits + self.frac_bits

    @property
    def resolution(self) -> float:
        return 2.0**-self.frac_bits

    @property
    def code_max(self) -> int:
        return 2 ** (self.bits - 1) - 1

    @property
    def code_min(self) -> int:
        return -(2 ** (self.bits - 1))

    @property
    def max(self) -> float:
        return self.code_max * self.resolution

    @property
    def min(self) -> float:
        return self.code_min * self.resolution

    @property
    def bit_names(self) -> tuple[str, ...]:
        return field_names("frac", self.frac_bits) + field_names("int", self.int_bits - 1) + ("sign",)

    @property
    def bit_roles(self) -> tuple[str, ...]:
        return roles_of(self.bit_names)

    def choose_qparams(self, x: Tensor) -> None:
        """Fixed point has a fixed scale: always None."""
        check_float_tensor(x, self.name)
        return None

    def encode(self, x: Tensor, scale: Tensor | None = None) -> Encoded:
        """Round half to even onto the ``2**-n`` grid, saturate; ``scale`` is ignored."""
        x32 = check_float_tensor(x, self.name).to(torch.float32)
        if torch.isnan(x32).any():
            n_nan = int(torch.isnan(x32).sum())
            raise FormatError(f"{self.name}: cannot encode {n_nan} NaN value(s); fixed point has no NaN code")
        # x * 2**n and the rounding are exact in float32; the clamp bounds are exact in float32
        # only up to 24 bits, so wider formats clamp in float64
        work = x32 if self.bits <= 24 else x32.to(torch.float64)
        codes = torch.round(work * 2.0**self.frac_bits).clamp_(self.code_min, self.code_max)
        return Encoded(pack_signed(codes, self.bits))

    def decode(self, enc: Encoded) -> Tensor:
        """``signed(code) * 2**-n`` as float32 (bits above ``bits`` are ignored)."""
        q = check_qdata(enc.qdata, self.name)
        codes = signed_codes(q, self.bits)
        if self.bits <= 24:  # code and product exact in float32
            return codes.to(torch.float32) * self.resolution
        return (codes.to(torch.float64) * self.resolution).to(torch.float32)

    def quantize(
        self, x: Tensor, scale: Tensor | None = None, *, out: Tensor | None = None, strict: bool = True
    ) -> Tensor:
        """``decode(encode(x))`` without codes; ``out`` (float32 of x's shape, ``x`` itself
        allowed) receives the result; ``strict=False`` lets NaN through as NaN."""
        x32 = check_float_tensor(x, self.name).to(torch.float32)
        if self.bits > 24 or strict:
            if self.bits > 24 or bool(torch.isnan(x32).any()):
                q = self.decode(self.encode(x32 if strict else torch.nan_to_num(x32, nan=0.0)))
                if not strict:
                    q = torch.where(torch.isnan(x32), x32, q)
                return q if out is None else out.copy_(q)
        q = torch.round(x32 * 2.0**self.frac_bits).clamp_(self.code_min, self.code_max).mul_(self.resolution)
        return q if out is None else out.copy_(q)

    @property
    def bits_per_value(self) -> float:
        return float(self.bits)

    def stored_bits(self, shape: tuple[int, ...]) -> int:
        n = 1
        for d in shape:
            n *= int(d)
        return n * self.bits

    def __str__(self) -> str:
        return self.name
