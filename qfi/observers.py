"""Observers: how far a fault's error has spread, per module, against a reference run.

    with qfi.observe(model, reference=lambda: evaluate(model)) as obs:   # records the clean run
        with session.inject(qfi.BitFlip(ber=1e-3), seed=0), obs.measuring(ber=1e-3, rep=0):
            evaluate(model)                                             # measured, batch by batch
    obs.save("observers.csv")     # one row per measurement and module, depth = execution order

What is observed.  ``names=None`` (or ``""``) observes every leaf module (a candidate module of
``qfi.select_modules`` with no candidate inside it; ``nn.MultiheadAttention`` is a leaf); a
name filter (``"encoder_layer_1"``, ``"re:mlp\\.[03]$"``, with ``exclude=``) observes exactly the
modules that ``qfi.select_modules`` selects, blocks included (a transformer block's output is
its residual stream).  Of each module output the first floating tensor is observed
(``qfi.outputs.pick``: a tensor, ``attn_output`` of MultiheadAttention, the first field of a
dict or ``ModelOutput``), or the one that ``output=`` names (a key, field, index or dotted path).

Reference and batches.  A *reference pass* (``recording()``, ``record_reference(run)``, or
``reference=`` on ``observe``) stores each observed output of every forward; a *measured pass*
(``measuring(**columns)``, ``measure(run, **columns)``) compares the outputs of its forwards
with the stored ones: forward ``b`` of a pass (counted at the model, from 0 when the pass
starts) against forward ``b`` of the reference, each module's ``k``-th call in a forward against
its ``k``-th call there.  So both passes must run the same batches in the same order (what
``qfi.evaluate.Evaluator`` does); a shape that differs is a QfiError.  Forwards nested inside a
forward (the size probe of an activation session) are not counted.  An observer's hooks run
after any other hook on the module (also one registered later, such as an activation session
entered inside ``measuring``), so they see the value that flows on: quantized and faulted.

Metrics, per module over the batches and calls of one measured pass, with ``a`` the observed
and ``r`` the reference values (float32 arithmetic for 16-bit outputs; each output's sums are
taken over ``|a - r| / max_abs``, so no square overflows, and added up in float64):

* ``numel``: elements compared; ``batches``: forwards in which the module was compared;
* ``changed_share``: share of elements with ``a != r`` (NaN against NaN counts as equal);
* ``nonfinite``: elements that are NaN/Inf in ``a`` but finite in ``r`` (also an element whose
  error ``|a - r|`` overflows float32, which takes two values near the top of its range);
* ``rmse``, ``mae``, ``max_abs``: of ``a - r`` over the elements finite in both (NaN/Inf are
  counted in ``nonfinite`` instead, so one NaN does not hide the size of the other errors);
  NaN when no element was compared;
* ``ref_rms``: the RMS of the reference values compared (``rmse / ref_rms`` is the relative
  error, comparable across modules of different scale); ``depth``: the module's position in the
  execution order of the reference's first forward (its first call), ``kind``: its class name.

Memory.  The reference holds every observed output of every recorded forward: the sum of the
observed output sizes per batch, times the batches (ViT-B/16 at batch 8, its 75 leaves: 674 MB
per batch; the embedded ViT on the 450 digits: 36 MB).  ``max_mb`` (default 1024) bounds it:
recording keeps the first whole forwards that fit and drops the rest (a warning on the ``qfi``
logger says how many were kept, ``batches_recorded`` too), and measured forwards beyond them are
not compared; ``max_batches`` keeps at most that many; a limit below one forward is a QfiError
saying what one forward needs.  ``store="device"`` (default) keeps the reference where the
outputs are (fastest), ``store="cpu"`` in host memory (the GPU's memory is left alone; each
measured forward copies the reference back).  A measured forward needs one temporary of the
size of each observed output, in turn.

Cost.  No hook is installed outside ``recording`` and ``measuring``: a model that is not being
recorded or measured runs exactly as without observers.  A recorded forward copies each observed
output once and reads the norms back once per forward; a measured forward runs about ten kernels
per observed output (difference, counts, max, scaled norm and sum) and reads the results back
once per pass.  ``benchmarks/bench_observers.py``, ViT-B/16 shape at batch 8, every leaf: on 2
CPU threads recording costs about 1.06x and measuring 1.15x a plain forward (2.3 s); on an H200,
1.25x and 3.0x (9.6 ms plain, 29 ms measured: about 0.25 ms of host dispatch per observed module,
so the ratio falls with the batch size and with fewer observed modules).
"""

