"""Fault-aware training: weight or activation faults in the training forwards, gradients flowing.

    fat = qfi.fault_aware(model, "bf16", qfi.BitFlip(ber=1e-4), names="fc", per="step", seed=0)
    for epoch in range(epochs):
        for x, y in loader:
            opt.zero_grad()
            with fat.step(epoch=epoch):            # this step's faults are in the model
                loss = crit(model(x), y)
                loss.backward()                    # inside: the gradients of the faulty forward
            opt.step()                             # outside: the clean weights take the update

**Weights** (``target="weights"``).  Each ``step()`` enters a weight session (``qfi.weights``,
``flat=False``: every change is made in place in the parameters' own storage, none is swapped)
on the *current* weights, applies this step's fault and, on exit, undoes it and puts the exact
weights of before the step back.  So the forward and the backward see ``fault(quantize(w))``,
the gradient with respect to those values lands in ``w.grad`` (a straight-through estimator for
the quantization and the fault: ``d loss / d w := d loss / d fault(quantize(w))``), and the
optimizer, called after the block, updates the clean fp32 weights ``w`` as it would without
faults, apart from the gradient effect of the faults.  The session is entered per step, never
kept open across optimizer steps: for every format but fp32 a session puts its saved originals
back on exit, which would drop every update made while it was open, and an undo made after an
update would write stale words back.  A step costs one pass over the selected weights (quantize,
keep, restore; fp32: none) plus O(flips).  Anything that changes the selected weights in place
inside the block (an ``opt.step()`` there) is a QfiError at the end of the block.

**Activations** (``target="activations"``).  Each ``step()`` enters an activation session
(``qfi.activations``) and arms the fault; selected module outputs are quantized and faulted as in
a campaign, and the result goes on through a straight-through estimator: the value is exactly the
quantized, faulty ``q``, the gradient flows to the module's output unchanged (``straight_through``),
where the plain session (made for inference) would pass none.  Integer formats need scales:
``dynamic=True`` (a scale per forward, which follows the training) or ``calibrate=<inputs>``
(calibrated at every step, in eval mode, one no-grad forward over those inputs per step); without
either, the first step is the session's QfiError.
FlipCount, StuckAt(count) and FlipSites on activations make the session run one no-grad probe
forward per step (for the output sizes); it runs in the model's mode, and every buffer
(BatchNorm statistics) and the RNG state (dropout) are put back after it, so the probe leaves no
trace in the training.

**When faults are drawn** (``per``).  ``per="step"``: a new draw for every step (its seed derives
from ``seed`` and the step number, ``fat.steps``); ``per="epoch"``: one draw per epoch (seed from
``seed`` and the ``epoch`` passed to ``step``), the same sites in every step of the epoch, a
permanent fault for the epoch.  The same seed gives the same draws and, with the same data order
and initialisation, a bit-identical training run; ``BitFlip(ber=0)`` in ``fp32`` trains
bit-identically to plain training.

**Non-finite gradients** (``nonfinite``).  A flipped float exponent bit can make a weight ~1e38
and the loss NaN or inf.  ``"skip"`` (default) drops such a step the way ``torch.amp.GradScaler``
does: when any gradient of the model holds NaN/Inf after the block, every ``.grad`` is set to
None, so the following ``opt.step()`` changes nothing; ``fat.skipped`` counts them.  (With
gradient accumulation over several blocks this drops the accumulated gradients as well.)
``"keep"`` leaves the gradients as they are.
"""

from __future__ import annotations

import contextlib
import hashlib
import weakref
from collections.abc import Iterable, Iterator

import torch
from torch import Tensor, nn

from qfi import outputs
from qfi.activation_session import ActivationSession
from qfi.errors import QfiError
from qfi.faults import BitFlip, FlipCount, FlipSites, StuckAt
from qfi.log import FaultLog
from qfi.select import activation_modules, select_modules, select_weights
from qfi.space import get_fmt
from qfi.weight_session import WeightSession

