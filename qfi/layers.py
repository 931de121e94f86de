"""Layer-wise vulnerability maps: split the selected weights (or activation modules) into one
group per layer, run one campaign over all groups, and tabulate and draw the result per layer.

Grouping rules (``layer_groups``):

* ``"block"`` (default): the block index in the name.  A dotted module path segment ``N`` after a
  word (``encoder.layer.3``, ``transformer.h.3``, ``_blocks.3``, ``features.3``, ``layer1.0``) or
  a segment ``<word>_N`` (``encoder.layers.encoder_layer_3``) is a block index when its family
  (the path before the index) occurs with at least two different indices; a name belongs to its
  outermost block, named by the block's path (``encoder.layers.encoder_layer_3``).  A name
  outside every block (embeddings, final norm, head) goes to the group of its shortest leading
  path that holds no block: ``class_token``, ``conv_proj``, ``encoder.pos_embedding``,
  ``encoder.ln``, ``heads`` in torchvision's ViT; ``embeddings``, ``pooler`` in BERT;
  ``transformer.wte``, ``transformer.ln_f``, ``lm_head`` in GPT-2.  A model without blocks
  (``conv1``, ``conv2``, ``fc1``) gets one group per top-level module.
* ``"module"``: one group per module owning the weights (the module path of the name; a
  parameter of the root model is its own group), or per selected module for activations.

Each group carries a name filter that selects exactly its members under the same ``exclude``
(a tight prefix regex, ``re:^encoder\\.layer\\.3(\\.|$)``, where that selects no other name,
else an alternation of the escaped names), so one campaign whose ``names`` are the groups'
filters runs one condition per layer.  ``layer_groups`` checks that the groups are disjoint and
cover the selection.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn

import qfi
from qfi.config import parse_bits
from qfi.errors import QfiError
from qfi.select import weight_tensors
from quant_schemes import get_format

log = logging.getLogger("qfi")

RULES = ("block", "module")
_NUMBERED = re.compile(r"(.*[^\d_])_(\d+)")  # encoder_layer_3 -> encoder_layer, 3


@dataclass(frozen=True)
class LayerGroup:
    """One layer: its ``name`` (a module path or prefix), the ``filter`` selecting exactly its
    ``members`` (weight or module names, in model order) and its size ``numel`` in elements
    (weights; for activations the output values per sample, None when no example was run)."""

    name: str
    filter: str
    members: tuple[str, ...]
    numel: int | None

    def bits(self, fmt: str) -> int | None:
        """The group's size in stored bits in format ``fmt``."""
        return None if self.numel is None else self.numel * get_format(fmt).bits


def _index_sites(path: str) -> list[tuple[str, str]]:
    """(family, block path) of each indexed segment of a module path, outermost first:
    ``encoder.layer.3.attn`` -> ``[("encoder.layer.", "encoder.layer.3")]``."""
    parts = path.split(".")
    sites = []
    for i, part in enumerate(parts):
        head = ".".join(parts[:i])
        lead = head + "." if head else ""
        if part.isdigit() and i > 0:
            sites.append((lead, lead + part))
        elif m := _NUMBERED.fullmatch(part):
            sites.append((lead + m[1] + "_", lead + part))
    return sites


def _block_of(names: list[str], module_paths: list[str]) -> list[str]:
    """The ``"block"`` rule's group name for each name (see the module docstring)."""
    sites = [_index_sites(p) for p in module_paths]
    blocks_of: dict[str, set[str]] = {}
    for s in sites:
        for family, block in s:
            blocks_of.setdefault(family, set()).add(block)
    families = {f for f, b in blocks_of.items() if len(b) >= 2}
    chosen = [next((b for f, b in s if f in families), None) for s in sites]
    holders = {".".join(b.split(".")[:k]) for b in chosen if b for k in range(1, b.count(".") + 2)}
    out = []
    for name, block in zip(names, chosen, strict=True):
        if block is None:
            parts = name.split(".")
            k = next((k for k in range(1, len(parts) + 1) if ".".join(parts[:k]) not in holders), len(parts))
            block = ".".join(parts[:k])
        out.append(block)
    return out