from __future__ import annotations

import contextlib
import csv
import logging
import math
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import torch
from torch import Tensor, nn

from qfi import outputs
from qfi.errors import QfiError
from qfi.select import activation_modules, select_modules

log = logging.getLogger("qfi")

T = TypeVar("T")

#: the columns an observer adds to the caller's columns, in order
COLUMNS = (
    "module", "kind", "depth", "batches", "numel", "rmse", "mae", "max_abs", "changed_share",
    "nonfinite", "ref_rms",
)
STORES = ("device", "cpu")
_F64 = torch.float64


def leaf_modules(model: nn.Module) -> list[str]:
    """Candidate modules (``qfi.select_modules``) with no candidate module inside them, in model
    order: what an observer with ``names=None`` observes."""
    cands = list(activation_modules(model))
    inner = {c.rsplit(".", k)[0] for c in cands for k in range(1, c.count(".") + 1)}
    return [c for c in cands if c not in inner]


@dataclass
class _Ref:
    """One recorded output: the tensor, whether all its values are finite, its sum of squares."""

    t: Tensor
    finite: bool
    sumsq: float  # over its finite values


class _Acc:
    """One module's sums over a measured pass, on the host."""

    __slots__ = ("batches", "changed", "mx", "n", "nonfinite", "pairs", "ref_sq", "sae", "sse")

    def __init__(self) -> None:
        self.n = self.changed = self.nonfinite = self.pairs = 0
        self.sse = self.sae = self.mx = self.ref_sq = 0.0
        self.batches: set[int] = set()


