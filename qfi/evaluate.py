"""Evaluate a model on a fixed dataset with a metric: its values, SDC against a reference, DUE.

Samples come in any of the shapes researchers' data has (collated by torch's default
``DataLoader`` collate into batches of the same shape):

* ``(inputs, target)``: ``inputs`` a tensor (``model(x)``), a tuple (positional arguments,
  ``model(*x)``) or a dict (keyword arguments, ``model(**x)``); ``target`` labels / token ids;
* a dict alone: keyword arguments (the HF convention); its ``labels`` entry, when present, is
  also the target (and stays an argument, so HF models compute their own loss);
* a tensor alone: the input, no target.

The batches are moved to the device once; every evaluation reuses them, so a trial costs one
pass of the model over the data and nothing else.  DUE is the share of samples whose output is
not finite: any floating tensor of the output (walked like activation outputs: tuples, dicts,
``ModelOutput``, dataclasses) with NaN/Inf in the sample's row (a tensor without a batch
dimension, such as a scalar loss, marks every sample).  How the outputs are scored is the
metric's business (``qfi.metrics``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from qfi import outputs
from qfi.errors import QfiError
from qfi.metrics import Metric, Record, get_metric
from qfi.select import call_model


@dataclass
class EvalResult:
    """One pass over the data: the metric's record and each sample's finiteness.

    ``values(reference)`` gives the metric's values (absolute metrics ignore the reference);
    ``top1``/``top5`` (and any other column of the metric) read the values without one.
    """

    metric: Metric
    record: Record
    finite: Tensor  # bool per sample, on the CPU

    @property
    def n(self) -> int:
        return int(self.finite.numel())

    @property
    def due(self) -> float:
        """Share of samples whose output holds NaN or Inf (detected unrecoverable error)."""
        return float((~self.finite).float().mean()) if self.n else 0.0

    def values(self, reference: EvalResult | None = None) -> dict[str, float]:
        return self.metric.values(self.record, None if reference is None else reference.record)

    def __getattr__(self, key: str) -> Any:
        if key in ("metric", "record", "finite") or key.startswith("_"):
            raise AttributeError(key)
        if key in self.metric.columns and not self.metric.relative:
            return self.values()[key]
        if key == "pred" and "pred" in self.record.per_sample:
            return self.record.cat("pred")
        raise AttributeError(f"{type(self).__name__} of metric {self.metric.name!r} has no {key!r}")

    def sdc(self, reference: EvalResult) -> float:
        """Silent data corruption: the share of samples whose output is finite (here and in
        ``reference``, e.g. the clean quantized model) and changed against the reference (top1:
        another top-1 class; see ``qfi.metrics``).  Disjoint from ``due``: a NaN/Inf output is
        detectable, so it is never counted as silent."""
        both = self.finite & reference.finite
        return float((self.metric.changed(self.record, reference.record) & both).float().mean())

    def sdc_any(self, reference: EvalResult) -> float:
        """Share of samples that changed or whose finiteness differs from the reference's (for
        top1 qfi < 0.2's ``sdc``; equals ``sdc + due`` when the reference is finite)."""
        both = self.finite & reference.finite
        changed = self.metric.changed(self.record, reference.record)
        return float(torch.where(both, changed, self.finite != reference.finite).float().mean())


def _to(obj: Any, device: torch.device) -> Any:
    if isinstance(obj, Tensor):
        return obj.to(device)
    if isinstance(obj, Mapping):
        return {k: _to(v, device) for k, v in obj.items()}
    if isinstance(obj, tuple):
        return tuple(_to(v, device) for v in obj)
    if isinstance(obj, list):
        return [_to(v, device) for v in obj]
    return obj


def split_batch(batch: Any) -> tuple[Any, Any]:
    """``(inputs, target)`` of a collated batch (see the module docstring)."""
    if isinstance(batch, Mapping):
        return dict(batch), batch.get("labels")
    if isinstance(batch, (tuple, list)):
        if len(batch) != 2:
            raise QfiError(
                f"a data sample must be (inputs, target), a dict of model arguments or a tensor; got "
                f"a {type(batch).__name__} of {len(batch)} items (wrap positional inputs in a tuple: "
                "((x1, x2), target))"
            )
        x, y = batch
        return (tuple(x) if isinstance(x, list) else x), y
    if isinstance(batch, Tensor):
        return batch, None
    raise QfiError(f"a data sample must be (inputs, target), a dict or a tensor; got {type(batch).__name__}")


