"""Weight sessions (in-place faults with an undo log) and activation sessions (forward hooks).

Weights.  ``with qfi.weights(model, "int8") as s:`` selects tensors by name and, for every
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

Activations.  ``with qfi.activations(model, "int8", calibrate=batches) as a:`` quantizes the
output of each selected module in a forward hook and, while a fault is armed, flips sites in
it.  The fault space of a module is the first floating tensor of its output (for
``nn.MultiheadAttention``, ``attn_output``).
"""

from __future__ import annotations

import contextlib
import mmap
import os
import weakref
from collections.abc import Iterable, Iterator

import torch
from torch import Tensor, nn

from qfi.errors import QfiError
from qfi.faults import (
    BitFlip,
    FlipCount,
    FlipSites,
    StuckAt,
    apply_mask,
    make_generator,
    odd_sites,
    resolve_bits,
    sample_sites,
    word_masks,
)
from qfi.log import FaultLog
from qfi.select import activation_modules, select_modules, select_weights, weight_tensors

_INT_VIEW = {
    torch.float32: torch.int32,
    torch.float16: torch.int16,
    torch.bfloat16: torch.int16,
    torch.float64: torch.int64,
}


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


def first_float(out: object) -> Tensor | None:
    """The tensor that carries activation faults: ``out`` or the first floating tensor in it."""
    if isinstance(out, Tensor):
        return out if out.is_floating_point() else None
    if isinstance(out, (tuple, list)):
        for o in out:
            if isinstance(o, Tensor) and o.is_floating_point():
                return o
    return None


def _tensors_in(obj: object, out: list[Tensor], depth: int = 0) -> list[Tensor]:
    """The tensors in ``obj`` and in the tuples, lists and dicts it nests (a few levels)."""
    if isinstance(obj, Tensor):
        out.append(obj)
    elif depth < 4 and isinstance(obj, (tuple, list)):
        for o in obj:
            _tensors_in(o, out, depth + 1)
    elif depth < 4 and isinstance(obj, dict):
        for o in obj.values():
            _tensors_in(o, out, depth + 1)
    return out


def _owned(t: Tensor, inputs: object, module: nn.Module | None = None, kwargs: object = None) -> bool:
    """Whether a module output may be overwritten in place: autograd does not track it and it
    shares no storage with the module's inputs, positional or keyword, also inside tuples, lists
    and dicts (``nn.Identity``, ``Dropout`` in eval and friends return their input, which a
    residual branch may still read), nor with its own parameters, buffers and plain tensor
    attributes (a positional table kept as ``self.pe`` and returned sliced).  (A view of a fresh
    intermediate, as ``nn.Linear`` returns for 3-D inputs, is fine.)"""
    if t.requires_grad:
        return False
    ptr = t.untyped_storage().data_ptr()
    others = _tensors_in(kwargs, _tensors_in(inputs, []))
    if module is not None:
        others += [*module.parameters(), *module.buffers()]
        others += [v for v in vars(module).values() if isinstance(v, Tensor)]
    return all(x.untyped_storage().data_ptr() != ptr for x in others)


def _replace_first(out: object, new: Tensor) -> object:
    if isinstance(out, Tensor):
        return new
    items = list(out)  # type: ignore[call-overload]
    for i, o in enumerate(items):
        if isinstance(o, Tensor) and o.is_floating_point():
            items[i] = new
            break
    return type(out)(items) if isinstance(out, list) else tuple(items)


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


class _Space:
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