class Observer:
    """Per-module error against a reference run of the same batches; see the module docstring
    and :func:`observe`.  The selected modules are fixed at construction."""

    def __init__(
        self,
        model: nn.Module,
        names: object = None,
        exclude: object = None,
        *,
        output: str | int | None = None,
        max_mb: float = 1024.0,
        max_batches: int | None = None,
        store: str = "device",
    ) -> None:
        outputs.check_key(output)
        if isinstance(max_mb, bool) or not isinstance(max_mb, (int, float)) or not max_mb > 0:
            raise QfiError(f"max_mb={max_mb!r}: expected a positive number of megabytes (1 MB = 2**20 bytes)")
        if max_batches is not None and (
            isinstance(max_batches, bool) or not isinstance(max_batches, int) or max_batches < 1
        ):
            raise QfiError(f"max_batches={max_batches!r}: expected None (no limit) or an int >= 1")
        if store not in STORES:
            raise QfiError(f"store={store!r}: allowed {', '.join(repr(s) for s in STORES)}")
        self.model, self.output, self.store = model, output, store
        self.max_bytes, self.max_batches = int(max_mb * 2**20), max_batches
        if not activation_modules(model):
            raise QfiError(f"{type(model).__name__} has no module to observe (it has no submodules)")
        if names is None or names == "":  # the leaves, less what exclude names
            leaves = set(leaf_modules(model))
            self.names = [n for n in select_modules(model, None, exclude) if n in leaves]
            if not self.names:
                raise QfiError(f"exclude={exclude!r} leaves no leaf module to observe")
        else:
            self.names = select_modules(model, names, exclude)
        table = activation_modules(model)
        self._mods = [table[n] for n in self.names]
        self.kinds = [type(m).__name__ for m in self._mods]
        self.rows: list[dict[str, Any]] = []
        self._handles: list[Any] = []
        self._mode = "idle"
        self._reset_reference()

    # -- the reference --------------------------------------------------------------------------------
    def _reset_reference(self) -> None:
        self._ref: list[dict[tuple[int, int], _Ref]] = []  # per recorded forward
        self._depth_of: dict[int, int] = {}
        self.bytes = 0
        self.forwards_recorded = 0  # forwards seen while recording (stored or not)
        self._has_reference = False

    @property
    def batches_recorded(self) -> int:
        """Forwards whose outputs the reference holds (the first ones, see ``max_mb``)."""
        return len(self._ref)

    @property
    def reference_mb(self) -> float:
        """Memory the reference takes, in MB (2**20 bytes)."""
        return self.bytes / 2**20

    @property
    def unseen(self) -> list[str]:
        """Observed modules the reference's forwards never called with a floating output (they
        get no rows)."""
        return [n for i, n in enumerate(self.names) if i not in self._depth_of]

    def clear(self) -> None:
        """Free the reference (the rows stay)."""
        self._reset_reference()

    @contextlib.contextmanager
    def recording(self) -> Iterator[Observer]:
        """Forwards inside this block become the reference (replacing an earlier one)."""
        self._reset_reference()
        self._stop = False
        self._first_bytes = 0  # what the first forward needs, stored or not
        with self._hooked("record"):
            yield self
        self._finish_recording()

    def record_reference(self, run: Callable[[], T]) -> T:
        """``run()`` (e.g. ``lambda: evaluate(model)``) as the reference pass; returns its result."""
        with self.recording():
            return run()

    def _finish_recording(self) -> None:
        self._has_reference = True
        kept, seen = len(self._ref), self.forwards_recorded
        if seen and not kept:
            raise QfiError(
                f"max_mb={self.max_bytes / 2**20:g} holds no whole forward: one forward's observed "
                f"outputs ({len(self._depth_of)} modules) take {self._first_bytes / 2**20:.1f} MB; raise "
                "max_mb, use smaller batches or observe fewer modules (names=)"
            )
        if kept < seen:
            why = (
                f"max_batches={self.max_batches}"
                if self.max_batches is not None and kept == self.max_batches
                else f"max_mb={self.max_bytes / 2**20:g}"
            )
            log.warning(
                "observer reference holds the first %d of %d forwards (%s, %.1f MB); later forwards "
                "are not measured",
                kept,
                seen,
                why,
                self.reference_mb,
            )

    # -- measuring ------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def measuring(self, **columns: Any) -> Iterator[list[dict[str, Any]]]:
        """Forwards inside this block are compared with the reference; on exit the yielded list
        receives one row per module (``columns`` first, then ``COLUMNS``), also added to ``rows``."""
        self._check_columns(columns)
        if not self._has_reference:
            raise QfiError(
                "the observer has no reference yet: record one first (obs.recording(), "
                "obs.record_reference(run) or qfi.observe(..., reference=run))"
            )
        self._acc = {i: _Acc() for i in self._depth_of}
        self._chunks: list[tuple[list[tuple[int, int, bool]], Tensor, Tensor]] = []
        got: list[dict[str, Any]] = []
        with self._hooked("measure"):
            yield got
        self._reduce()
        got.extend(self._rows(columns))
        self.rows.extend(got)

    def measure(self, run: Callable[[], T], **columns: Any) -> tuple[T, list[dict[str, Any]]]:
        """``run()`` as a measured pass: its result and the rows (also added to ``rows``)."""
        with self.measuring(**columns) as rows:
            res = run()
        return res, rows

    def unchanged_rows(self, **columns: Any) -> list[dict[str, Any]]:
        """The rows of a pass known to equal the reference (a trial that flipped nothing and was
        not run): zero error over every recorded element; also added to ``rows``."""
        self._check_columns(columns)
        self._acc = {i: _Acc() for i in self._depth_of}
        for b, batch in enumerate(self._ref):
            for (i, _c), ref in batch.items():
                acc = self._acc[i]
                acc.n += ref.t.numel()
                acc.pairs += ref.t.numel()  # every element a finite pair with zero error
                acc.ref_sq += ref.sumsq
                acc.batches.add(b)
        got = self._rows(columns)
        self.rows.extend(got)
        return got

    def _check_columns(self, columns: dict[str, Any]) -> None:
        clash = sorted(set(columns) & set(COLUMNS))
        if clash:
            raise QfiError(f"columns {clash} clash with the observer's columns {list(COLUMNS)}; rename them")

    def _rows(self, columns: dict[str, Any]) -> list[dict[str, Any]]:
        out = []
        for i in sorted(self._acc, key=self._depth_of.__getitem__):
            acc, nan = self._acc[i], math.nan
            some = acc.pairs > 0
            out.append(
                {
                    **columns,
                    "module": self.names[i],
                    "kind": self.kinds[i],
                    "depth": self._depth_of[i],
                    "batches": len(acc.batches),
                    "numel": acc.n,
                    "rmse": math.sqrt(acc.sse / acc.pairs) if some else nan,
                    "mae": acc.sae / acc.pairs if some else nan,
                    "max_abs": acc.mx if some else nan,
                    "changed_share": acc.changed / acc.n if acc.n else nan,
                    "nonfinite": acc.nonfinite,
                    "ref_rms": math.sqrt(acc.ref_sq / acc.n) if acc.n else nan,
                }
            )
        return out

    def _reduce(self) -> None:
        """Fold the measured forwards' scalars into the host sums (one copy from the device)."""
        if not self._chunks:
            return
        meta = [m for ms, _, _ in self._chunks for m in ms]
        counts = torch.cat([_on(c, self._chunks[0][1]) for _, c, _ in self._chunks]).tolist()
        floats = torch.cat([_on(f, self._chunks[0][2]) for _, _, f in self._chunks]).tolist()
        self._chunks = []
        for k, (i, n, fast) in enumerate(meta):
            changed, second, third = counts[3 * k : 3 * k + 3]
            mx, scale, norm, total = floats[4 * k : 4 * k + 4]
            nonfinite = changed - second if fast else second
            acc = self._acc[i]
            acc.changed += changed
            acc.nonfinite += nonfinite
            acc.pairs += n - nonfinite if fast else third
            acc.sse += (norm * scale) ** 2
            acc.sae += total * scale
            acc.mx = max(acc.mx, mx)

    # -- tables ---------------------------------------------------------------------------------------
    def frame(self) -> Any:
        """``rows`` as a pandas DataFrame."""
        import pandas as pd

        return pd.DataFrame(self.rows)

    def save(self, path: str | Path) -> Path:
        """Write ``rows`` as a CSV file (the union of the columns, in first-seen order)."""
        return write_rows(path, self.rows)

    # -- context manager ------------------------------------------------------------------------------
    def __enter__(self) -> Observer:
        return self

    def __exit__(self, *exc: object) -> None:
        self._remove()
        self.clear()

    # -- hooks ----------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def _hooked(self, mode: str) -> Iterator[None]:
        if self._mode != "idle":
            raise QfiError(f"the observer is already in a {self._mode} pass; passes cannot nest")
        self._depth, self._batch = 0, -1
        self._calls = [0] * len(self._mods)
        self._handles = [
            self.model.register_forward_pre_hook(self._pre, prepend=True),
            self.model.register_forward_hook(self._post, always_call=True),
        ]
        self._mod_handles = [m.register_forward_hook(self._hook(i)) for i, m in enumerate(self._mods)]
        self._handles += self._mod_handles
        self._mode = mode
        try:
            yield
        finally:
            self._remove()

    def _remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles, self._mod_handles, self._mode = [], [], "idle"

    def _pre(self, _module: nn.Module, _args: object) -> None:
        self._depth += 1
        if self._depth != 1:
            return
        self._batch += 1
        self._calls = [0] * len(self._mods)
        self._found: list[tuple[tuple[int, int, bool], tuple[Tensor, ...], tuple[Tensor, ...]]] = []
        self._keep_last()
        if self._mode == "record":
            self.forwards_recorded += 1
            self._pending: dict[tuple[int, int], Tensor] = {}
            self._pending_bytes = 0
            if self.max_batches is not None and len(self._ref) >= self.max_batches:
                self._stop = True

    def _post(self, _module: nn.Module, _args: object, _out: object) -> None:
        self._depth -= 1
        if self._depth != 0:
            return
        if self._mode == "record" and not self._stop:
            self._ref.append(_references(self._pending))
            self.bytes += self._pending_bytes
            self._pending = {}
        if self._mode == "measure" and self._found:  # this forward's scalars, stacked: 2 kernels
            meta = [m for m, _, _ in self._found]
            counts = _stack([c for _, cs, _ in self._found for c in cs])
            floats = _stack([f for _, _, fs in self._found for f in fs], _F64)
            self._chunks.append((meta, counts, floats))
            self._found = []

    def _keep_last(self) -> None:
        """Move each module hook of ours behind hooks registered after it (an activation session
        entered inside ``measuring``), so that it sees the value that flows on."""
        for m, h in zip(self._mods, self._mod_handles, strict=True):
            hooks = m._forward_hooks
            if isinstance(hooks, OrderedDict) and next(reversed(hooks)) != h.id:
                hooks.move_to_end(h.id)

    def _hook(self, i: int) -> Callable[[nn.Module, object, object], None]:
        def hook(_module: nn.Module, _inp: object, out: object) -> None:
            if self._depth != 1 or self._mode == "idle":
                return
            try:
                hit = outputs.pick(out, self.output)
            except QfiError as e:
                raise QfiError(f"observed module {self.names[i]!r}: {e}") from None
            if hit is None:
                return
            t = hit[1].detach()
            c = self._calls[i]
            self._calls[i] = c + 1
            if self._mode == "record":
                self._record(i, c, t)
            else:
                self._measure(i, c, t)

        return hook

    def _record(self, i: int, c: int, t: Tensor) -> None:
        if self._batch == 0:
            self._depth_of.setdefault(i, len(self._depth_of))
            self._first_bytes += t.numel() * t.element_size()
        if self._stop:
            return
        nbytes = t.numel() * t.element_size()
        if self.bytes + self._pending_bytes + nbytes > self.max_bytes:
            self._stop, self._pending = True, {}  # this forward does not fit whole: keep none of it
            return
        self._depth_of.setdefault(i, len(self._depth_of))  # a module first called in a later forward
        dev = torch.device("cpu") if self.store == "cpu" else t.device
        kept = t.to(dev, copy=True)
        self._pending[(i, c)] = kept
        self._pending_bytes += nbytes

    def _measure(self, i: int, c: int, a: Tensor) -> None:
        if self._batch >= len(self._ref):
            return
        ref = self._ref[self._batch].get((i, c))
        if ref is None:
            return
        r = ref.t
        if a.shape != r.shape:
            raise QfiError(
                f"observed module {self.names[i]!r}: output of shape {tuple(a.shape)} in forward "
                f"{self._batch} (call {c}), the reference's was {tuple(r.shape)}: a measured pass must "
                "run the reference's batches in the same order"
            )
        n = a.numel()
        acc = self._acc[i]
        acc.n += n
        acc.ref_sq += ref.sumsq
        acc.batches.add(self._batch)
        if n:
            counts, floats = _compare(a, r.to(a.device, non_blocking=True), ref.finite)
            self._found.append(((i, n, ref.finite), counts, floats))