def _escape(name: str) -> str:
    """``name`` as a regex matching it literally, commas written ``\\x2c`` (a filter splits on commas)."""
    return re.escape(name).replace(",", r"\x2c")


def _tight_filter(pattern: str, members: list[str], candidates: list[str]) -> str:
    """``re:<pattern>`` when it selects exactly ``members`` among ``candidates``, else an
    alternation of the escaped member names."""
    rx = re.compile(pattern)
    if [c for c in candidates if rx.search(c)] == members:
        return "re:" + pattern
    alternation = "|".join(map(_escape, members))
    return f"re:^(?:{alternation})$"


def layer_groups(
    model: nn.Module,
    target: str = "weights",
    rule: str = "block",
    names: object = None,
    exclude: object = None,
    *,
    bn_stats: bool = False,
    example: object = None,
) -> list[LayerGroup]:
    """The selected weights (``target="weights"``) or activation modules (``"activations"``),
    ``names`` / ``exclude`` as for :func:`qfi.select_weights`, split into one group per layer by
    ``rule`` (``"block"`` or ``"module"``, see the module docstring), in model order.

    Activation group sizes (output values per sample) are known only when ``example`` (a model
    input for one sample, as for :func:`qfi.list_names`) is given.
    """
    if rule not in RULES:
        raise QfiError(f"unknown layer grouping rule {rule!r}; allowed: {', '.join(RULES)}")
    if target == "weights":
        every = qfi.select_weights(model, bn_stats=bn_stats)
        chosen = qfi.select_weights(model, names, exclude, bn_stats=bn_stats)
        tensors = weight_tensors(model, bn_stats)
        sizes: dict[str, int | None] = {n: tensors[n].numel() for n in chosen}
        paths = [n.rpartition(".")[0] or n for n in every]  # module path; a root parameter: itself
    elif target == "activations":
        every = qfi.select_modules(model)
        chosen = qfi.select_modules(model, names, exclude)
        # a module the example's forward never calls (dropout on a fused attention path) adds nothing
        infos = qfi.list_names(model, "activations", example=example) if example is not None else []
        sizes = {i.name: i.numel or 0 for i in infos}
        paths = every
    else:
        raise QfiError(f"target must be 'weights' or 'activations', got {target!r}")
    # blocks are found over the whole model, so a selection of one layer still names it
    key = dict(zip(every, _block_of(every, paths) if rule == "block" else paths, strict=True))
    drop = qfi.NameFilter.parse(None, exclude)  # the campaign applies the same exclude to each group
    cands = [c for c in every if drop.matches(c)]
    members: dict[str, list[str]] = {}
    for name in chosen:
        members.setdefault(key[name], []).append(name)
    groups = []
    for group, ms in members.items():
        if rule == "block" or ms == [group]:
            pattern = rf"^{_escape(group)}(\.|$)"
        else:  # module rule, weights: the module's own tensors, not its children's
            pattern = rf"^{_escape(group)}\.[^.]+$"
        counts = [sizes.get(m) for m in ms]
        numel = None if None in counts else sum(c for c in counts if c is not None)
        groups.append(LayerGroup(group, _tight_filter(pattern, ms, cands), tuple(ms), numel))
    _check_partition(model, target, groups, chosen, exclude, bn_stats)
    return groups


def _check_partition(
    model: nn.Module,
    target: str,
    groups: list[LayerGroup],
    chosen: list[str],
    exclude: object,
    bn_stats: bool,
) -> None:
    """Each group's filter selects exactly its members; the groups are disjoint and cover ``chosen``."""
    seen: list[str] = []
    for g in groups:
        if target == "weights":
            got = qfi.select_weights(model, g.filter, exclude, bn_stats=bn_stats)
        else:
            got = qfi.select_modules(model, g.filter, exclude)
        if got != list(g.members):
            raise RuntimeError(f"internal: layer group {g.name!r} filter {g.filter!r} selects {got}")
        seen.extend(got)
    if sorted(seen) != sorted(chosen):
        raise RuntimeError("internal: the layer groups do not partition the selection")


