"""Evaluate a classifier on a fixed dataset: top-1/top-5, SDC against a reference, DUE (NaN/Inf).

The batches are moved to the device once; every evaluation reuses them, so a trial costs one
pass of the model over the data and nothing else.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import Tensor, nn


@dataclass(frozen=True)
class EvalResult:
    """Accuracy of one pass over the data.

    ``pred`` holds each sample's top-1 class (-1 where the output row is not finite), so the
    silent-data-corruption rate against another result is a cheap comparison.
    """

    top1: float
    top5: float
    due: float  # share of samples whose output row holds NaN or Inf (detected unrecoverable error)
    pred: Tensor

    def sdc(self, reference: EvalResult) -> float:
        """Silent data corruption: the share of samples whose output is finite (here and in
        ``reference``, e.g. the clean quantized model) and whose top-1 differs from the reference's.
        Disjoint from ``due``: a NaN/Inf output is detectable, so it is never counted as silent."""
        both = (self.pred >= 0) & (reference.pred >= 0)
        return float(((self.pred != reference.pred) & both).float().mean())

    def sdc_any(self, reference: EvalResult) -> float:
        """Share of samples whose top-1 differs from ``reference`` or whose output is non-finite
        (qfi < 0.2's ``sdc``; equals ``sdc + due`` when the reference is finite)."""
        return float((self.pred != reference.pred).float().mean())


class Evaluator:
    """Holds the evaluation batches on ``device`` and runs a model over them."""

    def __init__(
        self,
        dataset: Iterable,
        batch_size: int = 512,
        device: str | torch.device = "cpu",
        limit: int | None = None,
    ) -> None:
        self.device = torch.device(device)
        loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False)
        batches: list[tuple[Tensor, Tensor]] = []
        seen = 0
        for x, y in loader:
            if limit is not None and seen >= limit:
                break
            if limit is not None and seen + len(y) > limit:
                x, y = x[: limit - seen], y[: limit - seen]
            batches.append((x.to(self.device), y.to(self.device)))
            seen += len(y)
        if not batches:
            raise ValueError("the evaluation dataset is empty")
        self.batches = batches
        self.n = seen
        self.calls = 0  # evaluations run (for the campaign-overhead benchmark and tests)

    def inputs(self) -> list[Tensor]:
        """The input batches (for calibrating activation scales)."""
        return [x for x, _ in self.batches]

    @torch.no_grad()
    def __call__(self, model: nn.Module) -> EvalResult:
        self.calls += 1
        correct1 = correct5 = due = 0
        preds = []
        for x, y in self.batches:
            out = model(x)
            if isinstance(out, (tuple, list)):
                out = out[0]
            out = out.float()
            finite = torch.isfinite(out).all(dim=1)
            k = min(5, out.shape[1])
            top = out.nan_to_num(nan=-torch.inf).topk(k, dim=1).indices
            hit = top == y[:, None]
            correct1 += int((hit[:, 0] & finite).sum())
            correct5 += int((hit.any(dim=1) & finite).sum())
            due += int((~finite).sum())
            preds.append(torch.where(finite, top[:, 0], torch.full_like(top[:, 0], -1)))
        n = self.n
        return EvalResult(correct1 / n, correct5 / n, due / n, torch.cat(preds).cpu())
