"""Name-filtered fp32 weight corruption of a Vision Transformer at rates 1e-10..1e-6.

    python scripts/vit_weight_corruption.py --names mlp,ln --ber 1e-10:1e-6 --reps 10

The job an older bitstring script did in hours: flip float32 weight bits of every parameter whose
name contains one of the words, n times per rate, and write ``model.csv`` (mean top-1/top-5 per
rate) and ``detail-model.csv`` (every trial) in that script's shape, beside qfi's own tidy CSVs.
Works on the embedded ViT (torchvision names) by default, or on torchvision's vit_b_16 with
local weights and an ImageFolder (e.g. ImageNet-mini):

    python scripts/vit_weight_corruption.py --model torchvision:vit_b_16 --weights vit_b_16.pth \
        --data imagefolder:/data/imagenet-mini/val --batch-size 64
"""

import argparse
import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from qfi.campaign import run_campaign  # noqa: E402
from qfi.config import CampaignConfig  # noqa: E402
from qfi.errors import QfiError  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--names", default="mlp,ln", help="words; a name containing any of them is corrupted")
    ap.add_argument("--exclude", default="")
    ap.add_argument("--ber", default="1e-10:1e-6")
    ap.add_argument("--format", default="fp32", help="one format (model.csv has one row per rate)")
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--model", default="vit_digits")
    ap.add_argument("--weights", default=None)
    ap.add_argument("--data", default=None)
    ap.add_argument("--batch-size", type=int, default=512)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--limit", type=int, default=None, help="evaluate on the first N samples only")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--out", default="qfi-results/vit_weight_corruption")
    a = ap.parse_args()
    if "," in a.format:
        ap.error(f"--format {a.format!r}: give one format (run the script once per format)")
    cfg = CampaignConfig(
        model=a.model,
        weights=a.weights,
        data=a.data,
        formats=a.format,
        ber=a.ber,
        names=a.names,
        exclude=a.exclude,
        reps=a.reps,
        batch_size=a.batch_size,
        seed=a.seed,
        limit=a.limit,
        device=a.device,
        out=a.out,
    )
    res = run_campaign(cfg)
    d = res.detail
    d[["ber", "rep", "flips", "top1", "top5"]].to_csv(os.path.join(a.out, "detail-model.csv"), index=False)
    m = d.groupby("ber", sort=False)[["top1", "top5"]].mean().reset_index()
    m.to_csv(os.path.join(a.out, "model.csv"), index=False, float_format="%.6g")
    print(
        f"golden top-1 {d['golden_top1'].iloc[0]:.4f}; {res.trials_run} trials, "
        f"{res.evaluations} model evaluations ({(d['evaluated'] == 0).sum()} zero-flip trials answered "
        f"from the clean result)"
    )
    print(
        m.to_string(
            index=False, formatters={"ber": "{:g}".format, "top1": "{:.4f}".format, "top5": "{:.4f}".format}
        )
    )
    print(f"-> {a.out}/model.csv, {a.out}/detail-model.csv")


if __name__ == "__main__":
    try:
        main()
    except QfiError as e:  # a bad flag: the message names the value and what is allowed
        raise SystemExit(f"{os.path.basename(__file__)}: error: {e}") from None
