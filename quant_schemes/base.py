"""The contract every numeric format obeys.

A *format* is a small frozen value (a dataclass) that converts a float tensor to integer codes
and back.  The fault layer (`qfi`) depends only on what is written here.

Conventions, the same in every format:

* bit 0 is the least significant bit; the sign (where there is one) is bit ``bits - 1``;
* ``Encoded.qdata`` is an ``int32`` tensor of the input's shape holding the bit pattern:
  for ``bits < 32`` it is the *unsigned* pattern in ``[0, 2**bits)`` (so XOR-ing any bit
  below ``bits`` keeps it a valid code); for ``bits == 32`` it is the pattern reinterpreted as
  a signed int32 (``qdata.long() & 0xFFFFFFFF`` is the unsigned pattern);
* ``Encoded.scale`` is ``None`` for float formats and a float32 tensor broadcastable to
  ``qdata`` for the per-tensor / per-channel integers (``int8``, ``int8_per_channel``);
* formats that **store** their scales (group-wise and asymmetric integers, MX, NVFP4) also fill
  ``scale_codes`` (int32 bit patterns of the stored scales, in the format's scale format),
  ``zero_point`` (int32 k-bit codes, asymmetric integers) and ``tensor_scale`` (NVFP4's float32
  second-level scale); their ``scale`` is the float32 value of ``scale_codes``, in the shape of
  the scale array (``fmt.granularity.scale_shape(x.shape)``, e.g. ``(rows, n_groups)``), which
  need not broadcast to ``qdata``; ``decode`` reads the stored words (``qdata``,
  ``scale_codes``, ``zero_point``, ``tensor_scale``), so ``enc.replace(scale_codes=faulty)``
  decodes with a faulty scale;
* ``decode`` always returns float32 of the same shape and device.

The stored words of a format form its *parts* (``stored_parts(fmt)``): ``"codes"`` (one
``fmt.bits``-bit word per element), ``"scales"`` and ``"zero_points"`` (one word per scale
group, ``part_bits(fmt, part)`` bits wide); a fault layer may hit any of them.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch
from torch import Tensor


class FormatError(ValueError):
    """Bad format name, bad format parameters, or input a format cannot encode."""


@dataclass(frozen=True)
class Encoded:
    """Codes of one tensor in one format.

    ``dataclasses.replace(enc, qdata=faulty)`` gives a faulty encoding that decodes with the
    clean scale.
    """

    qdata: Tensor
    scale: Tensor | None = None
    scale_codes: Tensor | None = None
    zero_point: Tensor | None = None
    tensor_scale: Tensor | None = None

    def replace(self, **changes: object) -> Encoded:
        return dataclasses.replace(self, **changes)

    @property
    def qparams(self) -> QParams | Tensor | None:
        """What ``encode(x, qparams)`` takes to reproduce these codes: the scale tensor for
        formats that do not store their scales, else a QParams."""
        if self.scale_codes is None:
            return self.scale
        return QParams(self.scale, self.scale_codes, self.zero_point, self.tensor_scale)


@dataclass(frozen=True)
class QParams:
    """The chosen parameters of a format that stores its scales: ``scale`` (float32 value of
    ``scale_codes``, one per scale group), ``scale_codes`` (int32 stored patterns),
    ``zero_point`` (int32 codes or None) and ``tensor_scale`` (float32 0-d or None)."""

    scale: Tensor
    scale_codes: Tensor
    zero_point: Tensor | None = None
    tensor_scale: Tensor | None = None

    def replace(self, **changes: object) -> QParams:
        return dataclasses.replace(self, **changes)


@runtime_checkable
class Format(Protocol):
    """What the fault layer may rely on."""

    @property
    def name(self) -> str: ...

    @property
    def bits(self) -> int: ...

    @property
    def bit_names(self) -> tuple[str, ...]:
        """One label per bit, index 0 = LSB, e.g. ``("mantissa0", ..., "exponent0", ..., "sign")``."""
        ...

    def choose_qparams(self, x: Tensor) -> Tensor | QParams | None:
        """The scale for ``x`` (None for float formats; a QParams for formats that store their
        scales).  Computed once on clean data."""
        ...

    def encode(self, x: Tensor, scale: Tensor | QParams | None = None) -> Encoded:
        """Codes of ``x``; integer formats use ``scale`` if given, else ``choose_qparams(x)``."""
        ...

    def decode(self, enc: Encoded) -> Tensor:
        """float32 values of the codes."""
        ...

    def quantize(
        self, x: Tensor, scale: object = None, *, out: Tensor | None = None, strict: bool = True
    ) -> Tensor:
        """``decode(encode(x, scale))`` as float32, through the format's own fast path (no codes
        where it can).  ``out`` (float32, x's shape; ``x`` itself allowed: in place) receives the
        result and is returned; ``strict=False`` lets NaN through as NaN (and saturates +-inf)
        where ``encode`` would raise, which is what an activation hook wants."""
        ...


#: elements per piece of an in-place elementwise pass on the CPU: 8 MiB of float32 stays in a
#: server CPU's last-level cache, so a chain of elementwise ops (cast down and back, or
#: scale-round-clamp-scale) streams the tensor through memory once instead of once per op, while
#: each op still has enough work to amortise waking the thread pool (OMP_WAIT_POLICY=PASSIVE):
#: on the 2-core machine this was measured on, 30% off an fp16 or int8 pass over a 32 MiB map
CHUNK = 1 << 21


def in_pieces(x: Tensor, fn: Callable[[Tensor], object]) -> Tensor:
    """Run the in-place elementwise ``fn`` over ``x`` piece by piece (a contiguous CPU tensor of
    more than two pieces that autograd does not track), else over ``x`` whole; returns ``x``.
    Elementwise ops give the same values either way: only the memory traffic changes."""
    whole = x.device.type != "cpu" or x.numel() <= 2 * CHUNK or not x.is_contiguous()
    if whole or (x.requires_grad and torch.is_grad_enabled()):
        fn(x)
        return x
    for piece in x.view(-1).split(CHUNK):
        fn(piece)
    return x


def check_float_tensor(x: object, fmt_name: str) -> Tensor:
    """Raise FormatError unless ``x`` is a floating-point tensor."""
    if not isinstance(x, Tensor):
        raise FormatError(f"{fmt_name}: expected a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise FormatError(
            f"{fmt_name}: expected a floating-point tensor (float32, float16, bfloat16, float64), "
            f"got dtype {x.dtype}"
        )
    return x


def finite_float32(x: object, fmt_name: str) -> Tensor:
    """``x`` as float32; FormatError (naming the NaN and inf counts) unless every value is finite:
    integer formats have no code for NaN or infinity."""
    x32 = check_float_tensor(x, fmt_name).to(torch.float32)
    if not bool(torch.isfinite(x32).all()):
        n_nan, n_inf = int(torch.isnan(x32).sum()), int(torch.isinf(x32).sum())
        raise FormatError(
            f"{fmt_name}: cannot encode {n_nan} NaN and {n_inf} inf value(s); "
            "integer formats have no code for NaN or infinity"
        )
    return x32


def gather_scale(
    scale: Tensor | None, shape: torch.Size | tuple[int, ...], flat_idx: Tensor
) -> Tensor | None:
    """The scale of each element ``flat_idx`` (indices into a contiguous tensor of ``shape``).

    ``scale`` is broadcastable to ``shape``; the result is 1-D (one scale per index) or None,
    on ``scale``'s device (``flat_idx`` may live elsewhere, e.g. CPU sites for a CUDA scale).
    Never materialises the broadcast scale: cost is O(len(flat_idx)).
    """
    if scale is None:
        return None
    if scale.numel() == 1:
        return scale.reshape(1).expand(flat_idx.numel())
    shape = tuple(shape)
    s = scale.reshape((1,) * (len(shape) - scale.dim()) + tuple(scale.shape))
    # index into the (small) scale tensor, dimension by dimension
    rem = flat_idx.to(device=scale.device, dtype=torch.int64)
    s_idx = torch.zeros_like(rem)
    s_stride = 1
    for d in range(len(shape) - 1, -1, -1):
        coord = rem % shape[d]
        rem = rem // shape[d]
        if s.shape[d] != 1:
            s_idx = s_idx + coord * s_stride
            s_stride *= s.shape[d]
    return s.contiguous().reshape(-1).index_select(0, s_idx)


# -- stored parts: what a fault layer may hit ------------------------------------------------------
#: the parts a format may store, in the order a fault space lays them out
PARTS = ("codes", "scales", "zero_points")


def stored_parts(fmt: object) -> tuple[str, ...]:
    """The parts ``fmt`` stores as words a fault may hit: ``("codes",)`` for float and fixed-point
    formats and for ``int<k>`` / ``int<k>_per_channel`` (whose float32 scale is kept outside the
    fault space), ``("codes", "scales")`` or ``("codes", "scales", "zero_points")`` for formats
    that store their scales (``fmt.parts``)."""
    return tuple(getattr(fmt, "parts", ("codes",)))


def part_bits(fmt: object, part: str) -> int:
    """Width in bits of one word of ``part`` (``fmt.bits`` for the codes)."""
    if part == "codes":
        return int(fmt.bits)  # type: ignore[attr-defined]
    _check_part(fmt, part)
    return int(fmt.part_bits(part))  # type: ignore[attr-defined]


def part_bit_names(fmt: object, part: str) -> tuple[str, ...]:
    """One label per bit of a ``part`` word, index 0 = LSB: the codes' ``bit_names``, else names
    with the part's prefix (``scale.exp7``, ``zp.mag0``)."""
    if part == "codes":
        return tuple(fmt.bit_names)  # type: ignore[attr-defined]
    _check_part(fmt, part)
    return tuple(fmt.part_bit_names(part))  # type: ignore[attr-defined]


def part_bit_roles(fmt: object, part: str) -> tuple[str, ...]:
    """Coarse role of each bit of a ``part`` word (``scale exponent``, ``zero point``, ...)."""
    if part == "codes":
        return tuple(fmt.bit_roles)  # type: ignore[attr-defined]
    _check_part(fmt, part)
    return tuple(fmt.part_bit_roles(part))  # type: ignore[attr-defined]


def bits_per_value(fmt: object) -> float:
    """Stored bits per value of a large tensor, scales and zero points included (``fp32`` 32,
    ``int8`` 8 (one scale per tensor, amortised), ``mxfp4`` 4.25, ``nvfp4`` 4.5,
    ``int4_g128_fp16`` 4.125); see ``fmt.stored_bits(shape)`` for an exact count."""
    b = getattr(fmt, "bits_per_value", None)
    return float(b) if b is not None else float(fmt.bits)  # type: ignore[attr-defined]


def _check_part(fmt: object, part: str) -> None:
    parts = stored_parts(fmt)
    if part not in parts:
        name = getattr(fmt, "name", fmt)
        raise FormatError(f"format {name!r} stores no {part!r}; its parts are {', '.join(parts)}")
