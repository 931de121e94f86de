"""The qfi command line, end to end on the embedded ViT and digits (small reps, few samples)."""

import os
import signal
import subprocess
import sys
import time

import pandas as pd
import pytest

from qfi.cli import main

FAST = ["--reps", "2", "--limit", "96", "--device", "cpu", "--quiet"]


def test_names_lists_torchvision_style_weights(capsys):
    """`qfi names` lists every weight with shape and size, and filters by words."""
    assert main(["names"]) == 0
    out = capsys.readouterr().out
    assert "encoder.layers.encoder_layer_0.self_attention.in_proj_weight" in out
    assert "class_token" in out and "heads.head.weight" in out
    assert main(["names", "--filter", "mlp,ln"]) == 0
    out = capsys.readouterr().out
    assert "mlp.0.weight" in out and "ln_1.weight" in out and "in_proj_weight" not in out


def test_names_activations(capsys):
    """`qfi names --target activations` lists modules, MultiheadAttention included."""
    assert main(["names", "--target", "activations"]) == 0
    assert "encoder.layers.encoder_layer_0.self_attention" in capsys.readouterr().out


def test_bits_writes_per_bit_csv_and_plot(tmp_path, capsys):
    """`qfi bits` on int8 gives one condition per bit position (8), a per-bit CSV with CIs and a PNG."""
    out = tmp_path / "bits"
    assert main(["bits", "--format", "int8", "--ber", "1e-3", "--out", str(out), *FAST]) == 0
    per_bit = pd.read_csv(out / "per_bit.csv")
    assert sorted(per_bit["bit"]) == list(range(8))
    assert set(per_bit["bit_name"]) >= {"sign"}
    assert {"top1_mean", "top1_ci_low", "top1_ci_high", "trials"} <= set(per_bit.columns)
    assert (out / "per_bit.png").stat().st_size > 10_000
    assert (out / "manifest.json").exists() and (out / "detail.csv").exists()
    assert "16 trials run" in capsys.readouterr().out


def test_formats_writes_per_format_csv_and_plot(tmp_path):
    """`qfi formats` compares formats over BER decades: per-format CSV, accuracy-vs-BER plot."""
    out = tmp_path / "formats"
    assert main(["formats", "--formats", "fp32,int8", "--ber", "1e-5:1e-3", "--out", str(out), *FAST]) == 0
    per = pd.read_csv(out / "per_format.csv")
    assert set(per["format"]) == {"fp32", "int8"} and sorted(set(per["ber"])) == [1e-5, 1e-4, 1e-3]
    assert (out / "per_format.png").stat().st_size > 10_000


def test_ber_sweep_with_name_filter(tmp_path):
    """`qfi ber --names mlp,ln` corrupts only MLP and LayerNorm weights over decades."""
    out = tmp_path / "ber"
    assert main(["ber", "--ber", "1e-6:1e-4", "--names", "mlp,ln", "--out", str(out), *FAST]) == 0
    d = pd.read_csv(out / "detail.csv", keep_default_na=False)
    assert set(d["names"]) == {"mlp,ln"} and len(d) == 6


def test_run_yaml(tmp_path):
    """`qfi run campaign.yaml` builds the same CampaignConfig from the file's keys."""
    y = tmp_path / "c.yaml"
    y.write_text(
        f"formats: [bf16, q3.13]\nber: 1e-4\nreps: 2\nlimit: 64\ndevice: cpu\nout: {tmp_path / 'y'}\n"
    )
    assert main(["run", str(y), "--quiet"]) == 0
    assert set(pd.read_csv(tmp_path / "y" / "summary.csv")["format"]) == {"bf16", "q3.13"}


