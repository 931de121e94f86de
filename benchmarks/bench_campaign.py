"""Campaign overhead: a campaign's wall time / the time its own model evaluations took.

    OMP_WAIT_POLICY=PASSIVE python benchmarks/bench_campaign.py [--reps 30] [--rounds 3] [--smoke]

Everything a campaign does besides running the model (planning, seeding, injecting, undoing,
writing CSV rows, summarising) should cost at most 5% on top of the evaluations themselves.
Measured on the embedded ViT and the digits test split (450 images).

Each evaluation is clocked from inside the campaign as it runs (``Evaluator.__call__`` is wrapped
for the duration), so the wall time and the evaluation time are measured over the same seconds:
load slows both alike, and the ratio cannot fall below 1 nor the overhead below 0.  Each round
is a fresh campaign; the report gives every round and the median.  ``--smoke`` runs one small
round on 64 images (seconds; CI runs it so the benchmark cannot rot).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

from qfi import zoo  # noqa: E402
from qfi.campaign import run_campaign  # noqa: E402
from qfi.config import CampaignConfig  # noqa: E402
from qfi.evaluate import Evaluator  # noqa: E402


@dataclass
class EvalClock:
    """Seconds spent inside ``Evaluator.__call__`` and the number of calls, while installed."""

    seconds: float = 0.0
    calls: int = 0


@contextlib.contextmanager
def clock_evaluations() -> Iterator[EvalClock]:
    """Time every evaluation any ``Evaluator`` runs inside the block (the class is restored on exit)."""
    clock = EvalClock()
    original = Evaluator.__call__

    def timed(self: Evaluator, model: torch.nn.Module, *args, **kwargs):  # type: ignore[no-untyped-def]
        t = time.perf_counter()
        try:
            return original(self, model, *args, **kwargs)
        finally:
            clock.seconds += time.perf_counter() - t
            clock.calls += 1

    Evaluator.__call__ = timed  # type: ignore[method-assign]
    try:
        yield clock
    finally:
        Evaluator.__call__ = original  # type: ignore[method-assign]


@dataclass(frozen=True)
class Round:
    wall: float  # the whole run_campaign call
    evals: float  # the evaluations it ran, clocked inside it
    evaluations: int
    trials: int

    @property
    def ratio(self) -> float:
        return self.wall / self.evals

    @property
    def per_trial_ms(self) -> float:
        return (self.wall - self.evals) / self.trials * 1e3


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--reps", type=int, default=None, help="repetitions per condition (default 30; smoke 2)")
    ap.add_argument("--rounds", type=int, default=None, help="campaigns to time (default 3; smoke 1)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--smoke", action="store_true", help="one small round on 64 images (seconds)")
    ap.add_argument("--metric", default="top1", help="campaign metric: top1 (default), cosine, loss, ...")
    a = ap.parse_args(argv)
    reps = a.reps if a.reps is not None else 2 if a.smoke else 30
    n_rounds = a.rounds if a.rounds is not None else 1 if a.smoke else 3
    if reps < 1 or n_rounds < 1:
        ap.error(f"--reps {reps} / --rounds {n_rounds}: both must be >= 1")
    limit = 64 if a.smoke else None
    torch.set_num_threads(a.threads)
    model = zoo.load_model("vit_digits")
    data = zoo.load_data("digits", split="test")
    warm = Evaluator(data, batch_size=512, limit=limit)
    for _ in range(3):
        warm(model)
    rounds: list[Round] = []
    t_plots = 0.0
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(n_rounds):
            out = os.path.join(tmp, f"round{r}")
            cfg = CampaignConfig(
                formats=("fp32", "int8"), ber=(1e-5, 1e-4), reps=reps, limit=limit, device="cpu", out=out,
                metric=a.metric,
            )
            with clock_evaluations() as clock:
                t = time.perf_counter()
                res = run_campaign(cfg, model=model, dataset=data, progress=False, plots=False, fresh=True)
                wall = time.perf_counter() - t
            if clock.calls != res.evaluations:
                raise SystemExit(f"clocked {clock.calls} evaluations, the campaign reports {res.evaluations}")
            rounds.append(Round(wall, clock.seconds, clock.calls, res.trials_run))
        from qfi.results import write_tables

        t = time.perf_counter()
        write_tables(res.detail, res.summary, res.out, plots=True, metric=res.metric)
        t_plots = time.perf_counter() - t

    last = rounds[-1]
    images = 450 if limit is None else limit
    print(
        f"campaign: {last.trials} trials, {last.evaluations} evaluations of {images} images (golden + "
        f"clean per format included), metric {a.metric}, {len(rounds)} round(s), torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads"
    )
    for i, r in enumerate(rounds):
        print(
            f"round {i}: wall {r.wall:.3f} s, evaluations {r.evals:.3f} s "
            f"(mean {r.evals / r.evaluations * 1e3:.2f} ms each), ratio {r.ratio:.3f}, "
            f"overhead {r.per_trial_ms:.2f} ms/trial"
        )
    ratio = statistics.median(r.ratio for r in rounds)
    print(
        f"overhead ratio wall / (time of the campaign's own evaluations) = {ratio:.3f}  "
        "(median over rounds; target <= 1.05)"
    )
    per_trial = statistics.median(r.per_trial_ms for r in rounds)
    print(f"per-trial overhead beyond the evaluation: {per_trial:.2f} ms (median over rounds)")
    print(f"plots (written once per campaign, not counted above): {t_plots:.2f} s")


if __name__ == "__main__":
    main()
