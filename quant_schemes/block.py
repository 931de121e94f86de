"""Block formats: OCP Microscaling (MX v1.0) and NVIDIA's NVFP4.

``BlockFormat(element, block, scale)``: consecutive ``block`` elements along the last axis share
one stored scale word (padding rule: ``quant_schemes.granularity``; a last axis of 40 with blocks
of 32 gives a block of 32 and one of 8, each with its own scale).

============== ============= ===== ======================= ===================== ==============
name           element       block scale                   bits per value        element max
============== ============= ===== ======================= ===================== ==============
``mxfp8_e4m3`` E4M3 ``SEEEEMMM`` 32  E8M0                    8 + 8/32 = 8.25       448
``mxfp8_e5m2`` E5M2 ``SEEEEEMM`` 32  E8M0                    8.25                  57344
``mxfp6_e3m2`` E3M2 ``SEEEMM``   32  E8M0                    6.25                  28
``mxfp6_e2m3`` E2M3 ``SEEMMM``   32  E8M0                    6.25                  7.5
``mxfp4``      E2M1 ``SEEM``     32  E8M0                    4.25                  6
``mxint8``     INT8 ``SMMMMMMM`` 32  E8M0                    8.25                  127/64
``nvfp4``      E2M1 ``SEEM``     16  E4M3 + FP32 per tensor  4 + 8/16 = 4.5        6
============== ============= ===== ======================= ===================== ==============

**MX** (OCP Microscaling Formats v1.0, section 6.3): per block, ``X = 2**(floor(log2(amax)) -
emax_elem)`` with ``amax`` the largest magnitude in the block and ``emax_elem`` the exponent of
the element type's largest power of two (E4M3 8, E5M2 15, E3M2 4, E2M3 2, E2M1 2, INT8 0);
the exponent is stored as E8M0 (``0bEEEEEEEE``, code ``c`` = ``2**(c - 127)``), clamped below at
2^-127 (code 0: an all-zero block, or one whose amax is below 2^-127 * 2**emax_elem).  Elements
are ``V / X`` rounded to the element type, ties to even, **saturating** at its max (the spec's
"clamping"; E5M2 elements too).  MXINT8 elements are 8-bit two's complement with an implicit
2^-6 (``q2.6``): ``[-2, 127/64]``, RNE, saturating (so -2 = ``0x80`` is reachable, as the range
the spec gives allows).  A block holding NaN or +-inf gets the NaN scale ``0xFF`` (E8M0 has no
infinity; floor(log2(inf)) is no exponent) and zero element codes; it decodes to NaN.  Decoding
is ``X * P`` in float32: exact, except that a product beyond float32's range (only reachable
through a faulty scale) overflows to +-inf.

**NVFP4** (NVIDIA, as torchao's reference implements it): a float32 per-tensor scale
``t = amax(tensor) / (448 * 6)`` (floor 2^-120, so ``1/t`` divided by the smallest block scale
stays finite); per block of 16, ``s = e4m3(clamp((amax(block) / 6) / t, 2^-6, 448))`` (RNE, the
E4M3 sign bit stored as 0); elements ``e2m1(clamp(x * ((1/t) / s), -6, 6))``; decoding
``P * (t * s)`` in float32.  A block holding NaN or +-inf gets the E4M3 NaN code ``0x7F`` and
decodes to NaN; ``t`` is computed from the finite values.  The per-tensor scale is one float32
word per tensor, kept outside the fault space (the scale *words* that faults hit are the E4M3
block scales).

A scale word governs its whole block: ``decode`` reads ``scale_codes``, so one flipped scale bit
rescales 16 or 32 values at once (an E8M0 exponent bit by a power of two up to 2^128, or to NaN).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from quant_schemes._scaled import StoredScales, group_view
from quant_schemes.base import Encoded, FormatError, QParams, check_float_tensor
from quant_schemes.fixed import FixedPoint
from quant_schemes.floats import E8M0, FP4_E2M1, FP6_E2M3, FP6_E3M2, FP8_E4M3, FP8_E5M2, FloatFormat
from quant_schemes.granularity import PerGroup

Element = FloatFormat | FixedPoint
#: MXINT8's element: 8-bit two's complement with an implicit scale 2^-6
INT8_ELEMENT = FixedPoint(2, 6)
SCALE_TYPES: dict[str, object] = {"e8m0": E8M0(), "e4m3": FP8_E4M3}
#: the element types of the MX specification, by the name they take in a format name
MX_ELEMENTS: dict[str, Element] = {
    "fp8_e4m3": FP8_E4M3,
    "fp8_e5m2": FP8_E5M2,
    "fp6_e3m2": FP6_E3M2,
    "fp6_e2m3": FP6_E2M3,
    "fp4": FP4_E2M1,
    "int8": INT8_ELEMENT,
}
NVFP4_TENSOR_DIVISOR = 448.0 * 6.0
NVFP4_MIN_TENSOR_SCALE = 2.0**-120


@dataclass(frozen=True)
class BlockFormat(StoredScales):
    """Blocks of ``block`` elements along the last axis sharing one stored scale; see the module
    docstring.  ``scale="e8m0"`` is MX (any MX element type), ``scale="e4m3"`` is NVFP4 (E2M1
    elements, a float32 second-level scale per tensor)."""

    element: Element
    block: int = 32
    scale: str = "e8m0"

    def __post_init__(self) -> None:
        if self.element not in MX_ELEMENTS.values():
            raise FormatError(
                f"block format: element {getattr(self.element, 'name', self.element)!r} is not an MX "
                f"element type; allowed: {', '.join(e.name for e in MX_ELEMENTS.values())}"
            )
        if not isinstance(self.block, int) or isinstance(self.block, bool) or self.block < 1:
            raise FormatError(f"block format: block size must be an int >= 1, got {self.block!r}")
        if self.scale not in SCALE_TYPES:
            raise FormatError(f"block format: scale {self.scale!r} is not one of {', '.join(SCALE_TYPES)}")
        if self.scale == "e4m3" and self.element != FP4_E2M1:
            raise FormatError("block format: an E4M3 block scale (NVFP4) needs fp4_e2m1 elements")

    # -- description ------------------------------------------------------------------------------
    @property
    def name(self) -> str:
        if self.scale == "e4m3":
            return "nvfp4" if self.block == 16 else f"nvfp4_b{self.block}"
        elem = next(k for k, v in MX_ELEMENTS.items() if v == self.element)
        base = "mx" + elem
        return base if self.block == 32 else f"{base}_b{self.block}"

    @property
    def granularity(self) -> PerGroup:  # type: ignore[override]
        return PerGroup(self.block)

    @property
    def scale_fmt(self):  # type: ignore[override]
        return SCALE_TYPES[self.scale]

    @property
    def tensor_scale_bits(self) -> int:
        """Bits of the second-level per-tensor scale (NVFP4: 32), kept outside the fault space."""
        return 32 if self.scale == "e4m3" else 0

    @property
    def bits(self) -> int:
        return self.element.bits

    @property
    def bit_names(self) -> tuple[str, ...]:
        return self.element.bit_names

    @property
    def bit_roles(self) -> tuple[str, ...]:
        return self.element.bit_roles

    @property
    def emax_elem(self) -> int:
        """Exponent of the largest power of two of the element type (the spec's emax_elem)."""
        return math.floor(math.log2(self.element.max))

    @property
    def element_max(self) -> float:
        return float(self.element.max)

    # -- parameters -------------------------------------------------------------------------------
    def choose_qparams(self, x: Tensor, *, strict: bool = True) -> QParams:
        """The block scales of ``x`` (and NVFP4's tensor scale); never raises on NaN / inf (their
        blocks get the NaN scale), so ``strict`` changes nothing."""
        return self._choose(check_float_tensor(x, self.name).to(torch.float32))

    def _choose(self, x32: Tensor) -> QParams:
        shape = self.scale_shape(tuple(x32.shape))
        if x32.numel() == 0:
            z = torch.zeros(shape, dtype=torch.int32, device=x32.device)
            ts = torch.tensor(1.0, device=x32.device) if self.scale == "e4m3" else None
            return QParams(self.decode_scale(z, ts), z, None, ts)
        blocks = group_view(x32, self.block)
        amax = blocks.abs().amax(dim=-1).reshape(shape)  # NaN if the block holds one
        bad = ~torch.isfinite(amax)
        if self.scale == "e8m0":
            field = (amax.view(torch.int32) >> 23) & 0xFF  # floor(log2 amax) + 127 (0: < 2^-126)
            codes = (field - self.emax_elem).clamp_(min=0)
            codes = torch.where(bad, torch.full_like(codes, 0xFF), codes)
            return QParams(self.decode_scale(codes), codes)
        finite = torch.where(bad, torch.zeros_like(amax), amax)
        dev = x32.device
        t = (finite.amax() / torch.tensor(NVFP4_TENSOR_DIVISOR, device=dev)).clamp(min=NVFP4_MIN_TENSOR_SCALE)
        s = (finite / torch.tensor(6.0, device=dev)) / t
        codes = FP8_E4M3.encode(s.clamp(min=2.0**-6, max=448.0)).qdata
        codes = torch.where(bad, torch.full_like(codes, 0x7F), codes)
        return QParams(self.decode_scale(codes, t), codes, None, t)

    def saturated(self, x: Tensor, qparams: QParams) -> tuple[Tensor, float]:
        """Which finite values of ``x`` lie beyond the element range once scaled (they saturate),
        and the largest magnitude the format reaches with these scales."""
        x32 = check_float_tensor(x, self.name).to(torch.float32)
        qpe = self.expand_qparams(qparams, tuple(x32.shape))
        if self.scale == "e8m0":
            v = x32 / qpe.scale
        else:
            v = x32 * (torch.reciprocal(qpe.tensor_scale.float()) / FP8_E4M3.decode(Encoded(qpe.scale_codes)))
        low = self.element.min if isinstance(self.element, FixedPoint) else -self.element_max
        finite = qparams.scale[torch.isfinite(qparams.scale)]
        limit = float(finite.max()) * self.element_max if finite.numel() else 0.0
        return (v > self.element_max) | (v < low), limit

    # -- element codec ------------------------------------------------------------------------------
    def decode_scale(self, scale_codes: Tensor, tensor_scale: Tensor | None = None) -> Tensor:
        """float32 scale of stored scale words: ``2**(c - 127)`` (E8M0, NaN for 0xFF), or
        ``tensor_scale * e4m3(c)`` (NVFP4); any pattern, a faulty one included."""
        if self.scale == "e8m0":
            return self.scale_fmt.decode(Encoded(scale_codes))
        if tensor_scale is None:
            raise FormatError(f"{self.name}: decoding E4M3 block scales needs the tensor scale")
        return tensor_scale.to(torch.float32) * FP8_E4M3.decode(Encoded(scale_codes))

    def _element_codes(self, v: Tensor) -> Tensor:
        """Codes of the scaled values ``v`` (float32, no NaN), saturating at the element's max
        (+-inf included)."""
        if isinstance(self.element, FixedPoint):  # saturates itself, at [-2, 127/64] for INT8
            return self.element.encode(v).qdata
        m = self.element_max
        return self.element.encode(v.clamp(-m, m)).qdata

    def encode_elements(self, x32: Tensor, qp: QParams) -> Tensor:
        """Element codes of float32 ``x32`` given each element's parameters (``gather_qparams`` /
        ``expand_qparams``): ``x / X`` (MX) or ``x * ((1/t) / s)`` (NVFP4, reproducing its
        reciprocal), saturating; a NaN quotient (a NaN scale) gives code 0."""
        if self.scale == "e8m0":
            v = x32 / qp.scale
        else:
            bs = FP8_E4M3.decode(Encoded(qp.scale_codes))
            v = x32 * (torch.reciprocal(qp.tensor_scale.to(torch.float32)) / bs)  # type: ignore[union-attr]
        nan = torch.isnan(v)
        return torch.where(nan, 0, self._element_codes(torch.where(nan, torch.zeros_like(v), v)))

    def decode_elements(self, codes: Tensor, qp: QParams) -> Tensor:
        """float32 ``element(code) * scale`` (scale per element, broadcastable)."""
        return self.element.decode(Encoded(codes)) * qp.scale.to(torch.float32)

    # -- the Format protocol ----------------------------------------------------------------------
    def encode(self, x: Tensor, scale: QParams | None = None) -> Encoded:
        """Element and scale codes of ``x`` (``scale``: QParams, default chosen on x)."""
        x32 = check_float_tensor(x, self.name).to(torch.float32)
        qp = self._qparams_of(scale, x32)
        codes = self.encode_elements(x32, self.expand_qparams(qp, tuple(x32.shape)))
        return Encoded(codes, qp.scale, qp.scale_codes, None, qp.tensor_scale)

    def decode(self, enc: Encoded) -> Tensor:
        """``element * block scale`` from the stored words (element codes, scale codes, tensor scale)."""
        q, sc, _ = self._stored(enc)
        if self.scale == "e4m3" and enc.tensor_scale is None:
            raise FormatError(f"{self.name}: Encoded.tensor_scale is None; NVFP4 needs its per-tensor scale")
        qp = QParams(self.decode_scale(sc, enc.tensor_scale), sc, None, enc.tensor_scale)
        return self.decode_elements(q, self.expand_qparams(qp, tuple(q.shape)))

    def quantize(
        self, x: Tensor, scale: QParams | None = None, *, out: Tensor | None = None, strict: bool = True
    ) -> Tensor:
        """``decode(encode(x, scale))``; ``out`` receives the result.  Block formats never raise
        on NaN / inf (``strict`` is accepted for a uniform signature)."""
        q = self.decode(self.encode(x, scale))
        return q if out is None else out.copy_(q)

    def __str__(self) -> str:
        return self.name


MXFP8_E4M3 = BlockFormat(FP8_E4M3)
MXFP8_E5M2 = BlockFormat(FP8_E5M2)
MXFP6_E3M2 = BlockFormat(FP6_E3M2)
MXFP6_E2M3 = BlockFormat(FP6_E2M3)
MXFP4 = BlockFormat(FP4_E2M1)
MXINT8 = BlockFormat(INT8_ELEMENT)
NVFP4 = BlockFormat(FP4_E2M1, 16, "e4m3")

__all__ = ["BlockFormat", "MXFP4", "MXFP6_E2M3", "MXFP6_E3M2", "MXFP8_E4M3", "MXFP8_E5M2", "MXINT8", "NVFP4"]
