"""Fault-aware training: does training under weight faults make a model tolerate them?

    OMP_WAIT_POLICY=PASSIVE .venv/bin/python scripts/fault_aware_training.py --reps 30

Fine-tunes the embedded CNN (its shipped checkpoint; ``--model vit_digits`` for the ViT) on the
digits training split three ways with one recipe (AdamW, lr 1e-3, label smoothing 0.05, batch 64,
the same data order): *normal* (plain fp32 training), *quantization-aware* (the forward in the
format, no faults: ``qfi.fault_aware`` at BER 0) and *fault-aware* (the forward in the format
under a new ``BitFlip(train BER)`` draw of the weights at every step, ``qfi.fault_aware``).  Then
each model meets the same weight faults on the held-out split: for every format, BER and
repetition one seed, so all three models see the same fault sites (a paired comparison).

Writes ``fault_aware_training.csv`` (one row per format x model x BER: trials, mean flips,
top-1 mean / std / 95% Student-t CI, SDC, DUE, the model's clean and fp32 top-1 and, for the
trained variants, the paired top-1 difference to the normal model with its 95% CI),
``fault_aware_training_detail.csv`` (one row per trial) and ``fault_aware_training.png`` (top-1
vs BER per format with 95% CIs, and the paired differences).  Default formats and rates: int8
(per-tensor; train BER 3e-2) and bf16 (train BER 1e-5); ``--formats`` with ``--train-ber`` /
``--ber`` for others.  About 35 s on 2 cores (5 fine-tunes of 5 epochs, 900 trials).
``--smoke``: 1 epoch on 256 training images, the top 2 BERs, 2 reps, 64 test images.
"""

from __future__ import annotations

import argparse
import hashlib
import math
import os
import time
from collections.abc import Sequence
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # must precede the torch import

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import qfi  # noqa: E402
from qfi import zoo  # noqa: E402
from qfi.config import parse_bers  # noqa: E402
from qfi.errors import QfiError  # noqa: E402
from qfi.evaluate import Evaluator  # noqa: E402
from qfi.results import t_quantile_975  # noqa: E402

#: format -> (training BER, evaluation BERs): the training rate sits inside the evaluated range
RATES = {
    "int8": (3e-2, "1e-3,3e-3,1e-2,3e-2,1e-1"),
    "int8_per_channel": (3e-2, "1e-3,3e-3,1e-2,3e-2,1e-1"),
    "bf16": (1e-5, "1e-6,3e-6,1e-5,3e-5,1e-4"),
    "fp16": (1e-5, "1e-6,3e-6,1e-5,3e-5,1e-4"),
    "fp32": (3e-6, "3e-7,1e-6,3e-6,1e-5,3e-5"),
}
VARIANTS = ("normal", "quantization_aware", "fault_aware")
LABELS = {
    "normal": "normal fine-tune",
    "quantization_aware": "quantization-aware (BER 0)",
    "fault_aware": "fault-aware (train BER {train_ber:g})",
}
COLOURS = {"normal": "#1f77b4", "quantization_aware": "#7f7f7f", "fault_aware": "#d62728"}


def trial_seed(seed: int, *key: object) -> int:
    """A 63-bit seed from the run seed and a trial key (the same for every model: paired trials)."""
    h = hashlib.sha256("|".join(map(str, (seed, *key))).encode()).digest()
    return int.from_bytes(h[:8], "little") >> 1