def batch_len(inputs: Any) -> int:
    """Samples in a batch of inputs: the first dimension of its first tensor."""
    ts = outputs.tensors(inputs)
    if not ts or ts[0].dim() == 0:
        raise QfiError(f"cannot tell the batch size of inputs of type {type(inputs).__name__}")
    return int(ts[0].shape[0])


def slice_inputs(inputs: Any, n: int) -> Any:
    """The first ``n`` samples of a batch of inputs."""
    if isinstance(inputs, Tensor):
        return inputs[:n] if inputs.dim() else inputs
    if isinstance(inputs, Mapping):
        return {k: slice_inputs(v, n) for k, v in inputs.items()}
    if isinstance(inputs, (tuple, list)):
        return type(inputs)(slice_inputs(v, n) for v in inputs)
    return inputs


def finite_rows(out: Any, n: int) -> Tensor:
    """Per sample: every floating tensor of ``out`` is finite in that sample's row."""
    ok = None
    for _, t in outputs.float_tensors(out):
        if t.dim() >= 1 and t.shape[0] == n:
            f = torch.isfinite(t.detach()).reshape(n, -1).all(dim=1)
        else:  # no batch dimension (a scalar loss): it speaks for every sample
            f = torch.isfinite(t.detach()).all().expand(n)
        ok = f if ok is None else ok & f.to(ok.device)
    return torch.ones(n, dtype=torch.bool) if ok is None else ok


class Evaluator:
    """Holds the evaluation batches on ``device`` and runs a model over them, scored by ``metric``
    (a name, ``"cosine?threshold=0.95"``, ``"module:callable"`` or a :class:`~qfi.metrics.Metric`)."""

    def __init__(
        self,
        dataset: Iterable,
        batch_size: int = 512,
        device: str | torch.device = "cpu",
        limit: int | None = None,
        metric: str | Metric = "top1",
    ) -> None:
        self.device = torch.device(device)
        self.metric = get_metric(metric) if isinstance(metric, str) else metric
        loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False)
        batches: list[tuple[Any, Any, int]] = []
        seen = 0
        for raw in loader:
            if limit is not None and seen >= limit:
                break
            x, y = split_batch(raw)
            n = batch_len(x)
            if limit is not None and seen + n > limit:
                n = limit - seen
                x = slice_inputs(x, n)
                y = None if y is None else slice_inputs(y, n)
            if y is None and self.metric.needs_target:
                raise QfiError(
                    f"metric {self.metric.name!r} needs targets (labels), but the data has none; "
                    "use --metric cosine (drift against the clean outputs) or a metric plug-in"
                )
            batches.append((_to(x, self.device), _to(y, self.device), n))
            seen += n
        if not batches:
            raise QfiError("the evaluation dataset is empty")
        self.batches = batches
        self.n = seen
        self.calls = 0  # evaluations run (for the campaign-overhead benchmark and tests)

    @classmethod
    def from_batches(
        cls, batches: list[tuple[Any, Any, int]], metric: Metric, device: str | torch.device = "cpu"
    ) -> Evaluator:
        """An evaluator over already collated ``(inputs, target, n)`` batches (another
        evaluator's ``batches``, e.g. shipped to a worker), moved to ``device``."""
        ev = cls.__new__(cls)
        ev.device, ev.metric = torch.device(device), metric
        ev.batches = [(_to(x, ev.device), _to(y, ev.device), n) for x, y, n in batches]
        ev.n = sum(n for _, _, n in batches)
        ev.calls = 0
        return ev

    def inputs(self) -> list[Any]:
        """The input batches (for calibrating activation scales)."""
        return [x for x, _, _ in self.batches]

    @torch.no_grad()
    def __call__(
        self,
        model: nn.Module,
        prefix: Any = None,
        around_batch: Callable[[int], contextlib.AbstractContextManager[Any]] | None = None,
    ) -> EvalResult:
        """One pass over the batches.  ``prefix`` (a :class:`qfi.prefix.PrefixCache` recorded on
        this evaluator's batches) serves the fault-free start of each forward from its cache:
        batch ``i`` runs as ``prefix.forward(model, i, inputs)``.  ``around_batch(i)`` is a context
        entered around batch ``i``'s forward (a fault drawn per batch: ``--policy batch``)."""
        self.calls += 1
        rec = Record()
        finite = []
        for i, (x, y, n) in enumerate(self.batches):
            with around_batch(i) if around_batch is not None else contextlib.nullcontext():
                out = call_model(model, x) if prefix is None else prefix.forward(model, i, x)
                f = finite_rows(out, n)
                self.metric.batch(rec, out, y, f)
            rec.n += n
            finite.append(f.cpu())
        return EvalResult(self.metric, rec.finish(), torch.cat(finite))
