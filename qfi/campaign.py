"""Campaigns: a config becomes a plan of trials, trials become rows, rows become CSVs.

* golden (fp32, no emulation) is evaluated once per run, clean-quantized once per
  (format, name group); a trial whose fault has zero flips is answered from the clean result;
* every trial has a deterministic seed derived from the campaign seed and the trial's key;
* rows are appended to ``detail.csv`` as they finish, so a killed campaign restarted with the
  same command skips the finished trials and ends with the same CSVs as an uninterrupted run.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import hashlib
import json
import os
import platform
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

import qfi
from qfi.config import CampaignConfig, parse_bits
from qfi.errors import QfiError
from qfi.evaluate import EvalResult, Evaluator
from qfi.results import DETAIL_COLUMNS, summarize, write_tables
from quant_schemes import get_format

KEY_COLUMNS = ("format", "target", "names", "fault", "ber", "count", "bit", "rep")


@dataclass(frozen=True)
class Trial:
    """One cell of the plan."""

    index: int
    format: str
    names: str
    fault: str  # "ber" or "flips"
    ber: float
    count: int
    bit: int  # -1: any bit of the code
    rep: int
    seed: int

    def key(self, target: str) -> tuple[str, ...]:
        return (
            self.format,
            target,
            self.names,
            self.fault,
            repr(self.ber),
            str(self.count),
            str(self.bit),
            str(self.rep),
        )

    def fault_model(self) -> Any:
        bits = None if self.bit < 0 else self.bit
        if self.fault == "ber":
            return qfi.BitFlip(ber=self.ber, bits=bits)
        return qfi.FlipCount(count=self.count, bits=bits)

    @property
    def certainly_clean(self) -> bool:
        return (self.fault == "ber" and self.ber == 0.0) or (self.fault == "flips" and self.count == 0)


def resolve_device(spec: str) -> torch.device:
    """``auto`` picks CUDA when present, else the CPU."""
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(spec)
    except RuntimeError:
        raise QfiError(f"unknown device {spec!r}; allowed: auto, cpu, cuda, cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise QfiError(f"device {spec!r} asked for, but torch sees no CUDA device here; use --device cpu")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise QfiError(f"device {spec!r}: torch sees {torch.cuda.device_count()} CUDA device(s), cuda:0..")
    if dev.type not in ("cpu", "cuda"):
        raise QfiError(f"unknown device {spec!r}; allowed: auto, cpu, cuda, cuda:N")
    return dev


def trial_seed(campaign_seed: int, key: tuple[str, ...]) -> int:
    """A 63-bit seed from the campaign seed and the trial key (stable across runs and machines)."""
    h = hashlib.sha256(("|".join((str(campaign_seed),) + key)).encode()).digest()
    return int.from_bytes(h[:8], "little") >> 1


def plan(cfg: CampaignConfig) -> list[Trial]:
    """Every trial of the campaign, in a fixed order (format, name group, bit, rate/count, rep)."""
    trials: list[Trial] = []
    for fmt_name in cfg.formats:
        fmt = get_format(fmt_name)
        for names in cfg.names:
            for bit in dict.fromkeys(parse_bits(cfg.bits, fmt.bits)):
                conds = [("ber", p, 0) for p in cfg.ber] + [("flips", 0.0, n) for n in cfg.flips]
                for fault, ber, count in conds:
                    for rep in range(cfg.reps):
                        t = Trial(len(trials), fmt.name, names, fault, ber, count, bit, rep, 0)
                        trials.append(dataclasses.replace(t, seed=trial_seed(cfg.seed, t.key(cfg.target))))
    return trials


@dataclass
class CampaignResult:
    out: Path
    detail: Any  # pandas.DataFrame
    summary: Any
    trials_run: int  # trials executed in this call (not resumed)
    trials_resumed: int
    evaluations: int  # model passes over the data in this call, golden and clean included
    seconds: float


def model_hash(model: nn.Module) -> str:
    h = hashlib.sha256()
    for name, t in model.state_dict().items():
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def _versions() -> dict[str, str]:
    from importlib.metadata import version

    import numpy
    import pandas

    return {
        "qfi": version("qfi"),
        "torch": torch.__version__,
        "numpy": numpy.__version__,
        "pandas": pandas.__version__,
        "python": platform.python_version(),
    }


def _finished_rows(path: Path) -> dict[tuple[str, ...], dict[str, str]]:
    """The complete rows of an existing ``detail.csv`` by trial key (a half-written last line,
    left by a kill, is ignored)."""
    if not path.exists():
        return {}
    raw = path.read_bytes()
    raw = raw[: raw.rfind(b"\n") + 1]  # killed mid-line: drop the partial row
    reader = csv.DictReader(raw.decode().splitlines())
    rows = list(reader)
    if rows and list(reader.fieldnames or ()) != list(DETAIL_COLUMNS):
        raise QfiError(f"{path} has other columns than this version of qfi writes; use --fresh")
    return {_row_key(r): r for r in rows}


def _row_key(row: dict[str, str]) -> tuple[str, ...]:
    """A detail.csv row's trial key (equal to ``Trial.key`` of the trial that wrote it)."""
    return tuple(row[c] for c in KEY_COLUMNS)


