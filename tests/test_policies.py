"""Injection policies: when a trial's fault is drawn (once, per batch, per inference), each
batch's draw replayable from its seed; recorded in the manifest and the campaign's identity."""

import dataclasses
import json

import pytest
import torch

import qfi
from qfi import zoo
from qfi.campaign import batch_seed, plan, run_campaign
from qfi.config import CampaignConfig
from qfi.errors import QfiError
from qfi.evaluate import Evaluator


@pytest.fixture(scope="module")
def model():
    return zoo.load_model("vit_digits")


def _cfg(tmp_path, name, **kw):
    base = dict(formats=("int8",), ber=(), flips=(2,), reps=2, limit=96, batch_size=32, device="cpu")
    base.update(kw)
    return CampaignConfig(out=str(tmp_path / name), **base)


def test_batch_policy_draws_per_batch_and_replays_from_the_batch_seeds(tmp_path, model):
    """--policy batch: a trial of FlipCount(2) over 3 batches flips 6 bits; its top-1 equals a
    manual pass where batch i carries session.apply(fault, seed=batch_seed(trial seed, i))."""
    cfg = _cfg(tmp_path, "b", policy="batch")
    res = run_campaign(cfg, model=model, progress=False, plots=False)
    assert (res.detail["flips"] == 6).all()
    t = plan(cfg)[0]
    ev = Evaluator(zoo.load_data("digits"), batch_size=32, limit=96)
    correct = 0
    with qfi.weights(model, "int8") as s:
        for i, (x, y, _n) in enumerate(ev.batches):
            s.apply(qfi.FlipCount(count=2), seed=batch_seed(t.seed, i))
            try:
                with torch.no_grad():
                    correct += int((model(x).argmax(1) == y).sum())
            finally:
                s.undo()
    assert res.detail["top1"].iloc[0] == correct / 96
    trial = run_campaign(dataclasses.replace(cfg, policy="trial", out=str(tmp_path / "t")), model=model,
                         progress=False, plots=False)
    assert (trial.detail["flips"] == 2).all()


def test_inference_policy_needs_batches_of_one_and_draws_per_sample(tmp_path, model):
    """--policy inference: one draw per inference (batch size 1); other batch sizes are refused."""
    with pytest.raises(QfiError, match=r"policy 'inference' .* needs batch_size 1, got 32"):
        _cfg(tmp_path, "x", policy="inference")
    cfg = _cfg(tmp_path, "i", policy="inference", batch_size=1, limit=12, reps=1, flips=(1,))
    res = run_campaign(cfg, model=model, progress=False, plots=False)
    assert res.detail["flips"].tolist() == [12]


def test_activation_faults_per_batch(tmp_path, model):
    """Activations under --policy batch: one FlipCount draw per batch (armed per batch)."""
    cfg = _cfg(tmp_path, "a", target="activations", names=("mlp.0",), formats=("bf16",), policy="batch")
    res = run_campaign(cfg, model=model, progress=False, plots=False)
    assert (res.detail["flips"] == 6).all()


def test_policy_is_recorded_and_part_of_the_identity(tmp_path, model):
    """The policy is in manifest.json, and a folder of one policy refuses another."""
    cfg = _cfg(tmp_path, "m", policy="batch", reps=1)
    run_campaign(cfg, model=model, progress=False, plots=False)
    manifest = json.loads((tmp_path / "m" / "manifest.json").read_text())
    assert manifest["config"]["policy"] == "batch"
    with pytest.raises(QfiError, match="different campaign"):
        run_campaign(dataclasses.replace(cfg, policy="trial"), model=model, progress=False, plots=False)
    with pytest.raises(QfiError, match="unknown policy 'epoch'"):
        CampaignConfig(policy="epoch")


def test_stuck_at_campaign_counts_changed_bits_and_replays(tmp_path, model):
    """stuck_at=1: each trial is StuckAt(1, count=n, bits=b) with the trial's seed (its `flips` are
    the bits that changed, as a manual session gives them); stuck_at=0 on fp32 bit 30 changes no
    weight below 2 in magnitude, so every trial is clean; bad values are refused."""
    cfg = _cfg(tmp_path, "s1", formats=("fp32",), flips=(20,), bits="23", stuck_at=1)
    res = run_campaign(cfg, model=model, progress=False, plots=False)
    for t, flips in zip(plan(cfg), res.detail["flips"], strict=True):
        with qfi.weights(model, "fp32") as s, s.inject(qfi.StuckAt(1, count=20, bits=23), seed=t.seed) as log:
            assert log.flips == flips and 0 < flips < 20  # the exponent LSB is 1 in about half the weights
    cfg30 = dataclasses.replace(cfg, bits="30", out=str(tmp_path / "s30"))
    res = run_campaign(cfg30, model=model, progress=False, plots=False)
    assert (res.detail["flips"] == 20).all()  # bit 30 is 0 in every weight below 2 in magnitude
    assert (res.detail["top1"] < res.summary["clean_top1"].iloc[0]).all()
    zero = run_campaign(dataclasses.replace(cfg30, stuck_at=0, out=str(tmp_path / "s0")), model=model,
                        progress=False, plots=False)
    clean = zero.summary["clean_top1"].iloc[0]
    assert (zero.detail["flips"] == 0).all() and (zero.detail["top1"] == clean).all()
    manifest = json.loads((tmp_path / "s1" / "manifest.json").read_text())
    assert manifest["config"]["stuck_at"] == 1
    for bad in (2, True, "1", 1.0):
        with pytest.raises(QfiError, match="stuck_at .*allowed are 0, 1"):
            CampaignConfig(stuck_at=bad)
    import numpy as np

    assert type(CampaignConfig(stuck_at=np.int64(1)).stuck_at) is int


def test_cli_stuck_at_flag(tmp_path, capsys):
    """`--stuck-at 1` reaches the config (manifest); `--stuck-at 2` is refused by the parser."""
    from qfi.cli import main

    out = tmp_path / "c"
    argv = ["ber", "--ber", "1e-4", "--reps", "1", "--limit", "32", "--quiet", "--no-plots"]
    assert main([*argv, "--stuck-at", "1", "--out", str(out)]) == 0
    assert json.loads((out / "manifest.json").read_text())["config"]["stuck_at"] == 1
    with pytest.raises(SystemExit) as e:
        main([*argv, "--stuck-at", "2", "--out", str(tmp_path / "d")])
    assert e.value.code == 2 and "allowed are 0 and 1" in capsys.readouterr().err


def test_manifest_records_the_sampler_and_warns_on_another(tmp_path, model, caplog):
    """manifest.json records the site sampler's version; resuming rows of another version warns
    (the same law, other sites for the same seed when dense); manifest_extra cannot set qfi's keys."""
    cfg = _cfg(tmp_path, "v", reps=1)
    run_campaign(cfg, model=model, progress=False, plots=False)
    path = tmp_path / "v" / "manifest.json"
    manifest = json.loads(path.read_text())
    assert manifest["sampler"] == 2
    del manifest["sampler"]  # a folder written before the version was recorded: version 1
    path.write_text(json.dumps(manifest))
    with caplog.at_level("WARNING", logger="qfi"):
        run_campaign(cfg, model=model, progress=False, plots=False)
    assert "drawn by site sampler 1, new ones by 2" in caplog.text
    with pytest.raises(QfiError, match=r"manifest_extra may not set \['model_hash'\]"):
        run_campaign(cfg, model=model, progress=False, plots=False, manifest_extra={"model_hash": "x"})
