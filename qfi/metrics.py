"""How a pass over the data is scored: metric plug-ins.

A metric turns the model's outputs of one evaluation (and the targets, when the data has them)
into a *record*, and records into named values: absolute ones (top-1 accuracy, loss) or values
against a reference record (cosine similarity to the clean outputs).  Every metric also says,
per sample, whether an output *changed* against a reference: SDC is the share of samples whose
output is finite here and in the reference and changed.  DUE (non-finite outputs) is detected
by the evaluator the same way for every metric: a sample is non-finite when any floating tensor
of the model's output holds NaN/Inf in that sample's row.

Built in (``get_metric(spec)``; options after ``?`` as ``key=value&key=value``):

``top1`` (default)
    ``top1``, ``top5``: accuracy of the logits (the ``logits`` entry of a mapping output, else its
    first floating tensor) against the targets; a non-finite row is never correct.  Changed:
    the top-1 class differs.  Needs targets.
``cosine`` (options ``threshold=0.99``, ``key=<output key>``)
    ``cos_mean``, ``cos_min``: mean and minimum over the samples with finite outputs of the
    cosine similarity between a sample's output vector (the chosen tensor of the output,
    default the first floating one, flattened per sample) and the reference's (trials: clean;
    clean: golden).  Changed: similarity below ``threshold`` (default 0.99: a drift of the
    embedding direction by more than ~8 degrees).  Needs no targets.
``loss`` / ``perplexity`` (option ``key=<logits key>``)
    ``loss`` and ``perplexity = exp(loss)``: the model's own ``loss`` when its output carries one
    (HF models given ``labels``), else the cross-entropy of the logits against the targets
    (3-D logits ``[batch, tokens, vocab]`` with 2-D targets: next-token prediction, targets
    shifted by one as in HF causal LMs; target ``-100`` is ignored).  Lower is better; the
    primary value is ``loss`` or ``perplexity``.  Changed: the argmax of the logits differs at
    any position.
``module:callable``
    ``fn(outputs, targets) -> dict[str, float]``, called once per evaluation with the lists of
    per-batch outputs and targets (None where the data has none); the keys of its result are the
    columns, the first is the primary value (higher is better unless ``fn.higher_is_better`` is
    False).  Changed: any element of the output's first per-sample floating tensor differs.
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor

from qfi import outputs
from qfi.errors import QfiError

BUILTIN = ("top1", "cosine", "loss", "perplexity")


def parse_spec(spec: str) -> tuple[str, dict[str, str]]:
    """``"cosine?threshold=0.95&key=pooler_output"`` -> ``("cosine", {"threshold": "0.95", ...})``."""
    if not isinstance(spec, str) or not spec.strip():
        raise QfiError(f"metric {spec!r} must be a name: {', '.join(BUILTIN)} or 'module:callable'")
    name, _, query = spec.strip().partition("?")
    opts: dict[str, str] = {}
    for part in filter(None, query.split("&")):
        k, eq, v = part.partition("=")
        if not eq or not k:
            raise QfiError(f"metric {spec!r}: option {part!r} must be key=value")
        opts[k.strip()] = v.strip()
    return name.strip(), opts


def _tensor_of(out: object, key: str | None, what: str) -> Tensor:
    """The tensor a metric reads: ``key`` in the output, else ``logits`` of a mapping, else the
    first floating tensor."""
    if key is None and isinstance(out, Mapping) and isinstance(out.get("logits"), Tensor):
        return out["logits"]
    hit = outputs.pick(out, key)
    if hit is None:
        raise QfiError(
            f"metric {what}: the model's output ({outputs.type_name(out)}) holds no floating tensor"
            + ("" if key is None else f" under key {key!r}")
        )
    return hit[1]


def per_sample_first(out: object, n: int) -> Tensor | None:
    """The output's first floating tensor whose first dimension is the batch, as ``[n, -1]``."""
    for _, t in outputs.float_tensors(out):
        if t.dim() >= 1 and t.shape[0] == n:
            return t.detach().reshape(n, -1)
    return None


