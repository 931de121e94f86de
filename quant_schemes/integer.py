"""Symmetric scaled integers ``int<k>`` (one scale per tensor) and ``int<k>_per_channel``.

``IntSymmetric(bits=k, granularity=PerTensor() | PerChannel(axis))``, ``k`` in 2..32.
A signed code ``c`` stands for ``c * scale``; codes are stored as the k-bit two's complement
pattern (layout of ``int8``: ``0bSMMMMMMM``).

* ``choose_qparams(x)``: ``scale = max|x| / (2**(k-1) - 1)`` in float32, over the whole tensor
  (a 0-d tensor) or over every slice along ``axis`` (shape ``(1, .., C, .., 1)``, e.g.
  ``(C, 1, 1, 1)`` for a conv weight).  Scales are clamped below at the smallest normal
  float32, ``2**-126``, so an all-zero tensor or channel gets ``scale = 2**-126``: it encodes
  to code 0, decodes to exact zeros, ``1/scale`` stays finite, and a flipped bit there yields
  a value of magnitude at most ``2**-95``.
* ``encode(x, scale)``: ``round_half_even(x * (1/scale))`` with the reciprocal and the product
  in float32, exactly as ``torch.quantize_per_tensor`` / ``quantize_per_channel`` compute
  (they multiply by ``1.0f / scale``; dividing differs in the last place for some inputs),
  then clamped to ``+-(2**(k-1) - 1)`` (symmetric: the code ``-2**(k-1)`` is never produced,
  but a flipped bit can reach it and it decodes to ``-2**(k-1) * scale``, as hardware would).
  For ``k > 24`` the float32 product limits the precision of the codes, as float32 inputs do.
* ``decode``: ``code * scale`` rounded once to float32 (exact products up to k = 29).

NaN and +-inf have no integer code: ``choose_qparams`` and ``encode`` raise ``FormatError``
naming how many there are.  Inputs of other float dtypes are converted to float32 first.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from quant_schemes._bits import check_qdata, field_names, pack_signed, roles_of, signed_codes
from quant_schemes.base import Encoded, FormatError, check_float_tensor, finite_float32, in_pieces
from quant_schemes.granularity import Granularity, PerChannel, PerGroup, PerTensor

MIN_BITS, MAX_BITS = 2, 32
#: smallest scale ``choose_qparams`` returns (smallest normal float32)
MIN_SCALE = 2.0**-126




@dataclass(frozen=True)
class IntSymmetric:
    """Symmetric (zero point 0) k-bit integer with a float32 scale."""

    bits: int
    granularity: Granularity = field(default_factory=PerTensor)

    def __post_init__(self) -> None:
        if not isinstance(self.bits, int) or not MIN_BITS <= self.bits <= MAX_BITS:
            raise FormatError(f"int{self.bits}: width k={self.bits} is outside {MIN_BITS}..{MAX_BITS}")
        if not isinstance(self.granularity, (PerTensor, PerChannel)):
            hint = " (groups: IntAffine, e.g. get_format('int4_g128'))" if isinstance(
                self.granularity, PerGroup) else ""
            raise FormatError(
                f"int{self.bits}: granularity must be PerTensor() or PerChannel(axis), "
                f"got {self.granularity!r}{hint}"
            )

    @property
    def name(self) -> str:
        g = self.granularity
        if isinstance(g, PerTensor):
            return f"int{self.bits}"
        return f"int{self.bits}_per_channel" + (f"_axis{g.axis}" if g.axis else "")

    @property
    def qmax(self) -> int:
        """Largest code encode produces; the smallest is ``-qmax``."""
        return 2 ** (self.bits - 1) - 1

    max = qmax

    @property
    def bit_names(self) -> tuple[str, ...]:
        return field_names("mag", self.bits - 1) + ("sign",)

    @property
    def bit_roles(self) -> tuple[str, ...]:
        return roles_of(self.bit_names)

    # -- parameters --------------------------------------------------------------------------
    def _finite_float32(self, x: object) -> Tensor:
        return finite_float32(x, self.name)

    def _amax(self, x32: Tensor) -> Tensor:
        g = self.granularity
        if isinstance(g, PerTensor):
            return x32.abs().amax() if x32.numel() else x32.new_zeros(())
        if g.axis >= x32.dim():
            raise FormatError(
                f"{self.name}: per-channel axis {g.axis} needs a tensor with more than {g.axis} "
                f"dimension(s), got shape {tuple(x32.shape)}"
            )
        dims = [d for d in range(x32.dim()) if d != g.axis]
        if not dims:
            return x32.abs()
        if x32.numel() == 0:  # amax refuses to reduce an empty dimension: every channel is empty
            return x32.new_zeros([n if d == g.axis else 1 for d, n in enumerate(x32.shape)])
        return x32.abs().amax(dim=dims, keepdim=True)

    def choose_qparams(self, x: Tensor) -> Tensor:
        """float32 scale ``max|x| / qmax`` (clamped below at ``2**-126``), computed on clean ``x``."""
        return self._scale_of(self._finite_float32(x))

    def _scale_of(self, x32: Tensor) -> Tensor:
        # divide by a tensor: torch's CUDA kernel divides by a Python scalar as a multiplication
        # by its reciprocal, which rounds differently from the CPU's true division
        qmax = torch.tensor(float(self.qmax), dtype=torch.float32, device=x32.device)
        return (self._amax(x32) / qmax).clamp_(min=MIN_SCALE)

    def _check_scale(self, scale: object, x32: Tensor) -> Tensor:
        if not isinstance(scale, Tensor):
            raise FormatError(f"{self.name}: scale must be a float tensor, got {type(scale).__name__}")
        s = scale.to(device=x32.device, dtype=torch.float32)
        if not _broadcasts_to(tuple(s.shape), tuple(x32.shape)):
            raise FormatError(
                f"{self.name}: scale of shape {tuple(s.shape)} does not broadcast to "
                f"x of shape {tuple(x32.shape)}"
            )
        if not bool(((s > 0) & torch.isfinite(s)).all()):
            raise FormatError(
                f"{self.name}: scale must be positive and finite, got {s.flatten()[:8].tolist()}"
            )
        return s

    # -- codes -------------------------------------------------------------------------------
    def encode(self, x: Tensor, scale: Tensor | None = None) -> Encoded:
        """Codes of ``x`` with ``scale`` (default ``choose_qparams(x)``); see the module docstring."""
        x32 = self._finite_float32(x)
        s = self._scale_of(x32) if scale is None else self._check_scale(scale, x32)
        q = torch.round(x32 * torch.reciprocal(s))
        if self.bits <= 24:  # qmax is exact in float32
            codes = q.clamp_(-self.qmax, self.qmax).to(torch.int32)
        else:
            codes = q.to(torch.float64).clamp_(-self.qmax, self.qmax).to(torch.int64)
        return Encoded(pack_signed(codes, self.bits), s)

    def decode(self, enc: Encoded) -> Tensor:
        """``signed(code) * scale`` as float32 (bits above ``bits`` are ignored)."""
        q = check_qdata(enc.qdata, self.name)
        if enc.scale is None:
            raise FormatError(f"{self.name}: Encoded.scale is None; scaled integer codes need their scale")
        codes = signed_codes(q, self.bits)
        if self.bits <= 24:
            return codes.to(torch.float32) * enc.scale.to(torch.float32)
        return (codes.to(torch.float64) * enc.scale.to(torch.float64)).to(torch.float32)

    def quantize(
        self, x: Tensor, scale: Tensor | None = None, *, out: Tensor | None = None, strict: bool = True
    ) -> Tensor:
        """``decode(encode(x, scale))`` in three passes, without codes.

        ``out`` (float32 of x's shape; ``x`` itself allowed: in place) receives the result.
        ``strict=False`` lets NaN through as NaN and saturates +-inf to +-qmax * scale instead of
        raising (what an activation hook wants)."""
        x = check_float_tensor(x, self.name)
        if strict:
            self._finite_float32(x)  # NaN / inf raise, as encode does
        if scale is None:
            x32 = x.to(torch.float32)
            scale = self._scale_of(x32 if strict else torch.nan_to_num(x32, 0.0, 0.0, 0.0))
        if self.bits > 24:  # codes beyond float32's integers: through int64 codes
            q = self.decode(self.encode(x if strict else torch.nan_to_num(x), scale))
            return q if out is None else out.copy_(q)
        s = self._check_scale(scale, x)
        r = torch.reciprocal(s)
        if out is x and x.dtype == torch.float32 and s.numel() == 1:  # in place, piece by piece
            lo, hi, r0, s0 = -self.qmax, self.qmax, r.reshape(()), s.reshape(())  # 0-d: any piece shape
            return in_pieces(x, lambda piece: piece.mul_(r0).round_().clamp_(lo, hi).mul_(s0))
        if out is not None and x.dtype == torch.float32:
            q = out.mul_(r) if out is x else torch.mul(x, r, out=out)
            q.round_()
        else:
            q = torch.round(x.to(torch.float32) * r)
            if out is not None:
                q = out.copy_(q)
        return q.clamp_(-self.qmax, self.qmax).mul_(s)

    @property
    def bits_per_value(self) -> float:
        """Code bits per value; the float32 scale (one per tensor or channel) is amortised."""
        return float(self.bits)

    def stored_bits(self, shape: tuple[int, ...]) -> int:
        """Codes plus one float32 scale per tensor / channel (the memory the tensor takes; the
        scale itself is not in the fault space: ``int8_fp32`` puts it there)."""
        n = 1
        for d in shape:
            n *= int(d)
        g = self.granularity
        scales = 1 if isinstance(g, PerTensor) else int(shape[g.axis]) if g.axis < len(shape) else 1
        return n * self.bits + 32 * scales

    def __str__(self) -> str:
        return self.name


def _broadcasts_to(small: tuple[int, ...], shape: tuple[int, ...]) -> bool:
    """Whether ``small`` broadcasts to exactly ``shape`` (plain Python: ``torch.broadcast_shapes``
    imports torch._refs on first use, ~0.6 s)."""
    if len(small) > len(shape):
        return False
    return all(a in (1, b) for a, b in zip(reversed(small), reversed(shape), strict=False))
