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

_KEYS = ("format", "target", "names", "fault", "ber", "count", "bit", "bit_name", "rep", "seed", "flips")


def detail_columns(metric_columns: tuple[str, ...] = ("top1", "top5")) -> tuple[str, ...]:
    """The columns of ``detail.csv`` for a metric with ``metric_columns`` (see ``qfi.metrics``)."""
    return (
        *_KEYS,
        *metric_columns,
        "sdc",
        "sdc_any",
        "due",
        *(f"clean_{c}" for c in metric_columns),
        *(f"golden_{c}" for c in metric_columns),
        "evaluated",
    )


def metric_columns_of(columns: list[str] | tuple[str, ...]) -> tuple[str, ...] | None:
    """The metric columns of a ``detail.csv`` header (None when it is not one qfi writes)."""
    cols = tuple(columns)
    if len(cols) < len(_KEYS) + 4 or cols[: len(_KEYS)] != _KEYS or "sdc" not in cols:
        return None
    metric = cols[len(_KEYS) : cols.index("sdc")]
    return metric if detail_columns(metric) == cols else None


DETAIL_COLUMNS = detail_columns()  # the default metric, top1
CONDITION = ["format", "target", "names", "fault", "ber", "count", "bit", "bit_name"]


def t_quantile_975(dof: np.ndarray) -> np.ndarray:
    """Two-sided 95% Student-t quantile for each number of degrees of freedom."""
    from scipy.stats import t

    return t.ppf(0.975, dof)


def _metric(metric: object) -> object:
    if metric is None:
        from qfi.metrics import Top1

        return Top1()
    return metric


def summarize(detail: pd.DataFrame, metric: object = None) -> pd.DataFrame:
    """One row per condition: trials, mean flips, mean/std of every metric column (top1: top-1
    and top-5), the 95% confidence interval of the primary value's mean (Student t over
    repetitions, clipped to the metric's range: [0, 1] for accuracy), mean SDC and DUE, the mean
    of every other numeric detail column (``sdc_any`` -> ``sdc_any_mean``, after ``due_mean``),
    the clean and golden baselines.  ``metric`` is a ``qfi.metrics.Metric`` (default top1)."""
    m = _metric(metric)
    cols, p = tuple(m.columns), m.primary  # type: ignore[attr-defined]
    if detail.empty:
        return pd.DataFrame(columns=CONDITION + ["trials"])
    not_averaged = (
        set(CONDITION) | {"rep", "seed", "flips", "sdc", "due", "evaluated"} | set(cols)
        | {f"clean_{c}" for c in cols} | {f"golden_{c}" for c in cols}
    )
    extra = [
        c for c in detail.columns
        if c not in not_averaged and pd.api.types.is_numeric_dtype(detail[c])
        and not pd.api.types.is_bool_dtype(detail[c])
    ]
    g = detail.groupby(CONDITION, sort=False, dropna=False)
    agg: dict[str, tuple[str, str]] = {"trials": (p, "size"), "flips_mean": ("flips", "mean")}
    for c in cols:
        agg[f"{c}_mean"] = (c, "mean")
        agg[f"{c}_std"] = (c, "std")
    agg.update(sdc_mean=("sdc", "mean"), due_mean=("due", "mean"))
    agg.update({f"{c}_mean": (c, "mean") for c in extra})
    agg.update({f"clean_{c}": (f"clean_{c}", "first") for c in cols})
    agg.update({f"golden_{c}": (f"golden_{c}", "first") for c in cols})
    agg["evaluated"] = ("evaluated", "sum")
    s = g.agg(**agg).reset_index()
    n = s["trials"].to_numpy(dtype=float)
    std = s[f"{p}_std"].to_numpy(dtype=float)
    with np.errstate(invalid="ignore", divide="ignore"):
        half = np.where(n > 1, t_quantile_975(np.maximum(n - 1, 1)) * std / np.sqrt(n), np.nan)
    lo, hi = m.bounds or (None, None)  # type: ignore[attr-defined]
    s.insert(s.columns.get_loc(f"{p}_std") + 1, f"{p}_ci_low", (s[f"{p}_mean"] - half).clip(lower=lo))
    s.insert(s.columns.get_loc(f"{p}_ci_low") + 1, f"{p}_ci_high", (s[f"{p}_mean"] + half).clip(upper=hi))
    return s


_CONDITION_BIT = ("format", "target", "names", "fault", "ber", "count", "bit", "bit_name", "bit_role")
_CONDITION_ANY = ("format", "target", "names", "fault", "ber", "count")


def _view_columns(m: object, condition: tuple[str, ...]) -> list[str]:
    p = m.primary  # type: ignore[attr-defined]
    change = f"{p}_drop" if m.higher_is_better else f"{p}_rise"  # type: ignore[attr-defined]
    return [
        *condition, "trials", "flips_mean", f"{p}_mean", f"{p}_ci_low", f"{p}_ci_high", change,
        "sdc_mean", "due_mean", f"clean_{p}", f"golden_{p}",
    ]  # fmt: skip


