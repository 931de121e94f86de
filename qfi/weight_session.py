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

import torch
from torch import Tensor, nn

from qfi.errors import QfiError
from qfi.faults import apply_mask, make_generator, odd_sites, word_masks
from qfi.log import FaultLog
from qfi.select import select_weights, weight_table
from qfi.space import FaultSpace, get_fmt

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
    ) -> None:
        self.model, self.format, self.flat = model, get_fmt(fmt), flat
        self._filter, self.bn_stats = (names, exclude), bn_stats
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
        # tied weights: every other name of a selected tensor resolves to it (FlipSites, replay)
        for n in self.names:
            for alias, _ in table[n][1:]:
                self.space.pos.setdefault(alias, self.space.pos[n])
        self.numel = self.space.numel
        self.total_bits = self.numel * fmt.bits
        self._tensors = ts
        self._scales = [None] * len(ts)
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
        me = weakref.ref(self)
        for t in ts:
            _LIVE[id(t)] = (weakref.ref(t), f"{self.format.name}, {len(ts)} tensor(s)", me)
        self._active = True
        return self

    def _quantize(self, i: int, t: Tensor) -> Tensor:
        x = t.detach().float()
        scale = self.format.choose_qparams(x)
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

    def apply(self, fault, generator: torch.Generator | None = None, seed: int | None = None) -> FaultLog:
        """Apply ``fault`` once, in place; returns its FaultLog.  Cost O(flips).  If anything
        goes wrong part-way (an error, a KeyboardInterrupt), the words written so far are
        restored before the exception propagates."""
        self._check()
        elem, bit, value = self.space.sites(fault, make_generator(generator, seed))
        return self._apply_sites(elem, bit, value)

    def replay(self, log: FaultLog) -> FaultLog:
        """Re-apply the bits of a saved log (same words, same codes as when it was made).

        QfiError, with nothing changed, when the log cannot belong to this session: another
        format, a name not selected, an index or bit out of range, or clean codes that differ
        from the log's ``old_code`` (another checkpoint, or another scale).
        """
        self._check()
        fmt, pos = self.format, self.space.pos
        if log.format and log.format != fmt.name:
            raise QfiError(f"the log was made in format {log.format!r}; this session uses {fmt.name!r}")
        missing = [n for n in log.names if n not in pos]
        if missing:
            raise QfiError(f"log names {missing[0]!r}, which this session did not select")
        cols = log.columns
        remap = torch.tensor([pos[n] for n in log.names] or [0], dtype=torch.int64)
        tid = remap.index_select(0, cols["name_id"])
        index, bits = cols["index"], cols["bit"]
        sizes = torch.tensor(self.space.sizes, dtype=torch.int64).index_select(0, tid)
        bad = ((index < 0) | (index >= sizes)).nonzero().flatten()
        if bad.numel():
            r = int(bad[0])
            raise QfiError(
                f"log row {r}: index {int(index[r])} is outside {self.names[int(tid[r])]!r} "
                f"({int(sizes[r])} elements)"
            )
        bad = ((bits < 0) | (bits >= fmt.bits)).nonzero().flatten()
        if bad.numel():
            b = int(bits[int(bad[0])])
            raise QfiError(f"log bit {b} is outside format {fmt.name!r}, whose bits are 0..{fmt.bits - 1}")
        elem = self.space._starts_t.index_select(0, tid) + index
        e, b = odd_sites(elem, bits, parity=True)
        out = self._apply_sites(e, b, None)
        # the words must hold the clean codes the log saw, else the replay is another fault
        key = elem * 64 + bits
        got = out.columns
        got_key = self.space._starts_t.index_select(0, got["name_id"]) + got["index"]
        got_key = got_key * 64 + got["bit"]
        order, got_order = key.argsort(), got_key.argsort()
        if torch.equal(key[order], got_key[got_order]):
            want, have = cols["old_code"][order], got["old_code"][got_order]
            diff = (want != have).nonzero().flatten()
            if diff.numel():
                r, d = int(order[int(diff[0])]), int(diff[0])
                self.undo()
                raise QfiError(
                    f"log row {r} ({self.names[int(tid[r])]!r}[{int(index[r])}]): the log's old_code "
                    f"{int(want[d]):#x} differs from this session's clean code {int(have[d]):#x}; "
                    "was the log made on another checkpoint, format or calibration?"
                )
        return out

    def _apply_sites(self, elem: Tensor, bit: Tensor, value: int | None) -> FaultLog:
        words, inv, mask = word_masks(elem, bit)
        if len(self._segments) == 1:
            bounds = [0, words.numel()]
        else:
            bounds = torch.searchsorted(words, self._seg_starts).tolist() + [words.numel()]
        olds, news, oldvs, newvs = [], [], [], []
        # the undo log is pending before the first write and holds each word before it is
        # written, so an exception (or a KeyboardInterrupt) part-way can restore everything
        undo: list[tuple[Tensor, Tensor, Tensor]] = []
        self._pending = undo
        try:
            with torch.no_grad():
                for k, (start, buf) in enumerate(self._segments):
                    a, b = bounds[k], bounds[k + 1]
                    if a == b:
                        continue
                    dev = buf.device
                    w = words[a:b] if b - a != words.numel() else words
                    idx, m = (w - start if start else w), (mask[a:b] if b - a != mask.numel() else mask)
                    if dev.type != "cpu":
                        idx, m = idx.to(dev), m.to(dev)
                    ints = buf.view(_INT_VIEW[buf.dtype])
                    raw = ints.index_select(0, idx)
                    undo.append((ints, idx, raw))
                    if self._fp32:
                        old = raw
                        new = apply_mask(old, m, value)
                        ints.index_copy_(0, idx, new)
                        oldv, newv = old.view(torch.float32), new.view(torch.float32)
                    else:
                        oldv = raw.view(buf.dtype).float()
                        scale = self._elem_scale(w)
                        scale = None if scale is None else scale.to(dev)
                        enc = self.format.encode(oldv, scale)
                        old = enc.qdata
                        new = apply_mask(old, m, value)
                        newv = self.format.decode(enc.replace(qdata=new))
                        buf.index_copy_(0, idx, newv.to(buf.dtype))
                    olds.append(old)
                    news.append(new)
                    oldvs.append(oldv)
                    newvs.append(newv)
            cat = (lambda xs: torch.cat([x.cpu() for x in xs])) if len(olds) != 1 else (lambda xs: xs[0])
            if not olds:
                z = torch.empty(0, dtype=torch.int64)
                return self.space.make_log(elem, bit, inv, z, z, z.float(), z.float(), value)
            return self.space.make_log(elem, bit, inv, cat(olds), cat(news), cat(oldvs), cat(newvs), value)
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
        self, fault, generator: torch.Generator | None = None, seed: int | None = None
    ) -> Iterator[FaultLog]:
        """Apply on enter (yields the FaultLog), undo on exit, also on exceptions."""
        log = self.apply(fault, generator=generator, seed=seed)
        try:
            yield log
        finally:
            self.undo()

    def clean_codes(self, name: str):
        """``fmt.encode`` of the clean (quantized) tensor ``name`` with its scale."""
        if not self._active or self._pending is not None:
            raise QfiError("clean_codes needs an entered session with no fault applied")
        if name not in self.space.pos:
            raise QfiError(f"{name!r} is not selected in this session")
        i = self.space.pos[name]
        return self.format.encode(self._tensors[i].detach().float(), self._scales[i])

    def tensor(self, name: str) -> Tensor:
        """The live selected tensor ``name`` (a view of the session's buffer when ``flat``)."""
        return self._tensors[self.space.pos[name]]


def weights(
    model: nn.Module,
    fmt: object = "fp32",
    names: object = None,
    exclude: object = None,
    flat: bool = True,
    bn_stats: bool = False,
) -> WeightSession:
    """A context manager for weight faults on the selected tensors; see ``WeightSession``.
    BatchNorm running statistics are selectable only with ``bn_stats=True``."""
    return WeightSession(model, fmt, names, exclude, flat, bn_stats)


__all__ = ["WeightSession", "weights"]