def _references(kept: dict[tuple[int, int], Tensor]) -> dict[tuple[int, int], _Ref]:
    """The recorded outputs of one forward with their finiteness and sums of squares, read from
    the device at once: each output's norm in its own precision is finite exactly when every value
    is finite and none is too large to square; the others get a careful second pass."""
    if not kept:
        return {}
    wide = [t if t.dtype in (torch.float32, _F64) else t.float() for t in kept.values()]
    norms = _stack([torch.linalg.vector_norm(t) for t in wide], _F64).tolist()
    out = {}
    for (key, t), norm in zip(kept.items(), norms, strict=True):
        if math.isfinite(norm):
            out[key] = _Ref(t, True, norm * norm)
            continue
        v = torch.nan_to_num(t.to(_F64), 0.0, 0.0, 0.0)
        out[key] = _Ref(t, bool(torch.isfinite(t).all()), float(torch.linalg.vector_norm(v)) ** 2)
    return out


def _compare(a: Tensor, r: Tensor, ref_finite: bool) -> tuple[tuple[Tensor, ...], tuple[Tensor, ...]]:
    """The 0-dim tensors that the errors of one output reduce to, without a host synchronisation
    and in about ten kernels: counts ``(changed, c1, c2)`` and floats ``(max_abs, scale, norm,
    sum)``.  With a finite reference (``a != r`` exactly where ``|a - r| != 0``, NaN included)
    ``c1`` counts the finite non-zero errors (``changed - c1`` are non-finite); else ``c1`` counts
    the new NaN/Inf and ``c2`` the pairs finite in both.  ``norm`` and ``sum`` are taken over
    ``|a - r| / scale`` (values in [0, 1], so the squares of errors near the top of the float range
    cannot overflow): sse = (norm * scale)**2 and sae = sum * scale, in float64 on the host."""
    wide = _F64 if _F64 in (a.dtype, r.dtype) else torch.float32
    a, r = a.to(wide), r.to(wide)
    d = torch.sub(a, r).abs_()
    if ref_finite:
        changed = torch.count_nonzero(d)
        torch.nan_to_num_(d, 0.0, 0.0, 0.0)
        c1 = c2 = torch.count_nonzero(d)
    else:
        fa, fr = torch.isfinite(a), torch.isfinite(r)
        both = fa & fr
        changed = torch.count_nonzero((a != r) & ~(torch.isnan(a) & torch.isnan(r)))
        c1, c2 = torch.count_nonzero(~fa & fr), torch.count_nonzero(both)
        d = torch.nan_to_num_(torch.where(both, d, 0.0), 0.0, 0.0, 0.0)
    mx = d.amax()
    scale = mx.clamp(min=torch.finfo(wide).tiny)  # 1 / scale stays finite
    d.div_(scale)
    return (changed, c1, c2), (mx, scale, torch.linalg.vector_norm(d), d.sum())