PER_BIT_COLUMNS = tuple(_view_columns(_metric(None), _CONDITION_BIT))
PER_FORMAT_COLUMNS = ("format", "bits_per_value", *_view_columns(_metric(None), _CONDITION_ANY)[1:])


def _view(summary: pd.DataFrame, m: object, condition: tuple[str, ...]) -> pd.DataFrame:
    """The view's columns of ``summary`` plus the primary value's change from clean
    (``top1_drop = clean - mean`` for metrics where higher is better, ``loss_rise = mean - clean``
    otherwise); extra ``*_mean`` values (other metric columns, ``sdc_any_mean``) follow
    ``sdc_mean``."""
    p = m.primary  # type: ignore[attr-defined]
    cols = _view_columns(m, condition)
    change = cols[condition.__len__() + 5]
    sign = 1 if m.higher_is_better else -1  # type: ignore[attr-defined]
    df = summary.assign(**{change: sign * (summary[f"clean_{p}"] - summary[f"{p}_mean"])})
    known = {f"{c}_mean" for c in m.columns} | {"flips_mean", "sdc_mean", "due_mean"}  # type: ignore[attr-defined]
    extra = [
        c for c in summary.columns
        if c.endswith("_mean") and c not in known and not c.startswith(("clean_", "golden_"))
    ]
    at = cols.index("sdc_mean") + 1
    cols[at:at] = extra
    return df[cols].reset_index(drop=True)


def per_bit_table(summary: pd.DataFrame, metric: object = None, part: str = "codes") -> pd.DataFrame:
    """One row per per-bit condition (``bit >= 0``) with ``PER_BIT_COLUMNS``: the bit's name and
    role from the format (``bit_names`` / ``bit_roles``), top-1 with CI and its drop from clean
    (``clean_top1 - top1_mean``), SDC, DUE."""
    from quant_schemes import get_format

    m = _metric(metric)
    rows = summary[summary["bit"] >= 0] if not summary.empty else summary
    if rows.empty:
        return pd.DataFrame(columns=_view_columns(m, _CONDITION_BIT))
    from quant_schemes import part_bit_roles

    roles = {f: part_bit_roles(get_format(f), part) for f in rows["format"].unique()}  # a few formats
    role = [roles[f][int(b)] for f, b in zip(rows["format"], rows["bit"], strict=True)]
    return _view(rows.assign(bit_role=role), m, _CONDITION_BIT)


def per_format_table(summary: pd.DataFrame, metric: object = None) -> pd.DataFrame:
    """One row per condition where any bit may flip (``bit < 0``: format comparisons, BER sweeps)
    with ``PER_FORMAT_COLUMNS``: top-1 with CI and its drop from clean, SDC, DUE, mean flips."""
    from quant_schemes import bits_per_value, get_format

    m = _metric(metric)
    rows = summary[summary["bit"] < 0] if not summary.empty else summary
    if rows.empty:
        cols = _view_columns(m, _CONDITION_ANY)
        return pd.DataFrame(columns=[cols[0], "bits_per_value", *cols[1:]])
    view = _view(rows, m, _CONDITION_ANY)
    bpv = {f: bits_per_value(get_format(f)) for f in view["format"].unique()}
    view.insert(1, "bits_per_value", view["format"].map(bpv))  # equal-memory comparisons
    return view


def _write_csv(df: pd.DataFrame, path: Path) -> Path:
    """Write through a temporary file, so a kill leaves the old file or the new one, never half."""
    tmp = path.with_name(path.name + ".tmp")
    df.to_csv(tmp, index=False, float_format="%.6g", lineterminator="\n")
    os.replace(tmp, path)
    return path


def write_tables(
    detail: pd.DataFrame,
    summary: pd.DataFrame,
    out: Path,
    plots: bool = True,
    metric: object = None,
    part: str = "codes",
) -> list[Path]:
    """Write summary/per-bit/per-format CSVs (and PNG plots) next to ``detail.csv``; a view with
    no rows is not written."""
    out = Path(out)
    m = _metric(metric)
    written = [_write_csv(summary, out / "summary.csv")]
    per_bit, per_any = per_bit_table(summary, m, part), per_format_table(summary, m)
    if not per_bit.empty:
        written.append(_write_csv(per_bit, out / "per_bit.csv"))
    if not per_any.empty:
        written.append(_write_csv(per_any, out / "per_format.csv"))
    if plots:
        from qfi import plots as plotting

        if not per_bit.empty:
            written.append(plotting.plot_per_bit(per_bit, out / "per_bit.png", metric=m))
        ber = per_any[per_any["fault"] == "ber"]
        if not ber.empty and ber["ber"].nunique() > 1:
            written.append(plotting.plot_vs_ber(ber, out / "per_format.png", metric=m))
    return written
