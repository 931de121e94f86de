"""Prefix reuse: time per trial with and without serving the fault-free prefix from the cache.

    OMP_WAIT_POLICY=PASSIVE python benchmarks/bench_prefix.py [--trials 20] [--vit-b] [--sweep] [--smoke]

For faults only in the head (``heads``) or only in the last encoder layer, on the embedded ViT
(450 digits, one batch) and with ``--vit-b`` on the ViT-B/16 shape (random weights, random
224 px images, ``--vit-b-batches`` batches of 8): each trial (one flip, so every trial runs
the model) is run twice in a row, once with prefix reuse and once without (the order alternates
from trial to trial), inside one session, so both see the same machine load.  The rows of
both runs must be equal.  ``recording`` is what recording the cache adds to the group's clean
baseline (which doubles as the recording pass), in evaluations.

``--sweep`` adds the per-layer map: one group per layer (``qfi.layers.layer_groups``: class
token, patch projection, positions, every encoder layer, final norm, head), ``--trials`` trials
each, the whole time with reuse (recording included) over the whole time without.  With
uniformly spread faults over L equal layers the arithmetic floor is about (L+1)/(2L) of the
full forwards (0.54x for 12 layers), plus the recording.

``--smoke`` runs everything on a few images and a two-layer ViT (seconds; CI runs it).
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Sequence

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

from qfi import zoo  # noqa: E402
from qfi.campaign import TrialContext, _calibration_inputs, plan  # noqa: E402
from qfi.config import CampaignConfig  # noqa: E402
from qfi.evaluate import Evaluator  # noqa: E402
from qfi.layers import layer_groups  # noqa: E402
from qfi.zoo.vit import VisionTransformer  # noqa: E402


class Bench:
    """One model and its evaluator; groups of trials timed with and without prefix reuse."""

    def __init__(self, label: str, model: torch.nn.Module, evaluator: Evaluator, trials: int) -> None:
        self.label, self.model, self.evaluator, self.trials = label, model.eval(), evaluator, trials
        self.golden = evaluator(self.model)
        self.golden_values = self.golden.values()
        self.identical = True
        self.group("weights", "heads", trials=1)  # warm-up: first-use costs of both paths

    def group(self, target: str, names: str, trials: int | None = None) -> tuple[float, float, float, int]:
        """(seconds with reuse, seconds without, recording seconds, modules served), summed over
        the trials of one name group; recording: what it adds to the clean baseline (the plain
        clean baseline is not counted: a campaign runs it with or without reuse)."""
        cfg = CampaignConfig(target=target, names=(names,), ber=(), flips=(1,), reps=trials or self.trials,
                             device=str(self.evaluator.device))
        calib = _calibration_inputs(self.evaluator.inputs(), 64) if target == "activations" else []
        ctx = {
            on: TrialContext(cfg, self.model, self.evaluator, calib, True, self.golden, self.golden_values,
                             prefix=on)
            for on in (True, False)
        }
        secs = {True: 0.0, False: 0.0}
        with ctx[True].session("fp32", names) as s:
            t0 = time.perf_counter()
            clean, base = ctx[False].clean_baseline(s, "fp32", names)
            t1 = time.perf_counter()
            ctx[True].clean_baseline(s, "fp32", names)
            t2 = time.perf_counter()
            cache = ctx[True].prefix_cache(s, names)
            for k, t in enumerate(plan(cfg)):
                rows = {}
                for on in ((True, False) if k % 2 == 0 else (False, True)):
                    a = time.perf_counter()
                    rows[on] = ctx[on].row(s, t, clean, base)
                    secs[on] += time.perf_counter() - a
                self.identical &= rows[True] == rows[False]
        self.eval_seconds = t1 - t0
        served = len(cache.served) if cache.active else 0
        return secs[True], secs[False], max(0.0, (t2 - t1) - (t1 - t0)), served

    def line(self, target: str, names: str) -> None:
        on, off, rec, served = self.group(target, names)
        n = self.trials
        print(
            f"{self.label} | {target} {names}: full {off / n * 1e3:.2f} ms, reuse {on / n * 1e3:.2f} ms "
            f"per trial, x{off / on:.2f}; recording +{rec / self.eval_seconds:.2f} evaluations once; "
            f"{served} module(s) served",
            flush=True,
        )

    def sweep(self) -> None:
        groups = layer_groups(self.model)
        on = off = rec = 0.0
        for g in groups:
            a, b, r, _ = self.group("weights", g.filter)
            on, off, rec = on + a, off + b, rec + r
        print(
            f"{self.label} | per-layer sweep, {len(groups)} groups x {self.trials} trials: full {off:.2f} s, "
            f"reuse {on:.2f} s = {on / off:.2f}x of the full forwards; with the recording "
            f"{(on + rec) / off:.2f}x",
            flush=True,
        )


def vit_b_bench(smoke: bool, batches: int, trials: int, device: torch.device) -> Bench:
    torch.manual_seed(0)
    if smoke:
        model, size, batch = VisionTransformer(32, 16, 2, 2, 64, 128, num_classes=10), 32, 4
        label = "vit-b/16 shape (smoke: 2 layers, dim 64)"
    else:
        model, size, batch = zoo.vit.vit_b_16_shaped(), 224, 8
        label = "vit-b/16 shape"
    data = [(torch.randn(3, size, size), int(torch.randint(0, 10, ()))) for _ in range(batch * batches)]
    return Bench(label, model.to(device), Evaluator(data, batch_size=batch, device=device), trials)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trials", type=int, default=20, help="trials per name group (default 20)")
    ap.add_argument("--vit-b", action="store_true", help="also the ViT-B/16 shape (minutes on a CPU)")
    ap.add_argument("--vit-b-batches", type=int, default=3, help="ViT-B/16: batches of 8 images (default 3)")
    ap.add_argument("--sweep", action="store_true", help="also the per-layer sweep (every layer group)")
    ap.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    ap.add_argument("--smoke", action="store_true", help="a few images, a tiny ViT-B stand-in (CI)")
    a = ap.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    device = torch.device(a.device)
    trials = 2 if a.smoke else a.trials
    limit = 64 if a.smoke else None
    vit = Bench("embedded vit", zoo.load_model("vit_digits", device=device),
                Evaluator(zoo.load_data("digits"), device=device, limit=limit), trials)
    print(
        f"model: embedded ViT, {vit.evaluator.n} images in {len(vit.evaluator.batches)} batch(es); "
        f"{torch.get_num_threads()} thread(s), device {device}; one flip per trial (every trial runs "
        "the model), fp32",
        flush=True,
    )
    vit.line("weights", "heads")
    vit.line("weights", "encoder_layer_2")
    vit.line("activations", "heads.head")
    if a.sweep or a.smoke:
        vit.sweep()
    benches = [vit]
    if a.vit_b or a.smoke:
        big = vit_b_bench(a.smoke, 1 if a.smoke else a.vit_b_batches, trials, device)
        n, nb = big.evaluator.n, len(big.evaluator.batches)
        print(f"model: {big.label}, {n} images in {nb} batch(es)", flush=True)
        last = f"encoder_layer_{len(big.model.encoder.layers) - 1}"
        big.line("weights", "heads")
        big.line("weights", last)
        if a.sweep or a.smoke:
            big.sweep()
        benches.append(big)
    print(f"rows identical with and without reuse: {all(b.identical for b in benches)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
