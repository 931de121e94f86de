"""The ``qfi`` command line.  Every sweep command builds a :class:`CampaignConfig`, the same
dataclass a YAML campaign file becomes, and hands it to :func:`run_campaign`.

    qfi names   [--target weights|activations] [--filter mlp,ln]   list selectable names
    qfi bits    --format fp32 --ber 1e-3                           per-bit sensitivity sweep
    qfi formats --formats fp32,fp16,bf16,q3.13,int8 --ber 1e-7:1e-3 format comparison
    qfi ber     --ber 1e-10:1e-6 --names mlp,ln --reps 5            BER sweep over name groups
    qfi run     campaign.yaml                                      everything a YAML file says
    qfi main                                                       the default job (bits + formats)
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

os.environ.setdefault(
    "OMP_WAIT_POLICY", "PASSIVE"
)  # before torch is imported: 2-core machines spin otherwise

from qfi import layers_cli  # noqa: E402 - after the OMP setting above

MAIN_FORMATS = "fp32,fp16,bf16,q3.13,int8"
MAIN_BLOCK_FORMATS = "mxfp8_e4m3,mxfp4,nvfp4,int4_g128_fp16"

EXIT_CODES = """exit status:
  0    success
  1    internal error (a bug in qfi: please report the traceback)
  2    bad input: a flag, campaign file, model, data, fault log or output folder that qfi refuses
       (also a baseline whose outputs are already NaN/Inf)
  3    operating-system error: a folder or file that cannot be created, read or written (permissions,
       a file where a folder is expected, a full disk)
  4    the output folder is in use by another running qfi campaign
  130  interrupted (Ctrl-C); finished trials are kept, rerun the same command to resume"""


class _Once(argparse.Action):
    """``store`` that refuses a repeated flag instead of silently keeping the last value."""

    def __call__(self, parser: Any, namespace: Any, values: Any, option_string: Any = None) -> None:
        seen = namespace.__dict__.setdefault("_qfi_seen", {})
        if self.dest in seen:
            parser.error(
                f"{option_string} given twice ({seen[self.dest]!r} and {values!r}); give it once"
            )
        seen[self.dest] = values
        setattr(namespace, self.dest, values)


class _Accumulate(argparse.Action):
    """A list flag: ``--ber 1e-6 --ber 1e-5`` means ``--ber 1e-6,1e-5`` (the default is replaced)."""

    def __call__(self, parser: Any, namespace: Any, values: Any, option_string: Any = None) -> None:
        seen = namespace.__dict__.setdefault("_qfi_seen", {})
        old = getattr(namespace, self.dest) if self.dest in seen else None
        seen[self.dest] = True
        setattr(namespace, self.dest, values if old is None else f"{old},{values}")


class _Parser(argparse.ArgumentParser):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.register("action", None, _Once)
        self.register("action", "store", _Once)
        self.register("action", "accumulate", _Accumulate)


def _common(p: argparse.ArgumentParser, *, sweep: bool = True, out: str = "") -> None:
    g = p.add_argument_group("model and data")
    g.add_argument(
        "--model",
        default="vit_digits",
        help="vit_digits (default), cnn_digits, 'module.path:callable' or 'torchvision:<name>'",
    )
    g.add_argument("--weights", default=None, help="state-dict file to load into the model")
    g.add_argument("--data", default=None, help="digits (default for embedded models) or imagefolder:<dir>")
    g.add_argument(
        "--image-size", type=int, default=None, help="image folders: resize/crop size (default 224)"
    )
    g.add_argument(
        "--resize", type=int, default=None, help="image folders: shorter side before the crop (256 for 224)"
    )
    g.add_argument("--channels", type=int, default=None, help="image folders: 1 reads grayscale (default 3)")
    g.add_argument(
        "--class-map", default=None, help="image folders: JSON/text file: folder name -> class index"
    )
    g.add_argument("--mean", default=None, help="image folders: per-channel mean (default ImageNet's)")
    g.add_argument("--std", default=None, help="image folders: per-channel std (default ImageNet's)")
    g.add_argument("--target", default="weights", help="weights (parameters) or activations (module outputs)")
    g.add_argument(
        "--names",
        action="append",
        default=None,
        metavar="WORDS",
        help="name filter: comma-separated words, any of which the name contains (mlp,ln); "
        "also globs (*attention*) and 're:<regex>'. Repeat for several name groups",
    )
    g.add_argument("--exclude", default="", help="names to leave out, same syntax as --names")
    if sweep:
        g.add_argument(
            "--metric",
            default="top1",
            help="how a trial is scored: top1 (default), cosine (output drift against clean; "
            "cosine?threshold=0.95&key=<output key>), loss, perplexity, or module:callable",
        )
    g.add_argument(
        "--bn-stats",
        action="store_true",
        help="weights: also select BatchNorm running_mean/running_var (left out by default: "
        "quantized hardware folds them into the convolutions)",
    )
    if not sweep:
        return
    g.add_argument(
        "--calibrate",
        type=int,
        default=256,
        metavar="N",
        help="activations: samples that calibrate the int scales, then frozen (default 256)",
    )
    g.add_argument(
        "--calibrate-data",
        default=None,
        metavar="DATA",
        help="activations: data spec to calibrate on (default: the digits training split for "
        "digits, else the first evaluation samples)",
    )
    g = p.add_argument_group("run")
    g.add_argument("--reps", type=int, default=10, help="repetitions per condition (default 10)")
    g.add_argument(
        "--ci",
        type=float,
        default=None,
        metavar="HALF_WIDTH",
        help="sequential stopping: stop a condition once its 95%% CI half-width is <= this (e.g. 0.01)",
    )
    g.add_argument("--reps-min", type=int, default=None, help="with --ci: reps before stopping (default 3)")
    g.add_argument("--reps-max", type=int, default=None, help="with --ci: at most this many (default --reps)")
    g.add_argument("--seed", type=int, default=0, help="campaign seed; every trial's seed derives from it")
    g.add_argument("--out", default=out, help=f"output folder: CSVs, plots, manifest.json (default {out})")
    _run_flags(g, device=True)


def _run_flags(g: Any, *, device: bool, batch: bool = True) -> None:
    if device:
        g.add_argument("--device", default=None, help="auto (CUDA if present; default), cpu, cuda, cuda:N")
    g.add_argument(
        "--executor",
        default=None,
        help="local (this process; default) or ray (Ray actors; pip install 'qfi[distributed]')",
    )
    g.add_argument(
        "--workers", type=int, default=None, help="ray: worker actors (default: one per CPU, or per GPU)"
    )
    g.add_argument(
        "--address", default=None, help="ray: an existing cluster (ray://head:10001, auto; default: local)"
    )
    g.add_argument("--threads", type=int, default=None, help="ray: CPU threads per worker (default 1)")
    g.add_argument(
        "--prefix-reuse",
        action="store_true",
        help="serve the fault-free start of each trial's forward from cached clean activations "
        "(the same rows; faster when the faults sit late in the model)",
    )
    g.add_argument(
        "--cache-mb",
        type=int,
        default=None,
        metavar="N",
        help="with --prefix-reuse: MiB of cached activations per name group (default 512)",
    )
    if batch:
        g.add_argument("--batch-size", type=int, default=None, help="evaluation batch size (default 512)")
        g.add_argument(
            "--limit", type=int, default=None, help="evaluate on the first N samples only (default: all)"
        )
    g.add_argument(
        "--fresh", action="store_true", help="discard earlier results in the output folder, do not resume"
    )
    g.add_argument("--no-plots", action="store_true", help="write the CSVs but no PNG plots")
    g.add_argument(
        "--allow-nonfinite",
        action="store_true",
        help="go on when the golden or clean baseline already has NaN/Inf outputs (default: stop)",
    )
    g.add_argument("--quiet", action="store_true", help="no progress bar (shown on terminals only)")


def _stuck_value(v: str) -> int:
    if v.strip() not in ("0", "1"):
        raise argparse.ArgumentTypeError(f"{v!r}: allowed are 0 and 1")
    return int(v)


def _faults(p: argparse.ArgumentParser, ber: str, bits: str) -> None:
    p.add_argument(
        "--ber",
        default=ber,
        action="accumulate",
        help=f"BER(s): 1e-6 | 1e-7,1e-5 | decades 1e-10:1e-6; repeatable (default {ber})",
    )
    p.add_argument(
        "--flips",
        default=None,
        action="accumulate",
        help="exact flip counts instead of / besides rates, e.g. 1,10 (with --ber none for counts only)",
    )
    p.add_argument(
        "--bits",
        default=bits,
        help=f"none (any bit flips), all (one condition per bit), 30, 0:7, 23,30,31 (default {bits})",
    )
    p.add_argument(
        "--dynamic", action="store_true", help="activations: scale per forward instead of calibrated"
    )
    p.add_argument(
        "--policy",
        default="trial",
        help="when a fault is drawn: trial (once per trial; default), batch (per evaluation batch), "
        "inference (per inference: needs --batch-size 1)",
    )
    p.add_argument(
        "--stuck-at",
        type=_stuck_value,
        default=None,
        metavar="0|1",
        help="stuck-at faults: the drawn sites read 0 (or 1) instead of flipping (default: bit flips)",
    )
    p.add_argument(
        "--part",
        default="all",
        help="block/group formats: the stored words faults hit: all (default: every stored bit), "
        "codes, scales, zero_points; per-bit sweeps name one",
    )
    p.add_argument(
        "--output-key",
        default=None,
        metavar="KEY",
        help="activations: which floating tensor of a module output carries faults: a dict/ModelOutput "
        "key, dataclass field, index or dotted path (default: the first)",
    )
    p.add_argument(
        "--observe",
        nargs="?",
        const="",
        default=None,
        metavar="FILTER",
        help="write observers.csv: per trial and module, the error against the clean run (RMSE, MAE, "
        "max abs, changed share, NaN/Inf); FILTER picks the modules (none given: every leaf module)",
    )


def build_parser() -> argparse.ArgumentParser:
    ap = _Parser(
        prog="qfi",
        description="Quantization-aware bit-level fault injection.",
        epilog=EXIT_CODES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("-v", "--verbose", action="store_true", help="log INFO messages (default: warnings only)")
    sub = ap.add_subparsers(dest="command", required=True, metavar="command", parser_class=_Parser)

    def add(name: str, help: str) -> argparse.ArgumentParser:
        return sub.add_parser(name, help=help, description=help[0].upper() + help[1:] + ".")

    p = add("names", "list selectable weights or activations with shapes and sizes")
    _common(p, sweep=False)
    p.add_argument("--filter", default=None, help="alias of --names for listing")

    p = add("bits", "per-bit sensitivity sweep: only bit b of each code may flip, one condition per bit")
    _common(p, out="qfi-results/bits")
    p.add_argument(
        "--format",
        default="fp32",
        action="accumulate",
        help="format name: fp32, fp16, bf16, fp8_e4m3, q3.13, int8, ...; repeatable (default fp32)",
    )
    _faults(p, ber="1e-3", bits="all")

    p = add("formats", "compare formats over a list of BERs (every bit of a code may flip)")
    _common(p, out="qfi-results/formats")
    p.add_argument(
        "--formats",
        default=MAIN_FORMATS,
        action="accumulate",
        help=f"comma-separated formats; repeatable (default {MAIN_FORMATS})",
    )
    _faults(p, ber="1e-7:1e-3", bits="none")

    p = add("ber", "BER sweep over decades with name filters (e.g. ViT MLPs and LayerNorms)")
    _common(p, out="qfi-results/ber")
    p.add_argument(
        "--format",
        default="fp32",
        action="accumulate",
        help="format(s), comma-separated; repeatable (default fp32)",
    )
    _faults(p, ber="1e-10:1e-6", bits="none")

    p = add("run", "run a YAML campaign file (keys = CampaignConfig fields) or rerun a manifest.json")
    p.add_argument(
        "campaign",
        help="campaign.yaml (see examples/campaign.yaml), or <out>/manifest.json of an earlier run "
        "(resumes in its folder unless --out is given)",
    )
    p.add_argument("--out", default=None, help="write here instead of the file's out")
    p.add_argument("--device", default=None, help="override the file's device: auto, cpu, cuda, cuda:N")
    _run_flags(p, device=False, batch=False)

    p = add("main", "the default job: per-bit sweeps and a format comparison on the embedded ViT")
    p.add_argument(
        "--out", default="qfi-results/main", help="output folder (default qfi-results/main: bits/, formats/)"
    )
    p.add_argument("--reps", type=int, default=10, help="repetitions per condition (default 10)")
    p.add_argument("--seed", type=int, default=0, help="campaign seed (default 0)")
    _run_flags(p, device=True)

    layers_cli.add_parser(sub)
    return ap


def _config(a: argparse.Namespace, formats: str) -> Any:
    from qfi.config import CampaignConfig

    ber: Any = () if str(a.ber).lower() == "none" else a.ber
    return CampaignConfig(
        model=a.model,
        weights=a.weights,
        data=a.data,
        image_size=a.image_size,
        resize=a.resize,
        channels=a.channels,
        class_map=a.class_map,
        mean=a.mean,
        std=a.std,
        target=a.target,
        formats=formats,
        ber=ber,
        flips=a.flips or (),
        bits=a.bits,
        part=a.part,
        policy=a.policy,
        stuck_at=a.stuck_at,
        names=tuple(a.names) if a.names else ("",),
        exclude=a.exclude,
        reps=a.reps,
        ci=a.ci,
        reps_min=3 if a.reps_min is None else a.reps_min,
        reps_max=a.reps_max,
        seed=a.seed,
        batch_size=512 if a.batch_size is None else a.batch_size,
        limit=a.limit,
        device=a.device or "auto",
        calibrate=a.calibrate,
        calibrate_data=a.calibrate_data,
        dynamic=a.dynamic,
        output_key=a.output_key,
        observe=a.observe,
        metric=a.metric,
        bn_stats=a.bn_stats,
        allow_nonfinite=a.allow_nonfinite,
        **_executor_fields(a),
        out=a.out,
    )


def _executor_fields(a: argparse.Namespace) -> dict[str, Any]:
    """The executor flags that were given (a campaign file's values stay otherwise)."""
    d = {"executor": a.executor, "workers": a.workers, "address": a.address, "threads": a.threads,
         "prefix_reuse": a.prefix_reuse or None, "cache_mb": a.cache_mb}
    return {k: v for k, v in d.items() if v is not None}


def _run(cfg: Any, a: argparse.Namespace) -> int:
    from qfi.campaign import run_campaign

    res = run_campaign(
        cfg, fresh=a.fresh, progress=False if a.quiet else None, plots=not getattr(a, "no_plots", False)
    )
    _report(res)
    return 0


def _report(res: Any) -> None:
    s = res.summary
    print(ran_line(res))
    if not s.empty:
        p = res.metric.primary if res.metric is not None else "top1"
        print(golden_line(s, p))
        cols = ["format", "names", "fault", "ber", "count", "bit", "bit_name", "trials", "flips_mean"]
        cols += [f"{p}_mean", f"{p}_ci_low", f"{p}_ci_high", "sdc_mean", "due_mean", f"clean_{p}"]
        with_pd_opts(lambda: print(s[cols].to_string(index=False, float_format=lambda v: f"{v:.4g}")))


def ran_line(res: Any) -> str:
    """What a campaign ran: trials run and resumed, evaluations, seconds, the folder."""
    return (
        f"{res.trials_run} trials run, {res.trials_resumed} resumed, {res.evaluations} evaluations, "
        f"{res.seconds:.1f} s -> {res.out}/"
    )


def golden_line(summary: Any, metric: str) -> str:
    return f"golden fp32 {metric} {summary.iloc[0][f'golden_{metric}']:.4f}"


def with_pd_opts(fn: Any) -> None:
    import pandas as pd

    with pd.option_context("display.max_rows", 60, "display.width", 200):
        fn()


def cmd_names(a: argparse.Namespace) -> int:
    import qfi
    from qfi import zoo

    model = zoo.load_model(a.model, weights=a.weights)
    example = None
    if a.target == "activations":
        from qfi.evaluate import Evaluator

        ds = zoo.load_data(a.data or zoo.default_data_for(a.model), split="test")
        example = Evaluator(ds, batch_size=1, limit=1, metric="cosine").inputs()[0]  # any sample shape
    if a.target == "weights":
        infos = qfi.list_names(model, target="weights", bn_stats=a.bn_stats)
    else:
        infos = qfi.list_names(model, target=a.target, example=example)
    words = a.filter or (",".join(a.names) if a.names else None)
    if words or a.exclude:
        if a.target == "weights":
            chosen = set(qfi.select_weights(model, words, a.exclude or None, bn_stats=a.bn_stats))
        else:
            chosen = set(qfi.select_modules(model, names=words, exclude=a.exclude or None))
        infos = [i for i in infos if i.name in chosen]
    total = 0
    for i in infos:
        shape = "x".join(map(str, i.shape)) if i.shape is not None else "?"
        numel = i.numel if i.numel is not None else 0
        total += numel
        print(f"{i.label:<60} {shape:>16} {numel:>12,}")
    print(f"{len(infos)} {a.target}, {total:,} elements")
    return 0


def cmd_main(a: argparse.Namespace) -> int:
    """The default job: per-bit sweeps of five formats, then a format comparison over BERs."""
    from qfi.campaign import run_campaign
    from qfi.config import CampaignConfig

    run = dict(
        reps=a.reps,
        seed=a.seed,
        device=a.device or "auto",
        batch_size=512 if a.batch_size is None else a.batch_size,
        limit=a.limit,
        formats=MAIN_FORMATS,
        allow_nonfinite=a.allow_nonfinite,
        **_executor_fields(a),
    )
    jobs = [
        # per-bit BER 1e-3: ~59 flips of one bit position per trial over the 58.6k weights, enough
        # for one exponent-MSB hit to be near-certain and for harmless bits to show as harmless
        CampaignConfig(bits="all", ber=1e-3, out=os.path.join(a.out, "bits"), **run),
        # every stored bit may flip: 1e-7 (~0.2 flips per fp32 trial) .. 1e-3 (~1.9k flips); the
        # 2026 block formats beside the classic ones (scales included in the fault space)
        CampaignConfig(
            bits="none",
            ber="1e-7:1e-3",
            out=os.path.join(a.out, "formats"),
            **{**run, "formats": MAIN_FORMATS + "," + MAIN_BLOCK_FORMATS},
        ),
    ]
    for cfg in jobs:
        print(
            f"== {cfg.out}: formats {', '.join(cfg.formats)}, bits {cfg.bits}, BER {list(cfg.ber)}, "
            f"{cfg.reps} reps"
        )
        res = run_campaign(cfg, fresh=a.fresh, progress=False if a.quiet else None, plots=not a.no_plots)
        _report(res)
    return 0


def _dispatch(a: argparse.Namespace) -> int:
    if a.command == "layers":
        return layers_cli.cmd_layers(a)
    if a.command == "names":
        return cmd_names(a)
    if a.command == "bits":
        return _run(_config(a, a.format), a)
    if a.command == "formats":
        return _run(_config(a, a.formats), a)
    if a.command == "ber":
        return _run(_config(a, a.format), a)
    if a.command == "run":
        import dataclasses

        from qfi.config import CampaignConfig

        cfg = CampaignConfig.from_yaml(a.campaign)
        overrides: dict[str, Any] = {k: v for k, v in (("out", a.out), ("device", a.device)) if v is not None}
        if a.allow_nonfinite:
            overrides["allow_nonfinite"] = True
        overrides.update(_executor_fields(a))
        cfg = dataclasses.replace(cfg, **overrides)
        recorded = _layer_map_of(a.campaign)
        if recorded is not None:  # a `qfi layers` folder: the map is written again too
            return layers_cli.rerun(cfg, *recorded, a)
        return _run(cfg, a)
    return cmd_main(a)


def _layer_map_of(path: str) -> tuple[str, list] | None:
    """The (rule, groups) a ``qfi layers`` run recorded in the manifest ``path``, else None."""
    import json

    from qfi.layers import recorded_groups

    if not str(path).endswith(".json"):
        return None
    try:
        manifest = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None  # CampaignConfig.from_yaml has already read it, or said why not
    return recorded_groups(manifest) if isinstance(manifest, dict) else None


def _os_error(e: OSError) -> str:
    """One line for an OSError: what failed and on which path."""
    what = e.strerror or type(e).__name__
    paths = [p for p in (e.filename, e.filename2) if p is not None]
    return f"{what}: {' -> '.join(map(str, paths))}" if paths else str(e) or what


def _interrupted(e: BaseException) -> str:
    out, rows = getattr(e, "out", None), getattr(e, "rows", 0)
    if out is not None and rows:
        return f"interrupted; {rows} finished trials are kept in {out}/, rerun the same command to resume"
    return "interrupted before any trial finished; nothing was written"


def main(argv: Sequence[str] | None = None) -> int:
    """The CLI; returns the exit status (see ``EXIT_CODES``)."""
    command = "?"
    try:
        from qfi.errors import OutputFolderBusy, QfiError
        from quant_schemes import FormatError

        a = build_parser().parse_args(argv)
        command = a.command
        from qfi.allocator import keep_freed_memory

        keep_freed_memory()  # a campaign repeats one forward: reuse its large blocks (QFI_MALLOC=system: off)
        logging.basicConfig(
            level=logging.INFO if a.verbose else logging.WARNING, format="%(levelname)s %(message)s"
        )
        try:
            return _dispatch(a)
        except OutputFolderBusy as e:
            print(f"qfi {command}: error: {e}", file=sys.stderr)
            return 4
        except (QfiError, FormatError) as e:
            print(f"qfi {command}: error: {e}", file=sys.stderr)
            return 2
        except BrokenPipeError:
            raise
        except OSError as e:
            print(f"qfi {command}: error: {_os_error(e)}", file=sys.stderr)
            return 3
    except KeyboardInterrupt as e:
        print(f"qfi {command}: {_interrupted(e)}", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # the reader went away (`qfi names | head`): not an error; keep Python's exit flush quiet
        with contextlib.suppress(OSError, ValueError):
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    sys.exit(main())
