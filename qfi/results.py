"""Tidy result tables.

* ``detail.csv``: one row per trial (``DETAIL_COLUMNS``);
* ``summary.csv``: one row per condition (``CONDITION``): trials, flips, mean/std/CI of top-1,
  top-5, mean SDC and DUE, baselines, and the mean of any other numeric detail column
  (``<column>_mean``, e.g. ``sdc_any_mean``);
* ``per_bit.csv``: the per-bit view, one row per (format, target, names, fault, ber/count, bit)
  of the conditions where a single bit position may flip: the bit's name and role (sign,
  exponent, mantissa, integer, fraction, magnitude), mean top-1 with its 95% CI, the drop from
  clean, SDC, DUE, flips (``PER_BIT_COLUMNS``);
* ``per_format.csv``: the per-format view, one row per (format, target, names, fault, ber/count)
  of the conditions where any bit of a code may flip (format comparisons, BER sweeps), with the
  same metrics (``PER_FORMAT_COLUMNS``).
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
    "sdc_any",
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


#: detail columns that are not metrics to average (keys, identities, baselines, flags)
_NOT_AVERAGED = frozenset(CONDITION) | {
    "rep", "seed", "flips", "top1", "top5", "sdc", "due",
    "clean_top1", "clean_top5", "golden_top1", "golden_top5", "evaluated",
}


def summarize(detail: pd.DataFrame) -> pd.DataFrame:
    """One row per condition: trials, mean flips, mean/std of top-1 and top-5, the 95% confidence
    interval of mean top-1 (Student t over repetitions, clipped to [0, 1]), mean SDC and DUE,
    the mean of every other numeric detail column (``sdc_any`` -> ``sdc_any_mean``, after
    ``due_mean``; absent columns are simply not there), the clean and golden baselines."""
    if detail.empty:
        return pd.DataFrame(columns=CONDITION + ["trials"])
    extra = [
        c for c in detail.columns
        if c not in _NOT_AVERAGED and pd.api.types.is_numeric_dtype(detail[c])
        and not pd.api.types.is_bool_dtype(detail[c])
    ]
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
        **{f"{c}_mean": (c, "mean") for c in extra},
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


_METRICS = ["trials", "flips_mean", "top1_mean", "top1_ci_low", "top1_ci_high", "top1_drop", "sdc_mean"]
_BASELINES = ["clean_top1", "golden_top1"]
PER_BIT_COLUMNS = (
    "format", "target", "names", "fault", "ber", "count", "bit", "bit_name", "bit_role",
    *_METRICS, "due_mean", *_BASELINES,
)  # fmt: skip
PER_FORMAT_COLUMNS = (
    "format", "target", "names", "fault", "ber", "count", *_METRICS, "due_mean", *_BASELINES,
)  # fmt: skip


def _view(summary: pd.DataFrame, columns: tuple[str, ...]) -> pd.DataFrame:
    """``columns`` of ``summary`` plus ``top1_drop``; extra ``*_mean`` metrics (``sdc_any_mean``)
    follow ``sdc_mean``."""
    df = summary.assign(top1_drop=summary["clean_top1"] - summary["top1_mean"])
    known = {"top1_mean", "top5_mean", "flips_mean", "sdc_mean", "due_mean"}
    extra = [c for c in summary.columns if c.endswith("_mean") and c not in known]
    cols = list(columns)
    at = cols.index("sdc_mean") + 1
    cols[at:at] = extra
    return df[cols].reset_index(drop=True)


def per_bit_table(summary: pd.DataFrame) -> pd.DataFrame:
    """One row per per-bit condition (``bit >= 0``) with ``PER_BIT_COLUMNS``: the bit's name and
    role from the format (``bit_names`` / ``bit_roles``), top-1 with CI and its drop from clean
    (``clean_top1 - top1_mean``), SDC, DUE."""
    from quant_schemes import get_format

    rows = summary[summary["bit"] >= 0] if not summary.empty else summary
    if rows.empty:
        return pd.DataFrame(columns=list(PER_BIT_COLUMNS))
    roles = {f: get_format(f).bit_roles for f in rows["format"].unique()}  # a few formats
    role = [roles[f][int(b)] for f, b in zip(rows["format"], rows["bit"], strict=True)]
    return _view(rows.assign(bit_role=role), PER_BIT_COLUMNS)


def per_format_table(summary: pd.DataFrame) -> pd.DataFrame:
    """One row per condition where any bit may flip (``bit < 0``: format comparisons, BER sweeps)
    with ``PER_FORMAT_COLUMNS``: top-1 with CI and its drop from clean, SDC, DUE, mean flips."""
    rows = summary[summary["bit"] < 0] if not summary.empty else summary
    if rows.empty:
        return pd.DataFrame(columns=list(PER_FORMAT_COLUMNS))
    return _view(rows, PER_FORMAT_COLUMNS)


def _write_csv(df: pd.DataFrame, path: Path) -> Path:
    """Write through a temporary file, so a kill leaves the old file or the new one, never half."""
    tmp = path.with_name(path.name + ".tmp")
    df.to_csv(tmp, index=False, float_format="%.6g", lineterminator="\n")
    os.replace(tmp, path)
    return path


def write_tables(detail: pd.DataFrame, summary: pd.DataFrame, out: Path, plots: bool = True) -> list[Path]:
    """Write summary/per-bit/per-format CSVs (and PNG plots) next to ``detail.csv``; a view with
    no rows is not written."""
    out = Path(out)
    written = [_write_csv(summary, out / "summary.csv")]
    per_bit, per_any = per_bit_table(summary), per_format_table(summary)
    if not per_bit.empty:
        written.append(_write_csv(per_bit, out / "per_bit.csv"))
    if not per_any.empty:
        written.append(_write_csv(per_any, out / "per_format.csv"))
    if plots:
        from qfi import plots as plotting

        if not per_bit.empty:
            written.append(plotting.plot_per_bit(per_bit, out / "per_bit.png"))
        ber = per_any[per_any["fault"] == "ber"]
        if not ber.empty and ber["ber"].nunique() > 1:
            written.append(plotting.plot_vs_ber(ber, out / "per_format.png"))
    return written
