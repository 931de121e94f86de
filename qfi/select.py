"""Choose tensors (weight faults) and modules (activation faults) by fully qualified name.

A filter entry is one of

* a word, matched as a substring of the name (``"mlp"``, ``"ln_1"``, ``"heads.head"``);
* a glob, when it contains ``*``, ``?`` or ``[``, matched over the full name (``"*.mlp.0.weight"``);
* ``"re:<regex>"``, matched with :func:`re.search` (``"re:encoder_layer_(0|11)\\."``).

A name is selected when it matches any ``include`` entry (or ``include`` is empty) and no
``exclude`` entry.  An include entry that matches no candidate name is an error, so typos
never select silently less than meant.
"""

from __future__ import annotations

import difflib
import fnmatch
import re
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import nn

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

    def matches(self, name: str) -> bool:
        inc = not self.include or any(_matcher(e)(name) for e in self.include)
        return inc and not any(_matcher(e)(name) for e in self.exclude)

    def select(self, candidates: list[str], what: str, hint: str) -> list[str]:
        """The matching candidates in order; QfiError for an include entry matching nothing."""
        for e in self.include:
            m = _matcher(e)
            if not any(m(n) for n in candidates):
                raise QfiError(f"name filter {e!r} matches no {what}{_suggest(e, candidates)}; {hint}")
        out = [n for n in candidates if self.matches(n)]
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


def weight_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """Parameters and floating-point buffers by name, in model order, shared tensors once.

    Integer buffers (``num_batches_tracked``) are not candidates: they hold no fault-prone weights.
    """
    out: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for mname, mod in model.named_modules():
        for kind in (mod._parameters, mod._buffers):
            for tname, t in kind.items():
                if t is None or id(t) in seen or not t.is_floating_point():
                    continue
                seen.add(id(t))
                out[f"{mname}.{tname}" if mname else tname] = t
    return out


def activation_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Modules whose outputs can carry activation faults: leaves, and MultiheadAttention as a
    whole (its ``out_proj`` child is never called through ``forward``), in model order."""
    out: dict[str, nn.Module] = {}
    opaque: list[str] = []
    for name, mod in model.named_modules():
        if any(name.startswith(p + ".") for p in opaque):
            continue
        if isinstance(mod, OPAQUE_MODULES):
            opaque.append(name)
            out[name] = mod
        elif not any(True for _ in mod.children()) and name:
            out[name] = mod
    return out


_HINT_W = "list all names with `qfi names` or qfi.list_names(model, 'weights')"
_HINT_A = "list all names with `qfi names --target activations` or qfi.list_names(model, 'activations')"


def select_weights(model: nn.Module, names: object = None, exclude: object = None) -> list[str]:
    """Names of the selected parameters and floating buffers, in model order (None = all)."""
    return NameFilter.parse(names, exclude).select(list(weight_tensors(model)), "weights", _HINT_W)


def select_modules(model: nn.Module, names: object = None, exclude: object = None) -> list[str]:
    """Names of the selected modules for activation faults (None = every candidate module)."""
    cands = list(activation_modules(model))
    return NameFilter.parse(names, exclude).select(cands, "modules", _HINT_A)


@dataclass(frozen=True)
class NameInfo:
    """One selectable name; ``shape``/``numel``/``dtype`` are None where unknown."""

    name: str
    kind: str
    shape: tuple[int, ...] | None
    numel: int | None
    dtype: torch.dtype | None


def list_names(model: nn.Module, target: str = "weights", example: object = None) -> list[NameInfo]:
    """Every candidate name for ``target`` ("weights" or "activations").

    Activation shapes are known only when ``example`` (a model input, or a tuple of inputs) is
    given: one forward runs under ``torch.no_grad`` with recording hooks.
    """
    if target == "weights":
        params = {id(p) for p in model.parameters()}
        return [
            NameInfo(n, "parameter" if id(t) in params else "buffer", tuple(t.shape), t.numel(), t.dtype)
            for n, t in weight_tensors(model).items()
        ]
    if target != "activations":
        raise QfiError(f"target must be 'weights' or 'activations', got {target!r}")
    mods = activation_modules(model)
    seen: dict[str, torch.Tensor] = {}
    if example is not None:
        from qfi.inject import first_float

        hooks = [
            m.register_forward_hook(lambda _m, _i, out, n=n: (seen.setdefault(n, first_float(out)), None)[1])
            for n, m in mods.items()
        ]
        try:
            with torch.no_grad():
                model(*example) if isinstance(example, tuple) else model(example)
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
