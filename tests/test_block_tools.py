"""The block-format tools: the figure script and the per-format injection benchmark run, and
write what their docstrings promise."""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pandas as pd

ROOT = Path(__file__).resolve().parents[1]


def load(name: str):
    spec = importlib.util.spec_from_file_location(f"script_{name}", ROOT / "scripts" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_block_formats_script_writes_every_part(tmp_path, capsys):
    """One rep on 64 samples: a row per (format, part, BER, rep); formats with stored scales get a
    scales curve, bf16 none; scale-only trials hit only scale words."""
    load("block_formats").main(["--formats", "bf16,mxfp4,int4_g128", "--ber", "1e-3,1e-2", "--reps", "1",
                                "--limit", "64", "--no-plots", "--out", str(tmp_path)])
    df = pd.read_csv(tmp_path / "block_formats.csv")
    parts = df.groupby("format")["part"].apply(set).to_dict()
    assert parts == {"bf16": {"all", "codes"}, "mxfp4": {"all", "codes", "scales"},
                     "int4_g128": {"all", "codes", "scales"}}
    assert len(df) == 2 * (2 + 3 + 3)
    bpv = df.set_index("format")["bits_per_value"].to_dict()
    assert bpv == {"bf16": 16, "mxfp4": 4.25, "int4_g128": 4.25}
    scales = df[df.part == "scales"]
    assert (scales.stored_bits < df[df.part == "codes"].stored_bits.max()).all()
    assert "block_formats.csv" in capsys.readouterr().out


def test_bench_inject_format_table_smoke():
    """bench_inject.py --smoke --only formats --format int8,mxfp4 prints one row per format with
    its stored bits per value and its ratio to the first format."""
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE"}
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_inject.py"), "--smoke", "--only",
                        "formats", "--format", "int8,mxfp4"], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    num = r"-?[0-9.]+"
    assert re.search(rf"^int8 +8\.0000 +{num}ms +{num}% +1\.00x  mean flips", r.stdout, re.M), r.stdout
    assert re.search(rf"^mxfp4 +4\.\d+ +{num}ms +{num}% +{num}x  mean flips {num}, {num}% in scale words",
                     r.stdout, re.M), r.stdout
    assert "golden forward" not in r.stdout  # --only formats: the fp32 table is not run
