"""Campaigns on the embedded ViT: deterministic plans, the zero-flip shortcut, resume, exact restore."""

import dataclasses

import pandas as pd
import pytest
import torch

from qfi import zoo
from qfi.campaign import plan, run_campaign
from qfi.config import CampaignConfig
from qfi.errors import QfiError
from qfi.evaluate import Evaluator
from qfi.results import DETAIL_COLUMNS

LIMIT = 128  # evaluation samples: keeps every campaign here to a few seconds


@pytest.fixture(scope="module")
def model():
    return zoo.load_model("vit_digits")


def _cfg(tmp_path, name, **kw):
    base = dict(formats=("fp32",), ber=(1e-7,), reps=6, limit=LIMIT, device="cpu", out=str(tmp_path / name))
    base.update(kw)
    return CampaignConfig(**base)


def _bits(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _same(a, b):
    return all(torch.equal(a[k].view(torch.int32), b[k].view(torch.int32)) for k in a)


def test_plan_is_the_full_product_with_stable_distinct_seeds(tmp_path):
    """plan() = formats x groups x bits x (rates + counts) x reps, seeds stable across calls and distinct."""
    cfg = _cfg(
        tmp_path,
        "p",
        formats=("fp32", "int8"),
        names=("mlp", "ln"),
        bits="0:1",
        ber=(1e-6, 1e-5),
        flips=(3,),
        reps=2,
    )
    trials = plan(cfg)
    assert len(trials) == 2 * 2 * 2 * 3 * 2
    assert [t.seed for t in trials] == [t.seed for t in plan(cfg)]
    assert len({t.seed for t in trials}) == len(trials)
    other = plan(dataclasses.replace(cfg, seed=1))
    assert all(a.seed != b.seed for a, b in zip(trials, other, strict=True))


def test_zero_flip_shortcut_gives_the_numbers_of_running_the_model(tmp_path, model):
    """Trials with no flips answered from the clean result equal the same trials actually evaluated."""
    cfg = _cfg(tmp_path, "short", ber=(1e-7, 1e-6), reps=8)
    fast = run_campaign(cfg, model=model, progress=False, plots=False)
    slow = run_campaign(
        dataclasses.replace(cfg, out=str(tmp_path / "slow")),
        model=model,
        progress=False,
        plots=False,
        shortcut=False,
    )
    cols = [c for c in fast.detail.columns if c != "evaluated"]
    pd.testing.assert_frame_equal(fast.detail[cols], slow.detail[cols])
    zero = (fast.detail["flips"] == 0).sum()
    assert 0 < zero < len(fast.detail)  # the case is really exercised
    assert fast.evaluations == 2 + (len(fast.detail) - zero)  # golden + clean + trials with flips
    assert slow.evaluations == 2 + len(slow.detail)


def test_resume_after_a_crash_matches_an_uninterrupted_run(tmp_path, model, monkeypatch):
    """A campaign that dies mid-way and is rerun finishes with identical CSVs, redoing no finished trial."""
    cfg = _cfg(tmp_path, "whole", formats=("fp32", "int8"), ber=(1e-5, 1e-4), reps=4)
    whole = run_campaign(cfg, model=model, progress=False, plots=False)
    before = _bits(model)

    crash = dataclasses.replace(cfg, out=str(tmp_path / "crash"))
    real_call = Evaluator.__call__
    calls = {"n": 0}

    def dying(self, m, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 9:
            raise KeyboardInterrupt
        return real_call(self, m, *args, **kwargs)

    monkeypatch.setattr(Evaluator, "__call__", dying)
    with pytest.raises(KeyboardInterrupt):
        run_campaign(crash, model=model, progress=False, plots=False)
    monkeypatch.setattr(Evaluator, "__call__", real_call)
    assert _same(before, _bits(model)), "the model must be restored bit-exactly after a crash"
    done = (tmp_path / "crash" / "detail.csv").read_text().count("\n") - 1
    assert 0 < done < len(whole.detail)
    # a kill can also leave half a line behind
    with open(tmp_path / "crash" / "detail.csv", "a") as f:
        f.write("fp32,weights,,ber,1e-05,0,-1,any,3,12345,2,0.9")
    resumed = run_campaign(crash, model=model, progress=False, plots=False)
    assert resumed.trials_resumed == done
    assert resumed.trials_run == len(whole.detail) - done
    for name in ("detail.csv", "summary.csv", "per_format.csv"):
        assert (tmp_path / "crash" / name).read_bytes() == (tmp_path / "whole" / name).read_bytes(), name


def test_a_different_campaign_in_the_same_folder_is_refused(tmp_path, model):
    """Resuming with changed settings would mix results: refused with a message saying what to do."""
    cfg = _cfg(tmp_path, "x", reps=1)
    run_campaign(cfg, model=model, progress=False, plots=False)
    with pytest.raises(QfiError, match="different campaign.*--fresh"):
        run_campaign(dataclasses.replace(cfg, ber=(1e-3,)), model=model, progress=False, plots=False)
    run_campaign(dataclasses.replace(cfg, ber=(1e-3,)), model=model, progress=False, plots=False, fresh=True)


def test_campaign_leaves_the_model_bit_identical_and_reports_baselines(tmp_path, model):
    """After a quantized campaign every weight is bit-identical; golden and clean baselines are reported."""
    before = _bits(model)
    res = run_campaign(
        _cfg(tmp_path, "q", formats=("int8", "bf16"), ber=(1e-3,), reps=3),
        model=model,
        progress=False,
        plots=False,
    )
    assert _same(before, _bits(model))
    s = res.summary.set_index("format")
    assert s.loc["int8", "golden_top1"] == s.loc["bf16", "golden_top1"] > 0.9
    assert abs(s.loc["int8", "clean_top1"] - s.loc["int8", "golden_top1"]) < 0.05
    assert {"top1_ci_low", "top1_ci_high", "sdc_mean", "due_mean", "flips_mean"} <= set(res.summary.columns)
    assert (res.detail["flips"] > 0).all()  # 1e-3 over ~59k codes always flips something


def test_activation_campaign(tmp_path, model):
    """Activation faults on MLP outputs in fp16 and int8 run through the same campaign and give
    rows with flips; int8 scales come from calibration and keep clean accuracy."""
    res = run_campaign(
        _cfg(
            tmp_path,
            "act",
            target="activations",
            formats=("fp16", "int8"),
            names=("mlp",),
            ber=(1e-4,),
            reps=2,
        ),
        model=model,
        progress=False,
        plots=False,
    )
    assert len(res.detail) == 4
    assert (res.detail["flips"] > 0).all()
    clean = res.summary.set_index("format")["clean_top1"]
    assert clean["int8"] > 0.9  # int8 activation scales calibrated on the training split, then frozen
    assert (res.detail["target"] == "activations").all()


def test_a_name_filter_matching_nothing_writes_nothing(tmp_path, model):
    """A typo in a name group fails before any file is written (showing the nearest names), so the
    folder is not claimed by a campaign that never ran and the corrected command just runs."""
    bad = _cfg(tmp_path, "typo", names=("mlpp",), reps=1)
    with pytest.raises(QfiError, match="'mlpp' matches no weights; did you mean 'mlp'"):
        run_campaign(bad, model=model, progress=False, plots=False)
    assert not (tmp_path / "typo" / "manifest.json").exists()
    assert not (tmp_path / "typo" / "detail.csv").exists()
    good = run_campaign(dataclasses.replace(bad, names=("mlp",)), model=model, progress=False, plots=False)
    assert good.trials_run == 1


def test_a_folder_without_finished_trials_is_not_claimed(tmp_path, model):
    """A campaign killed before its first trial finished leaves a manifest and an empty detail.csv;
    a different campaign may then use the folder (there is nothing to mix)."""
    cfg = _cfg(tmp_path, "empty", reps=1)
    run_campaign(cfg, model=model, progress=False, plots=False)
    (tmp_path / "empty" / "detail.csv").write_text(",".join(DETAIL_COLUMNS) + "\n")
    other = run_campaign(dataclasses.replace(cfg, ber=(1e-3,)), model=model, progress=False, plots=False)
    assert other.trials_run == 1 and other.trials_resumed == 0


def test_trials_without_their_manifest_or_with_other_seeds_are_refused(tmp_path, model):
    """detail.csv rows can only be resumed when the manifest vouches for them and their seeds are the
    planned ones; otherwise results of another campaign would be mixed in silently."""
    cfg = _cfg(tmp_path, "m", reps=2)
    run_campaign(cfg, model=model, progress=False, plots=False)
    detail = tmp_path / "m" / "detail.csv"
    text = detail.read_text()
    (tmp_path / "m" / "manifest.json").unlink()
    with pytest.raises(QfiError, match="no qfi campaign manifest.*--fresh"):
        run_campaign(cfg, model=model, progress=False, plots=False)
    run_campaign(cfg, model=model, progress=False, plots=False, fresh=True)
    seed = next(iter(pd.read_csv(detail)["seed"]))
    detail.write_text(text.replace(str(seed), "42"))
    with pytest.raises(QfiError, match="other seeds"):
        run_campaign(cfg, model=model, progress=False, plots=False)


def test_fresh_campaign_removes_the_last_campaigns_tables(tmp_path, model):
    """--fresh with a per-format campaign in a folder that held a per-bit one leaves no stale
    per_bit.csv behind."""
    cfg = _cfg(tmp_path, "f", bits="31", reps=1)
    run_campaign(cfg, model=model, progress=False, plots=False)
    assert (tmp_path / "f" / "per_bit.csv").exists()
    run_campaign(dataclasses.replace(cfg, bits="none"), model=model, progress=False, plots=False, fresh=True)
    assert not (tmp_path / "f" / "per_bit.csv").exists()
    assert (tmp_path / "f" / "per_format.csv").exists()


def test_kill_while_writing_the_summary_then_rerun_gives_the_same_bytes(tmp_path, model, monkeypatch):
    """A kill after the trials, while the tables are written, loses nothing: the rerun evaluates
    nothing and writes the bytes of an uninterrupted run; a table is replaced whole or not at all."""
    import qfi.campaign as campaign

    cfg = _cfg(tmp_path, "ref", formats=("fp32", "int8"), ber=(1e-5, 1e-4), reps=2)
    ref = run_campaign(cfg, model=model, progress=False, plots=False)
    names = ("detail.csv", "summary.csv", "per_format.csv")
    want = {n: (tmp_path / "ref" / n).read_bytes() for n in names}
    crash = dataclasses.replace(cfg, out=str(tmp_path / "s"))
    real = campaign.write_tables

    def dying(detail, summary, out, plots=True, metric=None, part="codes"):
        real(detail, summary, out, plots, metric, part)
        (out / "summary.csv.tmp").write_text("format,tar")  # the next write, half done
        raise KeyboardInterrupt

    monkeypatch.setattr(campaign, "write_tables", dying)
    with pytest.raises(KeyboardInterrupt):
        run_campaign(crash, model=model, progress=False, plots=False)
    monkeypatch.undo()
    assert (tmp_path / "s" / "summary.csv").read_bytes() == want["summary.csv"]
    again = run_campaign(crash, model=model, progress=False, plots=False)
    assert again.trials_run == 0 and again.evaluations == 0 and again.trials_resumed == len(ref.detail)
    for name, data in want.items():
        assert (tmp_path / "s" / name).read_bytes() == data, name


def test_repeated_bit_positions_plan_once(tmp_path):
    """'30,30' or overlapping ranges give each bit position one condition, not two under one seed."""
    trials = plan(_cfg(tmp_path, "b", bits="29:30,30", reps=1))
    assert [t.bit for t in trials] == [29, 30]
