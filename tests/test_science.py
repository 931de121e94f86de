"""Science checks on the shipped, trained ViT (digits test split, 450 images).

These are the results a researcher expects from bit-level fault injection; a broken format,
a wrong bit numbering or a fault that never lands makes them fail.  Seeds are fixed, so the
numbers are reproducible; the margins are wide enough to hold for any reasonable seed.
"""

import numpy as np
import pytest

from qfi.campaign import run_campaign
from qfi.config import CampaignConfig


def _per_bit(tmp_path_factory, name, formats, bits, reps, ber=1e-3):
    out = tmp_path_factory.mktemp(name)
    cfg = CampaignConfig(formats=formats, bits=bits, ber=ber, reps=reps, device="cpu", out=str(out))
    s = run_campaign(cfg, progress=False, plots=False).summary
    return {f: d.set_index("bit") for f, d in s.groupby("format")}


@pytest.fixture(scope="module")
def fp32(tmp_path_factory):
    return _per_bit(tmp_path_factory, "fp32", ("fp32",), "0:15,30", reps=5)["fp32"]


@pytest.fixture(scope="module")
def narrow(tmp_path_factory):
    return _per_bit(tmp_path_factory, "narrow", ("fp16", "bf16", "q3.13"), "all", reps=8)


def test_fp32_exponent_msb_collapses_accuracy_mantissa_low_bits_do_not(fp32):
    """Per-bit BER 1e-3 (~58 flips): bit 30 (exponent MSB) turns weights into ~1e38 or inf and
    accuracy falls to chance or below; bits 0-15 (low mantissa) stay within 0.5 points of clean."""
    clean = fp32["clean_top1"].iloc[0]
    assert clean > 0.95
    assert fp32.loc[30, "top1_mean"] < 0.15
    assert fp32.loc[30, "flips_mean"] > 30
    low = fp32.loc[0:15]
    assert (low["top1_mean"] - clean).abs().max() <= 0.005
    assert (low["flips_mean"] > 30).all()  # the faults really landed


@pytest.mark.parametrize("fmt", ["fp16", "bf16"])
def test_half_formats_exponent_msb_most_sensitive_sign_in_between(narrow, fmt):
    """fp16/bf16: the exponent MSB (bit 14) is the most damaging bit; the sign bit hurts less than
    it but more than the low mantissa bits, which leave accuracy at (or within 0.2% SDC of) clean."""
    d = narrow[fmt]
    clean = d["clean_top1"].iloc[0]
    assert d["top1_mean"].idxmin() == 14
    assert d.loc[14, "top1_mean"] < 0.5 * clean
    low_mantissa = d.loc[0:3, "sdc_mean"].mean()
    assert low_mantissa < 0.002
    # failures = silent (sdc) + detected (due: a bf16 exponent-MSB flip often gives NaN/Inf)
    failed = d["sdc_mean"] + d["due_mean"]
    assert failed.loc[14] > failed.loc[15] > low_mantissa
    assert (d["sdc_mean"] + d["due_mean"] <= 1.0 + 1e-12).all()


def test_fixed_point_sensitivity_grows_with_bit_significance(narrow):
    """q3.13: a flip of bit b changes a value by 2^(b-13) (sign: 4), so damage grows with b: strong
    rank correlation, the three top bits strictly ordered, low fraction bits harmless."""
    d = narrow["q3.13"]
    drop = d["clean_top1"] - d["top1_mean"]
    bits = d.index.to_numpy()
    ranks = lambda v: np.argsort(np.argsort(v))  # noqa: E731
    rho = np.corrcoef(ranks(bits), ranks(drop.to_numpy() + 1e-9 * bits))[0, 1]
    assert rho > 0.85, rho
    assert (
        d.loc[15, "top1_mean"]
        < d.loc[14, "top1_mean"]
        < d.loc[13, "top1_mean"]
        < d.loc[0:12, "top1_mean"].min()
    )
    assert (drop.loc[0:7].abs() < 1e-9).all()


def test_int8_more_robust_than_fp32_at_the_same_ber(tmp_path):
    """Symmetric int8 bounds every faulty weight by 128 x scale; fp32 exponent flips are unbounded,
    so at the same BER int8 keeps far more accuracy."""
    cfg = CampaignConfig(formats=("fp32", "int8"), ber=(1e-5, 1e-4), reps=10, device="cpu", out=str(tmp_path))
    s = run_campaign(cfg, progress=False, plots=False).summary.set_index(["format", "ber"])
    for ber in (1e-5, 1e-4):
        assert s.loc[("int8", ber), "top1_mean"] > s.loc[("fp32", ber), "top1_mean"] + 0.2
        assert s.loc[("int8", ber), "top1_ci_low"] > s.loc[("fp32", ber), "top1_ci_high"]
