"""README.md stays true: every ```python block runs, its format names parse, and every command of
its ```bash blocks runs (read from the README, never listed here, so an edited README is tested as
written): `qfi ...` commands in order in one folder with small-run flags, benchmarks and scripts in
their quick modes; `bash run.sh` is what CI itself runs."""

import contextlib
import importlib.util
import io
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from quant_schemes import get_format

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()

PYTHON_BLOCKS = re.findall(r"```python\n(.*?)```", README, re.S)
#: what a small run appends to (or replaces in) a command, where the command accepts the flag
SMALL = {"--reps": "1", "--limit": "32", "--quiet": None, "--no-plots": None}
#: setup lines a test cannot and need not run (CI runs `bash run.sh test` itself)
SETUP = ("bash run.sh", "source ", ". ", "export ", "cd ", "pip ", "python -m pip ", "git clone ")


def bash_commands(text: str = README) -> list[str]:
    """Each command line of the ```bash (sh, shell, console) blocks, comments stripped,
    continuations joined; from unlabelled ``` blocks, the lines that are qfi, benchmark or script
    commands (the other lines there are file maps and output)."""
    out = []
    for lang, block in re.findall(r"```([A-Za-z]*)\n(.*?)```", text, re.S):
        if lang not in ("bash", "sh", "shell", "console", ""):
            continue
        for line in block.replace("\\\n", " ").splitlines():
            try:
                words = shlex.split(line.removeprefix("$ "), comments=True)
            except ValueError:  # an apostrophe in a file map's prose
                if lang:
                    raise
                continue
            if words and (lang or kind(shlex.join(words)) in ("qfi", "benchmark", "script")):
                out.append(shlex.join(words))
    return out


def split_env(words: list[str]) -> tuple[dict[str, str], list[str]]:
    """Leading VAR=value words (as in `OMP_WAIT_POLICY=PASSIVE python ...`) and the rest."""
    env = {}
    while words and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*=.*", words[0]):
        k, v = words[0].split("=", 1)
        env[k] = v
        words = words[1:]
    return env, words


def kind(cmd: str) -> str:
    """'qfi', 'benchmark', 'script', 'setup' or 'unknown'."""
    if cmd.startswith(SETUP):
        return "setup"
    _, words = split_env(shlex.split(cmd))
    if words[0] == "qfi" or words[0].endswith("/qfi"):
        return "qfi"
    if re.fullmatch(r"(.*/)?python3?", words[0]) and len(words) > 1:
        if words[1].startswith("benchmarks/"):
            return "benchmark"
        if words[1].startswith("scripts/"):
            return "script"
    return "unknown"


def with_flags(argv: list[str], accepted: set[str], values: dict[str, str | None]) -> list[str]:
    """``argv`` with each accepted flag of ``values`` set: its value replaced where the command
    already gives the flag (flags may not repeat), appended otherwise."""
    argv = list(argv)
    for flag, value in values.items():
        if flag not in accepted:
            continue
        for i, w in enumerate(argv):
            if w == flag and value is not None:
                argv[i + 1] = value
                break
            if w.startswith(flag + "="):
                argv[i] = f"{flag}={value}"
                break
            if w == flag:
                break
        else:
            argv += [flag] if value is None else [flag, value]
    return argv


def qfi_flags(argv: list[str]) -> set[str]:
    """The option strings that the `qfi <command>` subcommand accepts."""
    import argparse

    from qfi.cli import build_parser

    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return set(sub.choices[argv[0]]._option_string_actions)


def run_qfi(argv: list[str]) -> tuple[int, str]:
    """``qfi.cli.main(argv)`` in this process: (exit code, its output)."""
    from qfi.cli import main

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf), contextlib.redirect_stderr(buf):
        try:
            rc = main(argv)
        except SystemExit as e:  # argparse refused the command line
            rc = e.code if isinstance(e.code, int) else 1
    return rc, buf.getvalue()


def small_qfi(argv: list[str], tmp: Path) -> list[str]:
    """A README `qfi` command made small: few reps and samples, no plots, quiet; files named
    relative to the repository (examples/campaign.yaml) found from ``tmp``; a campaign file whose
    command takes no --reps/--limit is copied with reps 1 and limit 32."""
    accepted = qfi_flags(argv)
    argv = [str(ROOT / w) if not w.startswith("-") and (ROOT / w).is_file() else w for w in argv]
    if argv[0] == "run" and argv[1].endswith((".yaml", ".yml")):
        cfg = yaml.safe_load(Path(argv[1]).read_text())
        cfg.update({k.lstrip("-"): int(v) for k, v in SMALL.items() if v and k not in accepted})
        small = tmp / f"small-{Path(argv[1]).name}"
        small.write_text(yaml.safe_dump(cfg))
        argv[1] = str(small)
    return with_flags(argv, accepted, SMALL)


