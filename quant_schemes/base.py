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
  ``qdata`` for scaled integer formats;
* ``decode`` always returns float32 of the same shape and device.
"""

from __future__ import annotations

import dataclasses
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

    def replace(self, **changes: object) -> Encoded:
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

    def choose_qparams(self, x: Tensor) -> Tensor | None:
        """The scale for ``x`` (None for float formats).  Computed once on clean data."""
        ...

    def encode(self, x: Tensor, scale: Tensor | None = None) -> Encoded:
        """Codes of ``x``; integer formats use ``scale`` if given, else ``choose_qparams(x)``."""
        ...

    def decode(self, enc: Encoded) -> Tensor:
        """float32 values of the codes."""
        ...

    def quantize(self, x: Tensor, scale: Tensor | None = None) -> Tensor:
        """``decode(encode(x, scale))``."""
        ...


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
