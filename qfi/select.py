"""Choose tensors (weight faults) and modules (activation faults) by fully qualified name.

A filter entry is one of

* a word, matched as a substring of the name (``"mlp"``, ``"ln_1"``, ``"heads.head"``);
* a glob, when it contains ``*``, ``?`` or ``[``, matched over the full name (``"*.mlp.0.weight"``);
* ``"re:<regex>"``, matched with :func:`re.search` (``"re:encoder_layer_(0|11)\\."``).

A name is selected when it matches any ``include`` entry (or ``include`` is empty) and no
``exclude`` entry.  An include entry that matches no candidate name is an error, so typos
never select silently less than meant.

Modules (activation faults) follow one rule more: an entry equal to a module's full name means
that module alone, and naming a module that carries no activation faults (a container such as
``nn.Sequential``, ``out_proj`` inside ``nn.MultiheadAttention``) is an error saying what to
select instead, so a filter never lands silently on other modules than the one named.
"""

from __future__ import annotations

import difflib
import fnmatch
import re
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import nn

from qfi import outputs
from qfi.errors import QfiError

# modules whose children are not called through ``forward`` (MultiheadAttention passes
# ``out_proj.weight`` straight to F.multi_head_attention_forward): hooks go on the parent.
OPAQUE_MODULES: tuple[type[nn.Module], ...] = (nn.MultiheadAttention,)


def _entries(spec: object) -> tuple[str, ...]:
    if spec is None:
        return ()
    if isinstance(spec, str):
        return tuple(s.strip() for s in spec.split(",") if s.strip())
    if isinstance(spec, Iterable):
        out: list[str] = []
        for s in spec:
            if not isinstance(s, str):
                raise QfiError(f"name filter entries must be strings, got {s!r}")
            out.extend(_entries(s))
        return tuple(out)
    raise QfiError(f"a name filter is a comma-separated string or a list of strings, got {spec!r}")


def _matcher(entry: str):
    if entry.startswith("re:"):
        try:
            rx = re.compile(entry[3:])
        except re.error as e:
            raise QfiError(f"bad regular expression in name filter {entry!r}: {e}") from None
        return lambda name: rx.search(name) is not None
    if any(c in entry for c in "*?["):
        return lambda name: fnmatch.fnmatchcase(name, entry)
    return lambda name: entry in name


@dataclass(frozen=True)
class NameFilter:
    """Include/exclude entries (words, globs, ``re:`` regexes); see the module docstring."""

    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "include", _entries(self.include))
        object.__setattr__(self, "exclude", _entries(self.exclude))
        for e in self.include + self.exclude:
            _matcher(e)  # validates regexes early

    @classmethod
    def parse(cls, include: object = None, exclude: object = None) -> NameFilter:
        """From ``"mlp,ln"``, a list of entries, or an existing NameFilter (returned as is)."""
        if isinstance(include, NameFilter):
            if exclude is None:
                return include
            return cls(include.include, include.exclude + _entries(exclude))
        return cls(_entries(include), _entries(exclude))

    def matches(self, name: str, aliases: Iterable[str] = ()) -> bool:
        """Whether a candidate is selected: one of its names (``name`` and ``aliases``, the other
        names of the same tensor) matches an include entry and none matches an exclude entry."""
        names = (name, *aliases)
        inc = not self.include or any(_matcher(e)(n) for e in self.include for n in names)
        return inc and not any(_matcher(e)(n) for e in self.exclude for n in names)

    def select(
        self, candidates: list[str], what: str, hint: str, aliases: dict[str, tuple[str, ...]] | None = None
    ) -> list[str]:
        """The matching candidates in order; QfiError for an include entry matching nothing.
        ``aliases`` maps a candidate to its other names, which match on its behalf."""
        aliases = aliases or {}
        every = [a for n in candidates for a in (n, *aliases.get(n, ()))]
        for e in self.include:
            m = _matcher(e)
            if not any(m(n) for n in every):
                raise QfiError(f"name filter {e!r} matches no {what}{_suggest(e, every)}; {hint}")
        out = [n for n in candidates if self.matches(n, aliases.get(n, ()))]
        if not out:
            raise QfiError(f"{self} selects no {what} (everything included is excluded); {hint}")
        return out