# --------------------------------------------------------------------------------------- sweep


def fitted_bers(groups: Sequence[LayerGroup], fmt: str, per_bit: bool) -> tuple[float, ...]:
    """Default rates for a layer map.  Per bit (``per_bit``): 1e-3, as ``qfi bits`` (~19 flips of
    the bit per trial in an encoder layer of the embedded ViT).  Every bit: five decades whose
    top one is the lowest at which every group expects at least one flip per trial and the
    largest at least 100 (fp32 on the embedded ViT: 1e-7..1e-3); 1e-7..1e-3 where the group
    sizes are unknown (activations without an example)."""
    if per_bit:
        return (1e-3,)
    sizes = [b for g in groups if (b := g.bits(fmt))]
    top = -3
    if sizes:
        top = min(-1, max(math.ceil(math.log10(1 / min(sizes))), math.ceil(math.log10(100 / max(sizes)))))
    return tuple(float(f"1e{e}") for e in range(top - 4, top + 1))


def _selection(cfg_names: Sequence[str]) -> list[str] | None:
    """The campaign's name groups merged into one selection (None: everything)."""
    if any(not n for n in cfg_names):
        return None
    return list(cfg_names)


def _expected_flips(table: pd.DataFrame, target: str) -> pd.Series:
    """N x bits x BER per trial for weight BER conditions (the flips a trial expects)."""
    if target != "weights":
        return pd.Series(np.nan, index=table.index)
    nbits = table["format"].map(lambda f: get_format(f).bits)
    per = np.where(table["bit"] >= 0, 1, nbits) * table["numel"] * table["ber"]
    return pd.Series(np.where(table["fault"] == "ber", per, table["count"]), index=table.index)


def per_layer_table(
    summary: pd.DataFrame, groups: Sequence[LayerGroup], metric: str = "top1", higher_is_better: bool = True
) -> pd.DataFrame:
    """One row per layer group and condition of a campaign ``summary`` whose ``names`` are the
    groups' filters: ``layer`` (group name), ``order``, ``numel`` and ``size_bits`` (group size in
    elements and stored bits), ``format``, ``target``, ``fault``, ``ber``, ``count``, ``bit``,
    ``bit_name``, ``trials``, ``expected_flips`` (weights), ``flips_mean``, the mean of ``metric``
    (the primary value's column stem: ``top1``, ``cos_mean``, ``loss``) with its 95% CI and its
    change from clean (``<metric>_drop`` = clean - mean, or ``<metric>_rise`` = mean - clean where
    lower is better, as in ``per_bit.csv``), ``sdc_mean``, ``due_mean`` and the clean and golden
    ``metric``."""
    need = [f"{metric}_mean", f"{metric}_ci_low", f"{metric}_ci_high"]
    missing = [c for c in need if c not in summary.columns]
    if missing:
        known = sorted(c[: -len("_ci_low")] for c in summary.columns if c.endswith("_ci_low"))
        raise QfiError(f"metric {metric!r} has no columns {missing} in the summary; known: {known}")
    by_filter = {g.filter: (i, g) for i, g in enumerate(groups)}
    rows = summary[summary["names"].isin(by_filter)]
    t = pd.DataFrame(
        {
            "layer": [by_filter[n][1].name for n in rows["names"]],
            "order": [by_filter[n][0] for n in rows["names"]],
            "numel": pd.array([by_filter[n][1].numel for n in rows["names"]], dtype="Int64"),
        },
        index=rows.index,
    )
    t["size_bits"] = t["numel"] * rows["format"].map(lambda f: get_format(f).bits).astype("Int64")
    cond = ["format", "target", "fault", "ber", "count", "bit", "bit_name", "trials"]
    t = pd.concat([t, rows[cond]], axis=1)
    t["expected_flips"] = _expected_flips(t, str(rows["target"].iloc[0]) if len(rows) else "weights")
    t["flips_mean"] = rows["flips_mean"]
    t[need] = rows[need]
    if f"clean_{metric}" in rows:
        clean, mean = rows[f"clean_{metric}"], rows[f"{metric}_mean"]
        if higher_is_better:
            t[f"{metric}_drop"] = clean - mean
        else:
            t[f"{metric}_rise"] = mean - clean
    t[["sdc_mean", "due_mean"]] = rows[["sdc_mean", "due_mean"]]
    for base in (f"clean_{metric}", f"golden_{metric}"):
        if base in rows:
            t[base] = rows[base]
    return t.reset_index(drop=True)