TARGETS = ("weights", "activations")
PER = ("step", "epoch")
NONFINITE = ("skip", "keep")


class _StraightThrough(torch.autograd.Function):
    """Forward: ``q`` exactly (a view of it); backward: the incoming gradient goes to ``x``."""

    @staticmethod
    def forward(ctx, x: Tensor, q: Tensor) -> Tensor:  # noqa: ARG004
        return q

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:  # noqa: ARG004
        return grad, None


def straight_through(x: Tensor, q: Tensor) -> Tensor:
    """``q``'s values (bit-exact, NaN, inf and -0.0 included) with the gradient of the identity
    with respect to ``x``: the straight-through estimator of ``q = f(x)`` (quantize, dequantize,
    fault).  Unlike ``x + (q - x).detach()``, which can round away from ``q`` (float32 ``x`` = 0.3,
    ``q`` = -1.0 gives -0.99999994), turns ``-0.0`` into ``0.0`` and ``q`` into NaN where ``x`` is
    infinite, the forward value is ``q``."""
    if q.shape != x.shape:
        raise QfiError(f"straight_through needs one shape; got {tuple(x.shape)} and {tuple(q.shape)}")
    return _StraightThrough.apply(x, q.detach())


def draw_seed(seed: int, per: str, k: int) -> int:
    """The 63-bit seed of draw ``k`` (a step or an epoch number) of a run seeded ``seed``."""
    h = hashlib.sha256(f"qfi.training|{int(seed)}|{per}|{int(k)}".encode()).digest()
    return int.from_bytes(h[:8], "little") >> 1


