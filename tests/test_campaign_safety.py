"""What a new user hit (issue 12): shared output folders, other people's files, bad values, OS
errors, broken baselines, corrupt detail.csv, BatchNorm models, SDC vs DUE.  Each test failed
on the code before the fix."""

import dataclasses
import errno
import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pandas as pd
import pytest
import torch
from torch import nn

from qfi import zoo
from qfi.campaign import LOCK_NAME, model_hash, plan, run_campaign
from qfi.cli import main
from qfi.config import CampaignConfig
from qfi.errors import Interrupted, NonFiniteBaseline, OutputFolderBusy, QfiError
from qfi.evaluate import EvalResult

LIMIT = 96
FAST = ["--reps", "2", "--limit", str(LIMIT), "--device", "cpu", "--quiet", "--no-plots"]
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def model():
    return zoo.load_model("vit_digits")


def _cfg(tmp_path, name="o", **kw):
    base = dict(formats=("fp32",), ber=(1e-4,), reps=3, limit=LIMIT, device="cpu", out=str(tmp_path / name))
    base.update(kw)
    return CampaignConfig(**base)


def _run(cfg, model, **kw):
    return run_campaign(cfg, model=model, progress=False, plots=False, **kw)


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


# -- 1. one output folder, one writer ---------------------------------------------------------------

_HOLDER = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from qfi.campaign import _FolderLock
    Path(sys.argv[1]).mkdir(parents=True, exist_ok=True)
    _FolderLock(Path(sys.argv[1])).acquire()
    print("locked", flush=True)
    time.sleep(60)
    """
)


def test_a_second_writer_is_refused_and_a_killed_holder_does_not_block(tmp_path, model):
    """While another process holds the folder, a campaign into it fails naming the folder and the
    holder's pid, writing nothing; once that process is SIGKILLed (its lock file left behind), the
    same campaign runs."""
    out = tmp_path / "o"
    holder = subprocess.Popen([sys.executable, "-c", _HOLDER, str(out)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(OutputFolderBusy, match=rf"{out}.*in use.*pid {holder.pid}"):
            _run(_cfg(tmp_path), model)
        assert sorted(p.name for p in out.iterdir()) == [LOCK_NAME]
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
        holder.stdout.close()
    assert (out / LOCK_NAME).exists()  # stale: the killed process could not clean up
    res = _run(_cfg(tmp_path), model)
    assert res.trials_run == 3
    assert not (out / LOCK_NAME).exists()  # released and removed at the end


def test_busy_folder_exit_status_is_4(tmp_path, capsys):
    """The CLI maps a busy folder to exit status 4 with one line naming the folder."""
    out = tmp_path / "o"
    holder = subprocess.Popen([sys.executable, "-c", _HOLDER, str(out)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        assert main(["ber", "--ber", "1e-4", *FAST, "--out", str(out)]) == 4
    finally:
        holder.kill()
        holder.wait()
        holder.stdout.close()
    err = capsys.readouterr().err
    assert f"{out} is in use by another qfi campaign" in err and "Traceback" not in err


def test_two_campaigns_into_one_folder_never_lose_or_duplicate_rows(tmp_path):
    """Two identical CLI campaigns started at once into one folder: each exits 0 (ran or resumed)
    or 4 (busy); detail.csv ends with every planned trial exactly once."""
    out = tmp_path / "o"
    argv = ["ber", "--ber", "1e-4,1e-3", *FAST, "--reps", "6", "--out", str(out)]
    argv.remove("2")  # the FAST --reps value; "--reps 6" replaces it
    argv.remove("--reps")
    env = dict(os.environ, OMP_WAIT_POLICY="PASSIVE")
    cmd = [sys.executable, "-m", "qfi.cli", *argv]
    procs = [subprocess.Popen(cmd, env=env, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    codes = [p.wait(timeout=300) for p in procs]
    errs = [p.stderr.read() for p in procs]
    for p in procs:
        p.stderr.close()
    assert sorted(codes) in ([0, 0], [0, 4]), errs
    assert all("Traceback" not in e for e in errs)
    d = pd.read_csv(out / "detail.csv")
    assert len(d) == 12 and not d.duplicated(["ber", "rep"]).any()


def test_resume_drops_duplicate_trial_keys(tmp_path, model):
    """A detail.csv holding a trial twice (left by an older qfi) resumes to one row per trial."""
    cfg = _cfg(tmp_path)
    first = _run(cfg, model)
    detail = Path(cfg.out) / "detail.csv"
    lines = detail.read_text().splitlines(keepends=True)
    detail.write_text("".join(lines[:3] + lines[1:2]))  # trial 0, trial 1, trial 0 again; trial 2 lost
    again = _run(cfg, model)
    assert again.trials_run == 1 and again.trials_resumed == 2
    pd.testing.assert_frame_equal(first.detail, again.detail)


# -- 2. never overwrite files qfi did not write -----------------------------------------------------


@pytest.mark.parametrize("theirs", ["summary.csv", "manifest.json", "per_bit.png", "detail.csv"])
def test_a_folder_of_someone_elses_files_is_refused_and_left_alone(tmp_path, model, theirs):
    """--out at a folder with files of qfi's names but no qfi manifest: QfiError suggesting another
    folder or --fresh, and every byte of the folder unchanged (no lock file either)."""
    out = tmp_path / "o"
    out.mkdir()
    (out / theirs).write_text("my own results\n")
    (out / "notes.txt").write_text("keep me\n")
    before = _snapshot(out)
    with pytest.raises(QfiError, match=rf"{theirs}.*no qfi campaign manifest.*another --out.*--fresh"):
        _run(_cfg(tmp_path), model)
    assert _snapshot(out) == before


def test_a_folder_with_unrelated_files_only_is_fine(tmp_path, model):
    """Files of other names are not qfi's business: the campaign runs beside them."""
    out = tmp_path / "o"
    out.mkdir()
    (out / "notes.txt").write_text("keep me\n")
    _run(_cfg(tmp_path), model)
    assert (out / "notes.txt").read_text() == "keep me\n" and (out / "detail.csv").exists()


