"""The fault space of a session: selected tensors of one format as one index space of codes.

``FaultSpace`` maps a global element (start of its tensor + flat index) to ``(tensor, index)``
and back, turns a fault model into sorted global sites ``(element, bit)``, and builds the
FaultLog of the sites a session wrote (``log_rows``).  Weight sessions use one space for the
whole session; activation sessions build one per forward from the output sizes.
"""

from __future__ import annotations

import torch
from torch import Tensor

from qfi.errors import QfiError
from qfi.faults import BitFlip, FlipCount, FlipSites, StuckAt, odd_sites, resolve_bits, sample_sites
from qfi.log import FaultLog


def get_fmt(fmt: object):
    """A Format from a name (``"int8"``) or a Format value."""
    from quant_schemes import Format, FormatError, get_format

    if isinstance(fmt, str):
        try:
            return get_format(fmt)
        except FormatError as e:
            raise QfiError(str(e)) from None
    if isinstance(fmt, Format):
        return fmt
    raise QfiError(f"fmt must be a format name such as 'fp32' or 'int8', or a Format; got {fmt!r}")


class FaultSpace:
    """Named tensors as one index space: global element = start of tensor + flat index."""

    def __init__(self, names: list[str], shapes: list[tuple[int, ...]], fmt) -> None:
        self.names, self.shapes, self.fmt = names, shapes, fmt
        sizes = [int(torch.Size(s).numel()) for s in shapes]
        starts = [0]
        for n in sizes[:-1]:
            starts.append(starts[-1] + n)
        self.sizes, self.starts = sizes, starts
        self.numel = sum(sizes)
        self._ends_t = torch.tensor([s + n for s, n in zip(starts, sizes, strict=True)], dtype=torch.int64)
        self._starts_t = torch.tensor(starts, dtype=torch.int64)
        self.pos = {n: i for i, n in enumerate(names)}
        self.code_mask = (1 << fmt.bits) - 1

    def locate(self, elem: Tensor) -> tuple[Tensor, Tensor]:
        """(tensor id, flat index within the tensor) of sorted global elements."""
        if elem.numel() < 64:
            tid = torch.searchsorted(self._ends_t, elem, right=True)
        else:  # O(K): mark where each tensor's run of elements begins, then cumsum
            first = torch.searchsorted(elem, self._ends_t[:-1])
            marks = torch.zeros(elem.numel() + 1, dtype=torch.int64)
            tid = marks.index_add_(0, first, torch.ones_like(first))[:-1].cumsum(0)
        return tid, elem - self._starts_t.index_select(0, tid)

    def sites(self, fault, g: torch.Generator) -> tuple[Tensor, Tensor, int | None]:
        """Sorted global sites (element, bit) of ``fault`` and the stuck value (None = flip)."""
        value = fault.value if isinstance(fault, StuckAt) else None
        explicit = fault.sites if isinstance(fault, (FlipSites, StuckAt)) else None
        if explicit is None:
            if not isinstance(fault, (BitFlip, FlipCount, StuckAt)):
                raise QfiError(f"not a fault model: {fault!r} (BitFlip, FlipCount, FlipSites, StuckAt)")
            eligible = resolve_bits(fault.bits, self.fmt.bits, self.fmt.name)
            elem, bit = sample_sites(fault, self.numel, eligible, g)
            return elem, bit, value
        elems, bits = [], []
        for name, idx, b in explicit:
            if name not in self.pos:
                raise QfiError(f"site names {name!r}, which is not selected; selected: {self.names[:6]}...")
            if idx >= self.sizes[self.pos[name]]:
                size = self.sizes[self.pos[name]]
                raise QfiError(f"site index {idx} is outside {name!r} ({size} elements)")
            resolve_bits(b, self.fmt.bits, self.fmt.name)
            elems.append(self.starts[self.pos[name]] + idx)
            bits.append(b)
        e, b = odd_sites(
            torch.tensor(elems, dtype=torch.int64),
            torch.tensor(bits, dtype=torch.int64),
            parity=value is None,
        )
        return e, b, value

    def make_log(
        self,
        elem: Tensor,
        bit: Tensor,
        inv: Tensor | None,
        old: Tensor,
        new: Tensor,
        oldv: Tensor,
        newv: Tensor,
        value: int | None,
    ) -> FaultLog:
        """The FaultLog of global sites (elem, bit), built lazily; see ``log_rows``."""

        def build() -> dict[str, Tensor]:
            cols = log_rows(elem, bit, inv, old, new, oldv, newv, value, self.code_mask)
            cols["name_id"], cols["index"] = self.locate(cols["index"])
            return cols

        rows = elem.numel() if value is None else None
        return FaultLog(self.names, None, self.fmt.name, elem.numel(), lazy=build, rows=rows)


def log_rows(
    elem: Tensor,
    bit: Tensor,
    inv: Tensor | None,
    old: Tensor,
    new: Tensor,
    oldv: Tensor,
    newv: Tensor,
    value: int | None,
    code_mask: int,
    call: int = -1,
) -> dict[str, Tensor]:
    """Log columns for sites (elem, bit) given per-word codes/values (``inv``: site -> word).
    Stuck-at sites whose bit already held the value are dropped: rows are changed bits."""
    o, n = old.cpu().long() & code_mask, new.cpu().long() & code_mask
    ov, nv = oldv.cpu().float(), newv.cpu().float()
    if inv is not None:  # one row per site, the word's codes repeated
        o, n, ov, nv = (c.index_select(0, inv) for c in (o, n, ov, nv))
    if value is not None:
        keep = (((o ^ n) >> bit) & 1).bool()
        elem, bit, o, n, ov, nv = (c[keep] for c in (elem, bit, o, n, ov, nv))
    return {
        "index": elem,
        "bit": bit,
        "old_code": o,
        "new_code": n,
        "old_value": ov,
        "new_value": nv,
        "call": torch.full_like(elem, call),
    }


__all__ = ["FaultSpace", "get_fmt", "log_rows"]