@pytest.mark.parametrize(
    "argv, match",
    [
        (["bits", "--format", "fp33"], "fp33"),
        (["formats", "--formats", "fp32,q0.8"], "q0.8"),
        (["ber", "--ber", "2"], r"BER 2\.0 is outside \[0, 1\]"),
        (["ber", "--ber", "1e-3:1e-6"], "bad BER spec"),
        (["bits", "--format", "int8", "--bits", "9"], r"bit 9 is outside the format: allowed 0\.\.7"),
        (["ber", "--names", "mlpp"], "mlpp"),
        (["bits", "--target", "neurons"], "neurons"),
        (["bits", "--model", "vit_digit"], "vit_digit"),
        (["ber", "--data", "/no/such/dir"], r"unknown data '/no/such/dir'; allowed: 'digits', 'imagefolder"),
        (["ber", "--model", "torch.nn:Identity", "--data", "imagefolder:/no/such"], "/no/such"),
        (["ber", "--device", "tpu"], r"unknown device 'tpu'; allowed: auto, cpu, cuda"),
        (["ber", "--target", "activations", "--calibrate", "0"], r"calibrate 0 must be >= 1"),
        (["ber", "--flips", "x"], r"bad flip counts 'x'"),
    ],
)
def test_bad_flags_name_the_value(tmp_path, capsys, argv, match):
    """Bad flags exit with status 2 and a message naming the value and what is allowed."""
    fast = FAST if "--device" not in argv else [f for f in FAST if f not in ("--device", "cpu")]
    assert main([argv[0], *fast, *argv[1:], "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "error" in err
    import re

    assert re.search(match, err), err


def test_cuda_without_cuda_is_a_clear_error(tmp_path, capsys):
    """--device cuda on a machine without CUDA says so and suggests --device cpu."""
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    assert main(["ber", "--out", str(tmp_path / "o"), *FAST[:4], "--quiet", "--device", "cuda"]) == 2
    assert "no CUDA device" in capsys.readouterr().err


@pytest.mark.parametrize("command", ["names", "bits", "formats", "ber", "run", "main"])
def test_help_describes_every_flag(command, capsys):
    """Every command has a description and every flag a help text; --help exits 0 and shows the
    default output folder of the sweep commands."""
    import argparse

    from qfi.cli import build_parser

    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    p = sub.choices[command]
    assert p.description
    for action in p._actions:
        assert action.help, f"{command} {action.option_strings or action.dest} has no help"
    with pytest.raises(SystemExit) as e:
        main([command, "--help"])
    assert e.value.code == 0
    if command in ("bits", "formats", "ber"):
        assert f"(default qfi-results/{command})" in " ".join(capsys.readouterr().out.split())


def test_main_job_writes_bits_and_formats(tmp_path):
    """`qfi main` (what `bash run.sh` runs) writes the per-bit and the per-format campaign."""
    out = tmp_path / "m"
    assert main(["main", "--out", str(out), "--reps", "1", "--limit", "32", "--no-plots", "--quiet"]) == 0
    bits = pd.read_csv(out / "bits" / "per_bit.csv")
    assert len(bits) == 32 + 16 + 16 + 16 + 8  # fp32, fp16, bf16, q3.13, int8: one row per bit
    per = pd.read_csv(out / "formats" / "per_format.csv")
    assert sorted(set(per["ber"])) == [1e-7, 1e-6, 1e-5, 1e-4, 1e-3]


def test_killed_campaign_resumes_to_identical_csvs(tmp_path):
    """SIGKILL a running `qfi formats`, rerun the same command: same CSVs as an uninterrupted run."""
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE"}
    args = [
        "formats",
        "--formats",
        "fp32,bf16",
        "--ber",
        "1e-5:1e-3",
        "--reps",
        "6",
        "--limit",
        "256",
        "--device",
        "cpu",
        "--no-plots",
    ]
    cmd = [sys.executable, "-m", "qfi.cli"]
    ref = tmp_path / "ref"
    r = subprocess.run([*cmd, *args, "--out", str(ref)], check=True, env=env, capture_output=True)
    assert r.stderr == b"", "no progress bar (or anything else) on stderr when it is not a terminal"
    out = tmp_path / "killed"
    p = subprocess.Popen(
        [*cmd, *args, "--out", str(out)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    detail = out / "detail.csv"
    deadline = time.time() + 120
    while time.time() < deadline:
        if detail.exists() and detail.read_text().count("\n") > 8:
            break
        time.sleep(0.02)
    p.send_signal(signal.SIGKILL)
    p.wait()
    rows_at_kill = detail.read_text().count("\n") - 1
    assert 0 < rows_at_kill < 36, "the kill must land mid-campaign"
    r = subprocess.run([*cmd, *args, "--out", str(out)], check=True, env=env, capture_output=True, text=True)
    assert f"{rows_at_kill} resumed" in r.stdout
    for name in ("detail.csv", "summary.csv", "per_format.csv"):
        assert (out / name).read_bytes() == (ref / name).read_bytes(), name


def test_plug_in_model_and_image_folder(tmp_path, monkeypatch):
    """A 'module:callable' model with a state-dict file runs on an ImageFolder directory with mean/std."""
    import numpy as np
    import torch
    from PIL import Image

    (tmp_path / "mymodel.py").write_text(
        "from torch import nn\n"
        "def build():\n"
        "    return nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 16), nn.ReLU(), nn.Linear(16, 3))\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    torch.manual_seed(0)
    import importlib

    model = importlib.import_module("mymodel").build()
    torch.save(model.state_dict(), tmp_path / "w.pt")
    rng = np.random.default_rng(0)
    for c in ("cat", "dog", "owl"):
        (tmp_path / "imgs" / c).mkdir(parents=True)
        for i in range(3):
            Image.fromarray(rng.integers(0, 255, (10, 10, 3), dtype=np.uint8)).save(
                tmp_path / "imgs" / c / f"{i}.png"
            )
    out = tmp_path / "o"
    argv = [
        "ber",
        "--model",
        "mymodel:build",
        "--weights",
        str(tmp_path / "w.pt"),
        "--data",
        f"imagefolder:{tmp_path / 'imgs'}",
        "--image-size",
        "8",
        "--mean",
        "0.5,0.5,0.5",
        "--std",
        "0.25,0.25,0.25",
        "--ber",
        "1e-3",
        "--out",
        str(out),
        *FAST,
    ]
    assert main(argv) == 0
    d = pd.read_csv(out / "detail.csv")
    assert len(d) == 2 and (d["flips"] > 0).all()
    manifest = (out / "manifest.json").read_text()
    assert "mymodel:build" in manifest and '"samples": 9' in manifest
    # activation faults in int8, scales calibrated on a separate folder (the "train split")
    act = [*argv, "--target", "activations", "--format", "int8", "--names", "1,3"]
    act += ["--calibrate-data", f"imagefolder:{tmp_path / 'imgs'}", "--calibrate", "4", "--fresh"]
    assert main(act) == 0
    import json

    calib = json.loads((out / "manifest.json").read_text())["calibration"]
    assert calib == {"spec": f"imagefolder:{tmp_path / 'imgs'}", "samples": 4, "dynamic": False}


def test_plug_in_model_without_data_is_a_clear_error(tmp_path, capsys):
    """A model that is not embedded needs --data; the error says which forms are allowed."""
    assert main(["ber", "--model", "torch.nn:Identity", "--out", str(tmp_path / "o"), *FAST]) == 2
    assert "imagefolder" in capsys.readouterr().err


def test_manifest_reruns_the_campaign(tmp_path, capsys, monkeypatch):
    """`qfi run <out>/manifest.json --out other` reruns the recorded campaign: identical detail.csv;
    without --out it resumes in the manifest's folder from any working directory (nothing to redo)."""
    first = tmp_path / "first"
    assert main(["bits", "--format", "int4", "--ber", "1e-3", "--out", str(first), *FAST]) == 0
    again = tmp_path / "again"
    assert main(["run", str(first / "manifest.json"), "--out", str(again), "--quiet"]) == 0
    assert (again / "detail.csv").read_bytes() == (first / "detail.csv").read_bytes()
    monkeypatch.chdir(tmp_path)
    capsys.readouterr()
    assert main(["run", "first/manifest.json", "--quiet"]) == 0
    assert "0 trials run, 8 resumed, 0 evaluations" in capsys.readouterr().out
    assert not (tmp_path / "qfi-results").exists()


def test_run_missing_or_bad_campaign_file(tmp_path, capsys):
    """A missing or non-mapping campaign file is an error naming the file."""
    assert main(["run", str(tmp_path / "nope.yaml")]) == 2
    assert "nope.yaml" in capsys.readouterr().err
    bad = tmp_path / "bad.yaml"
    bad.write_text("- 1\n- 2\n")
    assert main(["run", str(bad)]) == 2
    assert "must be a mapping" in capsys.readouterr().err


@pytest.mark.parametrize(
    "script, args, written",
    [
        ("bit_sensitivity.py", ["--format", "int4"], "int4/per_bit.csv"),
        ("compare_formats.py", ["--formats", "fp16,int8", "--ber", "1e-4,1e-3"], "per_format.csv"),
        ("vit_weight_corruption.py", ["--ber", "1e-6:1e-4"], "model.csv"),
    ],
)
def test_research_scripts_run_end_to_end(tmp_path, monkeypatch, capsys, script, args, written):
    """The three research scripts run on the public API and write their tables."""
    import runpy
    from pathlib import Path

    path = Path(__file__).parent.parent / "scripts" / script
    argv = [str(path), *args, "--reps", "2", "--limit", "48", "--device", "cpu", "--out", str(tmp_path)]
    monkeypatch.setattr(sys, "argv", argv)
    runpy.run_path(str(path), run_name="__main__")
    assert (tmp_path / written).exists()
    assert "->" in capsys.readouterr().out
