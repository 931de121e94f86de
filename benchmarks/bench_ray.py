"""Trials per second: the local executor against Ray with 1 and 2 workers (one thread each).

    OMP_WAIT_POLICY=PASSIVE python benchmarks/bench_ray.py [--reps 48 | --smoke]

One run, one local Ray instance (started once, its start-up reported apart): the same campaign
(embedded ViT, digits test split, fp32 and int8 weight faults at BERs that flip bits in every
trial, so the evaluations dominate) on the local executor with one CPU thread, then on Ray with
1 and 2 workers of one thread each.  Ray's per-trial overhead (scheduling, shipping the baselines,
returning rows; the workers' one-time start with the model and data is reported apart) is the
time of the 1-worker run that is neither the workers' start, the driver's baselines nor the
worker's time inside its chunks, per trial,, as a share of one
evaluation of the embedded ViT; the target is under 5%.  The rows of all three runs are checked to
be byte-identical.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

from qfi import zoo  # noqa: E402
from qfi.campaign import run_campaign  # noqa: E402
from qfi.config import CampaignConfig  # noqa: E402
from qfi.distributed import RayExecutor  # noqa: E402
from qfi.evaluate import Evaluator  # noqa: E402


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--reps", type=int, default=None, help="repetitions per condition (default 24; smoke 2)")
    ap.add_argument("--smoke", action="store_true", help="a few trials on 64 images (seconds + Ray's start)")
    a = ap.parse_args(argv)
    import ray

    reps = a.reps if a.reps is not None else 2 if a.smoke else 24
    limit = 64 if a.smoke else None
    torch.set_num_threads(1)
    model = zoo.load_model("vit_digits")
    data = zoo.load_data("digits", split="test")
    ev = Evaluator(data, limit=limit)
    for _ in range(3):
        ev(model)
    t = time.perf_counter()
    for _ in range(5):
        ev(model)
    t_eval = (time.perf_counter() - t) / 5
    t = time.perf_counter()
    ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR",
             runtime_env={"env_vars": {"OMP_WAIT_POLICY": "PASSIVE"}})
    t_start = time.perf_counter() - t
    results: dict[str, tuple[int, float, bytes]] = {}
    starts: dict[str, float] = {}
    overhead = 0.0
    try:
        with tempfile.TemporaryDirectory() as tmp:
            runs = [("local, 1 thread", "local", None), ("ray, 1 worker", "ray", 1)]
            runs.append(("ray, 2 workers", "ray", 2))
            for label, executor, workers in runs:
                cfg = CampaignConfig(
                    formats=("fp32", "int8"), ber=(1e-4, 1e-3), reps=reps, limit=limit, device="cpu",
                    out=os.path.join(tmp, executor + str(workers)),
                )
                ex = RayExecutor(workers=workers) if executor == "ray" else None
                t = time.perf_counter()
                res = run_campaign(cfg, model=model, dataset=data, progress=False, plots=False, fresh=True,
                                   executor=ex)
                wall = time.perf_counter() - t
                start = ex.startup_seconds if ex is not None else 0.0  # once per campaign: apart
                results[label] = (res.trials_run, wall - start, Path(cfg.out, "detail.csv").read_bytes())
                starts[label] = start
                if ex is not None and workers == 1:  # Ray's own time, measured inside this run
                    overhead = ex.run_seconds - ex.startup_seconds - ex.baseline_seconds - ex.busy_seconds
    finally:
        ray.shutdown()
    images = 450 if limit is None else limit
    print(f"one evaluation ({images} images, embedded ViT, 1 thread): {t_eval * 1e3:.1f} ms; "
          f"torch {torch.__version__}, {os.cpu_count()} CPUs")
    base = results["local, 1 thread"]
    for label, (n, wall, _) in results.items():
        print(f"{label:16s} {n} trials in {wall:6.2f} s = {n / wall:6.2f} trials/s  "
              f"(x{base[1] / wall:.2f} vs local)")
    n = results["ray, 1 worker"][0]
    over = overhead / n
    print(f"ray overhead per trial (1 worker: scheduling and rows, outside the worker's trials): "
          f"{over * 1e3:.2f} ms = {100 * over / t_eval:.2f}% of an evaluation (target < 5%)")
    same = len({d for _, _, d in results.values()}) == 1
    print(f"rows identical across executors: {same}")
    ws = ", ".join(f"{k} {v:.1f} s" for k, v in starts.items() if v)
    print(f"ray start (once, not counted above): cluster {t_start:.1f} s; workers with model and data {ws}")
    if not same:
        raise SystemExit("the executors wrote different rows")


if __name__ == "__main__":
    main()
