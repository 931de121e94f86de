"""Walk a module's output: list its floating tensors, pick one, rebuild the output around a new one.

An output is a tensor or a container of them, nested: a tuple (namedtuples and torch's return
types included), a list, a mapping (a dict, an OrderedDict, or an HF ``ModelOutput``, which is an
OrderedDict subclass: it is recognised as a ``Mapping``, transformers is never imported) or a
dataclass instance.  Everything else (None, numbers, strings, integer or bool tensors) carries no
activation faults.

A *key* names a place in an output, one step per level, steps joined by ``"."``: a sequence
index (``"0"``), a mapping key (``"logits"``) or a dataclass field (``"last_hidden_state"``); the
digits ``"i"`` also mean the i-th entry of a mapping or dataclass (HF's ``out[0]``), a
namedtuple's field names work as well as its indices, and an int ``i`` is the one-step key
``"i"`` (negative ints count from the end).  ``None`` is the output itself.

The tensor that a key selects is the first floating tensor at or under it, in *walk order*:
sequence order, mapping order, field order, depth first.  So by default (key None) a tensor
output is itself, ``(out, weights)`` gives ``out``, a ``ModelOutput`` its first field that is
set (``last_hidden_state``, ``logits``), a dataclass its first floating field.

``replace`` rebuilds an output with one tensor swapped and every container keeping its type:
tuples (namedtuples through ``_make``), lists, mappings through ``copy.copy`` and item assignment
(HF ``ModelOutput`` keeps its attribute in step), dataclasses through ``dataclasses.replace``.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Mapping
from typing import Any

from torch import Tensor

from qfi.errors import QfiError

#: a place in an output: one concrete step per level (a sequence index, a mapping key, a field name)
Loc = tuple[Any, ...]

_MAX_DEPTH = 8  # outputs nest a few levels (an HF output holds a tuple of hidden states)


def _is_dataclass(obj: object) -> bool:
    return dataclasses.is_dataclass(obj) and not isinstance(obj, type)


def _children(obj: object) -> list[tuple[Any, object]] | None:
    """``(step, child)`` pairs of a container in walk order; None for a non-container."""
    if isinstance(obj, Mapping):
        return list(obj.items())
    if isinstance(obj, (tuple, list)):
        return list(enumerate(obj))
    if _is_dataclass(obj):
        return [(f.name, getattr(obj, f.name)) for f in dataclasses.fields(obj)]  # type: ignore[arg-type]
    return None


def loc_str(loc: Loc) -> str:
    """The key string of a location (``("hidden_states", 3)`` -> ``"hidden_states.3"``)."""
    return ".".join(str(s) for s in loc)


def type_name(out: object) -> str:
    """The output's type for messages: ``"dict"``, ``"BaseModelOutput (a Mapping)"``, ``"NoneType"``."""
    name = type(out).__name__
    if isinstance(out, Mapping) and type(out) not in (dict,):
        return f"{name} (a Mapping)"
    if _is_dataclass(out):
        return f"{name} (a dataclass)"
    return name


def tensors(obj: object, _depth: int = 0) -> list[Tensor]:
    """Every tensor in ``obj`` (any dtype), in walk order."""
    if isinstance(obj, Tensor):
        return [obj]
    if type(obj) is tuple and all(isinstance(o, Tensor) for o in obj):  # a module's usual inputs
        return list(obj)
    kids = _children(obj) if _depth < _MAX_DEPTH else None
    if not kids:
        return []
    return [t for _, c in kids for t in tensors(c, _depth + 1)]


def float_tensors(out: object) -> list[tuple[str, Tensor]]:
    """``(key, tensor)`` of every floating tensor in ``out``, in walk order (key ``""``: ``out``)."""
    found: list[tuple[str, Tensor]] = []

    def walk(obj: object, loc: Loc) -> None:
        if isinstance(obj, Tensor):
            if obj.is_floating_point():
                found.append((loc_str(loc), obj))
            return
        for step, child in (_children(obj) if len(loc) < _MAX_DEPTH else None) or ():
            walk(child, (*loc, step))

    walk(out, ())
    return found


def _first(obj: object, loc: Loc) -> tuple[Loc, Tensor] | None:
    if isinstance(obj, Tensor):
        return (loc, obj) if obj.is_floating_point() else None
    for step, child in (_children(obj) if len(loc) < _MAX_DEPTH else None) or ():
        hit = _first(child, (*loc, step))
        if hit is not None:
            return hit
    return None