class WeightSession:
    """Context manager for weight faults; see the module docstring and ``qfi.weights``."""

    def __init__(
        self,
        model: nn.Module,
        fmt: object = "fp32",
        names: object = None,
        exclude: object = None,
        flat: bool = True,
    ) -> None:
        self.model, self.format, self.flat = model, get_fmt(fmt), flat
        self._filter = (names, exclude)
        self._active = False
        self._pending: list[tuple[Tensor, Tensor, Tensor]] | None = None

    # -- enter / exit ---------------------------------------------------------------------------
    def __enter__(self) -> WeightSession:
        if self._active:
            raise QfiError("this weight session is already entered")
        fmt = self.format
        table = weight_tensors(self.model)
        self.names = select_weights(self.model, *self._filter)
        ts = [table[n] for n in self.names]
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
        self.space = _Space(self.names, [tuple(t.shape) for t in ts], fmt)
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
            for t in self._tensors:
                entry = _LIVE.get(id(t))
                if entry is not None and entry[2]() is self:
                    del _LIVE[id(t)]
            self._orig, self._kept, self._swapped, self._segments, self._active = [], {}, [], [], False

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
    model: nn.Module, fmt: object = "fp32", names: object = None, exclude: object = None, flat: bool = True
) -> WeightSession:
    """A context manager for weight faults on the selected tensors; see ``WeightSession``."""
    return WeightSession(model, fmt, names, exclude, flat)