def _suggest(entry: str, names: list[str]) -> str:
    key = entry[3:] if entry.startswith("re:") else entry
    pool = set(names)
    for n in names:  # also offer the dotted parts and suffixes: "ln_1", "self_attention.in_proj_weight"
        parts = n.split(".")
        pool.update(parts)
        pool.update(".".join(parts[i:]) for i in range(1, len(parts)))
    close = difflib.get_close_matches(key, sorted(pool), n=5, cutoff=0.6)
    return f"; did you mean {', '.join(repr(c) for c in close)}?" if close else ""


BN_STATS = ("running_mean", "running_var")


def _alias_key(t: torch.Tensor) -> tuple:
    """Tensors with equal keys are one stored tensor: the same object, or the same view (storage,
    offset, shape, strides, dtype) of the same memory through distinct Parameter objects."""
    try:
        ptr = t.untyped_storage().data_ptr() if t.device.type != "meta" else 0
    except (RuntimeError, NotImplementedError):  # a tensor subclass without one plain storage
        ptr = 0
    if not ptr or t.numel() == 0:  # meta tensors, empty tensors: only the object itself
        return (id(t),)
    return (ptr, t.storage_offset(), tuple(t.shape), t.stride(), t.dtype, str(t.device))


def weight_table(model: nn.Module, bn_stats: bool = False) -> dict[str, list[tuple[str, torch.Tensor]]]:
    """Each candidate weight under its first name, with every ``(name, tensor object)`` that
    stores it, first name first: one entry for a plain tensor, more for tied weights (one
    Parameter under two names, a module registered twice, or distinct Parameters viewing the
    same memory).  Which tensors are candidates: see ``weight_tensors``."""
    from torch.nn.modules.batchnorm import _BatchNorm

    out: dict[str, list[tuple[str, torch.Tensor]]] = {}
    first: dict[tuple, str] = {}
    for mname, mod in model.named_modules(remove_duplicate=False):
        skip = () if bn_stats or not isinstance(mod, _BatchNorm) else BN_STATS
        for kind in (mod._parameters, mod._buffers):
            for tname, t in kind.items():
                if t is None or not t.is_floating_point() or tname in skip:
                    continue
                name = f"{mname}.{tname}" if mname else tname
                key = _alias_key(t)
                if key in first:
                    entries = out[first[key]]
                    if name not in (n for n, _ in entries):
                        entries.append((name, t))
                    continue
                first[key] = name
                out[name] = [(name, t)]
    return out


def weight_tensors(model: nn.Module, bn_stats: bool = False) -> dict[str, torch.Tensor]:
    """Parameters and floating-point buffers by name, in model order, each stored tensor once.

    A tensor stored once but reachable under several names (tied weights: GPT-2's ``lm_head.weight``
    is ``transformer.wte.weight``) is listed under its first name; ``weight_aliases`` gives the
    others, and filters match any of them.  Integer buffers (``num_batches_tracked``) are not
    candidates: they hold no fault-prone weights.  The running statistics of BatchNorm layers
    (``running_mean``, ``running_var``) are candidates only with ``bn_stats=True``: hardware that
    runs a network quantized folds them into the preceding convolution, so they are no stored
    weights there (their affine ``weight`` and ``bias`` are parameters and always candidates).
    """
    return {n: entries[0][1] for n, entries in weight_table(model, bn_stats).items()}


def weight_aliases(model: nn.Module, bn_stats: bool = False) -> dict[str, tuple[str, ...]]:
    """First name -> the other names of the same stored tensor, for tied weights only
    (``{"transformer.wte.weight": ("lm_head.weight",)}``)."""
    return {
        n: tuple(a for a, _ in entries[1:])
        for n, entries in weight_table(model, bn_stats).items()
        if len(entries) > 1
    }


