"""Integers whose scales (and zero points) are stored words: group-wise and asymmetric integers.

``IntAffine(bits=k, granularity, symmetric, scale_format)``, ``k`` in 2..16:

* symmetric (``int<k>_g<G>``, e.g. ``int4_g128``): a signed code ``c`` (k-bit two's complement,
  ``0bSMMM`` for k = 4) stands for ``c * scale``; codes ``+-(2**(k-1) - 1)``;
* asymmetric (``uint<k>_asym``, ``uint<k>_asym_per_channel``, ``uint<k>_asym_g<G>``): an
  unsigned code ``c`` in ``[0, 2**k)`` (``0bMMMM``) stands for ``(c - zero_point) * scale``, the
  zero point itself a k-bit unsigned code, as ``torch.quint8`` and GPTQ/AWQ checkpoints store it.

Scales live in a declared **scale format**, stored as words of that format: ``fp32`` (default),
``fp16`` or ``bf16`` (``int4_g128_fp16``, ``uint4_asym_g128_bf16``), one per group of ``G``
consecutive elements along the last axis (``PerGroup``: the input dimension of a Linear weight;
padding rule in ``quant_schemes.granularity``), per slice along an axis (``_per_channel``) or per
tensor.  ``int8_fp32`` / ``int8_per_channel_fp16`` are the symmetric per-tensor / per-channel
integers with their scale stored (and so in the fault space); plain ``int8`` and
``int8_per_channel`` (``IntSymmetric``) keep a float32 scale outside it.

``choose_qparams(x)`` (on the clean tensor):

* symmetric: ``scale = max|x| / (2**(k-1) - 1)`` per group, in float32;
* asymmetric (``torch.ao`` MinMaxObserver, affine): ``lo = min(min x, 0)``, ``hi = max(max x, 0)``,
  ``scale = (hi - lo) / (2**k - 1)``, ``zero_point = clamp(-round(lo / scale), 0, 2**k - 1)``
  computed with the scale *as stored*;

then the scale is clamped to ``[smallest normal, max]`` of the scale format (2^-126 for
fp32/bf16, 2^-14 for fp16: an all-zero group decodes to exact zeros and ``1/scale`` stays finite;
a scale beyond fp16's 65504 saturates and the codes clamp) and rounded to it (RNE).

``encode``: ``round_half_even(x * (1/scale)) [+ zero_point]``, reciprocal and product in float32
(exactly as ``torch.quantize_per_tensor`` / ``quantize_per_channel`` compute), clamped to the code
range.  ``decode``: ``code * scale`` or ``(code - zero_point) * scale``, rounded once to float32;
it reads the stored words, so a flipped scale or zero-point bit decodes as hardware would (a scale
turned NaN, inf or negative included).  NaN and +-inf raise ``FormatError`` (no integer code).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from quant_schemes._bits import field_names, pack_signed, roles_of, signed_codes
from quant_schemes._scaled import StoredScales, reduce_groups
from quant_schemes.base import Encoded, FormatError, QParams, check_float_tensor, finite_float32
from quant_schemes.floats import BF16, FP16, FP32, FloatFormat
from quant_schemes.granularity import Granularity, PerChannel, PerGroup, PerTensor

MIN_BITS, MAX_BITS = 2, 16
SCALE_FORMATS: dict[str, FloatFormat] = {"fp32": FP32, "fp16": FP16, "bf16": BF16}


@dataclass(frozen=True)
class IntAffine(StoredScales):
    """k-bit integer codes with stored scales (and zero points); see the module docstring."""

    bits: int
    granularity: Granularity = field(default_factory=PerTensor)
    symmetric: bool = True
    scale_format: str = "fp32"

    def __post_init__(self) -> None:
        kind = "int" if self.symmetric else "uint"
        if not isinstance(self.bits, int) or not MIN_BITS <= self.bits <= MAX_BITS:
            raise FormatError(f"{kind}{self.bits}: width k={self.bits} is outside {MIN_BITS}..{MAX_BITS}")
        if not isinstance(self.granularity, (PerTensor, PerChannel, PerGroup)):
            raise FormatError(
                f"{kind}{self.bits}: granularity must be PerTensor(), PerChannel(axis) or PerGroup(size), "
                f"got {self.granularity!r}"
            )
        if self.scale_format not in SCALE_FORMATS:
            raise FormatError(
                f"{kind}{self.bits}: scale format {self.scale_format!r} is not one of "
                f"{', '.join(SCALE_FORMATS)}"
            )

    # -- description ------------------------------------------------------------------------------
    @property
    def name(self) -> str:
        g = self.granularity
        base = f"int{self.bits}" if self.symmetric else f"uint{self.bits}_asym"
        if isinstance(g, PerGroup):
            base += f"_g{g.size}"
        elif isinstance(g, PerChannel):
            base += "_per_channel" + (f"_axis{g.axis}" if g.axis else "")
        # a symmetric per-tensor/per-channel name without suffix is IntSymmetric: always spell it
        plain = not self.symmetric or isinstance(g, PerGroup)
        return base if plain and self.scale_format == "fp32" else f"{base}_{self.scale_format}"

    @property
    def scale_fmt(self) -> FloatFormat:
        return SCALE_FORMATS[self.scale_format]

    @property
    def zero_point_bits(self) -> int:
        return 0 if self.symmetric else self.bits

    @property
    def qmin(self) -> int:
        return -(2 ** (self.bits - 1) - 1) if self.symmetric else 0

    @property
    def qmax(self) -> int:
        return 2 ** (self.bits - 1) - 1 if self.symmetric else 2**self.bits - 1

    @property
    def bit_names(self) -> tuple[str, ...]:
        if self.symmetric:
            return field_names("mag", self.bits - 1) + ("sign",)
        return field_names("mag", self.bits)

    @property
    def bit_roles(self) -> tuple[str, ...]:
        return roles_of(self.bit_names)

    # -- parameters -------------------------------------------------------------------------------
    def _finite_float32(self, x: object) -> Tensor:
        return finite_float32(x, self.name)

    def choose_qparams(self, x: Tensor, *, strict: bool = True) -> QParams:
        """Scale (and zero point) per group of the clean ``x``, as stored; see the module docstring.
        ``strict=False`` chooses them on the finite values instead of raising on NaN / inf."""
        if strict:
            return self._choose(self._finite_float32(x))
        x32 = check_float_tensor(x, self.name).to(torch.float32)
        return self._choose(torch.nan_to_num(x32, 0.0, 0.0, 0.0))

    def _store_scale(self, s: Tensor) -> tuple[Tensor, Tensor]:
        """(float32 value, stored code) of a float32 scale clamped into the scale format."""
        sf = self.scale_fmt
        s = s.clamp(min=sf.smallest_normal, max=sf.max)
        codes = sf.encode(s).qdata
        return sf.decode(Encoded(codes)), codes

    def _choose(self, x32: Tensor) -> QParams:
        g = self.granularity
        if isinstance(g, PerChannel):
            g._check(tuple(x32.shape), self.name)
        dev = x32.device
        if self.symmetric:
            amax = reduce_groups(x32, g, "absmax")
            scale, codes = self._store_scale(amax / torch.tensor(float(self.qmax), device=dev))
            return QParams(scale, codes)
        lo = reduce_groups(x32, g, "min").clamp(max=0.0)
        hi = reduce_groups(x32, g, "max").clamp(min=0.0)
        scale, codes = self._store_scale((hi - lo) / torch.tensor(float(self.qmax), device=dev))
        zp = (-torch.round(lo / scale)).clamp_(0, self.qmax).to(torch.int32)
        return QParams(scale, codes, zp)

    # -- element codec (the fault layer re-encodes single elements with their own scale) ------------
    def encode_elements(self, x32: Tensor, qp: QParams) -> Tensor:
        """Codes of float32 ``x32`` given the parameters of each element (``gather_qparams`` /
        ``expand_qparams``: scale and zero point broadcastable to ``x32``)."""
        q = torch.round(x32 * torch.reciprocal(qp.scale.to(torch.float32)))
        if not self.symmetric:
            q = q + qp.zero_point.to(torch.float32)  # type: ignore[union-attr]
        codes = q.clamp_(self.qmin, self.qmax).to(torch.int32)
        return pack_signed(codes, self.bits) if self.symmetric else codes

    def decode_elements(self, codes: Tensor, qp: QParams) -> Tensor:
        """float32 values of ``codes`` (bits above ``bits`` ignored) with per-element parameters."""
        if self.symmetric:
            c = signed_codes(codes, self.bits)
        else:
            mask = (1 << self.bits) - 1
            c = (codes & mask) - (qp.zero_point.to(torch.int32) & mask)  # type: ignore[union-attr]
        return c.to(torch.float32) * qp.scale.to(torch.float32)

    def saturated(self, x: Tensor, qparams: QParams) -> tuple[Tensor, float]:
        """Which finite values of ``x`` lie beyond the code range with these parameters (the code
        ``encode`` computes before it clamps), and the largest magnitude the format reaches."""
        x32 = check_float_tensor(x, self.name).to(torch.float32)
        qpe = self.expand_qparams(qparams, tuple(x32.shape))
        q = torch.round(x32 * torch.reciprocal(qpe.scale))
        if not self.symmetric:
            q = q + qpe.zero_point.to(torch.float32)  # type: ignore[union-attr]
        zp = 0.0 if self.symmetric else qparams.zero_point.float()  # type: ignore[union-attr]
        reach = (torch.maximum(self.qmax - zp, zp - self.qmin) * qparams.scale) if not self.symmetric else (
            self.qmax * qparams.scale)
        limit = float(reach.max()) if reach.numel() else 0.0
        return (q < self.qmin) | (q > self.qmax), limit

    def decode_scale(self, scale_codes: Tensor, tensor_scale: Tensor | None = None) -> Tensor:
        """float32 value of stored scale words (any pattern: a faulty one may be NaN, inf, < 0)."""
        return self.scale_fmt.decode(Encoded(scale_codes))

    # -- the Format protocol ----------------------------------------------------------------------
    def encode(self, x: Tensor, scale: QParams | None = None) -> Encoded:
        """Codes of ``x`` with ``scale`` (QParams from ``choose_qparams``; default: chosen on x)."""
        x32 = self._finite_float32(x)
        qp = self._qparams_of(scale, x32)
        codes = self.encode_elements(x32, self.expand_qparams(qp, tuple(x32.shape)))
        return Encoded(codes, qp.scale, qp.scale_codes, qp.zero_point)

    def decode(self, enc: Encoded) -> Tensor:
        """Values of the stored words (codes, scale codes, zero points): see the module docstring."""
        q, sc, zp = self._stored(enc)
        qp = QParams(self.decode_scale(sc), sc, zp)
        return self.decode_elements(q, self.expand_qparams(qp, tuple(q.shape)))

    def quantize(
        self, x: Tensor, scale: QParams | None = None, *, out: Tensor | None = None, strict: bool = True
    ) -> Tensor:
        """``decode(encode(x, scale))``; ``out`` receives the result; ``strict=False`` lets NaN through
        as NaN and saturates +-inf (scales chosen on the finite values)."""
        if strict:
            q = self.decode(self.encode(x, scale))
            return q if out is None else out.copy_(q)
        x32 = check_float_tensor(x, self.name).to(torch.float32)
        qp = self._qparams_of(scale, torch.nan_to_num(x32, 0.0, 0.0, 0.0))
        qpe = self.expand_qparams(qp, tuple(x32.shape))
        q = self.decode_elements(self.encode_elements(torch.nan_to_num(x32, nan=0.0), qpe), qpe)
        q = torch.where(torch.isnan(x32), x32, q)
        return q if out is None else out.copy_(q)

    def __str__(self) -> str:
        return self.name


__all__ = ["IntAffine", "SCALE_FORMATS"]
