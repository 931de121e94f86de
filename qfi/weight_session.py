"""Weight sessions: in-place faults on selected parameters and buffers, with an undo log.

``with qfi.weights(model, "int8") as s:`` selects tensors by name and, for every
format but fp32, writes ``fmt.quantize(x)`` into them (the scale chosen once on the clean
tensor).  The selected tensors form one index space of ``s.numel`` codes; a trial samples
sites over it on the CPU, turns them into one XOR (or OR / AND-NOT) mask per hit word, reads
the hit words with ``index_select``, writes the faulty ones with ``index_copy_`` and keeps the
old words for ``undo``.  Cost is O(flips) after ``__enter__``.

``flat=True`` (default) moves the selected tensors into one flat buffer for the session
(``param.data`` becomes a view of it; one copy of the selected weights at enter) so a trial
touches one buffer instead of looping over tensors.  For fp32 the original storages are
released as they are copied (the session holds one copy of the weights plus the undo log) and
on exit every ``param.data`` becomes a fresh tensor of the original shape and strides holding
the bit-identical clean values; for other formats the originals are kept and put back.
``flat=False`` works on the tensors in place (fp32: no copy at all) and restores by undo (plus
a copy of the originals for other formats); it is slower per trial on models of many tensors.
A non-contiguous tensor then works on a contiguous copy and gets its original storage back.
Sessions on the same tensor cannot nest (QfiError); an interrupted ``apply`` restores the
words it wrote before the exception propagates.

Stored scales.  For a format that stores its scales (MX, NVFP4, ``int4_g128``, ``uint8_asym``,
``int8_fp32``: ``quant_schemes.stored_parts``) the session keeps each tensor's clean QParams
(the scale words, zero points and NVFP4's tensor scale) and the fault space has a part per
kind of stored word (``qfi.space``).  ``part=`` chooses what faults hit: ``"all"`` (default:
every stored bit at one BER, what a memory sees), ``"codes"``, ``"scales"`` or
``"zero_points"``; ``apply`` / ``inject`` take ``part=`` for one fault.  A flipped scale or
zero-point bit re-decodes every element of its group (16 or 32 values of a block, a row group,
a whole tensor for a per-tensor scale) from the faulty word, together with any code flips of the
same fault; the scale words themselves are never written (they live in the session), so undo
and exit restore bit-exactly by restoring the element words.

Tied weights (one stored tensor under several names: GPT-2's ``lm_head.weight`` is
``transformer.wte.weight``) are one entry of the index space, under their first name, so each
stored bit can flip once; a site or log may name any alias.  Distinct Parameter objects viewing
the same memory follow the selected one into the session's storage and get their own back on exit.
"""

from __future__ import annotations

import contextlib
import mmap
import os
import weakref
from collections.abc import Iterator

import numpy as np
import torch
from torch import Tensor, nn

from qfi.errors import QfiError
from qfi.faults import apply_mask, make_generator, odd_sites, word_masks
from qfi.log import FaultLog
from qfi.select import select_weights, weight_table
from qfi.space import SUFFIX, UNIT, FaultSpace, check_part, get_fmt

_INT_VIEW = {
    torch.float32: torch.int32,
    torch.float16: torch.int16,
    torch.bfloat16: torch.int16,
    torch.float64: torch.int64,
}


#: id(tensor) -> (weakref to it, description, weakref to its session) for every tensor in an
#: entered WeightSession: a second session on the same tensor would silently detach the first
_LIVE: dict[int, tuple[weakref.ref, str, weakref.ref]] = {}


def _shared_storage(model: nn.Module) -> set[int]:
    """Storage addresses that more than one distinct parameter/buffer object of ``model`` uses."""
    seen: dict[int, int] = {}
    out: set[int] = set()
    for t in [*model.parameters(), *model.buffers()]:
        ptr = t.untyped_storage().data_ptr()
        if ptr and seen.setdefault(ptr, id(t)) != id(t):
            out.add(ptr)
    return out


