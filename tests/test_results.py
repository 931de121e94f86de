"""Result tables from a hand-built detail frame (no model): summary.csv keeps its shape, per_bit.csv
and per_format.csv have the shapes their names promise and are not copies of the summary."""

from __future__ import annotations

import itertools

import numpy as np
import pandas as pd
import pytest

from qfi.results import (
    CONDITION,
    DETAIL_COLUMNS,
    PER_BIT_COLUMNS,
    PER_FORMAT_COLUMNS,
    per_bit_table,
    per_format_table,
    summarize,
    write_tables,
)
from quant_schemes import get_format

SUMMARY_COLUMNS = [
    *CONDITION, "trials", "flips_mean", "top1_mean", "top1_std", "top1_ci_low", "top1_ci_high",
    "top5_mean", "top5_std", "sdc_mean", "due_mean", "clean_top1", "clean_top5", "golden_top1",
    "golden_top5", "evaluated",
]  # fmt: skip
REPS = 3


def _detail(sdc_any: bool = False) -> pd.DataFrame:
    """int8 per-bit sweep (8 bits, two name groups) + fp16/bf16 BER sweep over two rates and a
    flip-count condition, REPS repetitions each; top-1 depends on the condition and the rep."""
    rows = []
    conds = [("int8", names, "ber", 1e-3, 0, bit) for names in ("", "mlp") for bit in range(8)]
    conds += [(f, "", "ber", ber, 0, -1) for f in ("fp16", "bf16") for ber in (1e-5, 1e-4)]
    conds += [("fp16", "", "flips", 0.0, 5, -1)]
    for i, ((fmt, names, fault, ber, count, bit), rep) in enumerate(itertools.product(conds, range(REPS))):
        clean = 0.95 if fmt == "int8" else 0.97
        top1 = clean - 0.01 * (bit + 1) - 0.002 * rep
        rows.append({
            "format": fmt, "target": "weights", "names": names, "fault": fault, "ber": ber,
            "count": count, "bit": bit, "bit_name": "any" if bit < 0 else get_format(fmt).bit_names[bit],
            "rep": rep, "seed": 1000 + i, "flips": 10 + rep, "top1": top1, "top5": 0.99,
            "sdc": 0.1 * rep, "due": 0.05 * (rep == 2), "clean_top1": clean, "clean_top5": 1.0,
            "golden_top1": 0.98, "golden_top5": 1.0, "evaluated": rep > 0,
        })  # fmt: skip
    df = pd.DataFrame(rows, columns=[c for c in DETAIL_COLUMNS if c != "sdc_any"])
    if sdc_any:  # SDC (finite outputs whose prediction differs) or DUE: the union
        df.insert(df.columns.get_loc("sdc") + 1, "sdc_any", df["sdc"] + df["due"])
    return df


def test_summary_keeps_its_columns_one_row_per_condition():
    s = summarize(_detail())
    assert list(s.columns) == SUMMARY_COLUMNS
    assert len(s) == 16 + 4 + 1 and not s.duplicated(CONDITION).any()
    assert (s["trials"] == REPS).all()
    np.testing.assert_allclose(s["sdc_mean"], 0.1)


def test_summary_averages_extra_numeric_columns_when_present():
    """An extra numeric detail column (``sdc_any``) becomes ``<col>_mean`` after ``due_mean``."""
    s = summarize(_detail(sdc_any=True))
    cols = list(s.columns)
    assert cols[cols.index("due_mean") + 1] == "sdc_any_mean"
    assert [c for c in cols if c != "sdc_any_mean"] == SUMMARY_COLUMNS
    np.testing.assert_allclose(s["sdc_any_mean"], 0.1 + 0.05 / REPS)


def test_per_bit_table_one_row_per_bit_condition_with_name_role_and_drop():
    s = summarize(_detail(sdc_any=True))
    pb = per_bit_table(s)
    key = ["format", "target", "names", "fault", "ber", "count", "bit"]
    assert list(pb.columns) == [*PER_BIT_COLUMNS[:16], "sdc_any_mean", *PER_BIT_COLUMNS[16:]]
    assert len(pb) == 16 and not pb.duplicated(key).any()
    assert sorted(pb["bit"].unique()) == list(range(8))
    roles, names = get_format("int8").bit_roles, get_format("int8").bit_names
    assert pb["bit_role"].tolist() == [roles[b] for b in pb["bit"]]
    assert pb["bit_name"].tolist() == [names[b] for b in pb["bit"]]
    assert set(pb["bit_role"]) == {"sign", "magnitude"}
    np.testing.assert_allclose(pb["top1_drop"], 0.01 * (pb["bit"] + 1) + 0.002)
    assert (pb["top1_ci_low"] < pb["top1_mean"]).all() and (pb["top1_mean"] < pb["top1_ci_high"]).all()
    subset = s[s["bit"] >= 0].reset_index(drop=True)
    assert not pb.equals(subset) and set(pb.columns) != set(subset.columns)


def test_per_format_table_one_row_per_format_and_rate():
    s = summarize(_detail())
    pf = per_format_table(s)
    assert list(pf.columns) == list(PER_FORMAT_COLUMNS)
    assert len(pf) == 5 and "bit" not in pf.columns  # any bit may flip: no bit column
    assert not pf.duplicated(["format", "target", "names", "fault", "ber", "count"]).any()
    ber = pf[pf["fault"] == "ber"]
    assert sorted(zip(ber["format"], ber["ber"], strict=True)) == [
        ("bf16", 1e-5), ("bf16", 1e-4), ("fp16", 1e-5), ("fp16", 1e-4)
    ]
    np.testing.assert_allclose(pf["flips_mean"], 11.0)
    np.testing.assert_allclose(pf["top1_drop"], 0.002)


@pytest.mark.parametrize("plots", [False, True])
def test_write_tables_writes_the_views_not_summary_copies(tmp_path, plots):
    """per_bit.csv and per_format.csv on disk are the views (not summary subsets); the plots draw
    from them; a campaign with no per-bit condition writes no per_bit.csv."""
    detail = _detail()
    s = summarize(detail)
    written = {p.name for p in write_tables(detail, s, tmp_path, plots=plots)}
    want = {"summary.csv", "per_bit.csv", "per_format.csv"}
    assert written == (want | {"per_bit.png", "per_format.png"} if plots else want)
    pb = pd.read_csv(tmp_path / "per_bit.csv", keep_default_na=False)
    pf = pd.read_csv(tmp_path / "per_format.csv", keep_default_na=False)
    assert tuple(pb.columns) == PER_BIT_COLUMNS and tuple(pf.columns) == PER_FORMAT_COLUMNS
    assert (len(pb), len(pf)) == (16, 5)
    summary_subset = s[s["bit"] >= 0].to_csv(index=False, float_format="%.6g", lineterminator="\n")
    assert (tmp_path / "per_bit.csv").read_text() != summary_subset
    only_any = tmp_path / "any"
    only_any.mkdir()
    d2 = detail[detail["bit"] < 0]
    names = {p.name for p in write_tables(d2, summarize(d2), only_any, plots=plots)}
    assert "per_bit.csv" not in names and "per_format.csv" in names