class FaultAwareTraining:
    """Faults in the training forwards; see the module docstring and ``qfi.fault_aware``.

    Attributes: ``steps`` (blocks entered so far; the next per-step draw uses it, so set it to
    resume a run), ``draws`` (new fault draws made), ``skipped`` (steps dropped for non-finite
    gradients) and ``log`` (the FaultLog of the last step; activations: filled as forwards run).
    """

    def __init__(
        self,
        model: nn.Module,
        fmt: object,
        fault: object,
        names: object = None,
        exclude: object = None,
        target: str = "weights",
        per: str = "step",
        seed: int = 0,
        nonfinite: str = "skip",
        calibrate: Iterable | None = None,
        dynamic: bool = False,
        output: str | int | None = None,
        part: str | None = None,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise QfiError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if not isinstance(fault, (BitFlip, FlipCount, FlipSites, StuckAt)):
            raise QfiError(f"not a fault model: {fault!r} (BitFlip, FlipCount, FlipSites, StuckAt)")
        for what, value, allowed in (("target", target, TARGETS), ("per", per, PER),
                                     ("nonfinite", nonfinite, NONFINITE)):
            if value not in allowed:
                raise QfiError(f"{what}={value!r}; allowed: {', '.join(map(repr, allowed))}")
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise QfiError(f"seed={seed!r}: allowed is an int")
        self.format = get_fmt(fmt)
        if target == "weights" and (calibrate is not None or dynamic or output is not None):
            raise QfiError("calibrate=, dynamic= and output= are for target='activations'")
        # a filter that selects nothing is an error now, not at the first step
        if target == "weights":
            select_weights(model, names, exclude)
        else:
            select_modules(model, names, exclude)
        self.model, self.fault, self.target, self.per, self.seed = model, fault, target, per, seed
        self.nonfinite, self._filter = nonfinite, (names, exclude)
        self._calibrate = None if calibrate is None else list(calibrate)
        self.dynamic, self.output = dynamic, output
        self._part = {} if part is None else {"part": part}  # formats with stored scales (see qfi.space)
        self.steps = self.draws = self.skipped = 0
        self.log = FaultLog([])
        self._last_key: int | None = None
        self._open = False

    def __repr__(self) -> str:
        return (
            f"FaultAwareTraining({self.target}, {self.format.name}, {self.fault!r}, per={self.per!r}, "
            f"seed={self.seed}, steps={self.steps}, draws={self.draws}, skipped={self.skipped})"
        )

    @contextlib.contextmanager
    def step(self, epoch: int | None = None) -> Iterator[FaultLog]:
        """One training step under faults: run the forward and ``loss.backward()`` inside, then
        ``opt.step()`` after the block.  Yields this step's FaultLog.  ``epoch`` (needed with
        ``per="epoch"``) keys the epoch's draw."""
        if self._open:
            raise QfiError("fat.step() blocks cannot nest; close the open one first")
        if self.per == "epoch":
            if epoch is None or isinstance(epoch, bool) or not isinstance(epoch, int) or epoch < 0:
                raise QfiError(
                    f"per='epoch' needs step(epoch=<the epoch number, an int >= 0>); got epoch={epoch!r}"
                )
            key = epoch
        else:
            key = self.steps
        seed = draw_seed(self.seed, self.per, key)
        if key != self._last_key:
            self.draws += 1
            self._last_key = key
        self._open = True
        try:
            body = self._weights(seed) if self.target == "weights" else self._activations(seed)
            with body as log:
                self.log = log
                yield log
            self._check_grads()
        finally:
            self._open = False
            self.steps += 1

    # -- weights --------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def _weights(self, seed: int) -> Iterator[FaultLog]:
        session = WeightSession(self.model, self.format, *self._filter, flat=False, **self._part)
        with session:
            log = session.apply(self.fault, seed=seed)
            tensors = [session.tensor(n) for n in session.names]
            versions = [t._version for t in tensors]
            yield log
            changed = [n for n, t, v in zip(session.names, tensors, versions, strict=True) if t._version != v]
            if changed:
                raise QfiError(
                    f"the selected weights were changed in place inside fat.step() ({changed[0]!r}"
                    f"{f' and {len(changed) - 1} more' if len(changed) > 1 else ''}): an optimizer step "
                    "there updates the faulty weights and is undone in part or in whole when the block "
                    "restores them; call opt.step() after the with block"
                )

    # -- activations ----------------------------------------------------------------------------------
    @contextlib.contextmanager
    def _activations(self, seed: int) -> Iterator[FaultLog]:
        model = self.model
        session = ActivationSession(
            model, self.format, *self._filter, self._calibrate, dynamic=self.dynamic, output=self.output,
            **self._part,
        )
        modes = [(m, m.training) for m in model.modules()]
        try:
            if self._calibrate is not None:  # deterministic scales: no dropout, no BatchNorm updates
                model.eval()
            session.__enter__()
        finally:
            for m, mode in modes:
                m.training = mode
        hooks = _SteHooks(model, session)
        try:
            with session.inject(self.fault, seed=seed) as log:
                yield log
        finally:
            hooks.remove()
            session.__exit__(None, None, None)

    # -- after the block --------------------------------------------------------------------------------
    def _check_grads(self) -> None:
        if self.nonfinite != "skip":
            return
        by_device: dict[torch.device, list[Tensor]] = {}
        for p in self.model.parameters():
            if p.grad is not None:
                by_device.setdefault(p.grad.device, []).append(torch.isfinite(p.grad).all())
        if not all(bool(torch.stack(oks).all()) for oks in by_device.values()):
            for p in self.model.parameters():
                p.grad = None
            self.skipped += 1


class _SteHooks:
    """Forward hooks around an entered ActivationSession's: one before its hook on each selected
    module (records the module's own output), one after it (replaces the session's ``q`` by
    ``straight_through(output, q)``), and model-level ones that put buffers and the RNG back after
    the session's size probe (a nested forward)."""

    def __init__(self, model: nn.Module, session: ActivationSession) -> None:
        self.model, self.key = model, session.output
        self._raw: dict[int, tuple[Tensor | None, Tensor | None]] = {}
        # id(st) -> (st, the session's q it stands for, st's version): the straight-through outputs
        # of the current forward (q held: the session recognises it by identity)
        self._st: dict[int, tuple[weakref.ref, Tensor, int]] = {}
        self._depth, self._saved = 0, None
        table = activation_modules(model)
        self._handles = [
            model.register_forward_pre_hook(self._model_pre, prepend=True),
            model.register_forward_hook(self._model_post, always_call=True),
        ]
        for i, name in enumerate(session.names):
            mod = table[name]
            self._handles.append(mod.register_forward_hook(self._before(i), prepend=True))
            self._handles.append(mod.register_forward_hook(self._after(i)))

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles, self._raw, self._st = [], {}, {}

    # the session's size probe is a forward of the model inside the model's forward
    def _model_pre(self, model: nn.Module, _args: object) -> None:
        self._depth += 1
        if self._depth == 1:
            self._st.clear()
        elif self._depth == 2:
            devices = sorted({p.device for p in model.parameters() if p.device.type == "cuda"}, key=str)
            self._saved = (
                torch.get_rng_state(),
                [(d, torch.cuda.get_rng_state(d)) for d in devices],
                [(b, b.detach().clone()) for b in model.buffers()],
            )

    def _model_post(self, _model: nn.Module, _args: object, _out: object) -> None:
        if self._depth == 2 and self._saved is not None:
            cpu, cuda, buffers = self._saved
            torch.set_rng_state(cpu)
            for d, s in cuda:
                torch.cuda.set_rng_state(s, d)
            with torch.no_grad():
                for b, s in buffers:
                    b.copy_(s)
            self._saved = None
        self._depth = max(self._depth - 1, 0)
        if not self._depth:
            self._st.clear()

    def _before(self, i: int):
        def hook(_module: nn.Module, _inp: object, out: object) -> object:
            hit = outputs.pick(out, self.key)
            if hit is None:  # the session's hook names the module and its output type
                return None
            loc, t = hit
            e = self._st.get(id(t))
            q = None if e is None or e[0]() is not t or e[2] != t._version else e[1]
            self._raw[i] = (t, q)
            # an inner selected module's straight-through output: hand the session its own q, so
            # it sees the value it produced (one site, counted once) and does not fault it again
            return None if q is None else outputs.replace(out, loc, q)

        return hook

    def _after(self, i: int):
        def hook(_module: nn.Module, _inp: object, out: object) -> object:
            raw, inner_q = self._raw.pop(i, (None, None))
            hit = outputs.pick(out, self.key)
            if raw is None or hit is None:
                return None
            loc, q = hit
            if inner_q is not None and q is inner_q:  # left alone: give back the inner st output
                return outputs.replace(out, loc, raw)
            if q is raw or not (raw.requires_grad and torch.is_grad_enabled()):
                return None
            st = straight_through(raw, q)
            self._st[id(st)] = (weakref.ref(st), q, st._version)
            return outputs.replace(out, loc, st)

        return hook


def fault_aware(
    model: nn.Module,
    fmt: object,
    fault: object,
    names: object = None,
    exclude: object = None,
    target: str = "weights",
    per: str = "step",
    seed: int = 0,
    nonfinite: str = "skip",
    calibrate: Iterable | None = None,
    dynamic: bool = False,
    output: str | int | None = None,
    part: str | None = None,
) -> FaultAwareTraining:
    """Faults in the training forwards of ``model`` (see ``qfi.training``): ``fmt`` and ``fault``
    as in ``qfi.weights`` / ``qfi.activations``; ``names`` / ``exclude`` select weights
    (``target="weights"``) or modules (``"activations"``); ``per`` is ``"step"`` or ``"epoch"``;
    ``seed`` fixes every draw; ``nonfinite`` is ``"skip"`` or ``"keep"``; ``calibrate``,
    ``dynamic`` and ``output`` are the activation session's; ``part`` (formats with stored
    scales) is passed to the session.  Use ``with fat.step(): ...``."""
    return FaultAwareTraining(
        model, fmt, fault, names, exclude, target, per, seed, nonfinite, calibrate, dynamic, output, part
    )


__all__ = ["FaultAwareTraining", "draw_seed", "fault_aware", "straight_through"]