@dataclass
class Record:
    """What one evaluation leaves for scoring: per-sample tensors and running sums."""

    n: int = 0
    per_sample: dict[str, list[Tensor]] = field(default_factory=dict)
    sums: dict[str, float] = field(default_factory=dict)
    raw: list[tuple[object, object]] = field(default_factory=list)  # custom metrics: (output, target)
    #: values computed against a reference, kept for the next call (not pickled)
    memo: dict = field(default_factory=dict, repr=False, compare=False)

    def __getstate__(self) -> dict:
        return {**self.__dict__, "memo": {}}

    def add(self, name: str, t: Tensor) -> None:
        self.per_sample.setdefault(name, []).append(t)

    def cat(self, name: str) -> Tensor:
        parts = self.per_sample.get(name, [])
        if len(parts) == 1:  # after finish(): the concatenated tensor itself, no copy per read
            return parts[0]
        return torch.cat(parts) if parts else torch.empty(0)

    def finish(self) -> Record:
        for k, parts in self.per_sample.items():
            if len(parts) > 1:
                self.per_sample[k] = [torch.cat(parts)]
        return self


class Metric:
    """The interface of a metric; see the module docstring."""

    name: str = ""
    columns: tuple[str, ...] = ()
    primary: str = ""
    higher_is_better: bool = True
    bounds: tuple[float, float] | None = None  # where the primary value lives (CI clipping)
    needs_target: bool = False
    relative: bool = False  # values need a reference record

    def batch(self, rec: Record, out: object, target: object, finite: Tensor) -> None:
        raise NotImplementedError

    def values(self, rec: Record, ref: Record | None) -> dict[str, float]:
        raise NotImplementedError

    def changed(self, rec: Record, ref: Record) -> Tensor:
        """Per sample: the output differs materially from the reference's."""
        a, b = rec.cat("_out"), ref.cat("_out")
        if a.numel() == 0 or a.shape != b.shape:
            return torch.zeros(rec.n, dtype=torch.bool)
        return (a != b).any(dim=1).cpu()

    def _keep_output(self, rec: Record, out: object, n: int) -> None:
        t = per_sample_first(out, n)
        if t is not None:
            rec.add("_out", t.float())


class Top1(Metric):
    name, columns, primary, bounds, needs_target = "top1", ("top1", "top5"), "top1", (0.0, 1.0), True

    def batch(self, rec: Record, out: object, target: object, finite: Tensor) -> None:
        logits = _tensor_of(out, None, "top1").float()
        if logits.dim() != 2:
            raise QfiError(
                f"metric top1 needs [batch, classes] logits, got shape {tuple(logits.shape)}; "
                "use --metric cosine or loss for other outputs"
            )
        y = target.to(logits.device)  # type: ignore[union-attr]
        k = min(5, logits.shape[1])
        top = logits.nan_to_num(nan=-torch.inf).topk(k, dim=1).indices
        hit = top == y[:, None]
        rec.sums["top1"] = rec.sums.get("top1", 0.0) + int((hit[:, 0] & finite).sum())
        rec.sums["top5"] = rec.sums.get("top5", 0.0) + int((hit.any(dim=1) & finite).sum())
        rec.add("pred", torch.where(finite, top[:, 0], torch.full_like(top[:, 0], -1)).cpu())

    def values(self, rec: Record, ref: Record | None) -> dict[str, float]:
        return {"top1": rec.sums.get("top1", 0.0) / rec.n, "top5": rec.sums.get("top5", 0.0) / rec.n}

    def changed(self, rec: Record, ref: Record) -> Tensor:
        return rec.cat("pred") != ref.cat("pred")