class ActivationSession:
    """Context manager for activation faults; see the module docstring and ``qfi.activations``.

    Each selected module's output is replaced by ``fmt.quantize(output)`` (fp32: left alone
    unless a fault is armed for this forward).  Integer scales are per tensor: calibrated as
    ``max|x|`` over the ``calibrate`` inputs on enter and then frozen, or with ``dynamic=True``
    chosen on every output.  Per-channel formats are not supported for activations.

    Forwards are counted from ``arm`` (``call`` 0 is the first forward after it).  BitFlip and
    StuckAt(ber) sample each output independently (the same law as one draw over all outputs);
    FlipCount, StuckAt(count) and explicit sites are sampled once per forward over all selected
    outputs, whose sizes come from one extra probe forward per new input shape.  A module called
    several times in one forward gets the planned sites on its first call only.  The emulation
    is for inference: the quantized output carries no gradient to the module.
    """

    def __init__(
        self,
        model: nn.Module,
        fmt: object = "fp32",
        names: object = None,
        exclude: object = None,
        calibrate: Iterable | None = None,
        dynamic: bool = False,
    ) -> None:
        self.model, self.format, self.dynamic = model, get_fmt(fmt), dynamic
        self._filter, self._calibrate = (names, exclude), calibrate
        self._handles: list = []
        self._fault = None
        self._mode = "off"
        self.log = FaultLog([])

    def __enter__(self) -> ActivationSession:
        fmt = self.format
        if type(getattr(fmt, "granularity", None)).__name__ == "PerChannel":
            raise QfiError(
                f"per-channel format {fmt.name!r} is not supported for activations; use a "
                "per-tensor format such as 'int8'"
            )
        table = activation_modules(self.model)
        self.names = select_modules(self.model, *self._filter)
        self._mods = [table[n] for n in self.names]
        self._fp32 = fmt.name == "fp32"
        self._scaled = fmt.choose_qparams(torch.ones(1)) is not None
        self._scales: list[Tensor | None] = [None] * len(self._mods)
        self._sizes: dict[object, list[int]] = {}
        self.log = FaultLog(self.names)
        self._handles = [self.model.register_forward_pre_hook(self._pre, with_kwargs=True)]
        self._handles += [
            m.register_forward_hook(self._hook(i), with_kwargs=True) for i, m in enumerate(self._mods)
        ]
        try:
            if self._scaled and not self.dynamic:
                self._run_calibration()
        except BaseException:
            self._remove()
            raise
        self._mode = "run"
        return self

    def _run_calibration(self) -> None:
        if self._calibrate is None:
            raise QfiError(
                f"format {self.format.name!r} needs a scale: pass calibrate=<model inputs> or dynamic=True"
            )
        self._amax: list[Tensor | None] = [None] * len(self._mods)
        self._mode = "calib"
        with torch.no_grad():
            for x in self._calibrate:
                self.model(*x) if isinstance(x, (tuple, list)) else self.model(x)
        missing = [n for n, a in zip(self.names, self._amax, strict=True) if a is None]
        if missing:
            raise QfiError(f"calibration never reached {missing[:3]}; are the calibrate inputs empty?")
        self._scales = [self.format.choose_qparams(a.reshape(1)) for a in self._amax]

    def __exit__(self, *exc: object) -> None:
        self.disarm()
        self._remove()

    def _remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles, self._mode = [], "off"

    # -- arming ---------------------------------------------------------------------------------------
    def arm(
        self,
        fault,
        generator: torch.Generator | None = None,
        seed: int | None = None,
        calls: Iterable[int] | None = None,
    ) -> FaultLog:
        """Apply ``fault`` to every following forward (or only to forward indices ``calls``)."""
        if self._mode != "run":
            raise QfiError("use the session inside its `with` block")
        if self._fault is not None:
            raise QfiError("a fault is already armed; call disarm() first (or use act.inject)")
        if not isinstance(fault, (BitFlip, FlipCount, FlipSites, StuckAt)):
            raise QfiError(f"not a fault model: {fault!r} (BitFlip, FlipCount, FlipSites, StuckAt)")
        if not isinstance(fault, FlipSites):
            resolve_bits(fault.bits, self.format.bits, self.format.name)
        if calls is not None:
            calls = frozenset(int(c) for c in calls)
            if any(c < 0 for c in calls):
                raise QfiError(f"calls={sorted(calls)}: forward indices are >= 0")
        self._g = make_generator(generator, seed)
        self._fault, self._calls, self._call, self._plan = fault, calls, -1, {}
        by_ber = isinstance(fault, StuckAt) and fault.ber is not None
        self._per_output = isinstance(fault, BitFlip) or by_ber
        self.log = FaultLog(self.names, fmt=self.format.name)
        return self.log

    def disarm(self) -> None:
        self._fault, self._plan = None, {}

    @contextlib.contextmanager
    def inject(
        self,
        fault,
        generator: torch.Generator | None = None,
        seed: int | None = None,
        calls: Iterable[int] | None = None,
    ) -> Iterator[FaultLog]:
        """Arm on enter (yields the FaultLog, filled as forwards run), disarm on exit."""
        log = self.arm(fault, generator=generator, seed=seed, calls=calls)
        try:
            yield log
        finally:
            self.disarm()

    def _armed_now(self) -> bool:
        return self._fault is not None and (self._calls is None or self._call in self._calls)

    # -- hooks ----------------------------------------------------------------------------------------
    def _pre(self, _module: nn.Module, args: tuple, kwargs: dict) -> None:
        if self._mode != "run" or self._fault is None:
            return
        self._call += 1
        if not self._armed_now() or self._per_output:
            return
        sizes = self._probe_sizes(args, kwargs)
        space = _Space(self.names, [(n,) for n in sizes], self.format)
        elem, bit, _ = space.sites(self._fault, self._g)
        tid, idx = space.locate(elem)
        ids, counts = torch.unique_consecutive(tid, return_counts=True)
        self._plan, a = {}, 0
        for i, c in zip(ids.tolist(), counts.tolist(), strict=True):
            self._plan[i] = (idx[a : a + c], bit[a : a + c])
            a += c

    def _probe_sizes(self, args: tuple, kwargs: dict) -> list[int]:
        def sig(a: object) -> object:
            return (tuple(a.shape), a.dtype) if isinstance(a, Tensor) else type(a)

        key = (tuple(sig(a) for a in args), tuple((k, sig(v)) for k, v in kwargs.items()))
        if key not in self._sizes:
            self._probe = [0] * len(self._mods)
            self._mode = "probe"
            try:
                with torch.no_grad():
                    self.model(*args, **kwargs)
            finally:
                self._mode = "run"
            self._sizes[key] = self._probe
        return self._sizes[key]

    def _hook(self, i: int):
        def hook(_module: nn.Module, _inp: object, _kw: dict, out: object) -> object:
            t = first_float(out)
            if t is None or self._mode in ("off", "probe"):
                if t is not None and self._mode == "probe" and not self._probe[i]:
                    self._probe[i] = t.numel()
                return None
            if self._mode == "calib":
                a = t.detach().abs().amax().float()
                self._amax[i] = a if self._amax[i] is None else torch.maximum(self._amax[i], a)
                return None
            armed = self._armed_now()
            if self._fp32 and not armed:
                return None
            if self._fp32 and t.dtype != torch.float32:
                raise QfiError(f"activation {self.names[i]!r} is {t.dtype}; format 'fp32' needs float32")
            scale = self.format.choose_qparams(t.detach().float()) if self.dynamic else self._scales[i]
            q = t if self._fp32 else self._quantize(t, scale, _owned(t, _inp, _module, _kw))
            if armed:
                q = self._inject(i, q, scale)
            return _replace_first(out, q.to(t.dtype))

        return hook

    def _quantize(self, t: Tensor, scale: Tensor | None, inplace: bool = False) -> Tensor:
        """``fmt.quantize(t)`` in fewer passes for float and int formats (the same values, checked
        in tests/test_inject.py; NaN payloads aside, and a NaN activation propagates instead of
        raising as ``IntSymmetric.encode`` would).  With ``inplace`` (a float32 output that the
        module made fresh and autograd does not track) the result is written into ``t`` itself:
        no new allocation, which on the CPU means no page faults on every forward."""
        fmt = self.format
        dt = getattr(fmt, "torch_dtype", None)
        inplace = inplace and t.dtype == torch.float32
        if scale is None and dt is not None and t.dtype == torch.float32:
            return t.copy_(t.to(dt)) if inplace else t.to(dt).to(torch.float32)
        if scale is not None and type(fmt).__name__ == "IntSymmetric" and fmt.bits <= 24:
            # the arithmetic of IntSymmetric.decode(encode(t, scale)), in three passes
            s = scale.to(t.device, torch.float32)
            r = torch.reciprocal(s)
            q = t.mul_(r).round_() if inplace else torch.round(t.float() * r)
            return q.clamp_(-fmt.qmax, fmt.qmax).mul_(s)
        return fmt.quantize(t, scale)

    def _inject(self, i: int, q: Tensor, scale: Tensor | None) -> Tensor:
        fault, fmt = self._fault, self.format
        if self._per_output:
            eligible = resolve_bits(fault.bits, fmt.bits, fmt.name)
            elem, bit = sample_sites(fault, q.numel(), eligible, self._g)
        else:
            elem, bit = self._plan.pop(i, (torch.empty(0, dtype=torch.int64),) * 2)
        if elem.numel() == 0:
            return q
        value = fault.value if isinstance(fault, StuckAt) else None
        words, inv, mask = word_masks(elem, bit)
        flat = q.reshape(-1)
        idx, m = words.to(q.device), mask.to(q.device)
        vals = flat.index_select(0, idx)
        if self._fp32:
            old = vals.view(torch.int32)
            new = apply_mask(old, m, value)
            newv = new.view(torch.float32)
        else:
            from quant_schemes import gather_scale

            s = gather_scale(scale, q.shape, idx)
            enc = fmt.encode(vals.float(), s)
            old = enc.qdata
            new = apply_mask(old, m, value)
            newv = fmt.decode(enc.replace(qdata=new))
        cols = log_rows(elem, bit, inv, old, new, vals, newv, value, (1 << fmt.bits) - 1, self._call)
        cols["name_id"] = torch.full_like(cols["index"], i)
        self.log.extend(cols, elem.numel())
        newv = newv.to(flat.dtype)
        if self._fp32:  # q is the module's own output: never modified in place
            return flat.index_copy(0, idx, newv).view_as(q)
        return flat.index_copy_(0, idx, newv).view_as(q)  # q is our fresh quantized copy


def activations(
    model: nn.Module,
    fmt: object = "fp32",
    names: object = None,
    exclude: object = None,
    calibrate: Iterable | None = None,
    dynamic: bool = False,
) -> ActivationSession:
    """A context manager quantizing (and, when armed, faulting) selected module outputs."""
    return ActivationSession(model, fmt, names, exclude, calibrate, dynamic)