@dataclass
class LayerMap:
    """What :func:`layer_map` made: the groups, the per-layer table, the campaign result (its
    ``metric`` scored the trials) and the files written (``per_layer.csv``, ``per_layer.png``)."""

    groups: list[LayerGroup]
    table: pd.DataFrame
    campaign: Any  # qfi.campaign.CampaignResult
    files: list[Path]

    @property
    def metric(self) -> str:
        """The primary value's column stem (``top1``, ``cos_mean``, ``loss``)."""
        return self.campaign.metric.primary


def layer_map(
    cfg: Any,
    model: nn.Module | None = None,
    dataset: Any = None,
    *,
    rule: str = "block",
    fresh: bool = False,
    progress: bool | None = False,
    plots: bool = True,
    groups: Sequence[LayerGroup] | None = None,
) -> LayerMap:
    """Run one campaign of ``cfg`` (a :class:`~qfi.config.CampaignConfig`) whose name groups are
    the layers of its selection (``cfg.names`` merged into one selection, minus ``cfg.exclude``,
    split by ``rule``), so all layers share one folder, one golden baseline and one resume; then
    write ``per_layer.csv`` (:func:`per_layer_table`) and, with ``plots``, the heatmap
    ``per_layer.png`` (:func:`plot_layer_map`) into ``cfg.out``.

    ``model`` / ``dataset`` default to ``cfg.model`` / ``cfg.data`` as in ``run_campaign``; the
    table and the map show the primary value of ``cfg.metric``.  ``groups`` (as an earlier map
    recorded them in its ``manifest.json``: ``cfg.names`` are then their filters) skips the
    grouping.  The groups and the rule are recorded in ``manifest.json`` under ``layer_map``.
    """
    from qfi import zoo
    from qfi.campaign import resolve_device, run_campaign
    from qfi.evaluate import Evaluator

    if model is None:
        model = zoo.load_model(cfg.model, weights=cfg.weights, device=resolve_device(cfg.device))
    example = None
    if cfg.target == "activations":
        if dataset is None:
            data_spec = cfg.data or zoo.default_data_for(cfg.model)
            dataset = zoo.load_data(
                data_spec, split="test", image_size=cfg.image_size, mean=cfg.mean, std=cfg.std
            )
        device = next(model.parameters(), torch.empty(0)).device
        example = Evaluator(dataset, batch_size=1, device=device, limit=1, metric="cosine").inputs()[0]
    if groups is None:
        groups = layer_groups(
            model,
            cfg.target,
            rule,
            _selection(cfg.names),
            cfg.exclude or None,
            bn_stats=cfg.bn_stats,
            example=example,
        )
    groups = list(groups)
    _warn_few_flips(cfg, groups)
    res = run_campaign(
        dataclasses.replace(cfg, names=tuple(g.filter for g in groups)),
        model=model,
        dataset=dataset,
        fresh=fresh,
        progress=progress,
        plots=False,  # one per_bit panel per layer would be unreadable: per_layer.png instead
        manifest_extra={"layer_map": {"rule": rule, "groups": [dataclasses.asdict(g) for g in groups]}},
    )
    metric, better = res.metric.primary, res.metric.higher_is_better
    table = per_layer_table(res.summary, groups, metric, higher_is_better=better)
    out = Path(cfg.out)
    files = [_write_csv(table, out / "per_layer.csv")]
    if plots and not table.empty:
        files.append(plot_layer_map(table, out / "per_layer.png", metric, higher_is_better=better))
    return LayerMap(groups, table, res, files)