class _DetailLog:
    """``detail.csv`` opened for appending, one flushed line per finished trial."""

    def __init__(self, path: Path, done: dict[tuple[str, ...], dict[str, str]]) -> None:
        self.path = path
        new = not done
        if not new:  # drop a half-written last line before appending
            raw = path.read_bytes()
            if not raw.endswith(b"\n"):
                path.write_bytes(raw[: raw.rfind(b"\n") + 1])
        self.f = open(path, "w" if new else "a", newline="")
        self.w = csv.writer(self.f, lineterminator="\n")
        if new:
            self.w.writerow(DETAIL_COLUMNS)
            self.f.flush()

    def add(self, row: dict[str, Any]) -> None:
        self.w.writerow([_fmt(row[c]) for c in DETAIL_COLUMNS])
        self.f.flush()

    def close(self) -> None:
        self.f.close()


def _fmt(v: Any) -> str:
    if isinstance(v, bool):
        return str(int(v))
    if isinstance(v, float):
        return repr(v)
    return str(v)


_OUTPUTS = ("summary.csv", "per_bit.csv", "per_format.csv", "per_bit.png", "per_format.png")


def _same_campaign(old: dict[str, Any], cfg: CampaignConfig, mhash: str) -> bool:
    """Whether an earlier run's manifest describes ``cfg`` on the same model (``out`` aside)."""
    try:
        same = CampaignConfig.from_dict(old["config"]).identity() == cfg.identity()
    except (QfiError, KeyError, TypeError):
        return False
    return same and old.get("model_hash") == mhash


def _filters(cfg: CampaignConfig, names: str) -> tuple[str | None, str | None]:
    """(include, exclude) for one name group: an empty string selects everything."""
    return (names or None), (cfg.exclude or None)


def _check_names(cfg: CampaignConfig, model: nn.Module) -> None:
    """Every name group selects something (QfiError with the nearest names otherwise)."""
    select = qfi.select_weights if cfg.target == "weights" else qfi.select_modules
    for names in cfg.names:
        include, exclude = _filters(cfg, names)
        select(model, names=include, exclude=exclude)


@contextlib.contextmanager
def _format_session(
    cfg: CampaignConfig, model: nn.Module, fmt_name: str, names: str, calib: list[torch.Tensor]
) -> Iterator[Any]:
    include, exclude = _filters(cfg, names)
    if cfg.target == "weights":
        with qfi.weights(model, fmt_name, names=include, exclude=exclude) as s:
            yield s
    else:
        with qfi.activations(
            model, fmt_name, names=include, exclude=exclude, calibrate=calib, dynamic=cfg.dynamic
        ) as s:
            yield s


def _calibration_inputs(batches: list[torch.Tensor], n: int) -> list[torch.Tensor]:
    """The first ``n`` samples of ``batches`` (activation scales are calibrated on them, then frozen)."""
    out, seen = [], 0
    for x in batches:
        if seen >= n:
            break
        out.append(x[: n - seen])
        seen += len(out[-1])
    return out


