"""Which elements share a scale: ``PerTensor()``, ``PerChannel(axis)``, ``PerGroup(size)``.

A granularity maps a tensor shape to the shape of its scale array and every element to the
scale word it uses (``scale_index``), and back (``scale_members``).  Groups run along the
**last axis** (the input dimension of a Linear weight ``(out, in)``, the feature dimension of
an activation ``(..., features)``).  Padding rule: when the last axis ``n`` is not a multiple
of ``size``, the last group of each row holds the ``n % size`` remaining elements and its scale
is computed from them alone (as if the row were padded with zeros, which change no maximum);
padding is never stored.  A 0-d tensor is one row of one element.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from quant_schemes.base import FormatError


@dataclass(frozen=True)
class PerTensor:
    """One scale for the whole tensor ("per-layer")."""

    def scale_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        return ()

    def scale_index(self, shape: tuple[int, ...], flat_idx: Tensor) -> Tensor:
        return torch.zeros_like(flat_idx, dtype=torch.int64)

    def scale_members(self, shape: tuple[int, ...], words: Tensor) -> tuple[Tensor, Tensor]:
        n = _numel(shape)
        return _members(words, torch.zeros_like(words), torch.full_like(words, n), 1)


@dataclass(frozen=True)
class PerChannel:
    """One scale per slice along ``axis`` (axis 0 = output channels of conv/linear weights)."""

    axis: int = 0

    def __post_init__(self) -> None:
        if not isinstance(self.axis, int) or isinstance(self.axis, bool) or self.axis < 0:
            raise FormatError(f"PerChannel: axis must be a non-negative int, got {self.axis!r}")

    def _check(self, shape: tuple[int, ...], name: str = "per-channel") -> None:
        if self.axis >= len(shape):
            raise FormatError(
                f"{name}: per-channel axis {self.axis} needs a tensor with more than {self.axis} "
                f"dimension(s), got shape {tuple(shape)}"
            )

    def scale_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        self._check(shape)
        return tuple(n if d == self.axis else 1 for d, n in enumerate(shape))

    def scale_index(self, shape: tuple[int, ...], flat_idx: Tensor) -> Tensor:
        self._check(shape)
        inner = _numel(shape[self.axis + 1 :])
        return torch.div(flat_idx, inner, rounding_mode="floor") % shape[self.axis]

    def scale_members(self, shape: tuple[int, ...], words: Tensor) -> tuple[Tensor, Tensor]:
        """Channel ``c`` holds ``outer x inner`` elements: ``(o * C + c) * inner + i``."""
        self._check(shape)
        c_count, inner = shape[self.axis], _numel(shape[self.axis + 1 :])
        outer = _numel(shape[: self.axis])
        o = torch.arange(outer, dtype=torch.int64)
        i = torch.arange(inner, dtype=torch.int64)
        base = (o[:, None] * c_count * inner + i[None, :]).reshape(-1)  # channel 0's elements
        elems = (words[:, None] * inner + base[None, :]).reshape(-1)
        owner = words.repeat_interleave(base.numel())
        order = torch.argsort(elems)
        return elems[order], owner[order]


@dataclass(frozen=True)
class PerGroup:
    """One scale per group of ``size`` consecutive elements along the last axis (see the module
    docstring for the padding rule)."""

    size: int

    def __post_init__(self) -> None:
        if not isinstance(self.size, int) or isinstance(self.size, bool) or self.size < 1:
            raise FormatError(f"PerGroup: size must be an int >= 1, got {self.size!r}")

    def groups(self, shape: tuple[int, ...]) -> int:
        """Groups per row: ``ceil(n / size)`` for a last axis of ``n`` elements."""
        n = shape[-1] if shape else 1
        return -(-n // self.size)

    def scale_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        return (tuple(shape[:-1]) if shape else ()) + (self.groups(shape),)

    def scale_index(self, shape: tuple[int, ...], flat_idx: Tensor) -> Tensor:
        n = shape[-1] if shape else 1
        row = torch.div(flat_idx, n, rounding_mode="floor")
        return row * self.groups(shape) + torch.div(flat_idx - row * n, self.size, rounding_mode="floor")

    def scale_members(self, shape: tuple[int, ...], words: Tensor) -> tuple[Tensor, Tensor]:
        n, ng = (shape[-1] if shape else 1), self.groups(shape)
        row, g = torch.div(words, ng, rounding_mode="floor"), words % ng
        start = row * n + g * self.size
        count = torch.clamp(n - g * self.size, max=self.size)
        return _members(words, start, count, 1)


Granularity = PerTensor | PerChannel | PerGroup


def _numel(shape: tuple[int, ...]) -> int:
    out = 1
    for s in shape:
        out *= int(s)
    return out


def _members(words: Tensor, start: Tensor, count: Tensor, step: int) -> tuple[Tensor, Tensor]:
    """Elements ``start[w] + step * j`` for ``j < count[w]`` of every word (sorted by element when
    the words' ranges are sorted and disjoint, as they are for sorted distinct words)."""
    owner = words.repeat_interleave(count)
    first = torch.cumsum(count, 0) - count
    j = torch.arange(owner.numel(), dtype=torch.int64) - first.repeat_interleave(count)
    return start.repeat_interleave(count) + step * j, owner


__all__ = ["Granularity", "PerChannel", "PerGroup", "PerTensor"]