def recorded_groups(manifest: dict[str, Any]) -> tuple[str, list[LayerGroup]] | None:
    """The rule and groups a layer map recorded in its ``manifest.json``, or None for another
    campaign's manifest."""
    lm = manifest.get("layer_map")
    if not isinstance(lm, dict):
        return None
    try:
        groups = [
            LayerGroup(g["name"], g["filter"], tuple(g["members"]), g["numel"]) for g in lm["groups"]
        ]
        return str(lm["rule"]), groups
    except (KeyError, TypeError) as e:
        raise QfiError(f"manifest.json: a malformed layer_map entry ({e!r}); rerun qfi layers") from None


def _warn_few_flips(cfg: Any, groups: list[LayerGroup]) -> None:
    """One warning line naming the weight groups that expect under one flip per trial at the
    highest BER (their cells show the clean result in most trials)."""
    if cfg.target != "weights" or not cfg.ber:
        return
    per_bit = parse_bits(cfg.bits, get_format(cfg.formats[0]).bits) != (-1,)
    top = max(cfg.ber)
    few = [g.name for g in groups if g.numel and (g.numel if per_bit else g.bits(cfg.formats[0])) * top < 1]
    if few:
        more = f" and {len(few) - 3} more" if len(few) > 3 else ""
        log.warning(
            "layer group(s) %s%s expect fewer than one flip per trial at BER %g: most of their "
            "trials are clean; raise --ber or use --flips for a per-fault comparison",
            ", ".join(few[:3]),
            more,
            top,
        )


def _write_csv(df: pd.DataFrame, path: Path) -> Path:
    """Through a temporary file and a rename: a kill leaves the old file or the new one."""
    tmp = path.with_name(path.name + ".tmp")
    df.to_csv(tmp, index=False, float_format="%.6g", lineterminator="\n")
    os.replace(tmp, path)
    return path


# ---------------------------------------------------------------------------------------- plot


def _column_label(r: pd.Series) -> str:
    n = int(r["count"])
    return f"BER {r['ber']:g}" if r["fault"] == "ber" else f"{n} flip{'s' * (n != 1)}"


def _panel_title(r: pd.Series, per_bit: bool) -> str:
    if not per_bit:
        return f"{r['target']} faults, {r['format']}"
    what = f"per-bit BER {r['ber']:g}" if r["fault"] == "ber" else f"{_column_label(r)} per trial"
    return f"{r['target']} faults, {r['format']}, {what} (only bit b flips)"


@dataclass(frozen=True)
class Panel:
    """One panel of a layer map: rows are the layers (model order, by name), columns the bit
    positions (MSB first) or the conditions (BERs, then flip counts); ``mean`` holds the mean
    metric, ``flipped`` whether any trial of the cell flipped anything."""

    title: str
    mean: pd.DataFrame
    flipped: pd.DataFrame
    clean: float | None

    def text(self, digits: int = 2) -> pd.DataFrame:
        """The cells as text: the mean, ``-`` where nothing flipped, ``nan``/``inf`` as such."""
        cells = self.mean.map(lambda v: f"{v:.{digits}f}")
        return cells.where(self.flipped, "-")