def fine_tune(model_name: str, fat_args: dict | None, epochs: int, lr: float, seed: int, device,
              train_limit: int | None = None):
    """The shipped checkpoint fine-tuned on the digits training split; with ``fat_args`` every
    step runs under ``qfi.fault_aware(model, **fat_args)``.  Returns (model in eval mode, fat)."""
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    x_tr, y_tr = zoo.load_data("digits", split="train").tensors
    if train_limit is not None:
        x_tr, y_tr = x_tr[:train_limit], y_tr[:train_limit]
    x_tr, y_tr = x_tr.to(device), y_tr.to(device)
    model = zoo.load_model(model_name).to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.05)
    fat = None if fat_args is None else qfi.fault_aware(model, **fat_args)
    for epoch in range(epochs):
        for idx in torch.randperm(len(x_tr), generator=g).split(64):
            idx = idx.to(device)
            opt.zero_grad(set_to_none=True)
            if fat is None:
                F.cross_entropy(model(x_tr[idx]), y_tr[idx], label_smoothing=0.05).backward()
            else:
                with fat.step(epoch=epoch):
                    F.cross_entropy(model(x_tr[idx]), y_tr[idx], label_smoothing=0.05).backward()
            opt.step()
    return model.eval(), fat


def evaluate_under_faults(model, variant: str, fmt: str, bers, reps: int, seed: int, ev: Evaluator,
                          names) -> tuple[list[dict], float, float]:
    """One row per (BER, rep) trial of weight BitFlip faults; (rows, clean top-1, fp32 top-1)."""
    golden = ev(model).top1
    rows = []
    with qfi.weights(model, fmt, names=names) as s:
        clean = ev(model)
        for ber in bers:
            for rep in range(reps):
                ts = trial_seed(seed, fmt, ber, rep)
                with s.inject(qfi.BitFlip(ber=ber), seed=ts) as log:
                    r = ev(model)
                rows.append(dict(format=fmt, model=variant, ber=ber, rep=rep, seed=ts, flips=log.flips,
                                 top1=r.top1, sdc=r.sdc(clean), due=r.due))
    return rows, clean.top1, golden


def ci(values: np.ndarray) -> tuple[float, float, float, float]:
    """(mean, std, 95% CI low, high) with the Student-t quantile; a single value has no CI."""
    n, mean = len(values), float(np.mean(values))
    if n < 2:
        return mean, float("nan"), float("nan"), float("nan")
    std = float(np.std(values, ddof=1))
    half = float(t_quantile_975(np.array([n - 1]))[0]) * std / math.sqrt(n)
    return mean, std, mean - half, mean + half


def summarize(detail: pd.DataFrame, info: dict) -> pd.DataFrame:
    rows = []
    normal = detail[detail["model"] == "normal"].set_index(["format", "ber", "rep"])["top1"]
    for (fmt, variant, ber), d in detail.groupby(["format", "model", "ber"], sort=False):
        mean, std, lo, hi = ci(d["top1"].to_numpy())
        row = dict(format=fmt, model=variant, train_ber=info[fmt, variant]["train_ber"], ber=ber,
                   trials=len(d), flips_mean=d["flips"].mean(), top1_mean=mean, top1_std=std,
                   top1_ci_low=lo, top1_ci_high=hi, sdc_mean=d["sdc"].mean(), due_mean=d["due"].mean(),
                   clean_top1=info[fmt, variant]["clean"], golden_top1=info[fmt, variant]["golden"])
        mine = d.set_index(["format", "ber", "rep"])["top1"]
        if variant != "normal" and mine.index.isin(normal.index).all():
            dmean, _, dlo, dhi = ci((mine - normal.loc[mine.index]).to_numpy())
            row.update(delta_top1=dmean, delta_ci_low=dlo, delta_ci_high=dhi)
        rows.append(row)
    return pd.DataFrame(rows)