def _has_bn_stats(model: nn.Module) -> bool:
    from torch.nn.modules.batchnorm import _BatchNorm

    return any(isinstance(m, _BatchNorm) and m.running_mean is not None for m in model.modules())


def _is_container(mod: nn.Module) -> bool:
    """Whether ``mod`` computes nothing of its own: ModuleList/ModuleDict and other modules without
    a ``forward``, and Sequential (subclasses too) unless its class defines its own ``forward``."""
    forward = type(mod).forward
    plain_sequential = isinstance(mod, nn.Sequential) and forward is nn.Sequential.forward
    return forward is nn.Module.forward or plain_sequential


def _opaque_parent(name: str, opaque: set[str]) -> str | None:
    parts = name.split(".")
    return next((p for k in range(1, len(parts)) if (p := ".".join(parts[:k])) in opaque), None)


def activation_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Modules whose outputs can carry activation faults, in model order: every named module but
    the root, containers (``_is_container``: Sequential, ModuleList, ModuleDict, which compute
    nothing of their own) and the children of MultiheadAttention (its forward never calls
    ``out_proj``).  A module with children is a candidate too (a ``Conv2d`` subclass that pads
    through a child, a transformer block whose output is a residual sum)."""
    out: dict[str, nn.Module] = {}
    opaque: set[str] = set()
    for name, mod in model.named_modules():
        if not name or _opaque_parent(name, opaque) is not None:
            continue
        if isinstance(mod, OPAQUE_MODULES):
            opaque.add(name)
        if not _is_container(mod):
            out[name] = mod
    return out


def _not_a_site(model: nn.Module, name: str) -> str:
    """Why module ``name`` carries no activation faults, and what to select instead."""
    mods = dict(model.named_modules())
    mod = mods[name]
    parent = _opaque_parent(name, {n for n, m in mods.items() if isinstance(m, OPAQUE_MODULES)})
    if parent is not None:
        return (
            f"module {name!r} is inside {type(mods[parent]).__name__} {parent!r}, whose forward never "
            f"calls it: select {parent!r} (its first output)"
        )
    kind = type(mod).__name__
    kids = [f"{name}.{n}" for n, _ in mod.named_children()]
    if isinstance(mod, nn.Sequential) and kids:
        what = f"a container whose output is the output of its last module {kids[-1]!r}"
    else:
        what = "a container without a forward of its own"
    return (
        f"module {name!r} is a {kind}, {what}; name a module in it, or select every module in it "
        f"with {name + '.'!r} or {name + '.*'!r}"
    )


_HINT_W = "list all names with `qfi names` or qfi.list_names(model, 'weights')"
_HINT_A = "list all names with `qfi names --target activations` or qfi.list_names(model, 'activations')"


def select_weights(
    model: nn.Module, names: object = None, exclude: object = None, bn_stats: bool = False
) -> list[str]:
    """Names of the selected parameters and floating buffers, in model order (None = all);
    BatchNorm running statistics only with ``bn_stats=True`` (see ``weight_tensors``).

    A tied tensor is selected (once, under its first name) when any of its names matches an
    include entry, and left out when any of them matches an exclude entry: ``exclude="lm_head"``
    also leaves out GPT-2's ``transformer.wte.weight``, which is the same stored tensor."""
    hint = _HINT_W
    if not bn_stats and _has_bn_stats(model):
        hint += "; BatchNorm running_mean/running_var are left out unless bn_stats=True (--bn-stats)"
    table = weight_table(model, bn_stats)
    aliases = {n: tuple(a for a, _ in e[1:]) for n, e in table.items() if len(e) > 1}
    return NameFilter.parse(names, exclude).select(list(table), "weights", hint, aliases)


