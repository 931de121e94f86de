"""fp32 vs fp16 vs bf16 vs q3.13 vs int8 under the same bit error rates.

    python scripts/compare_formats.py --formats fp32,fp16,bf16,q3.13,int8 --ber 1e-7:1e-3 --reps 10

Every bit of every selected code flips independently with probability BER; the clean quantized
accuracy of each format is reported beside the fp32 golden one.  Writes per_format.csv/png.
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
    ap.add_argument("--formats", default="fp32,fp16,bf16,q3.13,int8,int8_per_channel")
    ap.add_argument("--ber", default="1e-7:1e-3")
    ap.add_argument("--target", default="weights", help="weights or activations")
    ap.add_argument("--names", default="")
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--limit", type=int, default=None, help="evaluate on the first N samples only")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--no-plots", action="store_true", help="write the CSVs but no PNG plots")
    ap.add_argument(
        "--fresh", action="store_true", help="discard earlier results in the output folder, do not resume"
    )
    ap.add_argument("--out", default="qfi-results/compare_formats")
    a = ap.parse_args(argv)
    cfg = CampaignConfig(
        formats=a.formats,
        ber=a.ber,
        names=a.names,
        target=a.target,
        reps=a.reps,
        seed=a.seed,
        limit=a.limit,
        device=a.device,
        out=a.out,
    )
    res = run_campaign(cfg, plots=not a.no_plots, fresh=a.fresh)
    table = res.summary.pivot_table(index="ber", columns="format", values="top1_mean", sort=False)
    clean = res.summary.groupby("format", sort=False)["clean_top1"].first()
    print(f"golden fp32 top-1 {res.summary['golden_top1'].iloc[0]:.4f}")
    print("clean top-1:", ", ".join(f"{k} {v:.4f}" for k, v in clean.items()))
    print("mean top-1 by BER (rows) and format (columns):")
    table.index = [f"{b:g}" for b in table.index]
    table.index.name = "ber"
    print(table[list(clean.index)].to_string(float_format=lambda v: f"{v:.4f}"))
    written = [f for f in ("summary.csv", "per_format.csv", "per_format.png") if (Path(res.out) / f).exists()]
    print(f"-> {res.out}/: {', '.join(written)}")


if __name__ == "__main__":
    try:
        main()
    except QfiError as e:  # a bad flag: the message names the value and what is allowed
        raise SystemExit(f"{os.path.basename(__file__)}: error: {e}") from None
