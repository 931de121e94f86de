"""The research scripts in scripts/ run with their defaults (few reps, few samples) and write
what their docstrings promise; vit_weight_corruption's default rates fit the model in hand."""

import importlib.util
from pathlib import Path

import pandas as pd
import pytest

from qfi import zoo
from qfi.errors import QfiError

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"
SMALL = ["--reps", "1", "--limit", "64", "--device", "cpu", "--no-plots"]


def load(name: str):
    """The script as a module (its ``main(argv)`` runs in this process)."""
    spec = importlib.util.spec_from_file_location(f"script_{name}", SCRIPTS / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def mlp_ln_weights() -> int:
    """The embedded ViT's weights whose name contains 'mlp' or 'ln', counted from named_parameters."""
    model = zoo.load_model("vit_digits")
    return sum(p.numel() for n, p in model.named_parameters() if "mlp" in n or "ln" in n)


def test_bit_sensitivity_defaults(tmp_path, capsys):
    """Default format fp32, per-bit BER 1e-3: one condition per bit, bit 30 (exponent MSB) hurts."""
    load("bit_sensitivity").main([*SMALL, "--out", str(tmp_path)])
    s = pd.read_csv(tmp_path / "fp32" / "summary.csv", keep_default_na=False)
    assert sorted(s["bit"]) == list(range(32))
    assert s.set_index("bit").loc[30, "top1_mean"] < s.set_index("bit").loc[0, "top1_mean"]
    out = capsys.readouterr().out
    assert "bit 30 exp7" in out and "summary.csv" in out and ".png" not in out


def test_compare_formats_defaults(tmp_path, capsys):
    """Default formats x default decades 1e-7..1e-3, BERs printed as written (1e-07, not 1.000000e-07)."""
    load("compare_formats").main([*SMALL, "--out", str(tmp_path)])
    s = pd.read_csv(tmp_path / "summary.csv", keep_default_na=False)
    assert set(s["format"]) == {"fp32", "fp16", "bf16", "q3.13", "int8", "int8_per_channel"}
    assert sorted(set(s["ber"])) == pytest.approx([1e-7, 1e-6, 1e-5, 1e-4, 1e-3])
    out = capsys.readouterr().out
    assert "\n1e-07 " in out and "1.000000e-07" not in out


def test_vit_weight_corruption_default_rates_draw_a_curve(tmp_path, capsys):
    """Without --ber the rates are fitted so the top one expects >= 100 flips (not the seed
    script's 1e-10..1e-6, where every row read the clean accuracy); model.csv records the
    expected flips N x bits x BER of every rate, and top-1 falls along the curve."""
    load("vit_weight_corruption").main([*SMALL, "--out", str(tmp_path)])
    m = pd.read_csv(tmp_path / "model.csv")
    assert list(m.columns[:3]) == ["ber", "top1", "top5"]  # the seed script's columns first
    n = mlp_ln_weights()
    assert n == 28_752
    assert list(m["ber"]) == pytest.approx([1e-7, 1e-6, 1e-5, 1e-4, 1e-3])
    assert m["expected_flips"].to_numpy() == pytest.approx(n * 32 * m["ber"].to_numpy(), rel=1e-5)
    assert m["expected_flips"].iloc[-1] >= 100 and m["expected_flips"].iloc[-2] < 100
    assert m["top1"].iloc[-1] < m["top1"].iloc[0] - 0.5  # the default run shows the collapse
    d = pd.read_csv(tmp_path / "detail-model.csv")
    assert list(d.columns) == ["ber", "rep", "flips", "top1", "top5"]
    out, err = capsys.readouterr()
    assert "28,752 weights x 32 bits" in out and "920 at 0.001" in out
    assert "warning" not in err


def test_vit_weight_corruption_warns_when_no_rate_expects_a_flip(tmp_path, capsys):
    """The seed script's rates stay available via --ber, with a warning that names the top
    rate's expected flips and suggests fitted rates."""
    load("vit_weight_corruption").main([*SMALL, "--ber", "1e-10:1e-6", "--out", str(tmp_path)])
    m = pd.read_csv(tmp_path / "model.csv")
    assert list(m["ber"]) == pytest.approx([1e-10, 1e-9, 1e-8, 1e-7, 1e-6])
    assert m["expected_flips"].max() == pytest.approx(28_752 * 32 * 1e-6, rel=1e-5)
    err = capsys.readouterr().err
    assert "warning: every rate expects fewer than one flip" in err
    assert "0.92, at BER 1e-06" in err and "--ber 1e-7:1e-3" in err


def test_vit_weight_corruption_fitted_rates_follow_the_selection(tmp_path, capsys):
    """int8 over every weight (58,570 x 8 bits = 468,560 bits): the top decade is 1e-3 (469
    flips; 1e-4 would give 47)."""
    mod = load("vit_weight_corruption")
    assert mod.fitted_bers(28_752 * 32) == "1e-7:1e-3"
    assert mod.fitted_bers(1_000_000) == "1e-8:1e-4"  # exactly 100 flips at 1e-4
    assert mod.fitted_bers(50) == "1e-4:1e0"  # never above BER 1
    mod.main([*SMALL, "--names", "", "--format", "int8", "--out", str(tmp_path)])
    m = pd.read_csv(tmp_path / "model.csv")
    assert m["ber"].iloc[-1] == pytest.approx(1e-3)
    assert m["expected_flips"].iloc[-1] == pytest.approx(58_570 * 8 * 1e-3, rel=1e-5)


def test_vit_weight_corruption_bad_names_are_an_error(tmp_path):
    """A name filter matching nothing is a QfiError naming it, before anything is written."""
    with pytest.raises(QfiError, match="mlpp"):
        load("vit_weight_corruption").main([*SMALL, "--names", "mlpp", "--out", str(tmp_path / "x")])
    assert not (tmp_path / "x").exists()


def test_scripts_resume_and_fresh(tmp_path, capsys):
    """A rerun into the same folder resumes (no trial runs again); --fresh starts over."""
    mod = load("vit_weight_corruption")
    mod.main([*SMALL, "--out", str(tmp_path)])
    mod.main([*SMALL, "--out", str(tmp_path)])
    assert "0 trials run, 5 resumed" in capsys.readouterr().out
    mod.main([*SMALL, "--fresh", "--out", str(tmp_path)])
    assert "5 trials run, 0 resumed" in capsys.readouterr().out
    for name in ("bit_sensitivity", "compare_formats"):
        out = tmp_path / name
        load(name).main([*SMALL, "--out", str(out)])
        load(name).main([*SMALL, "--fresh", "--out", str(out)])