def _run_trial(
    cfg: CampaignConfig,
    session: Any,
    trial: Trial,
    model: nn.Module,
    evaluator: Evaluator,
    clean: EvalResult,
    shortcut: bool,
) -> tuple[EvalResult, int, bool]:
    """Returns (result, flips, evaluated)."""
    fault = trial.fault_model()
    if shortcut and trial.certainly_clean:
        return clean, 0, False
    if cfg.target == "weights":
        log = session.apply(fault, seed=trial.seed)
        try:
            if shortcut and log.flips == 0:
                return clean, 0, False
            return evaluator(model), log.flips, True
        finally:
            session.undo()
    with session.inject(fault, seed=trial.seed) as log:
        res = evaluator(model)
    return res, log.flips, True


def run_campaign(
    cfg: CampaignConfig,
    *,
    model: nn.Module | None = None,
    dataset: Any = None,
    fresh: bool = False,
    progress: bool | None = None,
    shortcut: bool = True,
    plots: bool = True,
) -> CampaignResult:
    """Run (or resume) a campaign and write ``detail.csv``, ``summary.csv``, the per-bit /
    per-format tables, ``manifest.json`` and plots under ``cfg.out``.

    ``model`` / ``dataset`` override ``cfg.model`` / ``cfg.data`` (for the Python API);
    ``shortcut=False`` evaluates zero-flip trials instead of answering them from the clean result.
    """
    from tqdm.auto import tqdm

    from qfi import zoo

    t0 = time.perf_counter()
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    device = resolve_device(cfg.device)
    model_given = None if model is None else type(model).__name__
    if model is None:
        model = zoo.load_model(cfg.model, weights=cfg.weights, device=device)
    model = model.to(device).eval()
    if dataset is None:
        data_spec = cfg.data or zoo.default_data_for(cfg.model)
        dataset = zoo.load_data(
            data_spec, split="test", image_size=cfg.image_size, mean=cfg.mean, std=cfg.std
        )
    else:
        data_spec = f"<{type(dataset).__name__} passed to run_campaign>"
    evaluator = Evaluator(dataset, batch_size=cfg.batch_size, device=device, limit=cfg.limit)
    calib: list[torch.Tensor] = []
    calib_info = None
    if cfg.target == "activations":
        # calibrate on held-in data: calibrate_data, else the digits training split, else (no
        # training data known) the first evaluation samples
        source = evaluator
        calib_spec = cfg.calibrate_data or ("digits" if data_spec == "digits" else None)
        if calib_spec is not None:
            calib_set = zoo.load_data(
                calib_spec, split="train", image_size=cfg.image_size, mean=cfg.mean, std=cfg.std
            )
            source = Evaluator(calib_set, cfg.batch_size, device, cfg.calibrate)
        calib = _calibration_inputs(source.inputs(), cfg.calibrate)
        calib_info = {
            "spec": calib_spec or "the first evaluation samples",
            "samples": sum(len(x) for x in calib),
            "dynamic": cfg.dynamic,
        }

    trials = plan(cfg)
    keyed = {t.key(cfg.target): t for t in trials}  # plan order
    _check_names(cfg, model)  # a name filter matching nothing fails before anything is written
    manifest_path, detail_path = out / "manifest.json", out / "detail.csv"
    mhash = model_hash(model)
    done: dict[tuple[str, ...], dict[str, str]] = {}
    if not fresh:
        done = _finished_rows(detail_path)
        try:
            old = json.loads(manifest_path.read_text()) if manifest_path.exists() else None
        except json.JSONDecodeError:
            old = {}
        if done and old is None:
            raise QfiError(
                f"{detail_path} holds trials but {manifest_path.name} is missing, so they cannot be "
                "checked against this campaign; use another --out or --fresh to overwrite"
            )
        if done and not _same_campaign(old, cfg, mhash):
            raise QfiError(
                f"{out} holds results of a different campaign (config or model differ); "
                "use another --out or --fresh to overwrite"
            )
        seeds = {k: str(t.seed) for k, t in keyed.items()}
        if any(k in seeds and r["seed"] != seeds[k] for k, r in done.items()):
            raise QfiError(f"{detail_path} holds trials with other seeds; use another --out or --fresh")
    if not done:  # a fresh campaign must not leave an earlier one's tables and plots behind
        for stale in _OUTPUTS:
            (out / stale).unlink(missing_ok=True)
    manifest = {
        "config": cfg.to_dict(),
        "model": cfg.model if model_given is None else f"<{model_given} passed to run_campaign>",
        "model_hash": mhash,
        "data": {"spec": data_spec, "samples": evaluator.n},
        "calibration": calib_info,
        "trials": len(trials),
        "versions": _versions(),
        "device": str(device),
    }
    tmp = out / "manifest.json.tmp"
    tmp.write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, manifest_path)

    detail = _DetailLog(detail_path, done)
    todo = [t for k, t in keyed.items() if k not in done]
    resumed = len(keyed) - len(todo)
    evals_before = evaluator.calls
    with contextlib.ExitStack() as stack:
        stack.callback(detail.close)
        if todo:
            golden = evaluator(model)
            groups: dict[tuple[str, str], list[Trial]] = {}
            for t in todo:
                groups.setdefault((t.format, t.names), []).append(t)
            bar = tqdm(
                total=len(todo),
                desc="qfi",
                unit="trial",
                dynamic_ncols=True,
                disable=None if progress is None else not progress,  # None: only on a terminal
            )
            stack.callback(bar.close)
            for (fmt_name, names), group in groups.items():
                fmt = get_format(fmt_name)
                with _format_session(cfg, model, fmt_name, names, calib) as session:
                    clean = evaluator(model)
                    for t in group:
                        res, flips, evaluated = _run_trial(cfg, session, t, model, evaluator, clean, shortcut)
                        detail.add(_row(cfg, fmt, t, res, flips, evaluated, clean, golden))
                        bar.set_postfix_str(
                            f"{fmt_name} {t.fault}={t.ber if t.fault == 'ber' else t.count} bit={t.bit}",
                            refresh=False,
                        )
                        bar.update(1)

    import pandas as pd

    # Canonical order (plan order) so a resumed run writes exactly the same file.
    with open(out / "detail.csv", newline="") as f:
        rows = [r for r in csv.DictReader(f) if _row_key(r) in keyed]
    rows.sort(key=lambda r: keyed[_row_key(r)].index)
    tmp = out / "detail.csv.tmp"
    with open(tmp, "w", newline="") as f:
        w = csv.writer(f, lineterminator="\n")
        w.writerow(DETAIL_COLUMNS)
        for r in rows:
            w.writerow([r[c] for c in DETAIL_COLUMNS])
    os.replace(tmp, out / "detail.csv")
    detail_df = pd.read_csv(out / "detail.csv", keep_default_na=False)
    summary = summarize(detail_df)
    write_tables(detail_df, summary, out, plots=plots)
    seconds = time.perf_counter() - t0
    return CampaignResult(
        out, detail_df, summary, len(todo), resumed, evaluator.calls - evals_before, seconds
    )


def _row(
    cfg: CampaignConfig,
    fmt: Any,
    t: Trial,
    res: EvalResult,
    flips: int,
    evaluated: bool,
    clean: EvalResult,
    golden: EvalResult,
) -> dict[str, Any]:
    return {
        "format": t.format,
        "target": cfg.target,
        "names": t.names,
        "fault": t.fault,
        "ber": t.ber,
        "count": t.count,
        "bit": t.bit,
        "bit_name": "any" if t.bit < 0 else fmt.bit_names[t.bit],
        "rep": t.rep,
        "seed": t.seed,
        "flips": flips,
        "top1": res.top1,
        "top5": res.top5,
        "sdc": res.sdc(clean),
        "due": res.due,
        "clean_top1": clean.top1,
        "clean_top5": clean.top5,
        "golden_top1": golden.top1,
        "golden_top5": golden.top5,
        "evaluated": evaluated,
    }
