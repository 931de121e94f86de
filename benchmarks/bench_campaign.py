"""Campaign overhead: wall time of a whole campaign / (model evaluations it ran x one evaluation).

    OMP_WAIT_POLICY=PASSIVE python benchmarks/bench_campaign.py [--reps 30]

Everything a campaign does besides running the model (planning, seeding, injecting, undoing,
writing CSV rows, summarising) should cost at most 5% on top of the evaluations themselves.
Measured in one run on the embedded ViT and the digits test split (450 images).
"""

import argparse
import os
import statistics
import tempfile
import time

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

from qfi import zoo  # noqa: E402
from qfi.campaign import run_campaign  # noqa: E402
from qfi.config import CampaignConfig  # noqa: E402
from qfi.evaluate import Evaluator  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    model = zoo.load_model("vit_digits")
    data = zoo.load_data("digits", split="test")
    ev = Evaluator(data, batch_size=512)
    for _ in range(3):
        ev(model)
    one = []
    for _ in range(15):
        t = time.perf_counter()
        ev(model)
        one.append(time.perf_counter() - t)
    t_eval = statistics.median(one)
    with tempfile.TemporaryDirectory() as d:
        cfg = CampaignConfig(formats=("fp32", "int8"), ber=(1e-5, 1e-4), reps=a.reps, device="cpu", out=d)
        t = time.perf_counter()
        res = run_campaign(cfg, model=model, dataset=data, progress=False, plots=False, fresh=True)
        wall = time.perf_counter() - t
        t = time.perf_counter()
        from qfi.results import write_tables

        write_tables(res.detail, res.summary, res.out, plots=True)
        t_plots = time.perf_counter() - t
    ideal = res.evaluations * t_eval
    print(f"one evaluation (450 images, median of 15): {t_eval * 1e3:.1f} ms")
    print(
        f"campaign: {res.trials_run} trials, {res.evaluations} evaluations (golden + clean per format "
        f"included), wall {wall:.2f} s"
    )
    print(f"overhead ratio wall / (evaluations x one evaluation) = {wall / ideal:.3f}  (target <= 1.05)")
    print(
        f"strict ratio wall / (trials x one evaluation) = {wall / (res.trials_run * t_eval):.3f}  "
        "(also charges the golden and clean baselines to the campaign)"
    )
    print(f"per-trial overhead beyond the evaluation: {(wall - ideal) / res.trials_run * 1e3:.2f} ms")
    print(f"plots (written once per campaign, not counted above): {t_plots:.2f} s")


if __name__ == "__main__":
    main()
