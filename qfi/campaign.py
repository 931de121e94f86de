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
import io
import json
import logging
import math
import os
import platform
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

import qfi
from qfi import outputs
from qfi.config import CampaignConfig, parse_bits
from qfi.errors import Interrupted, NonFiniteBaseline, OutputFolderBusy, QfiError
from qfi.evaluate import EvalResult, Evaluator
from qfi.faults import DENSE_FLIPS, SAMPLER_VERSION
from qfi.results import detail_columns, metric_columns_of, summarize, write_tables
from quant_schemes import get_format, part_bit_names, part_bits

log = logging.getLogger("qfi")

KEY_COLUMNS = ("format", "target", "names", "fault", "ber", "count", "bit", "rep")
OBSERVED = "_observed"  # a row's observer rows, taken off by the driver before detail.csv


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

    def fault_model(self, stuck_at: int | None = None) -> Any:
        """BitFlip / FlipCount, or with ``stuck_at`` StuckAt(that value) at the same rate or count."""
        bits = None if self.bit < 0 else self.bit
        if stuck_at is not None:
            if self.fault == "ber":
                return qfi.StuckAt(stuck_at, ber=self.ber, bits=bits)
            return qfi.StuckAt(stuck_at, count=self.count, bits=bits)
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


def bit_part(cfg: CampaignConfig) -> str:
    """The stored part whose bit positions a per-bit sweep numbers: ``codes`` unless ``part``
    names another (``all`` on a format with several parts is refused by the config)."""
    return "codes" if cfg.part == "all" else cfg.part


def batch_seed(seed: int, batch: int) -> int:
    """The seed of batch ``batch``'s fault draw in a trial of seed ``seed`` (``--policy batch`` /
    ``inference``): a 63-bit hash, so each batch's faults can be drawn again (replayed) alone."""
    h = hashlib.sha256(f"{seed}|batch|{batch}".encode()).digest()
    return int.from_bytes(h[:8], "little") >> 1


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
            for bit in dict.fromkeys(parse_bits(cfg.bits, part_bits(fmt, bit_part(cfg)))):
                conds = [("ber", p, 0) for p in cfg.ber] + [("flips", 0.0, n) for n in cfg.flips]
                for fault, ber, count in conds:
                    for rep in range(cfg.max_reps):
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
    metric: Any = None  # the qfi.metrics.Metric that scored the trials