class Cosine(Metric):
    name, columns, primary = "cosine", ("cos_mean", "cos_min"), "cos_mean"
    bounds, relative = (-1.0, 1.0), True

    def __init__(self, threshold: str | float = 0.99, key: str | None = None) -> None:
        try:
            self.threshold = float(threshold)
        except ValueError:
            raise QfiError(f"metric cosine: threshold {threshold!r} must be a number in [-1, 1]") from None
        if not -1.0 <= self.threshold <= 1.0:
            raise QfiError(f"metric cosine: threshold {self.threshold} is outside [-1, 1]")
        self.key = key

    def batch(self, rec: Record, out: object, target: object, finite: Tensor) -> None:
        v = _tensor_of(out, self.key, "cosine")
        n = int(finite.numel())
        if v.dim() == 0 or v.shape[0] != n:
            raise QfiError(
                f"metric cosine: the output tensor has shape {tuple(v.shape)}, not one row per sample "
                f"({n}); choose a per-sample tensor with key=<output key>"
            )
        rec.add("vec", v.detach().reshape(n, -1).float())

    def _cos(self, rec: Record, ref: Record) -> Tensor:
        """Per-sample cosine to the reference (computed once per pair: values, sdc and sdc_any
        all read it)."""
        hit = rec.memo.get(("cos", id(ref)))
        if hit is None or hit[0] is not ref:
            a, b = rec.cat("vec"), ref.cat("vec")
            cos = F.cosine_similarity(a, b.to(a.device), dim=1, eps=1e-30).cpu()
            hit = rec.memo[("cos", id(ref))] = (ref, cos)
        return hit[1]

    def values(self, rec: Record, ref: Record | None) -> dict[str, float]:
        if ref is None:  # the golden run against itself
            return {"cos_mean": 1.0, "cos_min": 1.0}
        c = self._cos(rec, ref)
        c = c[torch.isfinite(c)]
        if c.numel() == 0:
            return {"cos_mean": math.nan, "cos_min": math.nan}
        return {"cos_mean": float(c.mean()), "cos_min": float(c.min())}

    def changed(self, rec: Record, ref: Record) -> Tensor:
        return ~(self._cos(rec, ref) >= self.threshold)


class Loss(Metric):
    columns, higher_is_better, bounds, relative = ("loss", "perplexity"), False, None, False

    def __init__(self, primary: str, key: str | None = None) -> None:
        self.name = self.primary = primary
        self.key = key

    def batch(self, rec: Record, out: object, target: object, finite: Tensor) -> None:
        n = int(finite.numel())
        own = out.get("loss") if isinstance(out, Mapping) else getattr(out, "loss", None)
        logits = None
        try:
            logits = _tensor_of(out, self.key, self.name)
        except QfiError:
            if not isinstance(own, Tensor):
                raise
        if isinstance(own, Tensor) and own.numel() == 1:
            rec.sums["loss"] = rec.sums.get("loss", 0.0) + float(own.float()) * n
        elif target is None or logits is None:
            raise QfiError(
                f"metric {self.name} needs the model's own loss (an output 'loss', e.g. HF models "
                "given labels) or targets in the data"
            )
        else:
            per = _cross_entropy(logits.float(), target.to(logits.device))  # type: ignore[union-attr]
            rec.sums["loss"] = rec.sums.get("loss", 0.0) + float(per.sum())
        if logits is not None and logits.dim() >= 1 and logits.shape[0] == n:
            rec.add("argmax", logits.detach().nan_to_num(nan=-torch.inf).argmax(dim=-1).reshape(n, -1).cpu())

    def values(self, rec: Record, ref: Record | None) -> dict[str, float]:
        loss = rec.sums.get("loss", 0.0) / rec.n
        return {"loss": loss, "perplexity": math.exp(loss) if loss < 700 else math.inf}

    def changed(self, rec: Record, ref: Record) -> Tensor:
        a, b = rec.cat("argmax"), ref.cat("argmax")
        if a.numel() == 0 or a.shape != b.shape:
            return torch.zeros(rec.n, dtype=torch.bool)
        return (a != b).any(dim=1)