def layer_grids(table: pd.DataFrame, metric: str = "top1") -> list[Panel]:
    """The panels of a per-layer table: layers x bit positions, one panel per format and rate
    (per-bit sweeps), or layers x conditions, one panel per format (BER sweeps, flip counts)."""
    per_bit = bool((table["bit"] >= 0).any())
    keys = ["format", "fault", "ber", "count"] if per_bit else ["format"]
    clean = f"clean_{metric}"
    t = table.assign(
        column=table["bit"] if per_bit else table.apply(_column_label, axis=1),
        flipped=table["flips_mean"] > 0,
    )
    layers = t.sort_values("order").drop_duplicates("order")["layer"]
    panels = []
    for _, df in t.groupby(keys, sort=False):
        cols = sorted(df["column"].unique(), reverse=True) if per_bit else list(dict.fromkeys(df["column"]))
        cells = df.set_index(["layer", "column"])
        mean, flipped = (
            cells[c].unstack().reindex(index=layers, columns=cols) for c in (f"{metric}_mean", "flipped")
        )
        mean.columns.name = flipped.columns.name = "bit" if per_bit else "condition"
        title = _panel_title(df.iloc[0], per_bit)
        panels.append(
            Panel(title, mean, flipped.fillna(False).astype(bool), df[clean].iloc[0] if clean in df else None)
        )
    return panels


def plot_layer_map(
    table: pd.DataFrame, path: str | Path, metric: str = "top1", *, higher_is_better: bool = True
) -> Path:
    """Heatmap of a per-layer table, one panel per :func:`layer_grids` panel (layers x bit
    positions, or layers x BERs): the colour is the damage (the metric's loss from clean, the
    same scale in every panel; a non-finite mean counts as the worst), each cell shows the mean
    metric, a dash marks a cell whose trials flipped nothing.  Rows are labelled with the group
    size in elements."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = layer_grids(table, metric)
    sign = 1 if higher_is_better else -1
    damages = [sign * (p.clean - p.mean) if p.clean is not None else p.mean * 0 for p in panels]
    finite = [d.to_numpy(dtype=float)[np.isfinite(d.to_numpy(dtype=float))] for d in damages]
    vmax = max(1e-6, *(float(f.max(initial=0)) for f in finite))
    numel = table.drop_duplicates("layer").set_index("layer")["numel"]
    nrows, ncols = len(panels[0].mean), max(p.mean.shape[1] for p in panels)
    fig, axes = plt.subplots(
        len(panels),
        1,
        figsize=(min(20.0, 3.5 + 0.42 * ncols), len(panels) * (1.2 + 0.34 * nrows)),
        squeeze=False,
    )
    for ax, p, damage in zip(axes[:, 0], panels, damages, strict=True):
        d = damage.astype(float)
        shade = d.where(np.isfinite(d), vmax).where(p.flipped, 0.0).clip(0.0, vmax)  # NaN/inf: the worst
        im = ax.imshow(shade.to_numpy(), cmap="Reds", vmin=0, vmax=vmax, aspect="auto")
        wide = p.mean.shape[1] > 16
        for (i, j), c in np.ndenumerate(p.text().to_numpy()):
            c = "–" if c == "-" else c.removeprefix("0") if wide else c
            dark = shade.iat[i, j] > 0.6 * vmax
            ax.text(
                j,
                i,
                c,
                ha="center",
                va="center",
                fontsize=5.5 if wide else 7,
                color="white" if dark else "black",
            )
        ax.set_xticks(range(p.mean.shape[1]), [str(c) for c in p.mean.columns], fontsize=7)
        sizes = ["?" if pd.isna(numel[n]) else f"{int(numel[n]):,}" for n in p.mean.index]
        ax.set_yticks(
            range(nrows), [f"{n}  ({s})" for n, s in zip(p.mean.index, sizes, strict=True)], fontsize=7
        )
        ax.set_title(p.title + ("" if p.clean is None else f"; clean {p.clean:.4f}"), fontsize=9, loc="left")
        ax.set_xlabel("bit position (0 = LSB)" if p.mean.columns.name == "bit" else "condition", fontsize=8)
        cbar = fig.colorbar(im, ax=ax, fraction=0.025, pad=0.01)
        cbar.set_label(f"{metric} {'drop' if higher_is_better else 'rise'} from clean", fontsize=7)
        cbar.ax.tick_params(labelsize=7)
    note = f"cells: mean {metric} over trials; – : no flip in any trial; rows: layer group (size in elements)"
    fig.text(0.005, 0.005, note, fontsize=6, color="grey")
    fig.tight_layout(rect=(0, 0.02, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)
