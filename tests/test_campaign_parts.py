"""Campaigns on block and group formats: the part faults hit (codes, scales, all stored bits),
per-bit sweeps of scale bits named as such, stored bits per value in per_format.csv."""

import pandas as pd
import pytest

from qfi import zoo
from qfi.campaign import run_campaign
from qfi.config import CampaignConfig
from qfi.errors import QfiError


@pytest.fixture(scope="module")
def model():
    return zoo.load_model("vit_digits")


def _run(tmp_path, name, model, **kw):
    base = dict(formats=("mxfp4", "int4_g128_fp16"), ber=(1e-3,), reps=3, limit=64, device="cpu")
    base.update(kw)
    return run_campaign(CampaignConfig(out=str(tmp_path / name), **base), model=model, progress=False)


def test_parts_change_the_fault_space_and_per_format_reports_bits_per_value(tmp_path, model):
    """At one BER, 'scales' flips far fewer bits than 'codes' (few scale words), 'all' about the
    sum; per_format.csv carries each format's stored bits per value (mxfp4 4.25)."""
    flips = {}
    for part in ("codes", "scales", "all"):
        res = _run(tmp_path, part, model, part=part)
        flips[part] = res.detail.groupby("format")["flips"].mean()
    for f in ("mxfp4", "int4_g128_fp16"):
        assert flips["scales"][f] < flips["codes"][f] / 5
        assert flips["codes"][f] < flips["all"][f] + 5 * flips["all"][f] ** 0.5
    per = pd.read_csv(tmp_path / "all" / "per_format.csv").set_index("format")
    assert per.loc["mxfp4", "bits_per_value"] == 4.25
    assert per.loc["int4_g128_fp16", "bits_per_value"] == pytest.approx(4.125)


def test_per_bit_sweep_of_scale_bits(tmp_path, model):
    """--part scales --bits all sweeps the E8M0 scale's 8 bits, named scale.*, with their roles."""
    res = _run(tmp_path, "bits", model, formats=("mxfp4",), part="scales", bits="all", ber=(1e-1,), reps=2)
    names = res.detail.drop_duplicates("bit").set_index("bit")["bit_name"]
    assert len(names) == 8 and all(n.startswith("scale.") for n in names)
    pb = pd.read_csv(tmp_path / "bits" / "per_bit.csv")
    assert len(pb) == 8 and pb["bit_role"].str.contains("scale").all()
    # the scale exponent's top bit is the one that ruins a block (x 2^128)
    s = res.summary.set_index("bit")["top1_mean"]
    assert s.loc[7] < s.loc[0]


@pytest.mark.parametrize(
    "kw, match",
    [
        ({"formats": ("mxfp4",), "bits": "all"}, r"per-bit sweep of 'mxfp4' needs part 'codes' or 'scales'"),
        ({"formats": ("fp32",), "part": "scales"}, r"format 'fp32' stores no scales"),
        ({"part": "exponents"}, r"part 'exponents'; allowed: all, codes, scales, zero_points"),
        ({"formats": ("mxfp4",), "part": "scales", "bits": "8"}, r"bit 8 is outside the format: allowed 0\.\.7"),  # noqa: E501
    ],
)
def test_bad_parts_are_errors(kw, match):
    with pytest.raises(QfiError, match=match):
        CampaignConfig(**kw)
