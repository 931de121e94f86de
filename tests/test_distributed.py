"""Campaigns on a local Ray cluster (2 CPUs): the same rows as the local executor with 1 or 2
workers, a killed worker costs only its chunk, a killed or interrupted driver resumes, plug-in
models from a user module reach the workers, a worker's exception names its trial."""

import dataclasses
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pandas as pd
import pytest
import torch

ray = pytest.importorskip("ray")

from qfi import zoo  # noqa: E402
from qfi.campaign import run_campaign  # noqa: E402
from qfi.config import CampaignConfig  # noqa: E402
from qfi.distributed import RayExecutor  # noqa: E402
from qfi.errors import QfiError  # noqa: E402

PLUGIN = textwrap.dedent(
    """
    import torch
    from torch import nn

    class Tiny(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1 = nn.Linear(64, 32)
            self.fc2 = nn.Linear(32, 10)
            self.fail_when_shipped = False

        def __setstate__(self, state):  # unpickled: this copy runs in a worker
            super().__setstate__(state)
            self.shipped = True

        def forward(self, x):
            if self.fail_when_shipped and getattr(self, "shipped", False):
                raise RuntimeError("boom in the worker")
            return self.fc2(torch.relu(self.fc1(x.flatten(1))))

    def build():
        torch.manual_seed(0)
        return Tiny().eval()
    """
)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """One local Ray instance for the module; the plug-in module's folder is on the workers' path."""
    plug = tmp_path_factory.mktemp("plugin")
    (plug / "qfi_test_plugin.py").write_text(PLUGIN)
    sys.path.insert(0, str(plug))
    ray.init(
        num_cpus=2,
        include_dashboard=False,
        logging_level="ERROR",
        runtime_env={"env_vars": {"OMP_WAIT_POLICY": "PASSIVE", "PYTHONPATH": os.pathsep.join(sys.path)}},
    )
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the workers: the same float results
    yield plug
    torch.set_num_threads(threads)
    ray.shutdown()
    sys.path.remove(str(plug))


def _cfg(tmp_path, name, **kw):
    base = dict(formats=("fp32", "int8"), ber=(1e-5, 1e-4), reps=4, device="cpu", limit=96)
    base["out"] = str(tmp_path / name)
    base.update(kw)
    return CampaignConfig(**base)


def _detail(path):
    return Path(path, "detail.csv").read_bytes()


def test_same_rows_local_and_ray_with_one_or_two_workers(cluster, tmp_path):
    """detail.csv is byte-identical for the local executor, Ray with 1 worker and with 2 workers
    (and summary.csv too); the evaluation count is the same."""
    model = zoo.load_model("vit_digits")
    local = run_campaign(_cfg(tmp_path, "local"), model=model, progress=False, plots=False)
    one = run_campaign(
        _cfg(tmp_path, "one", executor="ray", workers=1), model=model, progress=False, plots=False
    )
    two = run_campaign(
        _cfg(tmp_path, "two", executor="ray", workers=2), model=model, progress=False, plots=False
    )
    assert _detail(tmp_path / "local") == _detail(tmp_path / "one") == _detail(tmp_path / "two")
    summary = [(tmp_path / n / "summary.csv").read_bytes() for n in ("local", "two")]
    assert summary[0] == summary[1]
    assert local.evaluations == one.evaluations == two.evaluations
    assert (local.detail["flips"] > 0).any()


def test_prefix_reuse_on_ray_records_no_cache_on_the_driver(cluster, tmp_path, monkeypatch):
    """With --prefix-reuse the workers record and use their caches (the same rows as without);
    the driver, which runs no trial, records none."""
    from qfi.campaign import TrialContext

    recorded = []
    real = TrialContext._new_prefix_cache

    def counted(self, session, names):
        recorded.append(names)
        return real(self, session, names)

    monkeypatch.setattr(TrialContext, "_new_prefix_cache", counted)
    model = zoo.load_model("vit_digits")
    kw = dict(executor="ray", workers=1, names=("heads",), reps=2)
    plain = run_campaign(_cfg(tmp_path, "plain", **kw), model=model, progress=False, plots=False)
    reuse = run_campaign(_cfg(tmp_path, "reuse", prefix_reuse=True, **kw), model=model, progress=False,
                         plots=False)
    assert _detail(tmp_path / "plain") == _detail(tmp_path / "reuse")
    assert recorded == [] and plain.evaluations == reuse.evaluations


