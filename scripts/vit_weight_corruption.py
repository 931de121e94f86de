"""Name-filtered fp32 weight corruption of a Vision Transformer over decades of bit error rates.

    python scripts/vit_weight_corruption.py --names mlp,ln --reps 10
    python scripts/vit_weight_corruption.py --names mlp,ln --ber 1e-10:1e-6  # the seed script's rates

The job an older bitstring script did in hours: flip float32 weight bits of every parameter whose
name contains one of the words, n times per rate, and write ``model.csv`` (per rate: mean
top-1/top-5, the expected and the observed flips per trial) and ``detail-model.csv`` (every trial)
in that script's shape, beside qfi's own tidy CSVs.

A trial at rate p flips on average N x bits x p bits, N being the number of selected weights.
Without ``--ber`` the rates are fitted to the model in hand: five decades whose top one is the
lowest that expects at least 100 flips per trial (1e-7..1e-3 for the embedded ViT's 28,752
``mlp,ln`` weights), so the default run draws the whole curve.  The expected flips of every rate
are printed before the run, with a warning when every rate expects less than one flip (most
trials would leave the model clean and every row would read the clean accuracy).

Works on the embedded ViT (torchvision names) by default, or on torchvision's vit_b_16 with
local weights and an ImageFolder (e.g. ImageNet-mini):

    python scripts/vit_weight_corruption.py --model torchvision:vit_b_16 --weights vit_b_16.pth \
        --data imagefolder:/data/imagenet-mini/val --batch-size 64
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import qfi  # noqa: E402
from qfi import zoo  # noqa: E402
from qfi.campaign import run_campaign  # noqa: E402
from qfi.config import CampaignConfig  # noqa: E402
from qfi.errors import QfiError  # noqa: E402
from quant_schemes import get_format  # noqa: E402

#: the top default rate is the lowest decade that expects at least this many flips per trial
TARGET_FLIPS = 100
DECADES = 5


def selected_weights(model_spec: str, weights: str | None, names: str, exclude: str) -> int:
    """N: the number of weights (elements) the campaign's name filter selects."""
    model = zoo.load_model(model_spec, weights=weights)
    chosen = set(qfi.select_weights(model, names=names or None, exclude=exclude or None))
    return sum(i.numel or 0 for i in qfi.list_names(model, "weights") if i.name in chosen)


def fitted_bers(n_bits: int, target: float = TARGET_FLIPS, decades: int = DECADES) -> str:
    """``DECADES`` decades ending at the lowest one (at most 1) where ``n_bits * BER >= target``."""
    top = 0
    while top > -30 and n_bits * 10.0 ** (top - 1) >= target:
        top -= 1
    return f"1e{top - decades + 1}:1e{top}"


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--names", default="mlp,ln", help="words; a name containing any of them is corrupted")
    ap.add_argument("--exclude", default="")
    ap.add_argument(
        "--ber",
        default=None,
        help=f"rates, e.g. 1e-10:1e-6 (default: {DECADES} decades fitted to the selected weights, "
        f"the top one expecting >= {TARGET_FLIPS} flips per trial)",
    )
    ap.add_argument("--format", default="fp32", help="one format (model.csv has one row per rate)")
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--model", default="vit_digits")
    ap.add_argument("--weights", default=None)
    ap.add_argument("--data", default=None)
    ap.add_argument("--batch-size", type=int, default=512)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--limit", type=int, default=None, help="evaluate on the first N samples only")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--no-plots", action="store_true", help="write the CSVs but no PNG plots")
    ap.add_argument(
        "--fresh", action="store_true", help="discard earlier results in the output folder, do not resume"
    )
    ap.add_argument("--out", default="qfi-results/vit_weight_corruption")
    a = ap.parse_args(argv)
    if "," in a.format:
        ap.error(f"--format {a.format!r}: give one format (run the script once per format)")
    bits = get_format(a.format).bits
    n = selected_weights(a.model, a.weights, a.names, a.exclude)
    ber = a.ber if a.ber is not None else fitted_bers(n * bits)
    cfg = CampaignConfig(
        model=a.model,
        weights=a.weights,
        data=a.data,
        formats=a.format,
        ber=ber,
        names=a.names,
        exclude=a.exclude,
        reps=a.reps,
        batch_size=a.batch_size,
        seed=a.seed,
        limit=a.limit,
        device=a.device,
        out=a.out,
    )
    expected = {b: n * bits * b for b in cfg.ber}
    how = "given by --ber" if a.ber is not None else f"fitted: the top one expects >= {TARGET_FLIPS} flips"
    print(f"{n:,} weights x {bits} bits ({a.format}) selected by {a.names!r}; rates {ber} ({how})")
    print("expected flips per trial: " + ", ".join(f"{e:.3g} at {b:g}" for b, e in expected.items()))
    if max(expected.values(), default=0) < 1:
        top = max(expected, key=expected.__getitem__)
        sys.stdout.flush()
        print(
            f"{os.path.basename(__file__)}: warning: every rate expects fewer than one flip per trial "
            f"(at most {expected[top]:.3g}, at BER {top:g}); most trials leave the model clean and "
            f"every row will read the clean accuracy. Raise the rates, e.g. --ber {fitted_bers(n * bits)}",
            file=sys.stderr,
        )
    res = run_campaign(cfg, plots=not a.no_plots, fresh=a.fresh)
    d = res.detail
    d[["ber", "rep", "flips", "top1", "top5"]].to_csv(os.path.join(a.out, "detail-model.csv"), index=False)
    m = d.groupby("ber", sort=False).agg(
        top1=("top1", "mean"), top5=("top5", "mean"), flips_mean=("flips", "mean")
    )
    m = m.reset_index()
    m.insert(3, "expected_flips", n * bits * m["ber"])
    m.to_csv(os.path.join(a.out, "model.csv"), index=False, float_format="%.6g")
    print(
        f"golden top-1 {d['golden_top1'].iloc[0]:.4f}; {res.trials_run} trials run, {res.trials_resumed} "
        f"resumed, {res.evaluations} model evaluations ({(d['evaluated'] == 0).sum()} zero-flip trials "
        "answered from the clean result)"
    )
    print(
        m.to_string(
            index=False,
            formatters={
                "ber": "{:g}".format,
                "top1": "{:.4f}".format,
                "top5": "{:.4f}".format,
                "expected_flips": "{:.3g}".format,
                "flips_mean": "{:.3g}".format,
            },
        )
    )
    print(f"-> {a.out}/model.csv, {a.out}/detail-model.csv")


if __name__ == "__main__":
    try:
        main()
    except QfiError as e:  # a bad flag: the message names the value and what is allowed
        raise SystemExit(f"{os.path.basename(__file__)}: error: {e}") from None