def model_hash(model: nn.Module) -> str:
    """A short hash of the state dict: names, dtypes, shapes and bytes of every tensor (0-d ones,
    such as BatchNorm's ``num_batches_tracked``, included)."""
    h = hashlib.sha256()
    for name, t in model.state_dict().items():
        h.update(name.encode())
        if not isinstance(t, torch.Tensor):  # extra state of a custom module
            h.update(repr(t).encode())
            continue
        h.update(f"{t.dtype}{tuple(t.shape)}".encode())
        flat = t.detach().cpu().contiguous().reshape(-1)
        if flat.is_quantized:
            flat = flat.int_repr()
        h.update(flat.view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    import numpy
    import pandas

    try:
        qfi_version = version("qfi")
    except PackageNotFoundError:  # run from a source tree that was not installed
        qfi_version = "unknown (not installed)"
    return {
        "qfi": qfi_version,
        "torch": torch.__version__,
        "numpy": numpy.__version__,
        "pandas": pandas.__version__,
        "python": platform.python_version(),
    }


#: calibration data is scored by nothing: a metric that needs no targets
_NO_TARGETS = "cosine"

_INT_COLUMNS = ("count", "bit", "rep", "seed", "flips", "evaluated")
_TEXT_COLUMNS = ("format", "target", "names", "fault", "bit_name")


def _finished_rows(
    path: Path, metric_columns: tuple[str, ...] | None = None
) -> dict[tuple[str, ...], dict[str, str]]:
    """The complete rows of an existing ``detail.csv`` by trial key, the first of duplicated keys
    kept (a half-written last line, left by a kill, is ignored).  A row that is not what qfi
    writes (hand-edited, truncated in the middle, another tool's file) is a QfiError naming the
    file, the line and the column.  ``metric_columns`` (None: whatever the header says, for a
    metric plug-in whose columns are not known yet) fixes the expected header."""
    if not path.exists():
        return {}
    raw = path.read_bytes()
    raw = raw[: raw.rfind(b"\n") + 1]  # killed mid-line: drop the partial row
    try:
        text = raw.decode()
    except UnicodeDecodeError:
        raise QfiError(f"{path} is not a text CSV; use another --out or --fresh") from None
    reader = csv.DictReader(text.splitlines())
    rows = list(reader)
    header = list(reader.fieldnames or ())
    expected = detail_columns(metric_columns) if metric_columns else None
    if (rows or header) and (metric_columns_of(header) is None or (expected and tuple(header) != expected)):
        raise QfiError(
            f"{path} holds results of another campaign (other metric columns, or an older qfi): "
            "use another --out, or --fresh to overwrite them"
        )
    done: dict[tuple[str, ...], dict[str, str]] = {}
    for line, r in enumerate(rows, start=2):
        _check_row(path, line, r, header)
        done.setdefault(_row_key(r), r)
    return done


def _check_row(path: Path, line: int, r: dict[str, Any], columns: list[str]) -> None:
    def bad(col: str, why: str) -> QfiError:
        return QfiError(
            f"{path}, line {line}: column {col!r} {why}; the file was edited or is corrupt: "
            "fix or delete that line, or start over with --fresh"
        )

    if None in r or any(v is None for v in r.values()):
        raise bad("(row)", "has another number of fields than the header")
    for c in columns:
        v = r[c]
        if c in _TEXT_COLUMNS:
            continue
        try:
            if c in _INT_COLUMNS:
                int(v)
            else:
                float(v)
        except ValueError:
            kind = "an integer" if c in _INT_COLUMNS else "a number"
            raise bad(c, f"holds {v!r}, not {kind}") from None


def _row_key(row: dict[str, str]) -> tuple[str, ...]:
    """A detail.csv row's trial key (equal to ``Trial.key`` of the trial that wrote it)."""
    return tuple(row[c] for c in KEY_COLUMNS)


class _DetailLog:
    """``detail.csv`` opened for appending, one flushed line per finished trial.  Resuming, the
    finished rows are first written back once per trial key (dropping duplicates and a
    half-written last line a kill may have left)."""

    def __init__(
        self, path: Path, done: dict[tuple[str, ...], dict[str, str]], columns: tuple[str, ...]
    ) -> None:
        self.path, self.columns = path, columns
        if done:
            _atomic_write(path, _csv_text(columns, done.values()))
        self.f = open(path, "a" if done else "w", newline="")
        self.w = csv.writer(self.f, lineterminator="\n")
        if not done:
            self.w.writerow(columns)
            self.f.flush()

    def add(self, row: dict[str, Any]) -> None:
        self.w.writerow([_fmt(row[c]) for c in self.columns])
        self.f.flush()

    def close(self) -> None:
        self.f.close()


class _ObserverLog:
    """``observers.csv`` opened for appending: the observer rows of each finished trial, flushed
    (rows of a trial written twice by a kill and a resume are dropped at the end, ``tidy_csv``)."""

    def __init__(self, path: Path, columns: tuple[str, ...], fresh: bool) -> None:
        self.columns = columns
        new = fresh or not path.exists()
        if not new:  # a kill may have left half a line: cut the file after its last whole line
            data = path.read_bytes()
            if data and not data.endswith(b"\n"):
                with open(path, "r+b") as f:
                    f.truncate(data.rfind(b"\n") + 1)
        self.f = open(path, "w" if new else "a", newline="")
        self.w = csv.writer(self.f, lineterminator="\n")
        if new:
            self.w.writerow(columns)
            self.f.flush()

    def add(self, rows: list[dict[str, Any]]) -> None:
        self.w.writerows([_fmt(r[c]) for c in self.columns] for r in rows)
        self.f.flush()

    def close(self) -> None:
        self.f.close()


def _csv_text(columns: tuple[str, ...], rows: Any) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(columns)
    for r in rows:
        w.writerow([r[c] for c in columns])
    return buf.getvalue()


def _fmt(v: Any) -> str:
    if isinstance(v, bool):
        return str(int(v))
    if isinstance(v, float):
        return repr(v)
    return str(v)


_OUTPUTS = (
    "summary.csv", "per_bit.csv", "per_format.csv", "per_bit.png", "per_format.png", "quantization.csv",
    "per_layer.csv", "per_layer.png", "observers.csv",
)
#: every file name qfi writes in an output folder: a folder holding any of them without a qfi
#: manifest belongs to someone else and is never overwritten
_OURS = ("manifest.json", "detail.csv", *_OUTPUTS)
LOCK_NAME = ".qfi.lock"
#: the keys of manifest.json that qfi writes itself (``run_campaign(manifest_extra=)`` adds others)
_MANIFEST_KEYS = (
    "config", "model", "model_hash", "data", "calibration", "trials", "versions", "device", "sampler",
)


class _FolderLock:
    """An exclusive OS lock (``flock``) on ``<folder>/.qfi.lock`` for one campaign run.

    The kernel drops the lock when its process dies, so a lock file left by a killed run never
    blocks a resume; the file names the holder (pid, host, start time) for the error message of
    a second writer.  The file is removed on release; an opener that raced with that removal
    notices (the path then names another inode) and tries again."""

    def __init__(self, folder: Path) -> None:
        self.path = folder / LOCK_NAME
        self.fd: int | None = None

    def acquire(self) -> None:
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            if not _try_lock(fd):
                holder = os.pread(fd, 4096, 0).decode(errors="replace").strip() or "a process"
                os.close(fd)
                raise OutputFolderBusy(
                    f"output folder {self.path.parent} is in use by another qfi campaign ({holder}); "
                    "wait for it to finish or choose another --out"
                )
            try:
                same = os.stat(self.path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        info = (
            f"pid {os.getpid()} on {platform.node() or 'this host'}, "
            f"started {time.strftime('%Y-%m-%d %H:%M:%S')}"
        )
        os.ftruncate(fd, 0)
        os.pwrite(fd, (info + "\n").encode(), 0)
        self.fd = fd

    def release(self) -> None:
        if self.fd is None:
            return
        with contextlib.suppress(OSError):
            self.path.unlink()
        os.close(self.fd)  # closing drops the lock
        self.fd = None


def _try_lock(fd: int) -> bool:
    """Take an exclusive non-blocking lock on ``fd``; False when another process holds it."""
    try:
        import fcntl
    except ImportError:  # Windows
        import msvcrt

        try:
            msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)  # type: ignore[attr-defined]
            return True
        except OSError:
            return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False


def _read_manifest(path: Path) -> dict[str, Any] | None:
    """An earlier run's manifest, or None when ``path`` is missing or not a qfi manifest."""
    try:
        d = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    ok = isinstance(d, dict) and isinstance(d.get("config"), dict) and "model_hash" in d
    return d if ok else None


def _check_out_folder(out: Path, fresh: bool) -> None:
    """Refuse an ``out`` that is a file, or a folder holding files of qfi's names that no qfi
    campaign wrote (no manifest of ours): they are someone else's and must not be overwritten.
    Reads only; changes nothing."""
    if out.exists() and not out.is_dir():
        raise QfiError(f"--out {out} is a file, not a folder; choose another --out")
    if not out.is_dir() or fresh:
        return
    if _read_manifest(out / "manifest.json") is not None:
        return
    theirs = [n for n in _OURS if (out / n).exists()]
    if theirs:
        raise QfiError(
            f"{out} holds {', '.join(theirs)} but no qfi campaign manifest, so qfi did not write "
            "them; refusing to overwrite them: choose another --out (or --fresh to overwrite)"
        )


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
    if cfg.observe:
        qfi.select_modules(model, names=cfg.observe)
    for names in cfg.names:
        include, exclude = _filters(cfg, names)
        if cfg.target == "weights":
            qfi.select_weights(model, names=include, exclude=exclude, bn_stats=cfg.bn_stats)
        else:
            qfi.select_modules(model, names=include, exclude=exclude)


@contextlib.contextmanager
def _format_session(
    cfg: CampaignConfig, model: nn.Module, fmt_name: str, names: str, calib: list[torch.Tensor]
) -> Iterator[Any]:
    include, exclude = _filters(cfg, names)
    if cfg.target == "weights":
        with qfi.weights(
            model, fmt_name, names=include, exclude=exclude, bn_stats=cfg.bn_stats, part=cfg.part
        ) as s:
            yield s
    else:
        with qfi.activations(
            model,
            fmt_name,
            names=include,
            exclude=exclude,
            calibrate=calib,
            dynamic=cfg.dynamic,
            output=cfg.output_key,
            part=cfg.part,
        ) as s:
            yield s


def _calibration_inputs(batches: list[Any], n: int) -> list[Any]:
    """The first ``n`` samples of ``batches`` (activation scales are calibrated on them, then frozen)."""
    from qfi.evaluate import batch_len, slice_inputs

    out, seen = [], 0
    for x in batches:
        if seen >= n:
            break
        k = min(batch_len(x), n - seen)
        out.append(slice_inputs(x, k))
        seen += k
    return out


def _run_trial(
    cfg: CampaignConfig,
    session: Any,
    trial: Trial,
    model: nn.Module,
    evaluator: Evaluator,
    clean: EvalResult,
    shortcut: bool,
    prefix: Any = None,
) -> tuple[EvalResult, int, bool]:
    """Returns (result, flips, evaluated).  ``prefix`` (a recorded ``qfi.prefix.PrefixCache``)
    serves the fault-free start of the forward; if the forward spoils the cache (writes into a
    cached tensor), the cache turns itself off and the trial is rerun without it."""
    fault = trial.fault_model(cfg.stuck_at)
    if shortcut and trial.certainly_clean:
        return clean, 0, False
    if cfg.policy != "trial":  # a new draw per batch (or per inference: batches of one)
        logs: list[Any] = []

        @contextlib.contextmanager
        def around(i: int) -> Iterator[None]:
            with session.inject(fault, seed=batch_seed(trial.seed, i)) as log:
                logs.append(log)
                yield

        res = evaluator(model, around_batch=around)
        return res, sum(lg.flips for lg in logs), True
    use = prefix if prefix is not None and prefix.active else None

    def evaluate() -> EvalResult:  # without a cache, exactly the call it always was
        return evaluator(model) if use is None else evaluator(model, prefix=use)

    if cfg.target == "weights":
        log = session.apply(fault, seed=trial.seed)
        try:
            if shortcut and log.flips == 0:
                return clean, 0, False
            res = evaluate()
            if use is not None and not use.active:
                res = evaluator(model)
            return res, log.flips, True
        finally:
            session.undo()
    with session.inject(fault, seed=trial.seed) as log:
        res = evaluate()
    if use is not None and not use.active:  # the same sites again: same seed, fresh generator
        with session.inject(fault, seed=trial.seed) as log:
            res = evaluator(model)
    return res, log.flips, True


class TrialContext:
    """What running trials needs, on the driver or on a worker: the model, its evaluator and
    calibration inputs, the golden baseline; it enters a group's session, computes its clean
    baseline and turns trials into rows.

    ``prefix`` (default: the config's ``prefix_reuse``) serves the fault-free start of each
    trial's forward from clean activations cached per group (``qfi.prefix``), at most
    ``cache_mb`` MiB of them (default: the config's ``cache_mb``); the rows are the same.  The
    cache is recorded by the group's clean baseline (a Ray worker, which runs none, records it at
    its first evaluated trial of the group) and dropped when the group's session ends."""

    def __init__(
        self,
        cfg: CampaignConfig,
        model: nn.Module,
        evaluator: Evaluator,
        calib: list[Any],
        shortcut: bool,
        golden: EvalResult | None,
        golden_values: dict[str, float],
        prefix: bool | None = None,
        cache_mb: float | None = None,
    ) -> None:
        from qfi.prefix import DEFAULT_CACHE_MB

        self.cfg, self.model, self.evaluator, self.calib = cfg, model, evaluator, calib
        self.shortcut = shortcut
        self.golden, self.golden_values = golden, golden_values
        self.metric = evaluator.metric
        self.prefix = bool(getattr(cfg, "prefix_reuse", False)) if prefix is None else prefix
        if cache_mb is None:
            cache_mb = getattr(cfg, "cache_mb", None)
        self.cache_mb = DEFAULT_CACHE_MB if cache_mb is None else cache_mb
        self._cache: tuple[Any, Any] | None = None  # (session, its PrefixCache)
        self._warned: set[str] = set()
        self.observer: Any = None
        self._observed: tuple[str, str] | None = None  # the group whose clean run is the reference
        if cfg.observe is not None:
            from qfi.observers import Observer

            self.observer = Observer(model, names=cfg.observe or None)
            self.prefix = False  # observers compare every module: none may be served from a cache

    @contextlib.contextmanager
    def session(self, fmt_name: str, names: str) -> Iterator[Any]:
        with _format_session(self.cfg, self.model, fmt_name, names, self.calib) as s:
            try:
                yield s
            finally:
                if self._cache is not None and self._cache[0] is s:
                    self._cache = None  # the cached activations belong to this session

    def clean_baseline(self, session: Any, fmt_name: str, names: str) -> tuple[EvalResult, dict[str, float]]:
        """The clean result of a group (checked, warned about) and its clean/golden row values."""
        cfg, metric = self.cfg, self.metric
        if self.prefix:  # the clean pass also records the group's prefix cache
            cache = self._new_prefix_cache(session, names)
            clean = self.evaluator(self.model, prefix=cache if cache.begin() else None)
            if not cache.end(self.evaluator.inputs()):  # recorded outputs not reproducible
                clean = self.evaluator(self.model)
            self._cache = (session, cache)
        elif self.observer is not None:  # the clean pass is the observers' reference
            clean = self.observer.record_reference(lambda: self.evaluator(self.model))
            self._observed = (fmt_name, names)
        else:
            clean = self.evaluator(self.model)
        what = f"clean ({fmt_name}, names {names or 'all'!r})"
        _check_baseline(cfg, clean, what, self.model, self.evaluator)
        never = getattr(session, "never_called", [])
        if never:
            more = f" and {len(never) - 5} more" if len(never) > 5 else ""
            log.warning(
                "%d selected module(s) never run in the forward, so they carry no faults: %s%s",
                len(never),
                ", ".join(never[:5]),
                more,
            )
        clean_values = clean.values(self.golden)
        _warn_if_crushed(what, metric, clean_values, self.golden_values)
        base = {f"clean_{c}": clean_values[c] for c in metric.columns}
        base.update({f"golden_{c}": self.golden_values[c] for c in metric.columns})
        return clean, base

    def _warn_once(self, msg: str) -> None:
        if msg not in self._warned:
            self._warned.add(msg)
            log.warning("%s", msg)

    def prefix_cache(self, session: Any, names: str) -> Any:
        """The group's ``PrefixCache`` (recorded by ``clean_baseline``, else on the first call for
        ``session``, whose model must be clean then: a worker gets no clean baseline to run), or
        None without prefix reuse."""
        if not self.prefix:
            return None
        if self._cache is None or self._cache[0] is not session:
            self._cache = (session, self._new_prefix_cache(session, names).record(self.evaluator.inputs()))
        return self._cache[1]

    def _new_prefix_cache(self, session: Any, names: str) -> Any:
        from qfi.prefix import prefix_cache

        label = f"names {names or 'all'!r}"
        return prefix_cache(self.model, session, None, self.cache_mb, label, self._warn_once)

    def row(self, session: Any, t: Trial, clean: EvalResult, base: dict[str, float]) -> dict[str, Any]:
        certain = self.shortcut and t.certainly_clean
        prefix = None if certain else self.prefix_cache(session, t.names)
        obs = self.observer
        if obs is None:
            res, flips, evaluated = _run_trial(
                self.cfg, session, t, self.model, self.evaluator, clean, self.shortcut, prefix
            )
            return _row(self.cfg, get_format(t.format), t, res, flips, evaluated, clean, base)
        if self._observed != (t.format, t.names):  # a later wave or a Ray worker: record it again
            obs.record_reference(lambda: self.evaluator(self.model))
            self._observed = (t.format, t.names)
        with obs.measuring() as measured:
            res, flips, evaluated = _run_trial(
                self.cfg, session, t, self.model, self.evaluator, clean, self.shortcut, prefix
            )
        if not evaluated:  # answered from the clean result: exactly the reference
            measured = obs.unchanged_rows()
        obs.rows.clear()  # the campaign writes them: nothing accumulates over trials
        row = _row(self.cfg, get_format(t.format), t, res, flips, evaluated, clean, base)
        keys = {k: row[k] for k in KEY_COLUMNS}
        row[OBSERVED] = [{**keys, **m} for m in measured]
        return row


class LocalExecutor:
    """Trials in this process, group by group: one session and one clean baseline per group."""

    name = "local"

    def __init__(self) -> None:
        self._cleans: dict[tuple[str, str], tuple[EvalResult, dict[str, float]]] = {}

    def run(
        self,
        ctx: TrialContext,
        groups: list[tuple[tuple[str, str], list[Trial]]],
        emit: Callable[[dict[str, Any]], None],
    ) -> int:
        """Run every trial, ``emit`` each row; returns the evaluations run besides the driver's
        evaluator (none here).  Called once per wave of a sequentially stopped campaign: a group's
        clean baseline is computed the first time only."""
        for (fmt_name, names), trials in groups:
            with ctx.session(fmt_name, names) as session:
                if (fmt_name, names) not in self._cleans:
                    self._cleans[(fmt_name, names)] = ctx.clean_baseline(session, fmt_name, names)
                clean, base = self._cleans[(fmt_name, names)]
                for t in trials:
                    emit(ctx.row(session, t, clean, base))
        return 0

    def close(self) -> None:
        self._cleans = {}


def _condition(key: tuple[str, ...]) -> tuple[str, ...]:
    """A trial key without its repetition: the condition it belongs to."""
    return key[:-1]


def ci_half_width(values: list[float]) -> float:
    """95% Student-t half-width of the mean of ``values`` (inf for fewer than two; the same rule
    as ``summary.csv``'s interval; NaN values, a cosine with every output non-finite, are left out)."""
    import numpy as np

    from qfi.results import t_quantile_975

    v = np.asarray([x for x in values if x == x], dtype=float)
    if len(v) < 2:
        return math.inf
    return float(t_quantile_975(np.array([len(v) - 1]))[0] * v.std(ddof=1) / math.sqrt(len(v)))


def _next_wave(
    cfg: CampaignConfig,
    keyed: dict[tuple[str, ...], Trial],
    seen: dict[tuple[str, ...], dict[str, Any]],
    primary: str,
) -> list[Trial]:
    """The trials to run next under sequential stopping: per condition, its first ``reps_min``
    repetitions, then one more while the 95% CI half-width of the primary value exceeds ``ci``,
    until ``reps_max``; a condition's trials are always a prefix of its fixed-repetition trials."""
    by_cond: dict[tuple[str, ...], list[Trial]] = {}
    for k, t in keyed.items():
        by_cond.setdefault(_condition(k), []).append(t)
    wave = []
    for trials in by_cond.values():  # plan order, reps ascending
        finished = [t for t in trials if t.key(cfg.target) in seen]
        n = len(finished)
        if n < cfg.reps_min:
            wave += [t for t in trials[: cfg.reps_min] if t.key(cfg.target) not in seen]
            continue
        values = [float(seen[t.key(cfg.target)][primary]) for t in finished]
        if n >= len(trials) or ci_half_width(values) <= cfg.ci:  # type: ignore[operator]
            continue
        wave += [t for t in trials if t.key(cfg.target) not in seen][:1]
    return wave


def executor_for(cfg: CampaignConfig) -> Any:
    """The executor a config names: ``local`` (this process) or ``ray`` (``qfi.distributed``)."""
    if cfg.executor == "ray":
        from qfi.distributed import RayExecutor

        return RayExecutor(workers=cfg.workers, address=cfg.address, threads=cfg.threads)
    return LocalExecutor()


def run_campaign(
    cfg: CampaignConfig,
    *,
    model: nn.Module | None = None,
    dataset: Any = None,
    fresh: bool = False,
    progress: bool | None = None,
    shortcut: bool = True,
    plots: bool = True,
    executor: Any = None,
    manifest_extra: dict[str, Any] | None = None,
) -> CampaignResult:
    """Run (or resume) a campaign and write ``detail.csv``, ``summary.csv``, the per-bit /
    per-format tables, ``manifest.json`` and plots under ``cfg.out``.

    ``manifest_extra`` adds top-level keys to ``manifest.json`` (``qfi layers`` records its
    groups there, so ``qfi run <out>/manifest.json`` can write the layer map again).

    ``model`` / ``dataset`` override ``cfg.model`` / ``cfg.data`` (for the Python API);
    ``shortcut=False`` evaluates zero-flip trials instead of answering them from the clean result.
    ``executor`` (default: the one ``cfg.executor`` names) runs the trials: ``LocalExecutor`` or
    ``qfi.distributed.RayExecutor``; the driver alone writes the files.

    Everything that can be checked (model, data, name filters, the output folder, the golden
    baseline) is checked before anything is written; the folder is locked for the whole run (a
    second campaign into it gets :class:`OutputFolderBusy`); a run that fails or is interrupted
    before its first trial leaves no trace, one that stops later leaves a resumable folder.
    """
    t0 = time.perf_counter()
    out = Path(cfg.out)
    _check_out_folder(out, fresh)
    device = resolve_device(cfg.device)
    model, evaluator, calib, meta = _prepare(cfg, model, dataset, device)
    meta["extra"] = dict(manifest_extra or {})
    reserved = set(meta["extra"]) & set(_MANIFEST_KEYS)
    if reserved:
        raise QfiError(f"manifest_extra may not set {sorted(reserved)}: qfi writes those keys itself")
    trials = plan(cfg)
    keyed = {t.key(cfg.target): t for t in trials}  # plan order
    _check_names(cfg, model)  # a name filter matching nothing fails before anything is written
    mhash = model_hash(model)

    created = _make_folder(out)
    lock = _FolderLock(out)
    try:
        lock.acquire()
    except BaseException:
        _remove_folders(created)
        raise
    state = _RunState(out, created)
    try:
        return _run_locked(cfg, model, evaluator, calib, meta, keyed, mhash, fresh, progress, shortcut,
                           plots, state, t0, executor)
    except KeyboardInterrupt as e:
        state.cleanup_if_empty()
        raise Interrupted(str(out) if state.rows else None, state.rows) from e
    except BaseException:
        state.cleanup_if_empty()
        raise
    finally:
        lock.release()
        if state.removed_folder:
            _remove_folders(created)


def _make_folder(out: Path) -> list[Path]:
    """Create ``out`` and its missing parents; the folders created, deepest first."""
    created = []
    p = out
    while not p.exists() and p != p.parent:
        created.append(p)
        p = p.parent
    out.mkdir(parents=True, exist_ok=True)
    return created


def _remove_folders(folders: list[Path]) -> None:
    """Remove the (empty) folders a failed start created, deepest first."""
    for f in folders:
        with contextlib.suppress(OSError):
            f.rmdir()


@dataclass
class _RunState:
    """What this run wrote, so a run that ends before its first trial can take it back."""

    out: Path
    created: list[Path]
    rows: int = 0  # trials in detail.csv (resumed + finished in this run)
    wrote: list[Path] = dataclasses.field(default_factory=list)
    removed_folder: bool = False

    def cleanup_if_empty(self) -> None:
        if self.rows:
            return
        for f in [*self.wrote, *(self.out / n for n in ("detail.csv.tmp", "manifest.json.tmp"))]:
            with contextlib.suppress(OSError):
                f.unlink()
        self.removed_folder = bool(self.created)


def _prepare(
    cfg: CampaignConfig, model: nn.Module | None, dataset: Any, device: torch.device
) -> tuple[nn.Module, Evaluator, list[torch.Tensor], dict[str, Any]]:
    """Model, evaluator, calibration inputs and their descriptions (nothing is written)."""
    from qfi import zoo

    model_given = None if model is None else type(model).__name__
    if model is None:
        model = zoo.load_model(cfg.model, weights=cfg.weights, device=device, args=cfg.model_args)
    model = model.to(device).eval()
    # image-folder options, passed only when set (a data plug-in given them is an error)
    opts = {
        k: getattr(cfg, k)
        for k in ("image_size", "mean", "std", "resize", "channels", "class_map")
        if getattr(cfg, k) is not None
    }
    if dataset is None:
        data_spec = cfg.data or zoo.default_data_for(cfg.model)
        dataset = zoo.load_data(data_spec, split="test", args=cfg.data_args, **opts)
    else:
        data_spec = f"<{type(dataset).__name__} passed to run_campaign>"
    evaluator = Evaluator(
        dataset, batch_size=cfg.batch_size, device=device, limit=cfg.limit, metric=cfg.metric
    )
    calib: list[Any] = []
    calib_info = None
    if cfg.target == "activations":
        from qfi.evaluate import batch_len

        # calibrate on held-in data: calibrate_data, else the training split of the data when it
        # has one (digits, a data factory with a split parameter), else (no training data known)
        # the first evaluation samples
        source = evaluator
        calib_spec = cfg.calibrate_data
        if calib_spec is None and not data_spec.startswith("<") and zoo.has_splits(data_spec):
            calib_spec = data_spec
        if calib_spec is not None:
            args = cfg.data_args if calib_spec == data_spec else None
            calib_set = zoo.load_data(calib_spec, split="train", args=args, **opts)
            source = Evaluator(calib_set, cfg.batch_size, device, cfg.calibrate, metric=_NO_TARGETS)
        calib = _calibration_inputs(source.inputs(), cfg.calibrate)
        calib_info = {
            "spec": calib_spec or "the first evaluation samples",
            "samples": sum(batch_len(x) for x in calib),
            "dynamic": cfg.dynamic,
        }
    meta = {
        "model": cfg.model if model_given is None else f"<{model_given} passed to run_campaign>",
        "data": {"spec": data_spec, "samples": evaluator.n},
        "calibration": calib_info,
        "device": str(device),
    }
    return model, evaluator, calib, meta


def _run_locked(
    cfg: CampaignConfig,
    model: nn.Module,
    evaluator: Evaluator,
    calib: list[torch.Tensor],
    meta: dict[str, Any],
    keyed: dict[tuple[str, ...], Trial],
    mhash: str,
    fresh: bool,
    progress: bool | None,
    shortcut: bool,
    plots: bool,
    state: _RunState,
    t0: float,
    executor: Any = None,
) -> CampaignResult:
    from tqdm.auto import tqdm

    out = state.out
    manifest_path, detail_path = out / "manifest.json", out / "detail.csv"
    metric = evaluator.metric
    done: dict[tuple[str, ...], dict[str, str]] = {}
    if not fresh:
        _check_out_folder(out, fresh)  # again, now under the lock
        done = _finished_rows(detail_path, metric.columns or None)
        old = _read_manifest(manifest_path)
        if done and old is None:
            raise QfiError(
                f"{detail_path} holds trials but {manifest_path.name} is missing, so they cannot be "
                "checked against this campaign; use another --out or --fresh to overwrite"
            )
        if done and not _same_campaign(old or {}, cfg, mhash):
            raise QfiError(
                f"{out} holds results of a different campaign (config or model differ); "
                "use another --out or --fresh to overwrite"
            )
        seeds = {k: str(t.seed) for k, t in keyed.items()}
        if any(k in seeds and r["seed"] != seeds[k] for k, r in done.items()):
            raise QfiError(f"{detail_path} holds trials with other seeds; use another --out or --fresh")
        sampler = (old or {}).get("sampler", 1)
        if done and sampler != SAMPLER_VERSION:
            log.warning(
                "%s: its %d finished trials were drawn by site sampler %s, new ones by %s: BER trials "
                "of %d or more expected flips draw other sites for the same seed (the same law; such "
                "rows are not replayable from their seeds here)", out, len(done), sampler, SAMPLER_VERSION,
                DENSE_FLIPS,
            )
    done = {k: r for k, r in done.items() if k in keyed}
    state.rows = len(done)
    todo = [t for k, t in keyed.items() if k not in done]
    resumed = len(keyed) - len(todo)
    evals_before = evaluator.calls
    golden = evaluator(model) if todo else None
    golden_values: dict[str, float] = {}
    if golden is not None:
        _check_baseline(cfg, golden, "golden (fp32, no emulation)", model, evaluator)
        golden_values = golden.values()  # also fixes the columns of a metric plug-in
    if not metric.columns:  # a plug-in metric, nothing left to run: its columns are in the file
        found = metric_columns_of(_header(detail_path))
        if not found:
            raise QfiError(f"{detail_path}: cannot tell the columns of metric {metric.name!r}; use --fresh")
        metric.columns, metric.primary = found, found[0]  # type: ignore[misc]
    columns = detail_columns(metric.columns)

    if not done:  # a fresh campaign must not leave an earlier one's tables and plots behind
        for stale in _OUTPUTS:
            (out / stale).unlink(missing_ok=True)
    manifest = {
        "config": cfg.to_dict(),
        "model": meta["model"],
        "model_hash": mhash,
        "data": meta["data"],
        "calibration": meta["calibration"],
        "trials": len(keyed),
        "versions": _versions(),
        "device": meta["device"],
        "sampler": SAMPLER_VERSION,
        **meta["extra"],
    }
    if not manifest_path.exists():
        state.wrote.append(manifest_path)
    _atomic_write(manifest_path, json.dumps(manifest, indent=2, sort_keys=True) + "\n")

    if cfg.target == "weights" and (todo or not (out / "quantization.csv").exists()):
        qpath = out / "quantization.csv"
        if not qpath.exists():
            state.wrote.append(qpath)
        _write_quantization_report(cfg, model, qpath)

    if not done:
        state.wrote.append(detail_path)
    detail = _DetailLog(detail_path, done, columns)
    observers = None
    if cfg.observe is not None:
        from qfi.observers import COLUMNS as OBS_COLUMNS

        obs_path = out / "observers.csv"
        if not obs_path.exists():
            state.wrote.append(obs_path)
        observers = _ObserverLog(obs_path, (*KEY_COLUMNS, *OBS_COLUMNS), fresh=not done)
    extra_evaluations = 0
    with contextlib.ExitStack() as stack:
        stack.callback(detail.close)
        if observers is not None:
            stack.callback(observers.close)
        if todo:
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
            ctx = TrialContext(cfg, model, evaluator, calib, shortcut, golden, golden_values)

            def emit(row: dict[str, Any]) -> None:
                observed = row.pop(OBSERVED, None)
                if observers is not None and observed is not None:
                    observers.add(observed)  # before the detail row: a kill between reruns the trial
                detail.add(row)
                state.rows += 1
                what = row["ber"] if row["fault"] == "ber" else row["count"]
                bar.set_postfix_str(f"{row['format']} {row['fault']}={what} bit={row['bit']}", refresh=False)
                bar.update(1)

            runner = executor if executor is not None else executor_for(cfg)
            stack.callback(runner.close)
            if cfg.ci is None:
                extra_evaluations = runner.run(ctx, list(groups.items()), emit)
            else:  # sequential stopping: waves of repetitions until each condition is settled
                seen = dict(done)
                emit_rows = emit

                def emit(row: dict[str, Any]) -> None:  # noqa: F811 - also remember the row
                    seen[_row_key({k: _fmt(v) for k, v in row.items()})] = row
                    emit_rows(row)

                wave = _next_wave(cfg, keyed, seen, metric.primary)
                while wave:
                    waves: dict[tuple[str, str], list[Trial]] = {}
                    for t in wave:
                        waves.setdefault((t.format, t.names), []).append(t)
                    extra_evaluations += runner.run(ctx, list(waves.items()), emit)
                    wave = _next_wave(cfg, keyed, seen, metric.primary)
                bar.total = bar.n
                bar.refresh()

    import pandas as pd

    # Canonical order (plan order), one row per trial key, so a resumed run writes exactly the
    # same file as an uninterrupted one.
    rows = _finished_rows(detail_path, metric.columns)
    ordered = sorted((r for k, r in rows.items() if k in keyed), key=lambda r: keyed[_row_key(r)].index)
    _atomic_write(detail_path, _csv_text(columns, ordered))
    if cfg.observe is not None and (out / "observers.csv").exists():
        from qfi.observers import tidy_csv

        finished = {_row_key(r) for r in ordered}
        tidy_csv(out / "observers.csv", KEY_COLUMNS, lambda k: keyed[k].index if k in finished else None)
    # names stay strings ("" = everything, even a filter spelled "nan"); metric values may be NaN
    # (cosine of a trial whose every output is non-finite)
    nan = {c: ["nan"] for c in columns if c not in _TEXT_COLUMNS}
    detail_df = pd.read_csv(detail_path, keep_default_na=False, na_values=nan)
    summary = summarize(detail_df, metric)
    write_tables(detail_df, summary, out, plots=plots, metric=metric, part=bit_part(cfg))
    seconds = time.perf_counter() - t0
    evaluations = evaluator.calls - evals_before + extra_evaluations
    return CampaignResult(out, detail_df, summary, len(todo), resumed, evaluations, seconds, metric)


def _write_quantization_report(cfg: CampaignConfig, model: nn.Module, path: Path) -> None:
    """``quantization.csv``: per format, name group and selected tensor, what quantizing alone
    does (saturated and underflowing shares, relative and max error); one warning line per
    tensor a format crushes."""
    import pandas as pd

    from qfi.qerror import quantization_report, quantization_warnings

    frames = []
    for fmt_name in cfg.formats:
        for names in cfg.names:
            include, exclude = _filters(cfg, names)
            r = quantization_report(model, fmt_name, names=include, exclude=exclude, bn_stats=cfg.bn_stats)
            r.insert(1, "names", names)
            frames.append(r)
            lines = quantization_warnings(r)
            if lines:  # one line per format and name group: the count and the first tensor hit
                more = f" (and {len(lines) - 1} more tensors)" if len(lines) > 1 else ""
                log.warning("%s%s; see %s", lines[0], more, path)
    table = pd.concat(frames, ignore_index=True)
    _atomic_write(path, table.to_csv(index=False, float_format="%.6g", lineterminator="\n"))


def _header(path: Path) -> list[str]:
    try:
        with open(path, newline="") as f:
            return next(csv.reader(f), [])
    except OSError:
        return []


def _atomic_write(path: Path, text: str) -> None:
    """Write through ``<path>.tmp`` and a rename: a kill or a full disk leaves the old file or the
    new one, never half of one, and no stray temporary file."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "w", newline="") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


def _check_baseline(
    cfg: CampaignConfig, res: EvalResult, what: str, model: nn.Module, evaluator: Evaluator
) -> None:
    """A baseline with NaN/Inf outputs makes every trial's DUE meaningless: stop, naming where
    the non-finite values are (unless ``allow_nonfinite``)."""
    if res.due == 0:
        return
    where = _nonfinite_source(model, evaluator)
    msg = f"the {what} baseline already has non-finite outputs on {res.due:.1%} of the samples: {where}"
    if cfg.allow_nonfinite:
        log.warning("%s; going on (allow_nonfinite)", msg)
        return
    raise NonFiniteBaseline(
        f"{msg}; fix the model or choose another format, or pass --allow-nonfinite "
        "(allow_nonfinite: true) to go on anyway"
    )


def _nonfinite_source(model: nn.Module, evaluator: Evaluator) -> str:
    """Where NaN/Inf come from: the weights that hold them, else the first module (in execution
    order) whose output turns non-finite on the first affected batch."""
    bad = []
    for name, t in model.state_dict().items():
        if isinstance(t, torch.Tensor) and t.is_floating_point():
            n = int((~torch.isfinite(t)).sum())
            if n:
                bad.append(f"{name!r} holds {n} NaN/Inf value(s)")
    if bad:
        more = f" and {len(bad) - 3} more tensors" if len(bad) > 3 else ""
        return "tensor " + "; ".join(bad[:3]) + more
    first: list[str] = []

    def hook(name: str):
        def record(_m: nn.Module, _i: object, out: object) -> None:
            if not first and any(not bool(torch.isfinite(t).all()) for _, t in outputs.float_tensors(out)):
                first.append(name)

        return record

    handles = [m.register_forward_hook(hook(n)) for n, m in model.named_modules() if n]
    try:
        with torch.no_grad():
            for x in evaluator.inputs():
                model(x)
                if first:
                    break
    finally:
        for h in handles:
            h.remove()
    if first:
        return f"no weight is NaN/Inf; the output of module {first[0]!r} is the first to turn non-finite"
    return "no weight is NaN/Inf and no module output could be traced"


def _warn_if_crushed(what: str, metric: Any, clean: dict[str, float], golden: dict[str, float]) -> None:
    """One warning line when quantizing alone costs much of the golden score (a drop of more than
    0.1 where higher is better, top-1 or cosine; a rise of more than 10% where lower is better)."""
    p = metric.primary
    c, g = clean[p], golden[p]
    crushed = g - c > 0.1 if metric.higher_is_better else c > 1.1 * g + 1e-12
    if crushed:
        log.warning(
            "%s %s is %.4g against golden %.4g: the format itself destroys much of the model "
            "before any fault (see quantization.csv)",
            what,
            p,
            c,
            g,
        )


def _row(
    cfg: CampaignConfig,
    fmt: Any,
    t: Trial,
    res: EvalResult,
    flips: int,
    evaluated: bool,
    clean: EvalResult,
    base: dict[str, float],
) -> dict[str, Any]:
    """One detail row: the trial's keys, its metric values (relative ones against clean), SDC and
    DUE, and the clean and golden values of the group (``base``)."""
    return {
        "format": t.format,
        "target": cfg.target,
        "names": t.names,
        "fault": t.fault,
        "ber": t.ber,
        "count": t.count,
        "bit": t.bit,
        "bit_name": "any" if t.bit < 0 else part_bit_names(fmt, bit_part(cfg))[t.bit],
        "rep": t.rep,
        "seed": t.seed,
        "flips": flips,
        **res.values(clean),
        "sdc": res.sdc(clean),
        "sdc_any": res.sdc_any(clean),
        "due": res.due,
        **base,
        "evaluated": evaluated,
    }