def test_readme_python_blocks_run(tmp_path, monkeypatch):
    """Every ```python block executes as written, on its own (a reader copies one block at a
    time), in a temp dir; a `print(...)  # values` line prints those values (to the digits shown)."""
    assert len(PYTHON_BLOCKS) >= 2
    monkeypatch.chdir(tmp_path)
    for i, code in enumerate(PYTHON_BLOCKS):
        buf = io.StringIO()
        with contextlib.redirect_stdout(buf):
            try:
                exec(compile(code, f"README.md python block {i + 1}", "exec"), {"__name__": "__readme__"})
            except Exception as e:
                pytest.fail(f"README python block {i + 1} fails: {type(e).__name__}: {e}\n{code}")
        printed = [line for line in code.splitlines() if re.match(r"print\(.*\)\s+#", line)]
        shown_lines = buf.getvalue().splitlines()
        if len(shown_lines) != sum(line.startswith("print(") for line in code.splitlines()):
            printed = []  # prints in loops or from the library: lines cannot be paired with claims
        for line, shown in zip(printed, shown_lines, strict=False):
            claimed = line.split("#", 1)[1].split()
            if all(re.fullmatch(r"-?\d+(\.\d+)?", c) for c in claimed):
                got = [float(x) for x in shown.split()]
                assert len(got) == len(claimed), (line, shown)
                for c, g in zip(claimed, got, strict=True):
                    digits = len(c.split(".")[1]) if "." in c else 0
                    assert abs(float(c) - g) <= 0.5 * 10**-digits + 1e-12, f"README says {c}, got {g}: {line}"
    if any("faults.csv" in code for code in PYTHON_BLOCKS):
        assert (tmp_path / "faults.csv").read_text().startswith("name,index,bit,old_code,new_code")


def test_readme_format_table_names_parse():
    """Every format named in the README's table is a valid get_format name."""
    formats = README[README.index("## Formats") :]
    formats = formats[: formats.index("\n## ", 1)]
    names = re.findall(r"^\| `([a-z0-9_.]+)`", formats, re.M)
    assert {"fp32", "fp16", "bf16", "fp8_e4m3", "fp8_e5m2"} <= set(names)
    for n in names:
        get_format(n)
    for n in ("q3.13", "q1.7", "int8", "int4", "int8_per_channel"):
        get_format(n)


def test_readme_bash_commands_are_all_exercised():
    """Every ```bash line is a kind this file runs (qfi, benchmark, script) or a setup line;
    a new kind of command in the README must get a test here."""
    cmds = bash_commands()
    assert any(kind(c) == "qfi" for c in cmds) and any(kind(c) == "benchmark" for c in cmds)
    unknown = [c for c in cmds if kind(c) == "unknown"]
    assert not unknown, f"README commands no test runs: {unknown}; teach tests/test_readme.py to run them"


def test_readme_qfi_commands_run_in_order(tmp_path, monkeypatch):
    """In one fresh folder, as a new user would after `bash run.sh` (which runs `qfi main`): each
    README `qfi` command in README order, with its default output folder and small-run flags,
    exits 0 (so no command collides with the results of an earlier one)."""
    monkeypatch.chdir(tmp_path)
    cmds = [["main"]] + [split_env(shlex.split(c))[1][1:] for c in bash_commands() if kind(c) == "qfi"]
    failed = []
    for argv in cmds:
        small = small_qfi(argv, tmp_path)
        rc, out = run_qfi(small)
        if rc != 0:
            failed.append(f"qfi {shlex.join(argv)} (run as qfi {shlex.join(small)}) exited {rc}:\n{out}")
    assert not failed, "\n\n".join(failed)


def test_small_qfi_flags():
    """The small-run rewrite replaces flags a command already gives and skips flags it lacks."""
    argv = small_qfi(["ber", "--ber", "1e-10:1e-6", "--names", "mlp,ln", "--reps", "10"], Path("/tmp"))
    assert argv.count("--reps") == 1 and argv[argv.index("--reps") + 1] == "1"
    assert "--limit" in argv and "--no-plots" in argv
    assert small_qfi(["names", "--filter", "mlp,ln"], Path("/tmp")) == ["names", "--filter", "mlp,ln"]


def test_readme_benchmark_commands_run():
    """Each README benchmark command runs as written, in its --smoke mode (tests/test_benchmarks.py
    checks the tables)."""
    for cmd in [c for c in bash_commands() if kind(c) == "benchmark"]:
        env, words = split_env(shlex.split(cmd))
        argv = [sys.executable, *[w for w in words[1:] if w != "--quick"], "--smoke"]
        r = subprocess.run(
            argv, cwd=ROOT, env={**os.environ, **env}, capture_output=True, text=True, timeout=300
        )
        assert r.returncode == 0, f"{cmd} --smoke exited {r.returncode}:\n{r.stdout}\n{r.stderr}"


def test_readme_script_commands_run(tmp_path, monkeypatch, capsys):
    """Each README `python scripts/...` command runs as written with small-run flags, in-process."""
    for i, cmd in enumerate(c for c in bash_commands() if kind(c) == "script"):
        env, words = split_env(shlex.split(cmd))
        for k, v in env.items():
            monkeypatch.setenv(k, v)
        spec = importlib.util.spec_from_file_location(f"readme_script_{i}", ROOT / words[1])
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        with pytest.raises(SystemExit):
            mod.main(["--help"])
        accepted = set(re.findall(r"(--[a-z][a-z0-9-]*)", capsys.readouterr().out))
        values = {**SMALL, "--limit": "64", "--out": str(tmp_path / f"out{i}")}
        mod.main(with_flags(words[2:], accepted, values))
