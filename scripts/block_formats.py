"""Block and group formats under weight faults: which part of the stored words does the damage?

    python scripts/block_formats.py --formats int8_fp32,bf16,mxfp8_e4m3,mxfp4,nvfp4,int4_g128 \\
        --ber 1e-5:1e-2 --reps 20 --png docs/block_formats.png

For every format and BER, top-1 of the embedded ViT on the digits test split under three fault
targets at the same rate per stored bit: every stored bit (``part="all"``, what a memory sees),
the element codes only (``"codes"``) and the scale words only (``"scales"``: E8M0 block scales of
MX, E4M3 block scales of NVFP4, the fp32 group scales of ``int4_g128``, the fp32 tensor scale of
``int8_fp32``; formats without stored scales have no scales curve).  The legend gives each
format's stored bits per value.  Driven through the Python API (``qfi.weights(..., part=)`` and
``qfi.evaluate.Evaluator``), one session per format; trial seeds are fixed, so a run reproduces.
Writes ``block_formats.csv`` (one row per trial) under ``--out`` and the figure to ``--png``.
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
from collections.abc import Sequence
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

import qfi  # noqa: E402
from qfi import zoo  # noqa: E402
from qfi.errors import QfiError  # noqa: E402
from qfi.evaluate import Evaluator  # noqa: E402
from quant_schemes import bits_per_value, get_format, stored_parts  # noqa: E402

PARTS = ("all", "codes", "scales")


def parse_ber(spec: str) -> list[float]:
    """``1e-5:1e-2`` (half decades) or a comma-separated list."""
    if ":" in spec:
        lo, hi = (math.log10(float(v)) for v in spec.split(":"))
        n = round((hi - lo) * 2)
        return [10 ** (lo + k / 2) for k in range(n + 1)]
    return [float(v) for v in spec.split(",")]


def run(formats: list[str], bers: list[float], reps: int, limit: int | None, seed: int) -> list[dict]:
    torch.manual_seed(0)
    model = zoo.load_model("vit_digits").eval()
    evaluate = Evaluator(zoo.load_data("digits"), limit=limit)
    golden = evaluate(model).top1
    rows = []
    for fmt in formats:
        parts = [p for p in PARTS if p != "scales" or "scales" in stored_parts(get_format(fmt))]
        with qfi.weights(model, fmt) as w:
            clean = evaluate(model).top1
            for part in parts:
                for ber in bers:
                    for rep in range(reps):
                        with w.inject(qfi.BitFlip(ber=ber), seed=seed + 1000 * rep, part=part) as log:
                            top1 = evaluate(model).top1
                        rows.append({"format": fmt, "part": part, "ber": ber, "rep": rep, "flips": log.flips,
                                     "top1": top1, "clean_top1": clean, "golden_top1": golden,
                                     "bits_per_value": bits_per_value(get_format(fmt)),
                                     "stored_bits": w.space.total_bits(part)})
                means = [statistics.mean(r["top1"] for r in rows if (r["format"], r["part"], r["ber"])
                                         == (fmt, part, b)) for b in bers]
                cells = " ".join(f"{b:.0e}:{m:.3f}" for b, m in zip(bers, means, strict=True))
                print(f"{fmt:12s} {part:6s} {cells}", flush=True)
    return rows


def plot(rows: list[dict], formats: list[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.6), sharey=True)
    titles = {"all": "every stored bit (codes + scales)", "codes": "element codes only",
              "scales": "scale words only"}
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, part in zip(axes, PARTS, strict=True):
        for k, fmt in enumerate(formats):
            sel = [r for r in rows if r["format"] == fmt and r["part"] == part]
            if not sel:
                continue
            bers = sorted({r["ber"] for r in sel})
            mean = [statistics.mean(r["top1"] for r in sel if r["ber"] == b) for b in bers]
            half = [1.96 * statistics.pstdev([r["top1"] for r in sel if r["ber"] == b])
                    / math.sqrt(sum(r["ber"] == b for r in sel)) for b in bers]
            label = f"{fmt} ({sel[0]['bits_per_value']:g} b/value)"
            ax.plot(bers, mean, marker="o", ms=3, color=colors[k % len(colors)], label=label)
            lo = [max(m - h, 0.0) for m, h in zip(mean, half, strict=True)]
            hi = [min(m + h, 1.0) for m, h in zip(mean, half, strict=True)]
            ax.fill_between(bers, lo, hi, color=colors[k % len(colors)], alpha=0.15, lw=0)
        ax.set_xscale("log")
        ax.set_title(titles[part])
        ax.set_xlabel("bit error rate (per stored bit)")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("top-1 (digits test split)")
    axes[0].legend(fontsize=8, loc="lower left")
    golden = rows[0]["golden_top1"]
    for ax in axes:
        ax.axhline(golden, color="k", lw=0.6, ls=":")
    fig.suptitle("Embedded ViT, weight faults: where the damage of block and group formats comes from "
                 "(mean of trials, 95% band; dotted: fp32 golden)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=130)
    plt.close(fig)


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--formats", default="int8_fp32,bf16,mxfp8_e4m3,mxfp4,nvfp4,int4_g128")
    ap.add_argument("--ber", default="1e-5:1e-2", help="lo:hi (half decades) or a comma-separated list")
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--limit", type=int, default=None, help="evaluate on the first N samples only")
    ap.add_argument("--out", default="qfi-results/block_formats")
    ap.add_argument("--png", default=None, help="figure path (default <out>/block_formats.png)")
    ap.add_argument("--no-plots", action="store_true")
    a = ap.parse_args(argv)
    formats = [f.strip() for f in a.formats.split(",") if f.strip()]
    for f in formats:
        try:
            get_format(f)
        except ValueError as e:
            raise QfiError(str(e)) from None
    rows = run(formats, parse_ber(a.ber), a.reps, a.limit, a.seed)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    import pandas as pd

    pd.DataFrame(rows).to_csv(out / "block_formats.csv", index=False)
    written = ["block_formats.csv"]
    if not a.no_plots:
        png = Path(a.png) if a.png else out / "block_formats.png"
        plot(rows, formats, png)
        written.append(str(png))
    print(f"-> {out}/: {', '.join(written)}")


if __name__ == "__main__":
    try:
        main()
    except QfiError as e:
        raise SystemExit(f"{os.path.basename(__file__)}: error: {e}") from None