def test_a_killed_worker_costs_only_its_chunk(cluster, tmp_path):
    """SIGKILL one worker's process after the first finished chunk: its unfinished chunk is
    retried on a replacement and the rows equal an undisturbed run's."""
    model = zoo.load_model("vit_digits")
    run_campaign(_cfg(tmp_path, "calm"), model=model, progress=False, plots=False)
    killed = []

    def kill_one(ex, done):
        if not killed:
            pid = ex.worker_pids()[0]
            os.kill(pid, signal.SIGKILL)
            killed.append(pid)

    ex = RayExecutor(workers=2, chunk=2, after_chunk=kill_one)
    run_campaign(_cfg(tmp_path, "hit", executor="ray", workers=2), model=model, progress=False, plots=False,
                 executor=ex)
    assert killed and ex.replaced >= 1
    assert _detail(tmp_path / "calm") == _detail(tmp_path / "hit")


def test_plugin_model_from_a_user_module_and_worker_errors(cluster, tmp_path):
    """A 'module:callable' model living in a user module runs on the workers (same rows as local);
    an exception inside a worker stops the campaign naming the trial key."""
    data = zoo.load_data("digits")
    cfg = _cfg(tmp_path, "plug-local", model="qfi_test_plugin:build", data="digits", formats=("int8",))
    run_campaign(cfg, progress=False, plots=False)
    run_campaign(dataclasses.replace(cfg, out=str(tmp_path / "plug-ray"), executor="ray", workers=2),
                 progress=False, plots=False)
    assert _detail(tmp_path / "plug-local") == _detail(tmp_path / "plug-ray")
    import qfi_test_plugin

    bad = qfi_test_plugin.build()
    bad.fail_when_shipped = True
    with pytest.raises(QfiError, match=r"trial \('int8', 'weights', '', 'ber', '1e-05'.*boom in the worker"):
        run_campaign(dataclasses.replace(cfg, out=str(tmp_path / "bad"), executor="ray", workers=1),
                     model=bad, dataset=data, progress=False, plots=False)


def _cli(out, *extra):
    argv = [sys.executable, "-m", "qfi.cli", "ber", "--ber", "1e-5,1e-4", "--format", "fp32", "--reps", "40",
            "--limit", "96", "--device", "cpu", "--quiet", "--no-plots", "--out", str(out), *extra]
    env = dict(os.environ, OMP_WAIT_POLICY="PASSIVE")
    return argv, env


def _wait_for_rows(path, n, proc, timeout=120):
    t = time.time()
    while time.time() - t < timeout:
        if path.exists() and path.read_text().count("\n") > n:
            return True
        if proc.poll() is not None:
            return False
        time.sleep(0.2)
    return False


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGINT])
def test_a_killed_or_interrupted_driver_resumes_with_the_same_command(tmp_path, sig):
    """The driver is SIGKILLed (or gets Ctrl-C) mid-campaign; Ctrl-C exits 130; the same command
    then finishes with the rows of the local executor."""
    argv, env = _cli(tmp_path / "ray", "--executor", "ray", "--workers", "2")
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    assert _wait_for_rows(tmp_path / "ray" / "detail.csv", 3, proc), proc.stderr.read()
    proc.send_signal(sig)
    code = proc.wait(timeout=120)
    err = proc.stderr.read()
    proc.stderr.close()
    if sig == signal.SIGINT:
        assert code == 130 and "rerun the same command to resume" in err, err
    rows = pd.read_csv(tmp_path / "ray" / "detail.csv")
    assert 0 < len(rows) <= 80  # a fast finish may beat the signal: resuming must work either way
    again = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr
    assert "resumed" in again.stdout
    local_argv, _ = _cli(tmp_path / "local", "--threads", "1")
    local_argv = [a for a in local_argv]  # --threads applies to ray only: run local with 1 thread instead
    local_argv.remove("--threads")
    local_argv.remove("1")
    done = subprocess.run(local_argv, env=dict(env, OMP_NUM_THREADS="1"), capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr
    assert _detail(tmp_path / "ray") == _detail(tmp_path / "local")
