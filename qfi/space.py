"""The fault space of a session: selected tensors of one format as one index space of codes.

``FaultSpace`` maps a global element (start of its tensor + flat index) to ``(tensor, index)``
and back, turns a fault model into sorted global sites ``(element, bit)``, and builds the
FaultLog of the sites a session wrote (``log_rows``).  Weight sessions use one space for the
whole session; activation sessions build one per forward from the output sizes.

Parts.  A format that stores its scales (MX, NVFP4, ``int4_g128``, ``uint8_asym``, ...) stores
more words than its element codes: one scale word (and one zero point) per group.  The space
then has one index space per *part* (``"codes"``, ``"scales"``, ``"zero_points"``; each word of
a part ``part_bits(fmt, part)`` bits wide), and a fault hits the part(s) a session chooses:

* ``"all"`` (the default): every stored bit at the same rate, what a memory sees; a BitFlip draws
  ``K ~ Binomial(all stored bits, p)`` and K distinct sites uniformly over the union;
* ``"codes"``, ``"scales"``, ``"zero_points"``: only that part.  A fault's ``bits=`` numbers
  the bits of one word of the chosen part (``"scales"``: bit 7 of an E8M0 scale is
  ``scale.exp7``), so a bit-restricted fault needs a single part: with ``"all"`` it is an error
  unless the format stores codes only.

For a format that stores only codes every part choice but ``"scales"`` / ``"zero_points"`` is
the code space, sampled exactly as before parts existed (same sites from the same seed).
In a FaultLog a scale flip is a row named ``<tensor>:scale`` (index = the scale word's flat
index in the tensor's scale array, codes = the scale words, values = the decoded scales), a
zero-point flip ``<tensor>:zero_point``; ``split_name`` parses them.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from qfi.errors import QfiError
from qfi.faults import (
    BitFlip,
    FlipCount,
    FlipSites,
    StuckAt,
    draw_binomial,
    odd_sites,
    resolve_bits,
    sample_distinct,
    sample_sites,
)
from qfi.log import FaultLog

#: the part choices of a session: every stored bit, or one part
PART_CHOICES = ("all", "codes", "scales", "zero_points")
#: name suffix of the log rows of each stored part beyond the codes
SUFFIX = {"scales": ":scale", "zero_points": ":zero_point"}
#: what one word of each part is called in messages
UNIT = {"codes": "elements", "scales": "scale words", "zero_points": "zero points"}


def split_name(name: str) -> tuple[str, str]:
    """``"blocks.0.weight:scale"`` -> ``("blocks.0.weight", "scales")``; a plain name is a code."""
    for part, suffix in SUFFIX.items():
        if name.endswith(suffix):
            return name[: -len(suffix)], part
    return name, "codes"


def check_part(part: object) -> str:
    """``part`` if it is one of PART_CHOICES, else QfiError naming the allowed values."""
    if part not in PART_CHOICES:
        raise QfiError(f"part={part!r}; allowed: {', '.join(map(repr, PART_CHOICES))}")
    return part  # type: ignore[return-value]


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
        from quant_schemes import part_bits, stored_parts

        self.parts = stored_parts(fmt)
        self.width = {p: part_bits(fmt, p) for p in self.parts}
        self.words = {"codes": sizes}
        for p in self.parts[1:]:
            self.words[p] = [fmt.part_words(tuple(s))[p] for s in shapes]
        self.word_starts: dict[str, list[int]] = {}
        self.part_numel: dict[str, int] = {}
        self._wstarts_t: dict[str, Tensor] = {}
        self._wends_t: dict[str, Tensor] = {}
        for p, ws in self.words.items():
            st = [0]
            for n in ws[:-1]:
                st.append(st[-1] + n)
            self.word_starts[p], self.part_numel[p] = st, sum(ws)
            self._wstarts_t[p] = torch.tensor(st, dtype=torch.int64)
            self._wends_t[p] = torch.tensor([a + n for a, n in zip(st, ws, strict=True)], dtype=torch.int64)
        #: FaultLog names: the tensors, then ``<tensor>:scale`` and ``<tensor>:zero_point`` entries
        self.log_names = list(names) + [n + SUFFIX[p] for p in self.parts[1:] for n in names]
        self.part_offset = {p: k * len(names) for k, p in enumerate(self.parts)}

    # -- parts --------------------------------------------------------------------------------------
    def select_parts(self, part: str, fault: object = None) -> tuple[str, ...]:
        """The parts a fault under ``part`` hits (see the module docstring); QfiError for a part the
        format does not store, or a bit-restricted fault over several parts."""
        check_part(part)
        if part == "all":
            parts = self.parts
            bits = getattr(fault, "bits", None)
            if bits is not None and len(parts) > 1:
                raise QfiError(
                    f"a fault with bits={bits!r} names bits of one word, but part='all' of format "
                    f"{self.fmt.name!r} holds words of {len(parts)} kinds ({', '.join(parts)}); "
                    "choose part='codes', 'scales' or 'zero_points' for a per-bit fault"
                )
            return parts
        if part not in self.parts:
            raise QfiError(
                f"format {self.fmt.name!r} stores no {part!r}; its parts are {', '.join(self.parts)} "
                "(scales are stored words of the group and block formats, e.g. mxfp4, nvfp4, int4_g128, "
                "uint8_asym, int8_fp32)"
            )
        return (part,)

    def total_bits(self, part: str = "all") -> int:
        """Stored bits a fault under ``part`` may hit."""
        return sum(self.part_numel[p] * self.width[p] for p in self.select_parts(part))

    def resolve(self, name: str) -> tuple[int, str]:
        """(tensor id, part) of a site or log name (``<tensor>`` or ``<tensor>:scale`` ...)."""
        base, part = split_name(name)
        if base not in self.pos or part not in self.parts:
            raise QfiError(f"site names {name!r}, which is not selected; selected: {self.log_names[:6]}...")
        return self.pos[base], part

    def locate_part(self, words: Tensor, part: str) -> tuple[Tensor, Tensor]:
        """(tensor id, word index within the tensor's ``part``) of sorted global words."""
        if part == "codes":
            return self.locate(words)
        tid = torch.searchsorted(self._wends_t[part], words, right=True)
        return tid, words - self._wstarts_t[part].index_select(0, tid)

    def part_sites(
        self, fault, g: torch.Generator, part: str = "all"
    ) -> tuple[dict[str, tuple[Tensor, Tensor]], int | None]:
        """Sorted global sites per part ``{part: (word, bit)}`` of ``fault`` and the stuck value."""
        value = fault.value if isinstance(fault, StuckAt) else None
        explicit = fault.sites if isinstance(fault, (FlipSites, StuckAt)) else None
        if explicit is not None:
            return self._explicit(explicit, value), value
        if not isinstance(fault, (BitFlip, FlipCount, StuckAt)):
            raise QfiError(f"not a fault model: {fault!r} (BitFlip, FlipCount, FlipSites, StuckAt)")
        parts = self.select_parts(part, fault)
        if len(parts) == 1:  # one part: exactly the single-space sampling (codes: as before parts)
            p = parts[0]
            label = self.fmt.name if p == "codes" else self.fmt.name + SUFFIX[p]
            eligible = resolve_bits(fault.bits, self.width[p], label)
            return {p: sample_sites(fault, self.part_numel[p], eligible, g)}, value
        # several parts (no bits restriction): K sites uniform over the union of all stored bits
        totals = [self.part_numel[p] * self.width[p] for p in parts]
        total = sum(totals)
        ber = getattr(fault, "ber", None)
        k = draw_binomial(total, ber, g) if ber is not None else int(fault.count)  # type: ignore[attr-defined]
        if k > total:
            raise QfiError(f"count={k} exceeds the {total} stored bits of the selected tensors")
        s = sample_distinct(total, k, g).numpy()  # numpy: cheaper per op at these sizes
        out, off = {}, 0
        for p, tot in zip(parts, totals, strict=True):
            lo, hi = np.searchsorted(s, [off, off + tot])
            local, w = s[lo:hi] - off, self.width[p]
            out[p] = (torch.from_numpy(local // w), torch.from_numpy(local % w))
            off += tot
        return out, value

    def _explicit(self, explicit, value: int | None) -> dict[str, tuple[Tensor, Tensor]]:
        per: dict[str, tuple[list[int], list[int]]] = {}
        for name, idx, b in explicit:
            tid, p = self.resolve(name)
            size = self.words[p][tid]
            if idx >= size:
                raise QfiError(f"site index {idx} is outside {name!r} ({size} {UNIT[p]})")
            resolve_bits(b, self.width[p], self.fmt.name if p == "codes" else self.fmt.name + SUFFIX[p])
            e, bb = per.setdefault(p, ([], []))
            e.append(self.word_starts[p][tid] + idx)
            bb.append(b)
        out = {}
        for p, (e, bb) in per.items():
            out[p] = odd_sites(torch.tensor(e, dtype=torch.int64), torch.tensor(bb, dtype=torch.int64),
                               parity=value is None)
        return out

    def make_parts_log(self, rows: dict[str, tuple], value: int | None, sites: int,
                       call: int = -1) -> FaultLog:
        """The FaultLog of sites of several parts: ``rows[part] = (word, bit, inv, old, new, oldv,
        newv)`` as ``log_rows`` takes them (global words); names from ``log_names``."""

        def build() -> dict[str, Tensor]:
            chunks = []
            for p, (word, bit, inv, old, new, oldv, newv) in rows.items():
                cols = log_rows(word, bit, inv, old, new, oldv, newv, value, (1 << self.width[p]) - 1, call)
                tid, cols["index"] = self.locate_part(cols["index"], p)
                cols["name_id"] = tid + self.part_offset[p]
                chunks.append(cols)
            if not chunks:
                z = torch.empty(0, dtype=torch.int64)
                return {"index": z, "bit": z, "old_code": z, "new_code": z, "old_value": z.float(),
                        "new_value": z.float(), "call": z, "name_id": z}
            return {k: torch.cat([c[k] for c in chunks]) for k in chunks[0]}

        n = sum(r[0].numel() for r in rows.values())
        return FaultLog(self.log_names, None, self.fmt.name, sites, lazy=build,
                        rows=n if value is None else None)

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


def fault_stored(fmt, flat: Tensor, shape: tuple[int, ...], qp, sites: dict, value: int | None):
    """Faults of one tensor of a stored-scale format (an activation): ``flat`` holds its values
    (decoded with ``qp``), ``sites[part] = (word, bit)`` local sorted sites.  Every element whose
    code flipped or whose scale / zero point flipped is re-encoded with the clean parameters and
    decoded from the faulty words.  Returns (elements written (CPU int64), their new values (on
    ``flat``'s device), ``rows`` for the log: ``rows[part] = (word, bit, inv, old, new, oldv, newv)``)."""
    from qfi.faults import apply_mask, word_masks

    empty = torch.empty(0, dtype=torch.int64)
    dev = flat.device
    ce, cb = sites.get("codes", (empty, empty))
    se, sb = sites.get("scales", (empty, empty))
    ze, zb = sites.get("zero_points", (empty, empty))
    cw, cinv, cmask = word_masks(ce, cb)
    sw, sinv, smask = word_masks(se, sb)
    zw, zinv, zmask = word_masks(ze, zb)
    old_sc = qp.scale_codes.reshape(-1).index_select(0, sw.to(qp.scale_codes.device))
    new_sc = apply_mask(old_sc, smask.to(old_sc.device), value)
    zp_flat = None if qp.zero_point is None else qp.zero_point.reshape(-1)
    old_zp = None if zp_flat is None else zp_flat.index_select(0, zw.to(zp_flat.device))
    new_zp = None if old_zp is None else apply_mask(old_zp, zmask.to(old_zp.device), value)
    hit = torch.unique(torch.cat([sw, zw])) if zw.numel() else sw
    members = fmt.scale_members(shape, hit)[0] if hit.numel() else empty
    elems = torch.unique(torch.cat([cw, members])) if hit.numel() else cw
    cpos = torch.searchsorted(elems, cw)
    emask = torch.zeros(elems.numel(), dtype=torch.int32).index_copy_(0, cpos, cmask)
    clean = fmt.gather_qparams(qp, shape, elems)
    faulty = clean
    we = fmt.scale_index(shape, elems)
    if sw.numel():
        j = torch.searchsorted(sw, we).clamp_(max=sw.numel() - 1)
        is_hit = (sw.index_select(0, j) == we).to(clean.scale_codes.device)
        j = j.to(new_sc.device)
        sc = torch.where(is_hit, new_sc.index_select(0, j), clean.scale_codes)
        faulty = fmt.with_scale_codes(faulty, sc)
    if zw.numel():
        j = torch.searchsorted(zw, we).clamp_(max=zw.numel() - 1)
        is_hit = (zw.index_select(0, j) == we).to(clean.zero_point.device)
        zp = torch.where(is_hit, new_zp.index_select(0, j.to(new_zp.device)), clean.zero_point)
        faulty = faulty.replace(zero_point=zp)
    idx = elems.to(dev)
    oldv = flat.index_select(0, idx).float()
    old = fmt.encode_elements(oldv, clean)
    new = apply_mask(old, emask.to(dev), value)
    newv = fmt.decode_elements(new, faulty)
    rows = {}
    if ce.numel():
        cp = cpos.to(dev)
        rows["codes"] = (ce, cb, cinv, old.index_select(0, cp), new.index_select(0, cp),
                         oldv.index_select(0, cp), newv.index_select(0, cp))
    if se.numel():
        old_s = qp.scale.reshape(-1).index_select(0, sw.to(qp.scale.device))
        rows["scales"] = (se, sb, sinv, old_sc, new_sc, old_s, fmt.decode_scale(new_sc, qp.tensor_scale))
    if ze.numel():
        rows["zero_points"] = (ze, zb, zinv, old_zp, new_zp, old_zp.float(), new_zp.float())  # type: ignore[union-attr]
    return elems, newv, rows


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


__all__ = [
    "PART_CHOICES", "SUFFIX", "UNIT", "FaultSpace", "check_part", "fault_stored", "get_fmt", "log_rows",
    "split_name",
]
