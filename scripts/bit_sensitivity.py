"""Which bit positions of a format hurt?  Per-bit BER sweep on the embedded ViT.

    python scripts/bit_sensitivity.py --format fp32 --ber 1e-3 --reps 10

Only bit b of each selected code may flip (probability --ber), one condition per bit position
(per-bit BER 1e-3 over the ViT's 58.6k weights: ~59 flips of that bit per trial);
writes detail.csv, summary.csv, per_bit.csv and per_bit.png under --out.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from qfi.campaign import run_campaign  # noqa: E402
from qfi.config import CampaignConfig  # noqa: E402
from qfi.errors import QfiError  # noqa: E402


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--format", default="fp32")
    ap.add_argument("--ber", default="1e-3", help="per-bit BER (default 1e-3)")
    ap.add_argument("--names", default="", help="name filter, e.g. mlp,ln (default: every weight)")
    ap.add_argument("--target", default="weights")
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--limit", type=int, default=None, help="evaluate on the first N samples only")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--no-plots", action="store_true", help="write the CSVs but no PNG plots")
    ap.add_argument(
        "--fresh", action="store_true", help="discard earlier results in the output folder, do not resume"
    )
    ap.add_argument("--out", default="qfi-results/bit_sensitivity", help="writes to <out>/<format>")
    a = ap.parse_args(argv)
    cfg = CampaignConfig(
        formats=a.format,
        bits="all",
        ber=a.ber,
        names=a.names,
        target=a.target,
        reps=a.reps,
        seed=a.seed,
        limit=a.limit,
        device=a.device,
        out=os.path.join(a.out, a.format),
    )
    res = run_campaign(cfg, plots=not a.no_plots, fresh=a.fresh)
    t = res.summary.sort_values("bit", ascending=False)
    print(
        f"golden fp32 top-1 {t['golden_top1'].iloc[0]:.4f}, "
        f"clean {a.format} top-1 {t['clean_top1'].iloc[0]:.4f}"
    )
    for _, r in t.iterrows():
        print(
            f"bit {int(r['bit']):2d} {r['bit_name']:<10} top-1 {r['top1_mean']:.4f} "
            f"[{r['top1_ci_low']:.4f}, {r['top1_ci_high']:.4f}]  flips/trial {r['flips_mean']:.1f}"
        )
    written = [f for f in ("summary.csv", "per_bit.csv", "per_bit.png") if (Path(res.out) / f).exists()]
    print(f"-> {res.out}/: {', '.join(written)}")


if __name__ == "__main__":
    try:
        main()
    except QfiError as e:  # a bad flag: the message names the value and what is allowed
        raise SystemExit(f"{os.path.basename(__file__)}: error: {e}") from None
