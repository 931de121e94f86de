"""``qfi layers``: the layer-wise vulnerability map (:mod:`qfi.layers`) from the command line.

    qfi layers --format bf16 --flips 1 --reps 20      per-bit map: layers x bit positions
    qfi layers --bits none --rule module              BER decades fitted to the group sizes

``add_parser(sub)`` adds the subcommand to the CLI's subparsers, ``cmd_layers(args)`` runs it.
The helpers of :mod:`qfi.cli` are imported inside the functions, so ``qfi.cli`` may import this
module at its top.
"""

from __future__ import annotations

import argparse
import dataclasses
from typing import Any

HELP = "layer-wise vulnerability map: one name group per layer, per-bit or BER sweep, heatmap"
DESCRIPTION = """\
Layer-wise vulnerability map. The selected weights (or activation modules) are split into one
group per layer (--rule block: the block index in the name, e.g. encoder.layers.encoder_layer_N,
encoder.layer.N, transformer.h.N, _blocks.N, layers.N; names outside every block, such as
embeddings, the final norm and the head, get a group of their own; --rule module: one group per
module), and one campaign runs every group: per_layer.csv (layer, group size in elements and
bits, mean metric with 95% CI per bit or BER, SDC, DUE, flips) and the heatmap per_layer.png.

--ber auto (the default): per-bit BER 1e-3 with --bits all or positions; with --bits none five
BER decades whose top one is the lowest at which every group expects at least one flip per trial
and the largest at least 100.
--flips N (with or without --ber none) flips exactly N sites per trial in every group, so layers
of different sizes compare per fault."""


def add_parser(sub: Any) -> argparse.ArgumentParser:
    """Add ``layers`` to the CLI's subparsers object; returns its parser."""
    from qfi.cli import _common, _faults
    from qfi.layers import RULES

    p = sub.add_parser(
        "layers", help=HELP, description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    _common(p, out="qfi-results/layers")
    p.add_argument("--format", default="fp32", help="one format: fp32 (default), bf16, q3.13, int8, ...")
    p.add_argument(
        "--rule",
        default="block",
        choices=RULES,
        help="block: one group per block index in the name (default); module: one per module",
    )
    _faults(p, ber="auto", bits="all")
    return p


def cmd_layers(a: argparse.Namespace) -> int:
    """Run ``qfi layers``: group, sweep, write per_layer.csv/png, print the map as a table."""
    from qfi import zoo
    from qfi.campaign import resolve_device
    from qfi.cli import _config
    from qfi.config import parse_bits
    from qfi.errors import QfiError
    from qfi.layers import _selection, fitted_bers, layer_groups, layer_map
    from quant_schemes import get_format

    if "," in a.format:
        raise QfiError(f"--format {a.format!r}: qfi layers maps one format; run it once per format")
    auto = str(a.ber).lower() == "auto"
    cfg = _config(argparse.Namespace(**{**vars(a), "ber": "1e-3" if auto else a.ber}), a.format)
    model = zoo.load_model(cfg.model, weights=cfg.weights, device=resolve_device(cfg.device))
    if auto:
        groups = layer_groups(
            model, cfg.target, a.rule, _selection(cfg.names), cfg.exclude or None, bn_stats=cfg.bn_stats
        )
        per_bit = parse_bits(cfg.bits, get_format(cfg.formats[0]).bits) != (-1,)
        cfg = dataclasses.replace(cfg, ber=fitted_bers(groups, cfg.formats[0], per_bit))
    rates = ", ".join(f"{p:g}" for p in cfg.ber) or "none"
    print(
        f"== {cfg.out}: format {cfg.formats[0]}, rule {a.rule}, bits {cfg.bits}, BER {rates}, {cfg.reps} reps"
    )
    res = layer_map(
        cfg,
        model=model,
        rule=a.rule,
        fresh=a.fresh,
        progress=False if a.quiet else None,
        plots=not a.no_plots,
    )
    report(res)
    return 0


def rerun(cfg: Any, rule: str, groups: list, a: argparse.Namespace) -> int:
    """``qfi run <out>/manifest.json`` of a layer map: the same campaign (resumed), then
    per_layer.csv / per_layer.png again, with the groups the manifest recorded."""
    from qfi.layers import layer_map

    print(f"== {cfg.out}: layer map, format {cfg.formats[0]}, rule {rule}, {len(groups)} layer groups")
    res = layer_map(
        cfg,
        rule=rule,
        groups=groups,
        fresh=a.fresh,
        progress=False if a.quiet else None,
        plots=not getattr(a, "no_plots", False),
    )
    report(res)
    return 0


def report(res: Any) -> None:
    """Print what a layer map ran and wrote, and the map itself."""
    from qfi.cli import golden_line, ran_line

    c = res.campaign
    print(f"{len(res.groups)} layer groups, {ran_line(c)}")
    if not c.summary.empty:
        print(golden_line(c.summary, res.metric))
    print_map(res.table, res.metric)
    print(f"per-layer table: {res.files[0]}" + (f", heatmap: {res.files[1]}" if len(res.files) > 1 else ""))


def print_map(table: Any, metric: str = "top1") -> None:
    """Each panel of the map as a text table: mean ``metric`` per layer and bit (or condition),
    ``-`` where no trial flipped anything."""
    import pandas as pd

    from qfi.layers import layer_grids

    for p in layer_grids(table, metric):
        print(f"\n{p.title}: mean {metric}" + ("" if p.clean is None else f" (clean {p.clean:.4f})"))
        with pd.option_context("display.max_rows", 200, "display.width", 250, "display.max_columns", 64):
            print(p.text().to_string())
