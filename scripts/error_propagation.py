"""Where a fault's error grows and where it is masked: per-module error vs depth on the embedded ViT.

    python scripts/error_propagation.py --reps 10        # -> qfi-results/error_propagation/

For a few conditions (one fp32 weight flip in encoder layer 1's MLP, at the exponent MSB or in the
mantissa; one fp32 activation flip per batch at the exponent MSB of layer 0's first MLP linear;
int8 vs bf16 weights at one BER), an observer (``qfi.observe``) on every leaf module and every
encoder block (the residual stream) measures each trial's outputs against the clean run of the
same format and batches.  Writes ``observers.csv`` (one row per condition, rep and module: the
trial's flips and top-1, then the observer's columns) and ``error_propagation.png``: the median
over reps of the relative RMSE (``rmse / ref_rms``, log scale) and the share of elements changed,
and of the shares of elements changed and non-finite (NaN/Inf, left out of the RMSE), against
depth (the order in which the modules' outputs are produced).
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

import qfi  # noqa: E402
from qfi import zoo  # noqa: E402
from qfi.errors import QfiError  # noqa: E402
from qfi.evaluate import Evaluator  # noqa: E402
from qfi.observers import leaf_modules  # noqa: E402


class Condition(NamedTuple):  # a NamedTuple: the script also runs loaded without sys.modules
    label: str
    target: str  # "weights" or "activations"
    format: str
    names: str | None  # the faulted tensors or modules (None: all)
    fault: qfi.Fault


CONDITIONS = (
    Condition("fp32 exponent MSB, 1 weight flip in layer 1 MLP", "weights", "fp32",
              "encoder_layer_1.mlp", qfi.FlipCount(count=1, bits=30)),
    Condition("fp32 mantissa (bits 0-22), 1 weight flip in layer 1 MLP", "weights", "fp32",
              "encoder_layer_1.mlp", qfi.FlipCount(count=1, bits=(0, 22))),
    Condition("fp32 exponent MSB, 1 activation flip per batch in layer 0 mlp.0", "activations", "fp32",
              "encoder_layer_0.mlp.0", qfi.FlipCount(count=1, bits=30)),
    Condition("int8 weights, BER 1e-4 (all weights)", "weights", "int8", None, qfi.BitFlip(ber=1e-4)),
    Condition("bf16 weights, BER 1e-4 (all weights)", "weights", "bf16", None, qfi.BitFlip(ber=1e-4)),
)


def observed_names(model: torch.nn.Module) -> list[str]:
    """Every leaf module and every encoder block (whose output is the residual stream)."""
    blocks = qfi.select_modules(model, r"re:encoder_layer_\d+$")
    keep = set(leaf_modules(model)) | set(blocks)
    return [n for n in qfi.select_modules(model) if n in keep]


def run_condition(model, evaluate: Evaluator, cond: Condition, reps: int, seed: int) -> list[dict]:
    """One session of the condition's format; the clean run is the observer's reference."""
    if cond.target == "weights":
        session = qfi.weights(model, cond.format, names=cond.names)
    else:
        session = qfi.activations(model, cond.format, names=cond.names, calibrate=evaluate.inputs())
    rows: list[dict] = []
    with session as s, qfi.observe(model, observed_names(model), reference=lambda: evaluate(model)) as obs:
        clean = evaluate(model)
        for rep in range(reps):
            with s.inject(cond.fault, seed=seed + rep) as log:
                res, got = obs.measure(lambda: evaluate(model), condition=cond.label, rep=rep)
            for r in got:
                r.update(flips=log.flips, top1=res.top1, sdc=res.sdc(clean))
            rows += got
    return rows


def short(name: str) -> str:
    """``encoder.layers.encoder_layer_1.mlp.0`` -> ``L1 mlp.0``; a block -> ``L1 (block)``."""
    parts = name.split(".")
    for i, p in enumerate(parts):
        if p.startswith("encoder_layer_"):
            rest = ".".join(parts[i + 1 :])
            return f"L{p.rsplit('_', 1)[1]} {rest or 'block'}"
    return name


def plot(df, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    df = df.assign(rel=df["rmse"] / df["ref_rms"], nonfinite_share=df["nonfinite"] / df["numel"])
    g = df.groupby(["condition", "depth", "module"], sort=False)
    med = g.agg(
        rel=("rel", "median"), changed=("changed_share", "median"), bad=("nonfinite_share", "median")
    ).reset_index()
    top1 = df.drop_duplicates(["condition", "rep"]).groupby("condition", sort=False)["top1"].mean()
    order = med.drop_duplicates("depth").sort_values("depth")
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(12, 8), sharex=True, height_ratios=(2, 1))
    floor = 1e-9
    for cond, d in med.groupby("condition", sort=False):
        d = d.sort_values("depth")
        label = f"{cond} (top-1 {top1[cond]:.2f})"
        (line,) = ax1.plot(d["depth"], d["rel"].clip(lower=floor), marker=".", label=label)
        ax2.plot(d["depth"], d["changed"], marker=".", color=line.get_color())
        ax2.plot(d["depth"], d["bad"], ls=":", lw=2, color=line.get_color())
    blocks = [r["depth"] for _, r in order.iterrows() if short(r["module"]).endswith(" block")]
    for ax in (ax1, ax2):
        for x in blocks:
            ax.axvline(x, color="0.88", lw=5, zorder=0)
    ax1.set_yscale("log")
    ax1.set_ylim(floor / 3, 1e40)
    ax1.set_yticks([1e-9, 1e-6, 1e-3, 1, 1e3, 1e10, 1e20, 1e30, 1e40])
    ax1.set_ylabel("relative RMSE vs clean, rmse / ref_rms\n(median over reps; 1e-9 = exactly 0)")
    ax1.legend(fontsize=8, loc="center left", bbox_to_anchor=(0.0, 0.45), framealpha=0.95)
    ax1.set_title(
        "Error propagation in the embedded ViT (digits test set), per module output in execution order\n"
        "grey: encoder block outputs (the residual stream); NaN/Inf values are left out of the RMSE "
        "and shown dotted below",
        fontsize=10,
    )
    ax2.set_ylabel("share of elements\nchanged (solid), non-finite (dotted)\n(median over reps)", fontsize=9)
    ax2.set_xticks(order["depth"], [short(m) for m in order["module"]], rotation=75, fontsize=7)
    ax2.set_xlabel("depth (execution order of the module outputs)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=10, help="trials per condition (seeds seed..seed+reps-1)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--limit", type=int, default=None, help="evaluate on the first N samples only")
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--out", default="qfi-results/error_propagation")
    ap.add_argument("--plot", default=None, help="the figure's path (default: <out>/error_propagation.png)")
    ap.add_argument("--no-plots", action="store_true")
    a = ap.parse_args(argv)
    torch.manual_seed(0)
    model = zoo.load_model("vit_digits").eval()
    evaluate = Evaluator(zoo.load_data("digits"), batch_size=a.batch_size, limit=a.limit)
    rows = []
    for cond in CONDITIONS:
        rows += run_condition(model, evaluate, cond, a.reps, a.seed)
    import pandas as pd

    df = pd.DataFrame(rows)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    df.to_csv(out / "observers.csv", index=False, float_format="%.6g")
    conds = list(dict.fromkeys(df["condition"]))
    top1 = df.drop_duplicates(["condition", "rep"]).groupby("condition", sort=False)["top1"].mean()
    for i, c in enumerate(conds):
        print(f"c{i}: {c}; mean top-1 {top1[c]:.4f}")
    code = {c: f"c{i}" for i, c in enumerate(conds)}
    rel = df.assign(rel=df["rmse"] / df["ref_rms"], c=df["condition"].map(code))
    summary = rel.groupby(["depth", "module", "c"], sort=False)["rel"].median().unstack("c")
    print("median relative RMSE (rmse / ref_rms) per module, in execution order:")
    print(summary.reset_index(level=0, drop=True).rename(index=short).to_string(float_format="{:.2g}".format))
    written = [out / "observers.csv"]
    if not a.no_plots:
        path = Path(a.plot) if a.plot else out / "error_propagation.png"
        plot(df, path)
        written.append(path)
    print("-> " + ", ".join(str(p) for p in written))


if __name__ == "__main__":
    try:
        main()
    except QfiError as e:
        raise SystemExit(f"{os.path.basename(__file__)}: error: {e}") from None
