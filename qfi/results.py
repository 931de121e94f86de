"""Tidy result tables: one row per trial (``detail.csv``), one per condition (``summary.csv``).

``per_bit.csv`` holds the conditions of per-bit sweeps (one bit position flips),
``per_format.csv`` those where any bit of a code may flip (format comparisons, BER sweeps).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd

DETAIL_COLUMNS = (
    "format",
    "target",
    "names",
    "fault",
    "ber",
    "count",
    "bit",
    "bit_name",
    "rep",
    "seed",
    "flips",
    "top1",
    "top5",
    "sdc",
    "due",
    "clean_top1",
    "clean_top5",
    "golden_top1",
    "golden_top5",
    "evaluated",
)
CONDITION = ["format", "target", "names", "fault", "ber", "count", "bit", "bit_name"]


def t_quantile_975(dof: np.ndarray) -> np.ndarray:
    """Two-sided 95% Student-t quantile for each number of degrees of freedom."""
    from scipy.stats import t

    return t.ppf(0.975, dof)


def summarize(detail: pd.DataFrame) -> pd.DataFrame:
    """One row per condition: trials, mean flips, mean/std of top-1 and top-5, the 95% confidence
    interval of mean top-1 (Student t over repetitions, clipped to [0, 1]), mean SDC and DUE,
    the clean and golden
    baselines."""
    if detail.empty:
        return pd.DataFrame(columns=CONDITION + ["trials"])
    g = detail.groupby(CONDITION, sort=False, dropna=False)
    s = g.agg(
        trials=("top1", "size"),
        flips_mean=("flips", "mean"),
        top1_mean=("top1", "mean"),
        top1_std=("top1", "std"),
        top5_mean=("top5", "mean"),
        top5_std=("top5", "std"),
        sdc_mean=("sdc", "mean"),
        due_mean=("due", "mean"),
        clean_top1=("clean_top1", "first"),
        clean_top5=("clean_top5", "first"),
        golden_top1=("golden_top1", "first"),
        golden_top5=("golden_top5", "first"),
        evaluated=("evaluated", "sum"),
    ).reset_index()
    n = s["trials"].to_numpy(dtype=float)
    std = s["top1_std"].to_numpy(dtype=float)
    with np.errstate(invalid="ignore", divide="ignore"):
        half = np.where(n > 1, t_quantile_975(np.maximum(n - 1, 1)) * std / np.sqrt(n), np.nan)
    # accuracy lives in [0, 1]: clip the t interval there
    s.insert(s.columns.get_loc("top1_std") + 1, "top1_ci_low", (s["top1_mean"] - half).clip(lower=0.0))
    s.insert(s.columns.get_loc("top1_ci_low") + 1, "top1_ci_high", (s["top1_mean"] + half).clip(upper=1.0))
    return s


def _write_csv(df: pd.DataFrame, path: Path) -> Path:
    """Write through a temporary file, so a kill leaves the old file or the new one, never half."""
    tmp = path.with_name(path.name + ".tmp")
    df.to_csv(tmp, index=False, float_format="%.6g", lineterminator="\n")
    os.replace(tmp, path)
    return path


def write_tables(detail: pd.DataFrame, summary: pd.DataFrame, out: Path, plots: bool = True) -> list[Path]:
    """Write summary/per-bit/per-format CSVs (and PNG plots) next to ``detail.csv``."""
    out = Path(out)
    written = [_write_csv(summary, out / "summary.csv")]
    per_bit = summary[summary["bit"] >= 0] if not summary.empty else summary
    per_any = summary[summary["bit"] < 0] if not summary.empty else summary
    if not per_bit.empty:
        written.append(_write_csv(per_bit, out / "per_bit.csv"))
    if not per_any.empty:
        written.append(_write_csv(per_any, out / "per_format.csv"))
    if plots:
        from qfi import plots as plotting

        if not per_bit.empty:
            written.append(plotting.plot_per_bit(per_bit, out / "per_bit.png"))
        if not per_any.empty and per_any["fault"].eq("ber").any() and per_any["ber"].nunique() > 1:
            written.append(plotting.plot_vs_ber(per_any[per_any["fault"] == "ber"], out / "per_format.png"))
    return written
