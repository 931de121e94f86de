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
import logging
import os
import sys
from collections.abc import Sequence
from typing import Any

os.environ.setdefault(
    "OMP_WAIT_POLICY", "PASSIVE"
)  # before torch is imported: 2-core machines spin otherwise

MAIN_FORMATS = "fp32,fp16,bf16,q3.13,int8"


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
    g.add_argument("--seed", type=int, default=0, help="campaign seed; every trial's seed derives from it")
    g.add_argument("--out", default=out, help=f"output folder: CSVs, plots, manifest.json (default {out})")
    _run_flags(g, device=True)


def _run_flags(g: Any, *, device: bool, batch: bool = True) -> None:
    if device:
        g.add_argument("--device", default=None, help="auto (CUDA if present; default), cpu, cuda, cuda:N")
    if batch:
        g.add_argument("--batch-size", type=int, default=None, help="evaluation batch size (default 512)")
        g.add_argument(
            "--limit", type=int, default=None, help="evaluate on the first N samples only (default: all)"
        )
    g.add_argument(
        "--fresh", action="store_true", help="discard earlier results in the output folder, do not resume"
    )
    g.add_argument("--no-plots", action="store_true", help="write the CSVs but no PNG plots")
    g.add_argument("--quiet", action="store_true", help="no progress bar (shown on terminals only)")


def _faults(p: argparse.ArgumentParser, ber: str, bits: str) -> None:
    p.add_argument(
        "--ber", default=ber, help=f"BER(s): 1e-6 | 1e-7,1e-5 | decades 1e-10:1e-6 (default {ber})"
    )
    p.add_argument(
        "--flips",
        default=None,
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


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="qfi", description="Quantization-aware bit-level fault injection.")
    ap.add_argument("-v", "--verbose", action="store_true", help="log INFO messages (default: warnings only)")
    sub = ap.add_subparsers(dest="command", required=True, metavar="command")

    def add(name: str, help: str) -> argparse.ArgumentParser:
        return sub.add_parser(name, help=help, description=help[0].upper() + help[1:] + ".")

    p = add("names", "list selectable weights or activations with shapes and sizes")
    _common(p, sweep=False)
    p.add_argument("--filter", default=None, help="alias of --names for listing")

    p = add("bits", "per-bit sensitivity sweep: only bit b of each code may flip, one condition per bit")
    _common(p, out="qfi-results/bits")
    p.add_argument(
        "--format", default="fp32", help="format name: fp32, fp16, bf16, fp8_e4m3, q3.13, int8, ..."
    )
    _faults(p, ber="1e-3", bits="all")

    p = add("formats", "compare formats over a list of BERs (every bit of a code may flip)")
    _common(p, out="qfi-results/formats")
    p.add_argument(
        "--formats", default=MAIN_FORMATS, help=f"comma-separated formats (default {MAIN_FORMATS})"
    )
    _faults(p, ber="1e-7:1e-3", bits="none")

    p = add("ber", "BER sweep over decades with name filters (e.g. ViT MLPs and LayerNorms)")
    _common(p, out="qfi-results/ber")
    p.add_argument("--format", default="fp32", help="format(s), comma-separated (default fp32)")
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
    p.add_argument("--out", default="qfi-results", help="output folder (default qfi-results)")
    p.add_argument("--reps", type=int, default=10, help="repetitions per condition (default 10)")
    p.add_argument("--seed", type=int, default=0, help="campaign seed (default 0)")
    _run_flags(p, device=True)
    return ap


def _config(a: argparse.Namespace, formats: str) -> Any:
    from qfi.config import CampaignConfig

    ber: Any = () if str(a.ber).lower() == "none" else a.ber
    return CampaignConfig(
        model=a.model,
        weights=a.weights,
        data=a.data,
        image_size=a.image_size,
        mean=a.mean,
        std=a.std,
        target=a.target,
        formats=formats,
        ber=ber,
        flips=a.flips or (),
        bits=a.bits,
        names=tuple(a.names) if a.names else ("",),
        exclude=a.exclude,
        reps=a.reps,
        seed=a.seed,
        batch_size=a.batch_size or 512,
        limit=a.limit,
        device=a.device or "auto",
        calibrate=a.calibrate,
        calibrate_data=a.calibrate_data,
        dynamic=a.dynamic,
        out=a.out,
    )