# -- 4. bad values are rejected, not reinterpreted ---------------------------------------------------


@pytest.mark.parametrize(
    "argv, match",
    [
        (["bits", "--bits", "7:3"], r"bit range '7:3' is reversed.*'3:7'"),
        (["bits", "--bits", "-1"], r"bit -1 is outside the format: allowed 0\.\.31"),
        (["ber", "--batch-size", "0"], r"batch_size 0 must be >= 1"),
    ],
)
def test_bad_values_are_errors_and_write_nothing(tmp_path, capsys, argv, match):
    """Each value that used to be reinterpreted is an error naming it; no folder is created."""
    import re

    out = tmp_path / "o"
    assert main([*argv, *FAST, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert re.search(match, err), err
    assert not out.exists()


def test_repeated_list_flags_accumulate_and_scalar_flags_are_refused(tmp_path, capsys):
    """--ber twice means both rates (not only the last); a scalar flag given twice is an error."""
    out = tmp_path / "o"
    assert main(["ber", "--ber", "1e-4", "--ber", "1e-3", *FAST, "--out", str(out)]) == 0
    assert sorted(pd.read_csv(out / "detail.csv")["ber"].unique()) == [1e-4, 1e-3]
    with pytest.raises(SystemExit) as e:
        main(["ber", "--seed", "1", "--seed", "2", *FAST, "--out", str(tmp_path / "p")])
    assert e.value.code == 2
    assert "--seed given twice (1 and 2); give it once" in capsys.readouterr().err


def test_empty_yaml_is_an_error(tmp_path, capsys):
    """An empty campaign file does not run a default campaign into qfi-results/."""
    (tmp_path / "c.yaml").write_text("")
    assert main(["run", str(tmp_path / "c.yaml")]) == 2
    assert "the campaign file is empty" in capsys.readouterr().err
    assert not (tmp_path / "qfi-results").exists()


# -- 5. ordinary OS errors: one line, meaningful exit status, nothing left behind --------------------


def test_out_at_a_file_or_under_a_file(tmp_path, capsys):
    """--out naming a file, or a folder under a file: one line, no traceback, file untouched."""
    f = tmp_path / "f.txt"
    f.write_text("x")
    assert main(["ber", *FAST, "--out", str(f)]) == 2
    assert f"--out {f} is a file" in capsys.readouterr().err
    assert main(["ber", *FAST, "--out", str(f / "sub")]) == 3
    err = capsys.readouterr().err
    assert "Not a directory" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert f.read_text() == "x"


def test_unwritable_folder_is_one_line(tmp_path, capsys, monkeypatch):
    """A folder that cannot be created (permissions) is exit status 3 with the path named."""

    def denied(self, *a, **k):
        raise PermissionError(errno.EACCES, "Permission denied", str(self))

    monkeypatch.setattr(Path, "mkdir", denied)
    assert main(["ber", *FAST, "--out", str(tmp_path / "ro" / "o")]) == 3
    err = capsys.readouterr().err
    assert err.startswith("qfi ber: error: Permission denied: ") and "Traceback" not in err


def test_run_on_a_directory(tmp_path, capsys):
    """`qfi run <dir>` says it is a directory and points at its manifest.json when there is one."""
    (tmp_path / "manifest.json").write_text("{}")
    assert main(["run", str(tmp_path)]) == 2
    assert "is a directory" in capsys.readouterr().err


def test_full_disk_leaves_no_temporary_file_and_resumes(tmp_path, capsys, monkeypatch):
    """ENOSPC while writing the final tables: exit status 3, one line, no *.tmp left, and the
    same command afterwards finishes from the saved trials."""
    import qfi.results as results

    real = results._write_csv

    def full(df, path):
        path.with_name(path.name + ".tmp").write_text("partial")
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(results, "_write_csv", full)
    out = tmp_path / "o"
    argv = ["ber", "--ber", "1e-4", *FAST, "--out", str(out)]
    assert main(argv) == 3
    err = capsys.readouterr().err
    assert "No space left on device" in err and "Traceback" not in err
    monkeypatch.setattr(results, "_write_csv", real)
    assert not list(out.glob("detail.csv.tmp"))
    assert main(argv) == 0
    assert "0 trials run, 2 resumed" in capsys.readouterr().out


def test_broken_pipe_is_quiet(tmp_path):
    """`qfi names | head -n 2`: exit status 0 and no traceback."""
    env = dict(os.environ, OMP_WAIT_POLICY="PASSIVE")
    p = subprocess.run(
        f"{sys.executable} -m qfi.cli names | head -n 2",
        shell=True,
        capture_output=True,
        text=True,
        env=env,
        executable="/bin/bash",
        cwd=tmp_path,
    )
    assert len(p.stdout.splitlines()) == 2
    assert "Traceback" not in p.stderr and "BrokenPipe" not in p.stderr, p.stderr
    p = subprocess.run(
        ["bash", "-c", f"set -o pipefail; {sys.executable} -m qfi.cli names | head -n 1 >/dev/null"],
        env=env,
        cwd=tmp_path,
    )
    assert p.returncode == 0


def test_ctrl_c_during_startup_leaves_nothing(tmp_path, capsys, monkeypatch):
    """Ctrl-C while the model loads: exit status 130, a line saying nothing was written, no folder."""

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(zoo, "load_model", interrupted)
    out = tmp_path / "o"
    assert main(["ber", *FAST, "--out", str(out)]) == 130
    assert "nothing was written" in capsys.readouterr().err
    assert not out.exists()


def test_ctrl_c_mid_campaign_keeps_finished_trials(tmp_path, model, monkeypatch):
    """Ctrl-C after some trials: Interrupted names the folder and the kept rows; the rerun resumes."""
    import qfi.campaign as campaign

    real, calls = campaign._run_trial, []

    def flaky(*a, **k):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(campaign, "_run_trial", flaky)
    cfg = _cfg(tmp_path, reps=4)
    with pytest.raises(Interrupted) as e:
        _run(cfg, model)
    assert e.value.rows == 2 and e.value.out == cfg.out
    monkeypatch.setattr(campaign, "_run_trial", real)
    assert _run(cfg, model).trials_resumed == 2


def test_a_failed_start_leaves_no_folder(tmp_path, model):
    """A start that fails after the folder was created (here: a broken golden baseline) removes it."""
    broken = zoo.load_model("vit_digits")
    with torch.no_grad():
        broken.heads.head.bias[3] = float("nan")
    out = tmp_path / "deep" / "o"
    with pytest.raises(NonFiniteBaseline):
        _run(_cfg(tmp_path, "deep/o"), broken)
    assert not out.exists() and not out.parent.exists()  # the parents it created are gone too


# -- 6. a broken baseline is said out loud -------------------------------------------------------------


def test_nan_weight_stops_the_campaign_naming_the_tensor(tmp_path, capsys):
    """A checkpoint with a NaN weight: exit status 2 naming the tensor; --allow-nonfinite goes on."""
    m = zoo.load_model("vit_digits")
    with torch.no_grad():
        m.encoder.layers.encoder_layer_1.mlp[0].weight[0, 0] = float("nan")
    torch.save(m.state_dict(), tmp_path / "w.pt")
    argv = ["ber", "--weights", str(tmp_path / "w.pt"), "--ber", "1e-4", *FAST, "--out", str(tmp_path / "o")]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "golden" in err and "'encoder.layers.encoder_layer_1.mlp.0.weight' holds 1 NaN/Inf" in err
    assert "--allow-nonfinite" in err and not (tmp_path / "o").exists()
    assert main([*argv, "--allow-nonfinite"]) == 0
    assert (pd.read_csv(tmp_path / "o" / "detail.csv")["golden_top1"] == 0.0).all()


def test_a_format_that_overflows_the_clean_model_names_the_module(tmp_path, model):
    """Non-finite outputs without a non-finite weight: the first module whose output turns
    non-finite is named (here fp16 activations overflow after a scaled-up layer)."""
    m = zoo.load_model("vit_digits")
    with torch.no_grad():
        m.encoder.layers.encoder_layer_0.mlp[0].bias.add_(1e6)  # > fp16 max 65504, fine in fp32
    cfg = _cfg(tmp_path, target="activations", formats=("fp16",), names=("mlp.0",))
    with pytest.raises(NonFiniteBaseline, match=r"clean \(fp16.*module 'encoder\.layers\.encoder_layer_0"):
        run_campaign(cfg, model=m, progress=False, plots=False)


# -- 7. corrupt detail.csv -----------------------------------------------------------------------------


def test_hand_edited_detail_csv_names_file_line_and_column(tmp_path, model):
    """A non-number in a finished row of detail.csv: QfiError with file, line and column, not a
    pandas TypeError; the folder is unchanged."""
    cfg = _cfg(tmp_path, reps=4)
    _run(cfg, model)
    detail = Path(cfg.out) / "detail.csv"
    lines = detail.read_text().splitlines(keepends=True)
    lines[2] = lines[2].replace(",0.", ",zero.", 1)
    lines = lines[:4]
    detail.write_text("".join(lines))
    before = _snapshot(Path(cfg.out))
    with pytest.raises(QfiError, match=rf"{detail}, line 3: column '\w+' holds 'zero\.\d*', not a number"):
        _run(cfg, model)
    assert _snapshot(Path(cfg.out)) == before


# -- 9. BatchNorm --------------------------------------------------------------------------------------

_BN_MODULE = textwrap.dedent(
    """
    import torch
    from torch import nn

    def build():
        torch.manual_seed(0)
        m = nn.Sequential(
            nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
            nn.Flatten(), nn.Linear(4 * 8 * 8, 10),
        )
        with torch.no_grad():  # as after training: statistics that are not the defaults
            m[1].running_mean.uniform_(-1, 1)
            m[1].running_var.uniform_(0.5, 2.0)
            m[1].num_batches_tracked.fill_(1000)
        return m.eval()
    """
)


def test_models_with_batchnorm_run_through_api_and_cli(tmp_path, monkeypatch):
    """A model with BatchNorm (a 0-d num_batches_tracked buffer) hashes and runs weight and
    activation campaigns, through run_campaign and through the CLI's module:callable."""
    (tmp_path / "bnmodel.py").write_text(_BN_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    import importlib

    m = importlib.import_module("bnmodel").build()
    assert len(model_hash(m)) == 16
    m2 = importlib.import_module("bnmodel").build()
    with torch.no_grad():
        m2[1].num_batches_tracked.fill_(7)
    assert model_hash(m2) != model_hash(m)  # the 0-d buffer is part of the hash
    data = zoo.load_data("digits")
    for target, fmt in (("weights", "int8"), ("activations", "int8")):
        cfg = _cfg(tmp_path, f"api-{target}", target=target, formats=(fmt,), ber=(1e-3,), reps=2)
        res = run_campaign(cfg, model=m, dataset=data, progress=False, plots=False)
        assert len(res.detail) == 2 and (res.detail["flips"] > 0).all()
    argv = ["ber", "--model", "bnmodel:build", "--data", "digits", "--format", "int8", "--ber", "1e-3"]
    assert main([*argv, *FAST, "--out", str(tmp_path / "cli")]) == 0


# -- 12. SDC and DUE are disjoint ------------------------------------------------------------------------


def test_sdc_counts_only_finite_outputs():
    """A NaN output is DUE, never SDC; sdc_any keeps the old union."""
    from qfi.metrics import Record, Top1

    def result(pred):
        rec = Record(n=4, per_sample={"pred": [torch.tensor(pred)]})
        return EvalResult(Top1(), rec, torch.tensor(pred) >= 0)

    ref = result([1, 2, 3, 4])
    res = result([1, 0, -1, 4])  # sample 1 differs, sample 2 NaN
    assert res.sdc(ref) == 0.25 and res.due == 0.25 and res.sdc_any(ref) == 0.5


def test_campaign_sdc_plus_due_never_exceeds_one(tmp_path, model):
    """At a rate that blows fp32 weights up, rows with DUE > 0 keep sdc + due <= 1 and
    sdc_any = sdc + due (the clean model is finite)."""
    cfg = _cfg(tmp_path, ber=(1e-3,), reps=4, bits="30")
    d = _run(cfg, model).detail
    assert (d["due"] > 0).any()
    assert ((d["sdc"] + d["due"]) <= 1.0 + 1e-12).all()
    assert ((d["sdc_any"] - (d["sdc"] + d["due"])).abs() < 1e-9).all()


def test_plan_unchanged_by_safety_fields(tmp_path):
    """allow_nonfinite is permission, not a result: it does not change the plan or the identity."""
    a = _cfg(tmp_path)
    b = dataclasses.replace(a, allow_nonfinite=True)
    assert [t.seed for t in plan(a)] == [t.seed for t in plan(b)] and a.identity() == b.identity()
    assert json.dumps(a.identity(), sort_keys=True) == json.dumps(b.identity(), sort_keys=True)


# -- 11. say when a format crushes the clean model ---------------------------------------------------


def test_quantization_report_and_warnings_for_a_crushing_format(tmp_path, monkeypatch, caplog):
    """q3.13 on a CNN whose BatchNorm running_var reaches 566 (selected with bn_stats): the
    campaign writes quantization.csv with the saturated share of that tensor and warns once per
    format, and warns that the clean top-1 collapsed; without bn_stats the statistics are not
    selected (and not reported)."""
    import logging

    (tmp_path / "bnmodel.py").write_text(_BN_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    import importlib

    m = importlib.import_module("bnmodel").build()
    with torch.no_grad():
        m[1].running_var[0] = 566.0
    data = zoo.load_data("digits")
    cfg = _cfg(tmp_path, "q", formats=("q3.13", "fp32"), ber=(1e-4,), reps=1, bn_stats=True)
    with caplog.at_level(logging.WARNING, logger="qfi"):
        run_campaign(cfg, model=m, dataset=data, progress=False, plots=False)
    q = pd.read_csv(tmp_path / "q" / "quantization.csv", keep_default_na=False).set_index(["format", "name"])
    assert q.loc[("q3.13", "1.running_var"), "saturated"] == 1
    assert q.loc[("q3.13", "1.running_var"), "batchnorm_stat"] == "running_var"
    assert q.loc[("fp32", "1.running_var"), "saturated"] == 0
    crushed = [r.getMessage() for r in caplog.records if "crushes" in r.getMessage()]
    assert len(crushed) == 1 and "q3.13 crushes '1.running_var'" in crushed[0]
    cfg = dataclasses.replace(cfg, bn_stats=False, out=str(tmp_path / "r"))
    run_campaign(cfg, model=m, dataset=data, progress=False, plots=False)
    names = set(pd.read_csv(tmp_path / "r" / "quantization.csv")["name"])
    assert "1.running_var" not in names and "1.weight" in names


def test_clean_collapse_is_warned(tmp_path, model, caplog):
    """A format that costs more than 0.1 of the golden top-1 before any fault says so."""
    import logging

    cfg = _cfg(tmp_path, formats=("int2",), ber=(1e-4,), reps=1)
    with caplog.at_level(logging.WARNING, logger="qfi"):
        res = _run(cfg, model)
    s = res.summary.iloc[0]
    assert s["golden_top1"] - s["clean_top1"] > 0.1
    assert any("the format itself destroys" in r.getMessage() for r in caplog.records)


def test_selected_modules_the_forward_never_runs_are_named(tmp_path, caplog):
    """An activation selection with a module the forward skips still runs (the others carry the
    faults) but warns once, naming it; a selection of only such modules is an error."""
    import logging

    class Skips(nn.Module):
        def __init__(self):
            super().__init__()
            self.used = nn.Linear(64, 10)
            self.unused = nn.Linear(64, 10)

        def forward(self, x):
            return self.used(x.flatten(1))

    torch.manual_seed(0)
    data = zoo.load_data("digits")
    cfg = _cfg(tmp_path, target="activations", formats=("bf16",), ber=(1e-3,), reps=1)
    with caplog.at_level(logging.WARNING, logger="qfi"):
        run_campaign(cfg, model=Skips(), dataset=data, progress=False, plots=False)
    msgs = [r.getMessage() for r in caplog.records]
    assert any("never run in the forward" in m and "unused" in m for m in msgs)
    with pytest.raises(QfiError, match="no selected module produced a value"):
        run_campaign(
            dataclasses.replace(cfg, names=("unused",), out=str(tmp_path / "u")),
            model=Skips(), dataset=data, progress=False, plots=False,
        )