def _cross_entropy(logits: Tensor, target: Tensor) -> Tensor:
    """Per-sample mean cross-entropy; ``[B, T, V]`` logits with ``[B, T]`` targets are scored as
    next-token prediction (position t predicts target t+1), ``-100`` targets ignored."""
    if logits.dim() == 3 and target.dim() == 2:
        logits, target = logits[:, :-1], target[:, 1:]
        ce = F.cross_entropy(logits.transpose(1, 2), target.long(), reduction="none", ignore_index=-100)
        counts = (target != -100).sum(dim=1).clamp(min=1)
        return ce.sum(dim=1) / counts
    if logits.dim() == 2 and target.dim() == 1:
        return F.cross_entropy(logits, target.long(), reduction="none")
    raise QfiError(
        f"cross-entropy needs [batch, classes] logits with [batch] targets or [batch, tokens, vocab] "
        f"with [batch, tokens]; got {tuple(logits.shape)} and {tuple(target.shape)}"
    )


class Custom(Metric):
    """``module:callable``: see the module docstring."""

    def __init__(self, spec: str, fn: Callable[..., Mapping[str, float]], kwargs: dict[str, str]) -> None:
        self.name, self.fn, self.kwargs = spec, fn, kwargs
        self.higher_is_better = bool(getattr(fn, "higher_is_better", True))
        self.columns = tuple(getattr(fn, "columns", ()))
        self.primary = self.columns[0] if self.columns else ""

    def batch(self, rec: Record, out: object, target: object, finite: Tensor) -> None:
        rec.raw.append((out, target))
        self._keep_output(rec, out, int(finite.numel()))

    def values(self, rec: Record, ref: Record | None) -> dict[str, float]:
        outs = [o for o, _ in rec.raw]
        targets = [t for _, t in rec.raw]
        try:
            res = self.fn(outs, targets, **self.kwargs)
        except Exception as e:
            raise QfiError(f"metric {self.name!r} raised {type(e).__name__}: {e}") from e
        if not isinstance(res, Mapping) or not res:
            raise QfiError(f"metric {self.name!r} must return a non-empty dict of named floats, got {res!r}")
        try:
            vals = {str(k): float(v) for k, v in res.items()}
        except (TypeError, ValueError):
            raise QfiError(f"metric {self.name!r} returned a value that is not a number: {res!r}") from None
        if not self.columns:
            self.columns, self.primary = tuple(vals), next(iter(vals))
        if tuple(vals) != self.columns:
            raise QfiError(f"metric {self.name!r} returned keys {list(vals)}, earlier {list(self.columns)}")
        return vals


def get_metric(spec: str = "top1") -> Metric:
    """The metric named by ``spec`` (see the module docstring); QfiError listing the allowed forms."""
    name, opts = parse_spec(spec)

    def only(*allowed: str) -> None:
        bad = sorted(set(opts) - set(allowed))
        if bad:
            ok = ", ".join(allowed) or "none"
            raise QfiError(f"metric {name!r} has no option(s) {bad}; allowed: {ok}")

    if name == "top1":
        only()
        return Top1()
    if name == "cosine":
        only("threshold", "key")
        return Cosine(opts.get("threshold", 0.99), opts.get("key"))
    if name in ("loss", "perplexity"):
        only("key")
        return Loss(name, opts.get("key"))
    if name.count(":") == 1 and all(name.split(":")):
        mod, _, attr = name.partition(":")
        try:
            fn = getattr(importlib.import_module(mod), attr)
        except (ImportError, AttributeError) as e:
            raise QfiError(f"cannot import metric {name!r}: {type(e).__name__}: {e}") from e
        if not callable(fn):
            raise QfiError(f"metric {name!r} is a {type(fn).__name__}, not a callable")
        return Custom(spec, fn, opts)
    raise QfiError(f"unknown metric {name!r}; allowed: {', '.join(BUILTIN)} or 'module:callable'")
