"""Every benchmark runs: its --smoke mode (a tiny model, seconds) exits 0 and prints its whole
table, so a benchmark cannot rot between the runs that fill the README's Speed section."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NUM = r"-?[0-9.]+"

#: per benchmark script: the lines its table must hold (regexes, each matched against a whole line)
TABLES = {
    "bench_inject.py": [
        rf"golden forward, batch 1 \(median\) +{NUM}ms +{NUM}%.*",
        *(
            rf"qfi {mode}, BER {ber} +{NUM}ms +{NUM}%  mean flips {NUM}; undo log .*"
            for mode in ("flat buffer", "in place")
            for ber in ("1e-09", "1e-06", "0.0001")
        ),
        rf"qfi flat buffer: session enter \(once\) +{NUM}ms.*",
        rf"qfi in place: session enter \(once\) +{NUM}ms.*",
        rf"baseline \(a\) full copy-restore +{NUM}ms +{NUM}%.*",
        rf"baseline \(b\) dense per-bit masks \(extrap.\) +{NUM}ms +{NUM}%.*",
        *(
            rf"{fmt} outputs, BitFlip\(1e-7\) armed +{NUM}ms +{NUM}ms +{NUM}% +{NUM}%"
            for fmt in ("fp16", "bf16", "int8")
        ),
    ],
    "bench_campaign.py": [
        r"campaign: \d+ trials, \d+ evaluations of \d+ images .*",
        rf"round 0: wall {NUM} s, evaluations {NUM} s \(mean {NUM} ms each\), ratio {NUM}, "
        rf"overhead {NUM} ms/trial",
        rf"overhead ratio wall / \(time of the campaign's own evaluations\) = {NUM} .*",
        rf"per-trial overhead beyond the evaluation: {NUM} ms .*",
        rf"plots \(written once per campaign, not counted above\): {NUM} s",
    ],
    "bench_observers.py": [
        *(
            line
            for model in (r"tiny ViT \(smoke test\), batch 8", r"embedded ViT \(digits\), batch 450")
            for line in (
                rf"{model}: \d+ leaf modules observed, reference {NUM} MB per batch \(device memory\), "
                r"\d+ pairs",
                rf"plain forward \(median\) +{NUM}ms +1\.00x  no observer",
                rf"observer off +{NUM}ms +{NUM}x  hooks added to the model: 0",
                rf"recording the reference +{NUM}ms +{NUM}x  one copy of every observed output .*",
                rf"measuring against it +{NUM}ms +{NUM}x  rmse, mae, max_abs, changed, nonfinite per module",
            )
        ),
    ],
    "bench_prefix.py": [
        r"model: embedded ViT, \d+ images in \d+ batch\(es\); .*",
        r"model: vit-b/16 shape.*, \d+ images in \d+ batch\(es\)",
        *(
            rf"{model} \| {what}: full {NUM} ms, reuse {NUM} ms per trial, x{NUM}; recording \+{NUM} "
            r"evaluations once; [1-9]\d* module\(s\) served"
            for model, what in (
                ("embedded vit", "weights heads"),
                ("embedded vit", "weights encoder_layer_2"),
                ("embedded vit", "activations heads.head"),
                (r"vit-b/16 shape.*", "weights heads"),
                (r"vit-b/16 shape.*", r"weights encoder_layer_\d+"),
            )
        ),
        *(
            rf"{model} \| per-layer sweep, \d+ groups x \d+ trials: full {NUM} s, reuse {NUM} s = {NUM}x of "
            rf"the full forwards; with the recording {NUM}x"
            for model in ("embedded vit", r"vit-b/16 shape.*")
        ),
        r"rows identical with and without reuse: True",
    ],
    "bench_ray.py": [
        rf"one evaluation \(\d+ images, embedded ViT, 1 thread\): {NUM} ms; .*",
        *(rf"{run} +\d+ trials in +{NUM} s = +{NUM} trials/s  \(x{NUM} vs local\)"
          for run in ("local, 1 thread", "ray, 1 worker", "ray, 2 workers")),
        rf"ray overhead per trial .*: {NUM} ms = {NUM}% of an evaluation \(target < 5%\)",
        r"rows identical across executors: True",
        rf"ray start \(once, not counted above\): cluster {NUM} s; .*",
    ],
}


def smoke(name: str) -> str:
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE"}
    r = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / name), "--smoke"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, f"{name} --smoke exited {r.returncode}:\n{r.stdout}\n{r.stderr}"
    return r.stdout


def test_every_benchmark_is_smoke_tested():
    """A new benchmark script needs its table lines listed here (and a --smoke mode)."""
    assert {p.name for p in (ROOT / "benchmarks").glob("bench_*.py")} == set(TABLES)


@pytest.mark.parametrize("name", sorted(TABLES))
def test_benchmark_smoke_prints_its_table(name):
    """`python benchmarks/<name> --smoke` exits 0 and prints every row of the full run's table."""
    if name == "bench_ray.py":
        pytest.importorskip("ray")
    lines = [line.strip() for line in smoke(name).splitlines()]
    missing = [rx for rx in TABLES[name] if not any(re.fullmatch(rx, line) for line in lines)]
    assert not missing, f"{name} --smoke printed no line matching {missing}:\n" + "\n".join(lines)
    if name == "bench_campaign.py":
        # wall and evaluation time come from the same run (the evaluations are clocked inside the
        # campaign), so no load can make the ratio fall below 1 or the overhead negative
        for line in lines:
            m = re.fullmatch(rf"round \d+: .*, ratio ({NUM}), overhead ({NUM}) ms/trial", line)
            if m:
                assert float(m.group(1)) >= 1 and float(m.group(2)) >= 0, line
