"""PNG plots of campaign tables (matplotlib, Agg backend, no screen needed).

``plot_per_bit`` takes ``per_bit.csv``'s table (or summary rows with ``bit >= 0``),
``plot_vs_ber`` ``per_format.csv``'s (or summary rows with ``bit < 0``)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

ROLE_COLOURS = {
    "sign": "#d62728",
    "exponent": "#1f77b4",
    "mantissa": "#2ca02c",
    "integer": "#9467bd",
    "fraction": "#17becf",
    "magnitude": "#ff7f0e",
}


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def bit_role(fmt_name: str, bit: int) -> str:
    from quant_schemes import get_format

    return get_format(fmt_name).bit_roles[bit]


def _err(df: pd.DataFrame, p: str) -> np.ndarray:
    lo = (df[f"{p}_mean"] - df[f"{p}_ci_low"]).fillna(0).clip(lower=0).to_numpy()
    hi = (df[f"{p}_ci_high"] - df[f"{p}_mean"]).fillna(0).clip(lower=0).to_numpy()
    return np.vstack([lo, hi])


_LABELS = {"top1": "top-1 accuracy", "cos_mean": "mean cosine to clean", "loss": "loss",
           "perplexity": "perplexity"}


def _metric(metric: object) -> tuple[str, str, tuple[float, float] | None]:
    """(primary column, axis label, y range) of a metric (default top1)."""
    if metric is None:
        return "top1", _LABELS["top1"], (0.0, 1.02)
    p = metric.primary  # type: ignore[attr-defined]
    b = metric.bounds  # type: ignore[attr-defined]
    return p, _LABELS.get(p, p), None if b is None else (b[0], b[1] + 0.02 * (b[1] - b[0]))


def _cond_label(r: pd.Series) -> str:
    what = f"BER {r['ber']:g}" if r["fault"] == "ber" else f"{int(r['count'])} flips"
    names = r["names"] if isinstance(r["names"], str) and r["names"] else "all"
    return f"{r['target']} [{names}], {what}"


def plot_per_bit(per_bit: pd.DataFrame, path: Path, metric: object = None) -> Path:
    """The metric's primary value (top-1 accuracy) per bit position (bars, 95% CI whiskers,
    coloured by bit role), one panel per (format, condition); bit 0 (LSB) on the right, as in a
    bit-layout diagram."""
    plt = _pyplot()
    p, ylabel, ylim = _metric(metric)
    keys = ["format", "target", "names", "fault", "ber", "count"]
    panels = list(per_bit.groupby(keys, sort=False, dropna=False))
    fig, axes = plt.subplots(len(panels), 1, figsize=(11, 3.0 * len(panels)), squeeze=False)
    for ax, (key, df) in zip(axes[:, 0], panels, strict=True):
        df = df.sort_values("bit", ascending=False)
        bits = df["bit"].to_numpy()
        if "bit_role" in df:  # per_bit.csv carries the roles
            roles_of_bits = df["bit_role"].tolist()
        else:
            roles_of_bits = [bit_role(key[0], int(b)) for b in bits]
        colours = [ROLE_COLOURS.get(r, "grey") for r in roles_of_bits]
        x = np.arange(len(bits))
        ax.bar(x, df[f"{p}_mean"], color=colours, yerr=_err(df, p), capsize=2, ecolor="black", linewidth=0)
        ax.axhline(df[f"clean_{p}"].iloc[0], color="black", ls="--", lw=1, label="clean (quantized)")
        ax.axhline(df[f"golden_{p}"].iloc[0], color="grey", ls=":", lw=1, label="golden fp32")
        ax.set_xticks(x, [str(int(b)) for b in bits], fontsize=7)
        if ylim is not None:
            ax.set_ylim(*ylim)
        ax.set_ylabel(ylabel)
        ax.set_title(f"{key[0]}: {_cond_label(df.iloc[0])}", fontsize=10, loc="left")
        roles = dict.fromkeys(roles_of_bits)
        handles = [plt.Rectangle((0, 0), 1, 1, color=ROLE_COLOURS.get(r, "grey")) for r in roles]
        h2, l2 = ax.get_legend_handles_labels()
        ax.legend(
            handles + h2,
            list(roles) + l2,
            fontsize=7,
            loc="lower right",
            bbox_to_anchor=(1.0, 1.0),
            ncol=len(roles) + 2,
            frameon=False,
            borderaxespad=0.1,
        )
    axes[-1, 0].set_xlabel("bit position (0 = LSB)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


def plot_vs_ber(per_format: pd.DataFrame, path: Path, metric: object = None) -> Path:
    """The mean primary value (top-1; 95% CI band) against BER on a log axis, one line per format
    and name group."""
    plt = _pyplot()
    p, ylabel, ylim = _metric(metric)
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    for (fmt, _target, names), df in per_format.groupby(
        ["format", "target", "names"], sort=False, dropna=False
    ):
        df = df.sort_values("ber")
        df = df[df["ber"] > 0]
        if df.empty:
            continue
        label = fmt if per_format["names"].nunique() == 1 else f"{fmt} [{names or 'all'}]"
        line = ax.plot(df["ber"], df[f"{p}_mean"], marker="o", ms=4, label=label)[0]
        ax.fill_between(
            df["ber"],
            df[f"{p}_ci_low"].fillna(df[f"{p}_mean"]),
            df[f"{p}_ci_high"].fillna(df[f"{p}_mean"]),
            color=line.get_color(),
            alpha=0.15,
        )
    ax.axhline(per_format[f"golden_{p}"].iloc[0], color="grey", ls=":", lw=1, label="golden fp32")
    ax.set_xscale("log")
    if ylim is not None:
        ax.set_ylim(*ylim)
    else:
        ax.set_yscale("log")
    ax.set_xlabel("bit error rate")
    ax.set_ylabel(ylabel)
    ax.set_title(f"{per_format['target'].iloc[0]} faults: {ylabel} vs BER")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)