def plot(summary: pd.DataFrame, path: Path, model_name: str, epochs: int, n: int) -> Path:
    """Top row: top-1 vs BER per format, one line per model (95% CI whiskers).  Bottom row: the
    paired top-1 difference of each trained variant to the normal model (95% CI)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    formats = list(dict.fromkeys(summary["format"]))
    fig, axes = plt.subplots(2, len(formats), figsize=(5.6 * len(formats), 7.0), squeeze=False,
                             gridspec_kw={"height_ratios": [3, 2]}, sharex="col")
    style = {"normal": dict(ls="-", lw=2.2), "quantization_aware": dict(ls="--", lw=1.2, mfc="none"),
             "fault_aware": dict(ls="-", lw=1.6)}
    for col, fmt in enumerate(formats):
        top, bottom = axes[0, col], axes[1, col]
        s = summary[summary["format"] == fmt]
        for variant, d in s.groupby("model", sort=False):
            d = d.sort_values("ber")
            label = LABELS[variant].format(train_ber=d["train_ber"].iloc[0])
            err = np.vstack([(d["top1_mean"] - d["top1_ci_low"]).fillna(0).clip(lower=0),
                             (d["top1_ci_high"] - d["top1_mean"]).fillna(0).clip(lower=0)])
            top.errorbar(d["ber"], d["top1_mean"], yerr=err, marker="o", ms=4, capsize=3, label=label,
                         color=COLOURS[variant], **style[variant])
            if variant != "normal" and "delta_top1" in d:
                err = np.vstack([(d["delta_top1"] - d["delta_ci_low"]).fillna(0).clip(lower=0),
                                 (d["delta_ci_high"] - d["delta_top1"]).fillna(0).clip(lower=0)])
                bottom.errorbar(d["ber"], d["delta_top1"], yerr=err, marker="o", ms=4, capsize=3,
                                color=COLOURS[variant], **style[variant])
        train_ber = s[s["model"] == "fault_aware"]["train_ber"]
        for ax in (top, bottom):
            if len(train_ber):
                ax.axvline(train_ber.iloc[0], color=COLOURS["fault_aware"], ls=":", lw=1)
            ax.set_xscale("log")
            ax.grid(alpha=0.3)
        bottom.axhline(0, color="black", lw=0.8)
        top.set_ylim(0, 1.02)
        top.set_ylabel("top-1 accuracy, held-out digits")
        top.set_title(f"{fmt}: {n} test images, {int(s['trials'].iloc[0])} trials per point")
        top.legend(loc="lower left", fontsize=8)
        bottom.set_ylabel("top-1 minus normal's\n(same faults, paired)")
        bottom.set_xlabel(f"weight BER ({fmt}, every bit of every weight)")
    fig.suptitle(f"{model_name} fine-tuned {epochs} epochs: normally vs fault-aware (mean, 95% CI)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def rates(formats: list[str], train_ber: str | None, ber: str | None) -> dict[str, tuple[float, tuple]]:
    out = {}
    for fmt in formats:
        if fmt not in RATES and (train_ber is None or ber is None):
            raise QfiError(
                f"format {fmt!r} has no default rates (defaults for {', '.join(RATES)}); pass --train-ber "
                "and --ber"
            )
        t, b = RATES.get(fmt, (None, None))
        t = float(train_ber) if train_ber is not None else t
        if not 0 < t <= 1:
            raise QfiError(f"--train-ber {train_ber!r}: allowed is 0 < BER <= 1")
        out[fmt] = (t, parse_bers(ber if ber is not None else b))
    return out


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="cnn_digits", choices=zoo.EMBEDDED_MODELS)
    ap.add_argument("--formats", default="int8,bf16", help="weight formats (default int8,bf16)")
    ap.add_argument("--train-ber", default=None, help="training BER for every format (default: per format)")
    ap.add_argument("--ber", default=None, help="evaluation BERs, e.g. 1e-3:1e-1 (default: per format)")
    ap.add_argument("--names", default="", help="weights to fault, in training and evaluation (default all)")
    ap.add_argument("--per", default="step", choices=("step", "epoch"), help="a new training draw per ...")
    ap.add_argument("--epochs", type=int, default=5, help="fine-tuning epochs (default 5)")
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--reps", type=int, default=30, help="trials per format, model and BER (default 30)")
    ap.add_argument("--seed", type=int, default=0, help="data order, training draws, trial seeds")
    ap.add_argument("--limit", type=int, default=None, help="evaluate on the first N test samples only")
    ap.add_argument("--device", default="cpu", help="cpu (default), cuda, cuda:N")
    ap.add_argument("--no-plots", action="store_true", help="write the CSVs but no PNG plot")
    ap.add_argument("--smoke", action="store_true", help="1 epoch, the top 2 BERs, 2 reps, 64 samples")
    ap.add_argument("--out", default="qfi-results/fault_aware_training")
    a = ap.parse_args(argv)
    if a.reps < 1 or a.epochs < 1:
        raise QfiError(f"--reps {a.reps} / --epochs {a.epochs}: allowed are integers >= 1")
    formats = [f.strip() for f in a.formats.split(",") if f.strip()]
    plan = rates(formats, a.train_ber, a.ber)
    train_limit = None
    if a.smoke:
        a.epochs, a.reps, a.limit, train_limit = 1, 2, 64, 256
        plan = {f: (t, b[-2:]) for f, (t, b) in plan.items()}
    names = a.names or None
    device = torch.device(a.device)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    ev = Evaluator(zoo.load_data("digits", split="test"), device=device, limit=a.limit)
    t0 = time.perf_counter()

    models = {("*", "normal"): fine_tune(a.model, None, a.epochs, a.lr, a.seed, device, train_limit)[0]}
    info: dict = {}
    for fmt, (train_ber, _) in plan.items():
        for variant, ber in (("quantization_aware", 0.0), ("fault_aware", train_ber)):
            fat_args = dict(fmt=fmt, fault=qfi.BitFlip(ber=ber), names=names, per=a.per, seed=a.seed)
            model, fat = fine_tune(a.model, fat_args, a.epochs, a.lr, a.seed, device, train_limit)
            models[fmt, variant] = model
            info[fmt, variant] = dict(train_ber=ber, skipped=fat.skipped)
            if variant == "fault_aware":
                print(f"{fmt}: fault-aware fine-tune at BER {ber:g}: {fat.draws} draws, "
                      f"{fat.skipped} of {fat.steps} steps skipped for non-finite gradients", flush=True)
    print(f"trained {len(models)} models in {time.perf_counter() - t0:.1f} s", flush=True)

    rows = []
    for fmt, (_, bers) in plan.items():
        for variant in VARIANTS:
            model = models["*", "normal"] if variant == "normal" else models[fmt, variant]
            r, clean, golden = evaluate_under_faults(model, variant, fmt, bers, a.reps, a.seed, ev, names)
            rows += r
            info.setdefault((fmt, variant), dict(train_ber=0.0))
            info[fmt, variant].update(clean=clean, golden=golden)
    detail = pd.DataFrame(rows)
    summary = summarize(detail, info)
    detail.to_csv(out / "fault_aware_training_detail.csv", index=False)
    summary.to_csv(out / "fault_aware_training.csv", index=False)
    written = ["fault_aware_training.csv", "fault_aware_training_detail.csv"]
    if not a.no_plots:
        plot(summary, out / "fault_aware_training.png", a.model, a.epochs, ev.n)
        written.append("fault_aware_training.png")

    for fmt in plan:
        s = summary[summary["format"] == fmt]
        clean = ", ".join(f"{v} {info[fmt, v]['clean']:.4f}" for v in VARIANTS)
        print(f"\n{fmt}: clean top-1 {clean}")
        table = s.pivot_table(index="ber", columns="model", values="top1_mean", sort=False)[list(VARIANTS)]
        fa = s[s["model"] == "fault_aware"].set_index("ber")
        if "delta_top1" in fa:
            table["fault_aware - normal [95% CI]"] = [
                f"{r.delta_top1:+.4f} [{r.delta_ci_low:+.4f}, {r.delta_ci_high:+.4f}]"
                for r in fa.itertuples()
            ]
        table.index = [f"{b:g}" for b in table.index]
        table.index.name = "ber"
        print(table.to_string(float_format=lambda v: f"{v:.4f}"))
    print(f"\n{len(models)} trainings and {len(detail)} trials in {time.perf_counter() - t0:.1f} s "
          f"-> {out}/: {', '.join(written)}")


if __name__ == "__main__":
    try:
        main()
    except QfiError as e:  # a bad flag: the message names the value and what is allowed
        raise SystemExit(f"{os.path.basename(__file__)}: error: {e}") from None