def _flat_buffer(numel: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """An uninitialised 1-D buffer.  On the CPU a large one is an anonymous mapping advised to
    use transparent huge pages: a trial's random reads and writes then miss the TLB far less
    (measured here: 2.8k scattered read+write+undo over 346 MB, 141 us -> 61 us)."""
    nbytes = numel * torch.empty((), dtype=dtype).element_size()
    if (
        device.type == "cpu"
        and nbytes >= 1 << 22
        and hasattr(mmap, "MADV_HUGEPAGE")
        and not os.environ.get("QFI_NO_THP")
    ):
        try:
            m = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
            m.madvise(mmap.MADV_HUGEPAGE)
            return torch.frombuffer(m, dtype=dtype)  # the tensor keeps the mapping alive
        except (OSError, ValueError, AttributeError):
            pass
    return torch.empty(numel, dtype=dtype, device=device)


class WeightSession:
    """Context manager for weight faults; see the module docstring and ``qfi.weights``."""

    def __init__(
        self,
        model: nn.Module,
        fmt: object = "fp32",
        names: object = None,
        exclude: object = None,
        flat: bool = True,
        bn_stats: bool = False,
        part: str = "all",
    ) -> None:
        self.model, self.format, self.flat = model, get_fmt(fmt), flat
        self._filter, self.bn_stats = (names, exclude), bn_stats
        self.part = check_part(part)
        self._active = False
        self._pending: list[tuple[Tensor, Tensor, Tensor]] | None = None
        self._aliases: list[tuple[Tensor, Tensor, Tensor]] = []  # (alias object, its own data, owner)

    # -- enter / exit ---------------------------------------------------------------------------
    def __enter__(self) -> WeightSession:
        if self._active:
            raise QfiError("this weight session is already entered")
        fmt = self.format
        table = weight_table(self.model, self.bn_stats)
        self.names = select_weights(self.model, *self._filter, bn_stats=self.bn_stats)
        ts = [table[n][0][1] for n in self.names]
        self._fp32 = fmt.name == "fp32"
        for n, t in zip(self.names, ts, strict=True):
            if self._fp32 and t.dtype != torch.float32:
                raise QfiError(
                    f"{n!r} is {t.dtype}; format 'fp32' needs float32 weights "
                    "(use the format matching the dtype, e.g. 'fp16', or model.float())"
                )
            if t.dtype not in _INT_VIEW:
                raise QfiError(f"{n!r} has dtype {t.dtype}; supported: float32, float16, bfloat16, float64")
            other = _LIVE.get(id(t))
            owner = None if other is None or other[0]() is not t else other[2]()
            if owner is not None and owner._active:
                raise QfiError(
                    f"{n!r} is already in an entered weight session ({other[1]}); sessions on the "
                    "same tensors cannot nest: exit the other session first or select other names"
                )
        self.space = FaultSpace(self.names, [tuple(t.shape) for t in ts], fmt)
        self.space.select_parts(self.part)  # a part the format does not store: refused before any change
        # tied weights: every other name of a selected tensor resolves to it (FlipSites, replay)
        for n in self.names:
            for alias, _ in table[n][1:]:
                self.space.pos.setdefault(alias, self.space.pos[n])
        self.numel = self.space.numel
        #: stored bits faults under the session's part may hit (codes only: numel * bits)
        self.total_bits = self.space.total_bits(self.part)
        self._stored = len(self.space.parts) > 1
        self._tensors = ts
        self._scales = [None] * len(ts)
        self._qp: list = [None] * len(ts)
        self._codes: list = [None] * len(ts)  # stored formats: clean element codes (uint8/int16)
        self._orig: list[Tensor] = []
        self._kept: dict[int, Tensor] = {}
        self._swapped: list[tuple[Tensor, Tensor]] = []
        with torch.no_grad():
            same = len({(t.device, t.dtype) for t in ts}) == 1
            self._use_flat = self.flat and same
            if self._use_flat:
                # fp32: the originals are not kept: each parameter's storage is released as soon as
                # it is copied into the buffer, so a session holds one copy of the weights plus
                # the undo log; __exit__ gives every parameter a fresh tensor of its original
                # shape and strides with the bit-identical clean values.  A tensor sharing its
                # storage with another tensor of the model (tied views, RNN flat weights) keeps
                # its original storage instead, so the sharing survives the session.
                self._layout = [(t.shape, t.stride()) for t in ts]
                if self._fp32:
                    shared = _shared_storage(self.model)
                    self._kept = {
                        i: t.data for i, t in enumerate(ts) if t.untyped_storage().data_ptr() in shared
                    }
                else:
                    self._orig = [t.data for t in ts]
                buf = _flat_buffer(self.numel, ts[0].dtype, ts[0].device)
                done = 0
                try:
                    for i, (t, s, n) in enumerate(zip(ts, self.space.starts, self.space.sizes, strict=True)):
                        c = t.detach() if self._fp32 else self._quantize(i, t)
                        view = buf[s : s + n]
                        view.copy_(c.reshape(-1))
                        t.data = view.view(t.shape)
                        done = i + 1
                        del c
                except BaseException:  # a quantization error, or an interrupt: put the tensors back
                    if self._orig:
                        for t, o in zip(ts[:done], self._orig, strict=False):
                            t.data = o
                    else:
                        self._restore_fp32(ts[:done])
                    raise
                self._segments = [(0, buf)]
            else:
                # quantize first (this can fail): nothing is changed before it succeeded
                clean = [t.detach() if self._fp32 else self._quantize(i, t) for i, t in enumerate(ts)]
                # in-place faults need contiguous words: a non-contiguous tensor works on a
                # contiguous copy and gets its untouched original storage back on exit
                self._swapped = [(t, t.data) for t in ts if not t.is_contiguous()]
                for t, _ in self._swapped:
                    t.data = t.data.contiguous()
                if not self._fp32:
                    self._orig = [t.detach().clone() for t in ts]
                    for t, c in zip(ts, clean, strict=True):
                        t.detach().copy_(c)
                starts = self.space.starts
                self._segments = [(s, t.detach().view(-1)) for s, t in zip(starts, ts, strict=True)]
        self._seg_starts = torch.tensor([s for s, _ in self._segments], dtype=torch.int64)
        sc = self._scales
        self._scaled = any(s is not None for s in sc)  # fixed for the session: not re-checked per trial
        self._scale_table = (
            torch.stack([s.reshape(()).float().cpu() for s in sc])
            if all(s is not None and s.numel() == 1 for s in sc)
            else None
        )
        # distinct Parameter objects viewing a selected tensor's memory (tied weights that are not
        # one object) follow it into the session's storage, so a fault reaches every name of it
        self._aliases = [
            (a, a.data, t) for n, t in zip(self.names, ts, strict=True) for _, a in table[n][1:] if a is not t
        ]
        for a, _, t in self._aliases:
            a.data = t.data
        if self._stored:
            self._build_stored_tables()
        me = weakref.ref(self)
        for t in ts:
            _LIVE[id(t)] = (weakref.ref(t), f"{self.format.name}, {len(ts)} tensor(s)", me)
        self._active = True
        return self

    def _quantize(self, i: int, t: Tensor) -> Tensor:
        x = t.detach().float()
        scale = self.format.choose_qparams(x)
        if self._stored:  # QParams (the stored scale words) and the clean codes, kept for the session
            self._qp[i] = scale
            enc = self.format.encode(x, scale)
            self._codes[i] = enc.qdata.reshape(-1).to(torch.uint8 if self.format.bits <= 8 else torch.int16)
            q = self.format.decode(enc)
        else:
            self._scales[i] = scale
            q = self.format.quantize(x, scale)
        if t.dtype != torch.float32 and not torch.equal(q.to(t.dtype).float(), q):
            raise QfiError(
                f"{self.names[i]!r} is {t.dtype}, which cannot hold {self.format.name} values "
                "exactly; use model.float()"
            )
        return q.to(t.dtype)

    def _restore_fp32(self, ts: list[Tensor]) -> None:
        """fp32 flat: each tensor gets its kept original storage, else a fresh tensor of its
        original shape and strides holding its current (clean) values."""
        for i, t in enumerate(ts):
            if i in self._kept:
                t.data = self._kept[i]
                continue
            shape, stride = self._layout[i]
            fresh = torch.empty_strided(shape, stride, dtype=t.dtype, device=t.device)
            fresh.copy_(t.data)
            t.data = fresh

    def __exit__(self, *exc: object) -> None:
        if not self._active:
            return
        try:
            if self._pending is not None:
                self.undo()
        finally:
            with torch.no_grad():
                if self._use_flat and self._orig:
                    for t, o in zip(self._tensors, self._orig, strict=True):
                        t.data = o
                elif self._use_flat:  # fp32: fresh tensors with the original layout, clean values
                    self._restore_fp32(self._tensors)
                elif self._orig:
                    for t, o in zip(self._tensors, self._orig, strict=True):
                        t.detach().copy_(o)
                for t, o in self._swapped:
                    t.data = o
                for a, o, _ in self._aliases:
                    a.data = o
            for t in self._tensors:
                entry = _LIVE.get(id(t))
                if entry is not None and entry[2]() is self:
                    del _LIVE[id(t)]
            self._orig, self._kept, self._swapped, self._segments, self._active = [], {}, [], [], False
            self._aliases = []

    # -- faults -------------------------------------------------------------------------------------
    def _check(self) -> None:
        if not self._active:
            raise QfiError("use the session inside its `with` block")
        if self._pending is not None:
            raise QfiError("a fault is already applied; call undo() first (or use session.inject)")

    def apply(
        self,
        fault,
        generator: torch.Generator | None = None,
        seed: int | None = None,
        part: str | None = None,
    ) -> FaultLog:
        """Apply ``fault`` once, in place; returns its FaultLog.  Cost O(flips) (plus the members
        of each hit scale word).  ``part`` overrides the session's part for this fault.  If
        anything goes wrong part-way (an error, a KeyboardInterrupt), the words written so far
        are restored before the exception propagates."""
        self._check()
        g = make_generator(generator, seed)
        sites, value = self.space.part_sites(fault, g, self.part if part is None else check_part(part))
        if not self._stored:
            elem, bit = sites.get("codes", (torch.empty(0, dtype=torch.int64),) * 2)
            return self._apply_sites(elem, bit, value)
        return self._apply_stored(sites, value)

    def replay(self, log: FaultLog) -> FaultLog:
        """Re-apply the bits of a saved log (same words, same codes as when it was made).

        QfiError, with nothing changed, when the log cannot belong to this session: another
        format, a name not selected, an index or bit out of range, or clean codes that differ
        from the log's ``old_code`` (another checkpoint, or another scale).  Rows of scale words
        (``<tensor>:scale``) and zero points replay as such, whatever the session's part.
        """
        self._check()
        fmt, space = self.format, self.space
        if log.format and log.format != fmt.name:
            raise QfiError(f"the log was made in format {log.format!r}; this session uses {fmt.name!r}")
        where = []
        for n in log.names:
            try:
                where.append(space.resolve(n))
            except QfiError:
                raise QfiError(f"log names {n!r}, which this session did not select") from None
        cols = log.columns
        tids = torch.tensor([t for t, _ in where] or [0], dtype=torch.int64)
        part_of = [p for _, p in where] or ["codes"]
        lids = torch.tensor([t + space.part_offset[p] for t, p in where] or [0], dtype=torch.int64)
        row_part = torch.tensor([space.parts.index(p) for p in part_of], dtype=torch.int64)
        name_id, index, bits = cols["name_id"], cols["index"], cols["bit"]
        tid, rp = tids.index_select(0, name_id), row_part.index_select(0, name_id)
        sites: dict[str, tuple[Tensor, Tensor]] = {}
        for k, p in enumerate(space.parts):
            sel = (rp == k).nonzero().flatten()
            if not sel.numel():
                continue
            t, i, b = tid.index_select(0, sel), index.index_select(0, sel), bits.index_select(0, sel)
            sizes = torch.tensor(space.words[p], dtype=torch.int64).index_select(0, t)
            bad = ((i < 0) | (i >= sizes)).nonzero().flatten()
            if bad.numel():
                r = int(sel[int(bad[0])])
                raise QfiError(
                    f"log row {r}: index {int(index[r])} is outside {log.names[int(name_id[r])]!r} "
                    f"({int(sizes[int(bad[0])])} {UNIT[p]})"
                )
            w = space.width[p]
            bad = ((b < 0) | (b >= w)).nonzero().flatten()
            if bad.numel():
                bb = int(b[int(bad[0])])
                label = fmt.name if p == "codes" else fmt.name + SUFFIX[p]
                raise QfiError(f"log bit {bb} is outside format {label!r}, whose bits are 0..{w - 1}")
            words = space._wstarts_t[p].index_select(0, t) + i
            sites[p] = odd_sites(words, b, parity=True)
        if self._stored:
            out = self._apply_stored(sites, None)
        else:
            empty = torch.empty(0, dtype=torch.int64)
            out = self._apply_sites(*sites.get("codes", (empty, empty)), None)
        # the words must hold the clean codes the log saw, else the replay is another fault
        key = (lids.index_select(0, name_id) << 37) + index * 64 + bits
        got = out.columns
        got_key = (got["name_id"] << 37) + got["index"] * 64 + got["bit"]
        order, got_order = key.argsort(), got_key.argsort()
        if torch.equal(key[order], got_key[got_order]):
            want, have = cols["old_code"][order], got["old_code"][got_order]
            diff = (want != have).nonzero().flatten()
            if diff.numel():
                r, d = int(order[int(diff[0])]), int(diff[0])
                self.undo()
                raise QfiError(
                    f"log row {r} ({log.names[int(name_id[r])]!r}[{int(index[r])}]): the log's old_code "
                    f"{int(want[d]):#x} differs from this session's clean code {int(have[d]):#x}; "
                    "was the log made on another checkpoint, format or calibration?"
                )
        return out

    def _write(self, elems: Tensor, values) -> tuple[Tensor, ...] | None:
        """Write new values into the sorted global elements ``elems`` (CPU int64), segment by
        segment: ``values(k, a, b, idx, raw)`` gets the elements ``a:b`` of ``elems`` (in segment
        ``k``; ``idx``: their positions in its buffer, on its device; ``raw``: their clean words)
        and returns ``(old code, new code, old value, new value)``; the new values are written.
        Returns the four, concatenated on the CPU, or None when nothing was hit.  The undo log is
        pending before the first write and holds each word before it is written, so the caller
        restores everything (``self.undo()``) when anything raises part-way."""
        n = elems.numel()
        if len(self._segments) == 1:
            bounds = [0, n]
        else:
            bounds = torch.searchsorted(elems, self._seg_starts).tolist() + [n]
        undo: list[tuple[Tensor, Tensor, Tensor]] = []
        self._pending = undo
        cols: list[list[Tensor]] = [[], [], [], []]
        with torch.no_grad():
            for k, (start, buf) in enumerate(self._segments):
                a, b = bounds[k], bounds[k + 1]
                if a == b:
                    continue
                w = elems if b - a == n else elems[a:b]
                idx = (w - start if start else w).to(buf.device)
                ints = buf.view(_INT_VIEW[buf.dtype])
                raw = ints.index_select(0, idx)
                undo.append((ints, idx, raw))
                got = values(k, a, b, idx, raw)
                if self._fp32:
                    ints.index_copy_(0, idx, got[1])
                else:
                    buf.index_copy_(0, idx, got[3].to(buf.dtype))
                for c, x in zip(cols, got, strict=True):
                    c.append(x)
        if not cols[0]:
            return None
        if len(cols[0]) == 1:  # left on the device: the log is built (and synchronises) when read
            return tuple(c[0] for c in cols)
        return tuple(torch.cat([x.cpu() for x in c]) for c in cols)

    def _apply_sites(self, elem: Tensor, bit: Tensor, value: int | None) -> FaultLog:
        words, inv, mask = word_masks(elem, bit)
        n = words.numel()

        def values(_k: int, a: int, b: int, idx: Tensor, raw: Tensor) -> tuple[Tensor, ...]:
            m = (mask if b - a == n else mask[a:b]).to(idx.device)
            if self._fp32:
                new = apply_mask(raw, m, value)
                return raw, new, raw.view(torch.float32), new.view(torch.float32)
            oldv = raw.view(self._segments[_k][1].dtype).float()
            w = words if b - a == n else words[a:b]
            scale = self._elem_scale(w)
            enc = self.format.encode(oldv, None if scale is None else scale.to(idx.device))
            new = apply_mask(enc.qdata, m, value)
            return enc.qdata, new, oldv, self.format.decode(enc.replace(qdata=new))

        try:
            got = self._write(words, values)
            if got is None:
                z = torch.empty(0, dtype=torch.int64)
                return self.space.make_log(elem, bit, inv, z, z, z.float(), z.float(), value)
            return self.space.make_log(elem, bit, inv, *got, value)
        except BaseException:
            self.undo()
            raise

    def _elem_scale(self, words: Tensor) -> Tensor | None:
        """The clean scale of each global element in ``words`` (O(len(words)))."""
        if not self._scaled:
            return None
        tid, idx = self.space.locate(words)
        if self._scale_table is not None:
            return self._scale_table.index_select(0, tid)
        from quant_schemes import gather_scale

        ids, counts = torch.unique_consecutive(tid, return_counts=True)
        parts, a = [], 0
        for i, c in zip(ids.tolist(), counts.tolist(), strict=True):
            parts.append(gather_scale(self._scales[i], self.space.shapes[i], idx[a : a + c]).float().cpu())
            a += c
        return torch.cat(parts)

    def undo(self) -> None:
        """Restore the clean words touched by the pending fault (bit-exact)."""
        if self._pending is None:
            return
        with torch.no_grad():
            for ints, idx, raw in reversed(self._pending):
                ints.index_copy_(0, idx, raw)
        self._pending = None

    @contextlib.contextmanager
    def inject(
        self,
        fault,
        generator: torch.Generator | None = None,
        seed: int | None = None,
        part: str | None = None,
    ) -> Iterator[FaultLog]:
        """Apply on enter (yields the FaultLog), undo on exit, also on exceptions."""
        log = self.apply(fault, generator=generator, seed=seed, part=part)
        try:
            yield log
        finally:
            self.undo()

    def clean_codes(self, name: str):
        """``fmt.encode`` of the clean (quantized) tensor ``name`` with its scale (an Encoded with
        the stored scale words, zero points and tensor scale where the format stores them)."""
        if not self._active or self._pending is not None:
            raise QfiError("clean_codes needs an entered session with no fault applied")
        if name not in self.space.pos:
            raise QfiError(f"{name!r} is not selected in this session")
        i = self.space.pos[name]
        scale = self._qp[i] if self._stored else self._scales[i]
        return self.format.encode(self._tensors[i].detach().float(), scale)

    # -- stored scales ---------------------------------------------------------------------------------
    def _build_stored_tables(self) -> None:
        """Flat CPU copies (numpy views) of every tensor's stored words (scale codes, decoded scales,
        zero points, tensor scales) and per-tensor geometry, so that a trial maps elements to scale
        words and scale words to their elements with a few vectorised numpy ops (numpy: a small
        fraction of torch's per-op overhead at the sizes of a trial)."""
        from quant_schemes import PerChannel, PerGroup

        fmt, qps = self.format, self._qp
        self._sc_flat = torch.cat([q.scale_codes.reshape(-1).cpu() for q in qps]).to(torch.int32)
        self._s_flat = torch.cat([q.scale.reshape(-1).cpu() for q in qps]).float()
        zps = [q.zero_point for q in qps]
        self._zp_flat = (
            None if zps[0] is None else torch.cat([z.reshape(-1).cpu() for z in zps]).to(torch.int32)
        )
        ts = [q.tensor_scale for q in qps]
        self._ts_t = None if ts[0] is None else torch.stack([t.reshape(()).float().cpu() for t in ts])
        g = fmt.granularity
        # element -> scale word: ((idx // a) % b) * m + (idx % e) // gs ; scale word -> run of elements
        rows = []
        for shape in self.space.shapes:
            n_el = max(int(torch.Size(shape).numel()), 1)
            if isinstance(g, PerChannel):
                inner = int(torch.Size(shape[g.axis + 1 :]).numel()) if shape else 1
                rows.append((max(inner, 1), max(shape[g.axis], 1), 1, 1, 1, 1, 1, 1))
            elif isinstance(g, PerGroup):
                n = max(shape[-1] if shape else 1, 1)
                ng = -(-n // g.size)
                rows.append((n, 2**62, ng, n, g.size, n, ng, g.size))
            else:  # per tensor: one run of every element
                rows.append((1, 1, 0, 1, 1, n_el, 1, n_el))
        self._geo = np.array(rows, dtype=np.int64).T.copy()  # (8, tensors)
        self._per_channel = isinstance(g, PerChannel)
        # groups of a power-of-two size on tensors whose rows hold whole groups: word = elem >> k
        size = g.size if isinstance(g, PerGroup) else 0
        self._shift = size.bit_length() - 1 if size and size & (size - 1) == 0 else None
        self._ragged = np.array([not isinstance(g, PerGroup) or (s[-1] if s else 1) % g.size != 0
                                 for s in self.space.shapes])
        self._np_starts = self.space._starts_t.numpy()
        self._np_ends = self.space._ends_t.numpy()
        self._np_wstarts = self.space._wstarts_t["scales"].numpy()
        self._np_wends = self.space._wends_t["scales"].numpy()
        # the clean element codes, laid out like the segments (one flat tensor, or one per tensor)
        if len(self._segments) == 1:
            self._code_segs = [torch.cat(self._codes).to(self._segments[0][1].device)]
        else:
            segs = zip(self._codes, self._segments, strict=True)
            self._code_segs = [c.to(buf.device) for c, (_, buf) in segs]
        self._codes = []

    def _scale_words(self, tid: np.ndarray, idx: np.ndarray) -> np.ndarray:
        """Global scale word of each element (tensor id, flat index)."""
        if self._shift is not None:  # whole power-of-two groups per row: one shift, ragged rows apart
            local = idx >> self._shift
            rag = self._ragged[tid]
            if rag.any():
                t, i = tid[rag], idx[rag]
                a, b, m, e, gs = self._geo[:5, t]
                local[rag] = (i // a % b) * m + (i % e) // gs
            return self._np_wstarts[tid] + local
        a, b, m, e, gs = self._geo[:5, tid]
        return self._np_wstarts[tid] + (idx // a % b) * m + (idx % e) // gs

    def _members(self, words: np.ndarray) -> np.ndarray:
        """Global elements governed by the sorted distinct global scale ``words`` (sorted)."""
        if words.size == 0:
            return words
        tid = np.searchsorted(self._np_wends, words, side="right")
        w = words - self._np_wstarts[tid]
        if self._per_channel:  # channels are strided: one call per hit tensor (rare and small)
            parts = []
            for i in np.unique(tid).tolist():
                el, _ = self.format.scale_members(self.space.shapes[i], torch.from_numpy(w[tid == i]))
                parts.append(el.numpy() + self._np_starts[i])
            return np.sort(np.concatenate(parts))
        n, ng, gsz = self._geo[5:, tid]
        grp = w % ng
        start = self._np_starts[tid] + (w // ng) * n + grp * gsz
        count = np.minimum(gsz, n - grp * gsz)
        widest = int(count.max())
        if widest <= 4096:  # blocks and groups: a (words, widest) grid, masked
            j = np.arange(widest, dtype=np.int64)
            return (start[:, None] + j)[j < count[:, None]]
        first = np.cumsum(count) - count  # a per-tensor scale: runs of a whole tensor
        return np.repeat(start - first, count) + np.arange(int(count.sum()), dtype=np.int64)

    def _apply_stored(self, sites: dict, value: int | None) -> FaultLog:
        """Faults in the codes, scale words and zero points of a stored-scale format: every element
        whose code flipped or whose scale / zero point flipped is re-encoded with its clean
        parameters and decoded from the (faulty) words; one undo entry per written element word.
        Index maths in numpy on the CPU, value maths in torch on the weights' device."""
        from quant_schemes import QParams

        fmt, space = self.format, self.space
        empty = torch.empty(0, dtype=torch.int64)
        ce, cb = sites.get("codes", (empty, empty))
        se, sb = sites.get("scales", (empty, empty))
        ze, zb = sites.get("zero_points", (empty, empty))
        cw, cinv, cmask = word_masks(ce, cb)
        sw, sinv, smask = word_masks(se, sb) if se.numel() else (se, None, se.to(torch.int32))
        zw, zinv, zmask = word_masks(ze, zb) if ze.numel() else (ze, None, ze.to(torch.int32))
        cw_n, sw_n, zw_n = cw.numpy(), sw.numpy(), zw.numpy()
        # faulty scale / zero-point words (global scale-word ids; a zero point shares its scale's id)
        old_sc = self._sc_flat.index_select(0, sw)
        new_sc = apply_mask(old_sc, smask, value)
        old_zp = None if self._zp_flat is None else self._zp_flat.index_select(0, zw)
        new_zp = None if old_zp is None else apply_mask(old_zp, zmask, value)
        hit = _sorted_union(sw_n, zw_n) if zw_n.size else sw_n
        if hit.size:
            elems = _sorted_union(cw_n, self._members(hit))
            cpos = np.searchsorted(elems, cw_n)
            emask_n = np.zeros(elems.size, dtype=np.int32)
            emask_n[cpos] = cmask.numpy()
            emask = torch.from_numpy(emask_n)
        else:  # codes only: the elements are the code words
            elems, cpos, emask = cw_n, None, cmask
        tid = np.searchsorted(self._np_ends, elems, side="right")
        swe = self._scale_words(tid, elems - self._np_starts[tid])
        swe_t = torch.from_numpy(swe)
        # decode_elements reads the scale (and zero point) of each element: the clean codes are kept
        clean = QParams(self._s_flat.index_select(0, swe_t), self._sc_flat.index_select(0, swe_t),
                        None if self._zp_flat is None else self._zp_flat.index_select(0, swe_t))
        faulty = clean
        new_s = None
        if sw_n.size:  # the faulty scales of the hit words, then of their elements
            wtid = space.locate_part(sw, "scales")[0]
            new_s = fmt.decode_scale(new_sc, None if self._ts_t is None else self._ts_t.index_select(0, wtid))
            new_s = new_s.float()
            j = np.minimum(np.searchsorted(sw_n, swe), sw_n.size - 1)
            is_hit = torch.from_numpy(sw_n[j] == swe)
            scale = torch.where(is_hit, new_s.index_select(0, torch.from_numpy(j)), clean.scale)
            faulty = faulty.replace(scale=scale)
        if zw_n.size:
            j = np.minimum(np.searchsorted(zw_n, swe), zw_n.size - 1)
            is_hit = torch.from_numpy(zw_n[j] == swe)
            zp = torch.where(is_hit, new_zp.index_select(0, torch.from_numpy(j)), clean.zero_point)
            faulty = faulty.replace(zero_point=zp)
        elems_t = torch.from_numpy(elems)
        n = elems.size

        def values(k: int, a: int, b: int, idx: Tensor, raw: Tensor) -> tuple[Tensor, ...]:
            whole, dev = b - a == n, idx.device
            qf = faulty if whole and dev.type == "cpu" else _slice_qp(faulty, slice(a, b), dev)
            old = self._code_segs[k].index_select(0, idx).to(torch.int32)
            if fmt.bits > 8:  # int16 storage of unsigned patterns
                old &= self.space.code_mask
            new = apply_mask(old, (emask if whole else emask[a:b]).to(dev), value)
            return old, new, raw.view(self._segments[k][1].dtype).float(), fmt.decode_elements(new, qf)

        try:
            got = self._write(elems_t, values)
            rows = {}
            if ce.numel():
                old_all, new_all, oldv_all, newv_all = (x.cpu() for x in got)
                if cpos is not None:
                    cp = torch.from_numpy(cpos)
                    old_all, new_all, oldv_all, newv_all = (
                        x.index_select(0, cp) for x in (old_all, new_all, oldv_all, newv_all))
                rows["codes"] = (ce, cb, cinv, old_all, new_all, oldv_all, newv_all)
            if se.numel():
                rows["scales"] = (se, sb, sinv, old_sc, new_sc, self._s_flat.index_select(0, sw), new_s)
            if ze.numel():
                rows["zero_points"] = (ze, zb, zinv, old_zp, new_zp, old_zp.float(), new_zp.float())
            n_sites = ce.numel() + se.numel() + ze.numel()
            return space.make_parts_log(rows, value, n_sites)
        except BaseException:
            self.undo()
            raise

    def tensor(self, name: str) -> Tensor:
        """The live selected tensor ``name`` (a view of the session's buffer when ``flat``)."""
        return self._tensors[self.space.pos[name]]


def _sorted_union(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Sorted distinct values of two int64 arrays (cheaper than np.union1d's hash at these sizes)."""
    c = np.concatenate([a, b])
    c.sort()
    if c.size < 2:
        return c
    keep = np.empty(c.size, dtype=bool)
    keep[0] = True
    np.not_equal(c[1:], c[:-1], out=keep[1:])
    return c[keep]


def _slice_qp(qp, sl: slice, device: torch.device):
    """Per-element QParams rows ``sl`` on ``device`` (the tensor scale is per element too)."""
    from quant_schemes import QParams

    def cut(t: Tensor | None) -> Tensor | None:
        return None if t is None else t[sl].to(device)

    return QParams(cut(qp.scale), cut(qp.scale_codes), cut(qp.zero_point), cut(qp.tensor_scale))


def weights(
    model: nn.Module,
    fmt: object = "fp32",
    names: object = None,
    exclude: object = None,
    flat: bool = True,
    bn_stats: bool = False,
    part: str = "all",
) -> WeightSession:
    """A context manager for weight faults on the selected tensors; see ``WeightSession``.
    BatchNorm running statistics are selectable only with ``bn_stats=True``; ``part`` chooses
    which stored words of a format with stored scales faults hit (``"all"``, ``"codes"``,
    ``"scales"``, ``"zero_points"``; see ``qfi.space``)."""
    return WeightSession(model, fmt, names, exclude, flat, bn_stats, part)


__all__ = ["WeightSession", "weights"]
