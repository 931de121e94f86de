"""Shared machinery of the formats that store their scales (private): reductions per scale group,
scale arrays expanded to elements, and the ``parts`` protocol (scale and zero-point words)."""

from __future__ import annotations

import torch
from torch import Tensor

from quant_schemes._bits import check_qdata, roles_of
from quant_schemes.base import Encoded, FormatError, QParams
from quant_schemes.granularity import PerChannel, PerGroup, PerTensor, _numel

#: role of a scale / zero-point bit, from the role of the bit in its own format
SCALE_ROLE = {"sign": "scale sign", "exponent": "scale exponent", "mantissa": "scale mantissa"}


def as_rows(x: Tensor) -> Tensor:
    """A 0-d tensor as one row of one element (groups run along the last axis)."""
    return x.reshape(1) if x.dim() == 0 else x


def group_view(x: Tensor, size: int, fill: float = 0.0) -> Tensor:
    """``x`` (..., n) as (..., ceil(n/size), size), the last group padded with ``fill``."""
    x = as_rows(x)
    n = x.shape[-1]
    ng = -(-n // size)
    pad = ng * size - n
    if pad:
        x = torch.nn.functional.pad(x, (0, pad), value=fill)
    return x.reshape(*x.shape[:-1], ng, size)


def reduce_groups(x32: Tensor, granularity, how: str) -> Tensor:
    """``amax`` of ``|x|`` (how="absmax"), ``amin`` / ``amax`` of ``x`` per scale group, in the
    shape of the scale array.  Empty groups give 0; the zero padding of the last group never
    changes the result (|x| >= 0, and the asymmetric range always includes 0)."""
    v = x32.abs() if how == "absmax" else x32
    op = torch.amin if how == "min" else torch.amax
    g = granularity
    if isinstance(g, PerTensor):
        return op(v) if v.numel() else v.new_zeros(())
    if isinstance(g, PerChannel):
        shape = g.scale_shape(tuple(v.shape))
        if v.numel() == 0:
            return v.new_zeros(shape)
        dims = [d for d in range(v.dim()) if d != g.axis]
        return op(v, dim=dims, keepdim=True) if dims else v.clone()
    shape = g.scale_shape(tuple(v.shape))
    if v.numel() == 0:
        return v.new_zeros(shape)
    return op(group_view(v, g.size), dim=-1).reshape(shape)


def per_element(arr: Tensor, shape: tuple[int, ...], granularity) -> Tensor:
    """A scale-shaped array expanded to ``shape`` (a view for per-tensor / per-channel)."""
    if not isinstance(granularity, PerGroup):
        return arr.expand(shape) if arr.dim() else arr
    n = shape[-1] if shape else 1
    out = arr.repeat_interleave(granularity.size, dim=-1)[..., :n]
    return out.reshape(shape)


class StoredScales:
    """Mixin: the ``parts`` protocol and scale-word geometry of a format with fields
    ``granularity`` and the properties ``scale_fmt`` (a format of the stored scale words) and
    ``zero_point_bits`` (0 when there is no zero point)."""

    granularity: PerTensor | PerChannel | PerGroup
    bits: int
    name: str

    @property
    def zero_point_bits(self) -> int:
        return 0

    @property
    def parts(self) -> tuple[str, ...]:
        return ("codes", "scales", "zero_points") if self.zero_point_bits else ("codes", "scales")

    def part_bits(self, part: str) -> int:
        self._part(part)
        if part == "codes":
            return self.bits
        return self.scale_fmt.bits if part == "scales" else self.zero_point_bits

    def part_bit_names(self, part: str) -> tuple[str, ...]:
        self._part(part)
        if part == "codes":
            return self.bit_names  # type: ignore[attr-defined]
        if part == "scales":
            return tuple(f"scale.{n}" for n in self.scale_fmt.bit_names)
        return tuple(f"zp.mag{i}" for i in range(self.zero_point_bits))

    def part_bit_roles(self, part: str) -> tuple[str, ...]:
        self._part(part)
        if part == "codes":
            return self.bit_roles  # type: ignore[attr-defined]
        if part == "scales":
            return tuple(SCALE_ROLE[r] for r in roles_of(self.scale_fmt.bit_names))
        return ("zero point",) * self.zero_point_bits

    def _part(self, part: str) -> None:
        if part not in self.parts:
            parts = ", ".join(self.parts)
            raise FormatError(f"format {self.name!r} stores no {part!r}; its parts are {parts}")

    def scale_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        return self.granularity.scale_shape(tuple(shape))

    def part_words(self, shape: tuple[int, ...]) -> dict[str, int]:
        """Number of words of each part a tensor of ``shape`` stores."""
        n_scales = _numel(self.scale_shape(shape)) if _numel(shape) else 0
        out = {"codes": _numel(shape), "scales": n_scales}
        if self.zero_point_bits:
            out["zero_points"] = n_scales
        return out

    def scale_index(self, shape: tuple[int, ...], flat_idx: Tensor) -> Tensor:
        """The scale word (flat index into the scale array) of each element ``flat_idx``."""
        return self.granularity.scale_index(tuple(shape), flat_idx)

    def scale_members(self, shape: tuple[int, ...], words: Tensor) -> tuple[Tensor, Tensor]:
        """Elements (flat indices, sorted) governed by the sorted distinct scale ``words``, and the
        word of each."""
        return self.granularity.scale_members(tuple(shape), words)

    def gather_qparams(self, qp: QParams, shape: tuple[int, ...], flat_idx: Tensor) -> QParams:
        """The parameters of each element ``flat_idx`` (1-D, on ``qp``'s device): what
        ``encode_elements`` / ``decode_elements`` take.  O(len(flat_idx))."""
        si = self.scale_index(tuple(shape), flat_idx.to(device=qp.scale_codes.device, dtype=torch.int64))

        def pick(t: Tensor | None) -> Tensor | None:
            return None if t is None else t.reshape(-1).index_select(0, si)

        return QParams(pick(qp.scale), pick(qp.scale_codes), pick(qp.zero_point), qp.tensor_scale)  # type: ignore[arg-type]

    def expand_qparams(self, qp: QParams, shape: tuple[int, ...]) -> QParams:
        """The parameters expanded to every element of a tensor of ``shape``."""

        def ex(t: Tensor | None) -> Tensor | None:
            return None if t is None else per_element(t, tuple(shape), self.granularity)

        return QParams(ex(qp.scale), ex(qp.scale_codes), ex(qp.zero_point), qp.tensor_scale)  # type: ignore[arg-type]

    def with_scale_codes(self, qp: QParams, scale_codes: Tensor) -> QParams:
        """``qp`` with other (e.g. faulty) stored scale words: their decoded scale follows."""
        return qp.replace(scale_codes=scale_codes, scale=self.decode_scale(scale_codes, qp.tensor_scale))

    def decode_scale(self, scale_codes: Tensor, tensor_scale: Tensor | None = None) -> Tensor:
        raise NotImplementedError  # pragma: no cover - implemented by the formats

    @property
    def scale_bits_per_value(self) -> float:
        """Scale and zero-point bits per value of a large tensor (0 for per-tensor and
        per-channel scales, amortised)."""
        if isinstance(self.granularity, PerGroup):
            return (self.scale_fmt.bits + self.zero_point_bits) / self.granularity.size
        return 0.0

    @property
    def bits_per_value(self) -> float:
        return self.bits + self.scale_bits_per_value

    def stored_bits(self, shape: tuple[int, ...]) -> int:
        """Exact bits a tensor of ``shape`` stores: codes, scale words and zero points (plus a
        second-level tensor scale where the format has one)."""
        w = self.part_words(tuple(shape))
        extra = 32 if getattr(self, "tensor_scale_bits", 0) and w["codes"] else 0
        return (w["codes"] * self.bits + w["scales"] * self.scale_fmt.bits
                + w.get("zero_points", 0) * self.zero_point_bits + extra)

    # -- the stored words of an encoding ---------------------------------------------------------
    def _stored(self, enc: Encoded) -> tuple[Tensor, Tensor, Tensor | None]:
        """(qdata, scale_codes, zero_point) of ``enc``, checked."""
        q = check_qdata(enc.qdata, self.name)
        if enc.scale_codes is None:
            raise FormatError(
                f"{self.name}: Encoded.scale_codes is None; this format decodes from its stored scale codes"
            )
        sc = check_qdata(enc.scale_codes, self.name)
        want = self.scale_shape(tuple(q.shape))
        if tuple(sc.shape) != want and _numel(tuple(q.shape)):
            raise FormatError(
                f"{self.name}: scale_codes of shape {tuple(sc.shape)} do not fit qdata of shape "
                f"{tuple(q.shape)} (expected {want})"
            )
        zp = enc.zero_point
        if self.zero_point_bits and zp is None:
            raise FormatError(
                f"{self.name}: Encoded.zero_point is None; asymmetric codes need their zero point"
            )
        return q, sc, zp

    def _qparams_of(self, qparams: object, x32: Tensor) -> QParams:
        if qparams is None:
            return self._choose(x32)
        if isinstance(qparams, Encoded):
            qparams = qparams.qparams
        if not isinstance(qparams, QParams):
            raise FormatError(
                f"{self.name}: qparams must be a QParams (from choose_qparams), got {type(qparams).__name__}"
            )
        want = self.scale_shape(tuple(x32.shape))
        if tuple(qparams.scale_codes.shape) != want:
            raise FormatError(
                f"{self.name}: qparams for scale shape {tuple(qparams.scale_codes.shape)} do not fit x of "
                f"shape {tuple(x32.shape)} (expected {want})"
            )
        dev = x32.device
        return QParams(*(None if t is None else t.to(dev) for t in (
            qparams.scale, qparams.scale_codes, qparams.zero_point, qparams.tensor_scale)))

    def _choose(self, x32: Tensor) -> QParams:  # pragma: no cover - implemented by the formats
        raise NotImplementedError