def _run(cfg: Any, a: argparse.Namespace) -> int:
    from qfi.campaign import run_campaign

    res = run_campaign(
        cfg, fresh=a.fresh, progress=False if a.quiet else None, plots=not getattr(a, "no_plots", False)
    )
    _report(res)
    return 0


def _report(res: Any) -> None:
    s = res.summary
    print(
        f"{res.trials_run} trials run, {res.trials_resumed} resumed, {res.evaluations} evaluations, "
        f"{res.seconds:.1f} s -> {res.out}/"
    )
    if not s.empty:
        d = s.iloc[0]
        print(f"golden fp32 top-1 {d['golden_top1']:.4f}")
        cols = [
            "format",
            "names",
            "fault",
            "ber",
            "count",
            "bit",
            "bit_name",
            "trials",
            "flips_mean",
            "top1_mean",
            "top1_ci_low",
            "top1_ci_high",
            "sdc_mean",
            "due_mean",
            "clean_top1",
        ]
        with_pd_opts(lambda: print(s[cols].to_string(index=False, float_format=lambda v: f"{v:.4g}")))


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
        ds = zoo.load_data(a.data or zoo.default_data_for(a.model), split="test")
        example = ds[0][0][None]
    infos = qfi.list_names(model, target=a.target, **({"example": example} if example is not None else {}))
    words = a.filter or (",".join(a.names) if a.names else None)
    if words or a.exclude:
        select = qfi.select_weights if a.target == "weights" else qfi.select_modules
        chosen = set(select(model, names=words, exclude=a.exclude or None))
        infos = [i for i in infos if i.name in chosen]
    total = 0
    for i in infos:
        shape = "x".join(map(str, i.shape)) if i.shape is not None else "?"
        numel = i.numel if i.numel is not None else 0
        total += numel
        print(f"{i.name:<60} {shape:>16} {numel:>12,}")
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
        batch_size=a.batch_size or 512,
        limit=a.limit,
        formats=MAIN_FORMATS,
    )
    jobs = [
        # per-bit BER 1e-3: ~59 flips of one bit position per trial over the 58.6k weights, enough
        # for one exponent-MSB hit to be near-certain and for harmless bits to show as harmless
        CampaignConfig(bits="all", ber=1e-3, out=os.path.join(a.out, "bits"), **run),
        # every bit may flip: 1e-7 (~0.2 flips per fp32 trial, mostly clean) .. 1e-3 (~1.9k flips)
        CampaignConfig(bits="none", ber="1e-7:1e-3", out=os.path.join(a.out, "formats"), **run),
    ]
    for cfg in jobs:
        print(
            f"== {cfg.out}: formats {', '.join(cfg.formats)}, bits {cfg.bits}, BER {list(cfg.ber)}, "
            f"{cfg.reps} reps"
        )
        res = run_campaign(cfg, fresh=a.fresh, progress=False if a.quiet else None, plots=not a.no_plots)
        _report(res)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    from qfi.errors import QfiError
    from quant_schemes import FormatError

    ap = build_parser()
    a = ap.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if a.verbose else logging.WARNING, format="%(levelname)s %(message)s"
    )
    try:
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
            overrides = {k: v for k, v in (("out", a.out), ("device", a.device)) if v is not None}
            return _run(dataclasses.replace(cfg, **overrides), a)
        if a.command == "main":
            return cmd_main(a)
    except (QfiError, FormatError, ValueError, FileNotFoundError) as e:
        print(f"qfi {a.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; finished trials are saved, rerun the same command to resume", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