def select_modules(model: nn.Module, names: object = None, exclude: object = None) -> list[str]:
    """Names of the selected modules for activation faults (None = every candidate module).

    Entries work as for weights, with one rule more: an entry equal to a module's full name
    means that module alone (``"features.3"`` is not also ``features.3.pad`` or ``features.31``),
    and QfiError when that module is not a candidate (a container, ``out_proj`` inside
    MultiheadAttention), so a filter never lands silently on other modules than the one named.
    """
    f = NameFilter.parse(names, exclude)
    table = activation_modules(model)
    cands = list(table)
    mods = [n for n, _ in model.named_modules() if n]
    others = set(mods) - table.keys()
    for e in f.include + f.exclude:
        if e in others:
            raise QfiError(_not_a_site(model, e))
    inc = [(e, (lambda n, e=e: n == e) if e in table else _matcher(e)) for e in f.include]
    exc = [(lambda n, e=e: n == e) if e in table else _matcher(e) for e in f.exclude]
    for e, m in inc:
        if not any(m(n) for n in cands):
            why = next((n for n in mods if n in others and _matcher(e)(n)), None)
            extra = f" ({_not_a_site(model, why)})" if why is not None else _suggest(e, cands)
            raise QfiError(f"name filter {e!r} matches no modules{extra}; {_HINT_A}")
    out = [n for n in cands if (not inc or any(m(n) for _, m in inc)) and not any(m(n) for m in exc)]
    if not out:
        raise QfiError(f"{f} selects no modules (everything included is excluded); {_HINT_A}")
    return out


def call_model(model: nn.Module, inputs: object) -> object:
    """``model(inputs)``; a tuple is positional arguments, a dict keyword arguments."""
    if isinstance(inputs, tuple):
        return model(*inputs)
    if isinstance(inputs, dict):
        return model(**inputs)
    return model(inputs)


@dataclass(frozen=True)
class NameInfo:
    """One selectable name; ``shape``/``numel``/``dtype`` are None where unknown; ``aliases``: the
    other names of a tied weight (the same stored tensor), which filters match as well."""

    name: str
    kind: str
    shape: tuple[int, ...] | None
    numel: int | None
    dtype: torch.dtype | None
    aliases: tuple[str, ...] = ()

    @property
    def label(self) -> str:
        """The name, with its aliases: ``transformer.wte.weight (= lm_head.weight)``."""
        return f"{self.name} (= {', '.join(self.aliases)})" if self.aliases else self.name


def list_names(
    model: nn.Module, target: str = "weights", example: object = None, bn_stats: bool = False
) -> list[NameInfo]:
    """Every candidate name for ``target`` ("weights" or "activations").

    Activation shapes (of the first floating tensor of each output) are known only when
    ``example`` (a model input, a tuple of positional inputs or a dict of keyword inputs) is
    given: one forward runs under ``torch.no_grad`` with recording hooks.
    """
    if target == "weights":
        params = {id(p) for p in model.parameters()}
        return [
            NameInfo(
                n, "parameter" if id(t) in params else "buffer", tuple(t.shape), t.numel(), t.dtype,
                tuple(a for a, _ in e[1:]),
            )
            for n, e in weight_table(model, bn_stats).items()
            for t in (e[0][1],)
        ]
    if target != "activations":
        raise QfiError(f"target must be 'weights' or 'activations', got {target!r}")
    mods = activation_modules(model)
    seen: dict[str, torch.Tensor] = {}
    if example is not None:
        def record(name: str, out: object) -> None:
            hit = outputs.pick(out)
            if hit is not None:
                seen.setdefault(name, hit[1])

        hooks = [m.register_forward_hook(lambda _m, _i, out, n=n: record(n, out)) for n, m in mods.items()]
        try:
            with torch.no_grad():
                call_model(model, example)
        finally:
            for h in hooks:
                h.remove()
    infos = []
    for n, m in mods.items():
        t = seen.get(n)
        infos.append(
            NameInfo(n, type(m).__name__, None if t is None else tuple(t.shape),
                     None if t is None else t.numel(), None if t is None else t.dtype)
        )
    return infos