def _step(obj: object, part: str | int) -> tuple[Any, object] | None:
    """The concrete step and child that ``part`` names in ``obj``; None when absent.  A key or
    field equal to ``part`` wins; else digits are a position (negative from the end)."""
    kids = _children(obj)
    if not kids:
        return None
    for step, child in kids:
        if step == part or str(step) == str(part):
            return step, child
    fields = getattr(type(obj), "_fields", None)  # a namedtuple's field names
    if isinstance(obj, tuple) and isinstance(fields, tuple) and part in fields:
        return kids[fields.index(part)]
    if isinstance(part, str):
        if not part.lstrip("-").isdigit():
            return None
        part = int(part)
    if -len(kids) <= part < len(kids):
        return kids[part]
    return None


def describe(out: object) -> str:
    """Where ``out``'s floating tensors are, for messages."""
    have = [k for k, _ in float_tensors(out)]
    if not have:
        return f"this {type_name(out)} output holds no floating tensor"
    if have == [""]:
        return f"this {type_name(out)} output is itself the only floating tensor (it has no keys)"
    return f"this {type_name(out)} output has floating tensors at {have}"


def check_key(key: object) -> None:
    """QfiError unless ``key`` is None, an int or a non-empty string (see the module docstring)."""
    if key is None or (isinstance(key, int) and not isinstance(key, bool)):
        return
    if isinstance(key, str) and key.strip():
        return
    raise QfiError(
        f"output={key!r}: expected None (the first floating tensor), an int index or a key such as "
        "'logits' or 'hidden_states.3'"
    )


def pick(out: object, key: str | int | None = None) -> tuple[Loc, Tensor] | None:
    """``(location, tensor)`` of the floating tensor that carries faults: the first floating
    tensor at or under ``key`` in walk order; None when there is none there.  QfiError when
    ``key`` names nothing in ``out`` (the message lists the keys of its floating tensors)."""
    if key is None:
        if isinstance(out, Tensor):  # the common case, kept cheap: hooks call this on every forward
            return ((), out) if out.is_floating_point() else None
        return _first(out, ())
    parts = key.split(".") if isinstance(key, str) else [key]
    obj, loc = out, ()
    for part in parts:
        hit = _step(obj, part)
        if hit is None:
            raise QfiError(f"output key {key!r} names nothing in it: {describe(out)}")
        loc = (*loc, hit[0])
        obj = hit[1]
    return _first(obj, loc)


def get(out: object, loc: Loc) -> object:
    """The object at ``loc`` (as returned by ``pick``)."""
    for step in loc:
        out = getattr(out, step) if _is_dataclass(out) and not isinstance(out, Mapping) else out[step]  # type: ignore[index]
    return out


def replace(out: object, loc: Loc, new: object) -> object:
    """``out`` with the object at ``loc`` replaced by ``new``; containers keep their types and
    ``out`` itself is not modified."""
    if not loc:
        return new
    step = loc[0]
    return _with(out, step, replace(get(out, (step,)), loc[1:], new))


def _with(obj: object, step: Any, new: object) -> object:
    if isinstance(obj, Mapping):
        try:
            c = copy.copy(obj)
            c[step] = new  # type: ignore[index]
        except Exception:  # an immutable or unusual mapping: rebuild it from a dict
            d = {**obj, step: new}
            for make in (lambda: type(obj)(**d), lambda: type(obj)(d)):
                try:
                    return make()
                except Exception:
                    pass
            return d
        if _is_dataclass(c) and isinstance(step, str) and hasattr(c, step):
            object.__setattr__(c, step, new)  # ModelOutput-like: attribute and item agree
        return c
    if isinstance(obj, (tuple, list)):
        items = list(obj)
        items[step] = new
        kind = type(obj)
        if kind in (tuple, list):
            return kind(items)
        if hasattr(kind, "_make"):  # namedtuple
            return kind._make(items)  # type: ignore[attr-defined]
        try:
            return kind(items)  # torch.return_types, list subclasses
        except Exception:
            return tuple(items) if isinstance(obj, tuple) else items
    if _is_dataclass(obj):
        try:
            return dataclasses.replace(obj, **{step: new})  # type: ignore[type-var]
        except (TypeError, ValueError):  # a field with init=False
            c = copy.copy(obj)
            object.__setattr__(c, step, new)
            return c
    raise QfiError(f"cannot rebuild a {type_name(obj)} output")  # unreachable for pick's locations


__all__ = [
    "Loc", "check_key", "describe", "float_tensors", "get", "loc_str", "pick", "replace", "tensors",
    "type_name",
]
