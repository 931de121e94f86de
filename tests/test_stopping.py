"""Sequential stopping (--ci): a condition stops once its 95% CI half-width reaches the target,
never before reps_min, at most reps_max; its trials are a prefix of the fixed-repetition trials
(same keys, seeds and values); resume works as with fixed repetitions."""

import dataclasses

import pandas as pd
import pytest

from qfi import zoo
from qfi.campaign import ci_half_width, run_campaign
from qfi.config import CampaignConfig
from qfi.errors import QfiError


@pytest.fixture(scope="module")
def model():
    return zoo.load_model("vit_digits")


def _cfg(tmp_path, name, **kw):
    base = dict(formats=("fp32",), bits="29,30", ber=(1e-5,), reps=10, limit=96, device="cpu")
    base.update(kw)
    return CampaignConfig(out=str(tmp_path / name), **base)


def _run(cfg, model, **kw):
    return run_campaign(cfg, model=model, progress=False, plots=False, **kw)


def test_stopped_conditions_are_prefixes_of_the_fixed_repetitions(tmp_path, model):
    """Bit 29 (harmless: zero spread) stops at reps_min; bit 30 (accuracy collapses at random)
    runs until its CI is tight enough or reps_max; every row equals the fixed-rep run's row."""
    fixed = _run(_cfg(tmp_path, "fixed"), model).detail
    seq = _run(_cfg(tmp_path, "seq", ci=0.3, reps_min=3), model)
    d = seq.detail
    n = d.groupby("bit").size()
    assert n[29] == 3  # settled at once: every trial equal
    assert 3 < n[30] <= 10
    keys = ["bit", "rep"]
    merged = d.merge(fixed, on=keys, suffixes=("", "_fixed"))
    assert len(merged) == len(d)
    for c in ("seed", "flips", "top1", "sdc", "due"):
        assert (merged[c] == merged[f"{c}_fixed"]).all(), c
    assert (d.groupby("bit")["rep"].max() + 1 == n).all()  # a prefix: reps 0..n-1
    s = seq.summary.set_index("bit")
    assert s.loc[30, "trials"] == n[30]
    top = d[d["bit"] == 30]["top1"].tolist()
    assert ci_half_width(top) <= 0.3 or n[30] == 10
    assert ci_half_width(top[:-1]) > 0.3  # it did not stop earlier than it could


def test_interrupted_sequential_campaign_resumes_to_the_same_rows(tmp_path, model, monkeypatch):
    """Killed after a few trials, the same command resumes and ends with the rows of an
    uninterrupted sequential run."""
    import qfi.campaign as campaign

    whole = _run(_cfg(tmp_path, "whole", ci=0.3), model).detail
    real, calls = campaign._run_trial, []

    def dying(*a, **k):
        calls.append(1)
        if len(calls) == 5:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(campaign, "_run_trial", dying)
    cfg = _cfg(tmp_path, "cut", ci=0.3)
    with pytest.raises(KeyboardInterrupt):
        _run(cfg, model)
    monkeypatch.setattr(campaign, "_run_trial", real)
    again = _run(cfg, model)
    assert again.trials_resumed == 4
    pd.testing.assert_frame_equal(again.detail, whole)


@pytest.mark.parametrize(
    "kw, match",
    [
        ({"ci": 0}, r"ci 0\.0 must be a positive half-width"),
        ({"ci": 0.01, "reps_min": 1}, r"reps_min 1 must be >= 2"),
        ({"ci": 0.01, "reps_min": 5, "reps_max": 4}, r"reps_max 4 is below reps_min 5"),
        ({"reps_max": 20}, r"reps_min and reps_max apply with ci"),
    ],
)
def test_bad_stopping_settings(kw, match):
    with pytest.raises(QfiError, match=match):
        CampaignConfig(**kw)


def test_reps_max_plans_more_than_reps(tmp_path):
    """With ci, reps_max is the planned maximum (seeds as with fixed reps = reps_max)."""
    from qfi.campaign import plan

    cfg = CampaignConfig(ci=0.01, reps=4, reps_max=12, out=str(tmp_path))
    assert len(plan(cfg)) == 12
    fixed = plan(dataclasses.replace(cfg, ci=None, reps_max=None, reps=12))
    assert [t.seed for t in plan(cfg)] == [t.seed for t in fixed]
