"""Activation sessions: selected module outputs quantized in forward hooks and, while armed, faulted.

``with qfi.activations(model, "int8", calibrate=batches) as a:`` quantizes the output of each
selected module in a forward hook and, while a fault is armed, flips sites in it.

Which tensor.  The fault space of a module is one floating tensor of its output, found by
walking the output (``qfi.outputs``: tensors, tuples, lists, dicts, HF ``ModelOutput`` and other
mappings, dataclasses, nested).  ``output=None`` (default) takes the first floating tensor in
walk order: a tensor output itself, ``attn_output`` of ``nn.MultiheadAttention``, the first
field of a ``ModelOutput`` that is set (``last_hidden_state``, ``logits``); ``output="logits"``
or ``output=1`` (a key, a field, an index, or a dotted path such as ``"hidden_states.3"``)
chooses another, for every selected module.  The rest of the output passes through untouched
and every container keeps its type.  A selected module whose output holds no floating tensor
(or not the chosen key) is a QfiError naming the module and its output type, raised by the
first forward that reaches it (calibration, a size probe or a plain forward).

Nested modules.  Selected modules may contain each other (a block and its layers).  A module
whose output is the very tensor that a selected module inside it has just produced (an encoder
returning its final LayerNorm's output) is not quantized or faulted a second time: every
tensor is one fault site, counted once.

Block and group formats.  Formats that store their scales (MX, NVFP4, ``int4_g128``,
``uint8_asym``) compute them from each output on every forward, as MX hardware does
(``calibrate`` and ``dynamic`` are not used for them), along the output's last axis (the feature
dimension).  Faults hit the output's element codes and the scale words (and zero points) of
that forward as ``part`` says (``qfi.space``: ``"all"`` by default); a flipped scale bit
re-decodes its whole block; log rows of scale words are named ``<module>:scale``.

Modules never called.  Calibration needs every selected module to run at least once (else a
QfiError names the modules the forward never called, apart from empty calibrate inputs); an
armed forward in which no selected module produced any value is a QfiError, never a 0-flip
trial.
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Iterable, Iterator

import torch
from torch import Tensor, nn

from qfi import outputs
from qfi.errors import QfiError
from qfi.faults import (
    BitFlip,
    FlipCount,
    FlipSites,
    StuckAt,
    apply_mask,
    make_generator,
    resolve_bits,
    sample_sites,
    word_masks,
)
from qfi.log import FaultLog
from qfi.select import OPAQUE_MODULES, activation_modules, call_model, select_modules
from qfi.space import FaultSpace, check_part, fault_stored, get_fmt, log_rows


def _owned(t: Tensor, inputs: object, module: nn.Module | None = None, kwargs: object = None) -> bool:
    """Whether a module output may be overwritten in place: autograd does not track it and it
    shares no storage with the module's inputs, positional or keyword, also inside tuples, lists,
    dicts and dataclasses (``nn.Identity``, ``Dropout`` in eval and friends return their input,
    which a residual branch may still read), nor with its own parameters, buffers and plain
    tensor attributes (a positional table kept as ``self.pe`` and returned sliced).  (A view of a
    fresh intermediate, as ``nn.Linear`` returns for 3-D inputs, is fine.)"""
    if t.requires_grad:
        return False
    ptr = t.untyped_storage().data_ptr()
    others = outputs.tensors(inputs) + outputs.tensors(kwargs)
    if module is not None:
        others += [*module.parameters(), *module.buffers()]
        others += [v for v in vars(module).values() if isinstance(v, Tensor)]
    return all(x.untyped_storage().data_ptr() != ptr for x in others)


def _version(t: Tensor) -> int:
    try:
        return t._version
    except RuntimeError:  # an inference tensor keeps no version counter
        return 0


class ActivationSession:
    """Context manager for activation faults; see the module docstring and ``qfi.activations``.

    Each selected module's output is replaced by ``fmt.quantize(output)`` (fp32: left alone
    unless a fault is armed for this forward).  Integer scales are per tensor: calibrated as
    ``max|x|`` over the ``calibrate`` inputs on enter and then frozen, or with ``dynamic=True``
    chosen on every output.  Per-channel formats are not supported for activations; block and group
    formats (MX, NVFP4, ``int4_g128``) choose their scales on every output and take ``part`` (see
    the module docstring).  A
    calibrate input that is a tuple (or list) is passed as positional arguments, a dict as
    keyword arguments.

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
        output: str | int | None = None,
        part: str = "all",
    ) -> None:
        outputs.check_key(output)
        self.model, self.format, self.dynamic, self.output = model, get_fmt(fmt), dynamic, output
        self.part = check_part(part)
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
        self._space1 = FaultSpace(self.names[:1], [(1,)], fmt)  # validates parts and bits at arm
        self._space1.select_parts(self.part)
        self._stored = len(self._space1.parts) > 1  # scales stored per group: chosen per forward
        self._scales: list[Tensor | None] = [None] * len(self._mods)
        self._sizes: dict[object, list[tuple[int, ...]]] = {}
        self._called = [0] * len(self._mods)
        self._hits = 0  # values produced by selected modules in the current forward
        self._emitted: dict[int, tuple[weakref.ref, int]] = {}
        self._nesting()
        self.log = FaultLog(self._log_names())
        self._handles = [
            self.model.register_forward_pre_hook(self._pre, with_kwargs=True),
            self.model.register_forward_hook(self._post, with_kwargs=True),
        ]
        self._handles += [
            m.register_forward_hook(self._hook(i), with_kwargs=True) for i, m in enumerate(self._mods)
        ]
        try:
            if self._scaled and not self.dynamic and not self._stored:
                self._run_calibration()
        except BaseException:
            self._remove()
            raise
        self._mode = "run"
        return self

    def _log_names(self) -> list[str]:
        """Module names, then ``<module>:scale`` / ``<module>:zero_point`` for stored-scale formats."""
        return FaultSpace(self.names, [(1,)] * len(self.names), self.format).log_names

    def _nesting(self) -> None:
        """Which selected modules contain selected modules (``_inner``: their output may be a
        tensor a selected child already produced) and which sit inside one (``_outer``: they
        record what they produce); only leaves and MultiheadAttention quantize in place."""
        pos = {n: i for i, n in enumerate(self.names)}
        self._inner = [False] * len(self.names)
        self._outer = [False] * len(self.names)
        for i, name in enumerate(self.names):
            parts = name.split(".")
            for k in range(1, len(parts)):
                j = pos.get(".".join(parts[:k]))
                if j is not None:
                    self._inner[j] = self._outer[i] = True
        self._inplace_ok = [
            isinstance(m, OPAQUE_MODULES) or not any(True for _ in m.children()) for m in self._mods
        ]

    def _run_calibration(self) -> None:
        if self._calibrate is None:
            raise QfiError(
                f"format {self.format.name!r} needs a scale: pass calibrate=<model inputs> or dynamic=True"
            )
        self._amax: list[Tensor | None] = [None] * len(self._mods)
        self._mode = "calib"
        batches = 0
        with torch.no_grad():
            for x in self._calibrate:
                call_model(self.model, tuple(x) if isinstance(x, list) else x)
                batches += 1
        if not batches:
            raise QfiError(
                f"calibrate= holds no inputs: format {self.format.name!r} needs at least one batch to "
                "choose its activation scales (or pass dynamic=True)"
            )
        missing = [i for i, a in enumerate(self._amax) if a is None]
        if missing:
            never = [self.names[i] for i in missing if not self._called[i]]
            empty = [self.names[i] for i in missing if self._called[i]]
            why = []
            if never:
                why.append(
                    f"the model's forward never called {_some(never)} in {batches} calibration "
                    "batch(es) (a module the forward skips: e.g. a dropout bypassed by a fused "
                    "attention path, a layer behind a fast path or a branch not taken)"
                )
            if empty:
                why.append(f"{_some(empty)} produced only empty outputs")
            raise QfiError(
                f"calibration found no values for {len(missing)} selected module(s): {'; '.join(why)}; "
                "exclude them (exclude= or --exclude) or select modules the forward computes"
            )
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
        part: str | None = None,
    ) -> FaultLog:
        """Apply ``fault`` to every following forward (or only to forward indices ``calls``);
        ``part`` overrides the session's part (formats that store their scales)."""
        if self._mode != "run":
            raise QfiError("use the session inside its `with` block")
        if self._fault is not None:
            raise QfiError("a fault is already armed; call disarm() first (or use act.inject)")
        if not isinstance(fault, (BitFlip, FlipCount, FlipSites, StuckAt)):
            raise QfiError(f"not a fault model: {fault!r} (BitFlip, FlipCount, FlipSites, StuckAt)")
        part = self.part if part is None else check_part(part)
        if not isinstance(fault, FlipSites):
            parts = self._space1.select_parts(part, fault)
            if len(parts) == 1:
                p = parts[0]
                label = self.format.name if p == "codes" else f"{self.format.name}:{p}"
                resolve_bits(fault.bits, self._space1.width[p], label)
        self._part = part
        if calls is not None:
            calls = frozenset(int(c) for c in calls)
            if any(c < 0 for c in calls):
                raise QfiError(f"calls={sorted(calls)}: forward indices are >= 0")
        self._g = make_generator(generator, seed)
        self._fault, self._calls, self._call, self._plan = fault, calls, -1, {}
        by_ber = isinstance(fault, StuckAt) and fault.ber is not None
        self._per_output = isinstance(fault, BitFlip) or by_ber
        self.log = FaultLog(self._log_names(), fmt=self.format.name)
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
        part: str | None = None,
    ) -> Iterator[FaultLog]:
        """Arm on enter (yields the FaultLog, filled as forwards run), disarm on exit."""
        log = self.arm(fault, generator=generator, seed=seed, calls=calls, part=part)
        try:
            yield log
        finally:
            self.disarm()

    @property
    def never_called(self) -> list[str]:
        """Selected modules that no forward of this session has called so far (they carry no
        faults: a dropout skipped by a fused attention path, a branch not taken)."""
        return [n for n, c in zip(self.names, self._called, strict=True) if not c]

    def _armed_now(self) -> bool:
        return self._fault is not None and (self._calls is None or self._call in self._calls)

    # -- hooks ----------------------------------------------------------------------------------------
    def _pre(self, _module: nn.Module, args: tuple, kwargs: dict) -> None:
        self._emitted.clear()
        if self._mode != "run":
            return
        self._hits = 0
        if self._fault is None:
            return
        self._call += 1
        if not self._armed_now() or self._per_output:
            return
        shapes = self._probe_sizes(args, kwargs)
        self._emitted.clear()  # what the probe forward recorded
        space = FaultSpace(self.names, shapes, self.format)
        if not space.numel:
            raise QfiError(self._nothing_computed("the size probe of this forward"))
        sites, _ = space.part_sites(self._fault, self._g, self._part)
        self._plan = {}
        for p, (word, bit) in sites.items():
            tid, idx = space.locate_part(word, p)
            ids, counts = torch.unique_consecutive(tid, return_counts=True)
            a = 0
            for i, c in zip(ids.tolist(), counts.tolist(), strict=True):
                self._plan.setdefault(i, {})[p] = (idx[a : a + c], bit[a : a + c])
                a += c

    def _post(self, _module: nn.Module, _args: tuple, _kwargs: dict, _out: object) -> None:
        if self._mode == "run" and not self._hits and self._armed_now():
            raise QfiError(self._nothing_computed("this armed forward"))

    def _nothing_computed(self, where: str) -> str:
        return (
            f"no selected module produced a value in {where} (selected: {_some(self.names)}): the "
            "forward never called them (e.g. a dropout bypassed by a fused attention path, or a "
            "branch not taken) or their outputs were empty, so the fault space is empty; select "
            "modules that this forward computes"
        )

    def _probe_sizes(self, args: tuple, kwargs: dict) -> list[tuple[int, ...]]:
        def sig(a: object) -> object:
            return (tuple(a.shape), a.dtype) if isinstance(a, Tensor) else type(a)

        key = (tuple(sig(a) for a in args), tuple((k, sig(v)) for k, v in kwargs.items()))
        if key not in self._sizes:
            self._probe: list[tuple[int, ...]] = [(0,)] * len(self._mods)
            self._mode = "probe"
            try:
                with torch.no_grad():
                    self.model(*args, **kwargs)
            finally:
                self._mode = "run"
            self._sizes[key] = self._probe
        return self._sizes[key]

    def _pick(self, i: int, out: object) -> tuple[outputs.Loc, Tensor]:
        """Where in ``out`` module ``i``'s fault space is, and the tensor; QfiError if nowhere."""
        try:
            hit = outputs.pick(out, self.output)
        except QfiError as e:
            raise QfiError(f"module {self.names[i]!r} ({type(self._mods[i]).__name__}): {e}") from None
        if hit is None:
            under = "" if self.output is None else f" under output key {self.output!r}"
            raise QfiError(
                f"module {self.names[i]!r} ({type(self._mods[i]).__name__}) returned a "
                f"{outputs.type_name(out)} with no floating tensor{under}, so it has no activation to "
                f"fault ({outputs.describe(out)}); exclude it or select another module"
            )
        return hit

    def _emit(self, t: Tensor) -> None:
        self._emitted[id(t)] = (weakref.ref(t), _version(t))

    def _seen(self, t: Tensor) -> bool:
        """Whether ``t`` is, unchanged, a tensor that a selected inner module produced."""
        e = self._emitted.get(id(t))
        return e is not None and e[0]() is t and e[1] == _version(t)

    def _hook(self, i: int):
        inner, outer, inplace_ok = self._inner[i], self._outer[i], self._inplace_ok[i]

        def hook(module: nn.Module, inp: object, kw: dict, out: object) -> object:
            mode = self._mode
            if mode == "off":
                return None
            loc, t = self._pick(i, out)
            self._called[i] += 1
            if inner and self._seen(t):  # an inner selected module's value: one site, counted once
                return None
            if mode == "probe":
                if self._probe[i] == (0,):
                    self._probe[i] = tuple(t.shape)
                if outer:
                    self._emit(t)
                return None
            if mode == "calib":
                if t.numel():
                    a = t.detach().abs().amax().float()
                    self._amax[i] = a if self._amax[i] is None else torch.maximum(self._amax[i], a)
                return None
            if t.numel():
                self._hits += 1
            armed = self._armed_now()
            if self._fp32 and not armed:
                if outer:
                    self._emit(t)
                return None
            if self._fp32 and t.dtype != torch.float32:
                raise QfiError(f"activation {self.names[i]!r} is {t.dtype}; format 'fp32' needs float32")
            if self._stored:  # block / group scales: from this output, on every forward
                scale = self.format.choose_qparams(t.detach(), strict=False)
            else:
                scale = self.format.choose_qparams(t.detach().float()) if self.dynamic else self._scales[i]
            owned = inplace_ok and _owned(t, inp, module, kw)
            q = t if self._fp32 else self._quantize(t, scale, owned)
            if armed:
                q = self._inject(i, q, scale, owned)
            q = q.to(t.dtype)
            if outer:
                self._emit(q)
            return outputs.replace(out, loc, q)

        return hook

    def _quantize(self, t: Tensor, scale: object, inplace: bool = False) -> Tensor:
        """``fmt.quantize(t, scale)`` through the format's own fast path, lenient: a NaN activation
        propagates instead of raising as ``encode`` would.  With ``inplace`` (a float32 output that
        the module made fresh and autograd does not track) the result is written into ``t`` itself
        (``quantize(..., out=t)``): no new allocation, which on the CPU means no page faults on
        every forward."""
        out = t if inplace and t.dtype == torch.float32 else None
        return self.format.quantize(t, scale, out=out, strict=False)

    def _inject(self, i: int, q: Tensor, scale: object, owned: bool = False) -> Tensor:
        """Flip the planned sites of output ``i`` (``q``: the quantized output, or for fp32 the
        module's own output, written in place only when ``owned``: a fresh tensor that nothing
        else reads, so a handful of flips never costs a copy of a large feature map)."""
        fault, fmt = self._fault, self.format
        if self._stored:
            return self._inject_stored(i, q, scale)
        if self._per_output:
            eligible = resolve_bits(fault.bits, fmt.bits, fmt.name)
            elem, bit = sample_sites(fault, q.numel(), eligible, self._g)
        else:
            empty = torch.empty(0, dtype=torch.int64)
            elem, bit = self._plan.pop(i, {}).get("codes", (empty, empty))
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
        call, code_mask = self._call, (1 << fmt.bits) - 1

        def build() -> dict[str, Tensor]:  # read back from the device when the log is read
            cols = log_rows(elem, bit, inv, old, new, vals, newv, value, code_mask, call)
            cols["name_id"] = torch.full_like(cols["index"], i)
            return cols

        self.log.extend(build, elem.numel(), rows=elem.numel() if value is None else None)
        newv = newv.to(flat.dtype)
        if self._fp32 and not owned:  # the module's own output, possibly read elsewhere: a copy
            return flat.index_copy(0, idx, newv).view_as(q)
        return flat.index_copy_(0, idx, newv).view_as(q)  # our fresh quantized copy, or owned


    def _inject_stored(self, i: int, q: Tensor, qp) -> Tensor:
        """Faults in the codes, scale words and zero points of one output of a stored-scale format
        (``qfi.space.fault_stored``); q is our fresh quantized copy (or the module's own output
        quantized in place), written in place."""
        fault, fmt = self._fault, self.format
        shape = tuple(q.shape)
        if self._per_output:
            space = FaultSpace(self.names[i : i + 1], [shape], fmt)
            sites, _ = space.part_sites(fault, self._g, self._part)
        else:
            sites = self._plan.pop(i, {})
        n_sites = sum(w.numel() for w, _ in sites.values())
        if not n_sites:
            return q
        value = fault.value if isinstance(fault, StuckAt) else None
        flat = q.reshape(-1)
        elems, newv, rows = fault_stored(fmt, flat, shape, qp, sites, value)
        call, width = self._call, self._space1.width
        offset = {p: k * len(self.names) for k, p in enumerate(self._space1.parts)}

        def build() -> dict[str, Tensor]:  # read back from the device when the log is read
            chunks = []
            for p, (w, b, inv, old, new, oldv, newv_p) in rows.items():
                cols = log_rows(w, b, inv, old, new, oldv, newv_p, value, (1 << width[p]) - 1, call)
                cols["name_id"] = torch.full_like(cols["index"], offset[p] + i)
                chunks.append(cols)
            return {k: torch.cat([c[k] for c in chunks]) for k in chunks[0]}

        self.log.extend(build, n_sites, rows=n_sites if value is None else None)
        return flat.index_copy_(0, elems.to(flat.device), newv.to(flat.dtype)).view_as(q)


def _some(names: list[str], k: int = 5) -> str:
    """Up to ``k`` names for a message, and how many more."""
    more = f" and {len(names) - k} more" if len(names) > k else ""
    return f"{names[:k]}{more}"


def activations(
    model: nn.Module,
    fmt: object = "fp32",
    names: object = None,
    exclude: object = None,
    calibrate: Iterable | None = None,
    dynamic: bool = False,
    output: str | int | None = None,
    part: str = "all",
) -> ActivationSession:
    """A context manager quantizing (and, when armed, faulting) selected module outputs; ``output``
    chooses the tensor of each output that carries faults, ``part`` the stored words of a block or
    group format that faults hit (see ``ActivationSession``)."""
    return ActivationSession(model, fmt, names, exclude, calibrate, dynamic, output, part)


__all__ = ["ActivationSession", "activations"]