def _stack(ts: list[Tensor], dtype: torch.dtype | None = None) -> Tensor:
    """0-dim tensors as one 1-D tensor on the first one's device (converted only where needed)."""
    first = ts[0]
    same = all(t.dtype == first.dtype and t.device == first.device for t in ts)
    out = torch.stack(ts if same else [t.to(first.device, first.dtype) for t in ts])
    return out if dtype is None else out.to(dtype)


def _on(t: Tensor, like: Tensor) -> Tensor:
    return t if t.device == like.device else t.to(like.device)


def write_rows(path: str | Path, rows: list[dict[str, Any]]) -> Path:
    """Rows of dicts as a CSV file: the union of their keys in first-seen order, floats as
    ``repr`` (exact), missing values empty."""
    path = Path(path)
    cols: dict[str, None] = {}
    for r in rows:
        cols.update(dict.fromkeys(r))
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(cols), lineterminator="\n")
        w.writeheader()
        w.writerows(rows)
    return path


def tidy_csv(
    path: str | Path, key_columns: tuple[str, ...], order: Callable[[tuple[str, ...]], int | None]
) -> int:
    """Rewrite an appended observers CSV (a campaign's ``observers.csv``) in canonical order: rows
    whose trial key (the values of ``key_columns``, as written) ``order`` maps to None are
    dropped, a (trial, module) written twice (a trial rerun after a kill) keeps its last row, and
    rows are sorted by ``order`` then ``depth``.  Written through a temporary file and a rename;
    returns the rows kept."""
    import os

    path = Path(path)
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        columns = list(reader.fieldnames or ())
        rows: dict[tuple[tuple[str, ...], str], dict[str, str]] = {}
        for r in reader:
            if None in r or any(v is None for v in r.values()):  # a half-written last line
                continue
            rows[(tuple(r[c] for c in key_columns), r["module"])] = r
    kept = [(order(k), r) for (k, _m), r in rows.items()]
    kept = [(i, r) for i, r in kept if i is not None]
    kept.sort(key=lambda ir: (ir[0], int(ir[1]["depth"])))
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=columns, lineterminator="\n")
        w.writeheader()
        w.writerows(r for _, r in kept)
    os.replace(tmp, path)
    return len(kept)


def observe(
    model: nn.Module,
    names: object = None,
    exclude: object = None,
    *,
    reference: Callable[[], Any] | None = None,
    output: str | int | None = None,
    max_mb: float = 1024.0,
    max_batches: int | None = None,
    store: str = "device",
) -> Observer:
    """An :class:`Observer` of ``model``'s leaf modules (``names=None``) or of the modules a name
    filter selects.  ``reference``: a callable run once as the reference pass (e.g.
    ``lambda: evaluate(model)``, the golden or clean run of the batches to be measured); else
    record one with ``obs.recording()`` or ``obs.record_reference(run)``.  As a context manager
    the observer frees its reference on exit; see the module docstring for the rest."""
    obs = Observer(
        model, names, exclude, output=output, max_mb=max_mb, max_batches=max_batches, store=store
    )
    if reference is not None:
        if not callable(reference):
            raise QfiError(
                f"reference={reference!r}: expected a callable that runs the reference pass, such as "
                "lambda: evaluate(model)"
            )
        obs.record_reference(reference)
    return obs


__all__ = ["COLUMNS", "Observer", "leaf_modules", "observe", "tidy_csv", "write_rows"]
