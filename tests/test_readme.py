"""README.md stays true: its Python example runs, its format names parse, its commands exist."""

import re
from pathlib import Path

import pytest

from quant_schemes import get_format

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()


def test_readme_python_example_runs(tmp_path, monkeypatch):
    """The first ```python block executes as written (in a temp dir: it writes faults.csv)."""
    code = re.search(r"```python\n(.*?)```", README, re.S).group(1)
    monkeypatch.chdir(tmp_path)
    exec(compile(code, "README.md", "exec"), {})
    assert (tmp_path / "faults.csv").read_text().startswith("name,index,bit,old_code,new_code")


def test_readme_format_table_names_parse():
    """Every format named in the README's table is a valid get_format name."""
    names = re.findall(r"^\| `([a-z0-9_.]+)`", README, re.M)
    assert {"fp32", "fp16", "bf16", "fp8_e4m3", "fp8_e5m2"} <= set(names)
    for n in names:
        get_format(n)
    for n in ("q3.13", "q1.7", "int8", "int4", "int8_per_channel"):
        get_format(n)


@pytest.mark.parametrize("cmd", ["names", "bits", "formats", "ber", "run", "main"])
def test_readme_cli_commands_exist(cmd):
    """Each `qfi <command>` the README shows is a real subcommand."""
    from qfi.cli import build_parser

    assert f"qfi {cmd}" in README
    build_parser().parse_args([cmd, "x.yaml"] if cmd == "run" else [cmd])
