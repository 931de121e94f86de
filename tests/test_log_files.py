"""Fault logs on disk: a corrupt or hand-edited file gives a QfiError naming the file, the row and
the problem (never KeyError, OverflowError, EmptyDataError, TypeError); duplicated weight sites are
refused; a failed save leaves the old file."""

from __future__ import annotations

import pickle
import re

import pytest
import torch
from torch import nn

import qfi
from qfi import FaultLog, QfiError
from qfi.log import COLUMNS

HEADER = "name,index,bit,old_code,new_code,old_value,new_value,call"


@pytest.fixture
def model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 4))


@pytest.fixture
def log(model) -> FaultLog:
    with qfi.weights(model, "int8") as w:
        lg = w.apply(qfi.FlipCount(20), seed=1)
        w.undo()
    return lg


def _edit(lines: list[str], line: int, column: str, value: str) -> list[str]:
    """``lines`` with the cell ``column`` of file line ``line`` (1 = header) replaced."""
    out = list(lines)
    cells = out[line - 1].split(",")
    cells[HEADER.split(",").index(column)] = value
    out[line - 1] = ",".join(cells)
    return out


CSV_CASES = {
    "missing column": (lambda ls: [",".join(c for i, c in enumerate(x.split(",")) if i != 2) for x in ls],
                       r"lacks the column\(s\) bit; a fault log CSV has the columns name, index, bit"),
    "huge code": (lambda ls: _edit(ls, 3, "old_code", "99999999999999999999999"),
                  r"line 3: old_code 99999999999999999999999 is outside 0\.\.4294967295"),
    "code beyond 32 bits": (lambda ls: _edit(ls, 2, "new_code", str(2**32)),
                            r"line 2: new_code 4294967296 is outside"),
    "empty file": (lambda ls: [], r"is empty \(0 bytes\); a fault log CSV starts with the header name,"),
    "negative bit": (lambda ls: _edit(ls, 4, "bit", "-1"), r"line 4: bit -1 is outside 0\.\.31"),
    "bit 32": (lambda ls: _edit(ls, 4, "bit", "32"), r"line 4: bit 32 is outside 0\.\.31"),
    "negative index": (lambda ls: _edit(ls, 2, "index", "-3"), r"line 2: index -3 is outside 0 or more"),
    "non-integral index": (lambda ls: _edit(ls, 5, "index", "2.5"), r"line 5: index 2\.5 is not an integer"),
    "word as index": (lambda ls: _edit(ls, 3, "index", "abc"), r"line 3: index 'abc' is not an integer"),
    "empty bit": (lambda ls: _edit(ls, 3, "bit", ""), r"line 3: bit '' is not an integer"),
    "call below -1": (lambda ls: _edit(ls, 2, "call", "-2"), r"line 2: call -2 is outside -1 or more"),
    "word as value": (lambda ls: _edit(ls, 3, "new_value", "big"),
                      r"line 3: new_value 'big' is not a number"),
    "value beyond float32": (lambda ls: _edit(ls, 3, "old_value", "1e300"),
                             r"old_value 1e\+300 is beyond the float32"),
    "ragged row": (lambda ls: ls[:2] + [ls[2] + ",1,2"],
                   r"is not a readable CSV: .*Expected 8 fields in line 3"),
    "duplicated row": (lambda ls: ls + [ls[3]],
                       r"lines 4 and 22 both flip bit \d+ of '[\w.]+'\[\d+\]: replaying"),
}  # fmt: skip


@pytest.mark.parametrize("case", list(CSV_CASES))
def test_corrupt_csv_log_names_file_and_problem(tmp_path, log, case):
    edit, pattern = CSV_CASES[case]
    log.save(tmp_path / "good.csv")
    lines = (tmp_path / "good.csv").read_text().splitlines()
    assert lines[0] == HEADER and len(lines) == 21
    bad = tmp_path / "bad.csv"
    bad.write_text("\n".join(edit(lines)) + ("\n" if case != "empty file" else ""))
    with pytest.raises(QfiError, match=f"fault log {re.escape(str(bad))}.*{pattern}"):
        FaultLog.load(bad)


def test_binary_csv_and_header_only_csv(tmp_path):
    (tmp_path / "bin.csv").write_bytes(b"\xff\xfe\x00\x81garbage")
    with pytest.raises(QfiError, match=r"bin\.csv is not a readable CSV: 'utf-8' codec"):
        FaultLog.load(tmp_path / "bin.csv")
    (tmp_path / "h.csv").write_text(HEADER + "\n")
    assert FaultLog.load(tmp_path / "h.csv").flips == 0


def test_integral_floats_and_extra_columns_are_read(tmp_path, log):
    """A spreadsheet's '3.0' is the integer 3; an added column is ignored; the rows round-trip."""
    log.save(tmp_path / "good.csv")
    lines = (tmp_path / "good.csv").read_text().splitlines()
    bit = lines[2].split(",")[2]
    lines = _edit(lines, 3, "bit", f"{bit}.0")
    lines = [x + ("," + ("note" if i == 0 else "x")) for i, x in enumerate(lines)]
    (tmp_path / "edited.csv").write_text("\n".join(lines) + "\n")
    back = FaultLog.load(tmp_path / "edited.csv")
    for k, v in log.columns.items():
        if k != "name_id":
            assert torch.equal(back.columns[k].nan_to_num(), v.nan_to_num()), k


def _pt(log: FaultLog, **changes) -> dict:
    d = {"names": log.names, "columns": dict(log.columns), "format": log.format, "sites": log.sites}
    cols = changes.pop("columns", {})
    d["columns"].update(cols)
    d.update(changes)
    return d


PT_CASES = {
    "not a dict": (lambda lg: [1, 2], r"holds list; expected a FaultLog\.save file"),
    "no columns": (lambda lg: {"names": lg.names}, r"holds a dict with keys \['names'\]; expected"),
    "names not strings": (lambda lg: _pt(lg, names=[1, 2, 3]), r"'names' must be a list of strings"),
    "names twice": (lambda lg: _pt(lg, names=[lg.names[0]] * 3), r"'names' lists '0\.weight' more than once"),
    "format not a string": (lambda lg: _pt(lg, format=8), r"'format' must be a format name string"),
    "negative sites": (lambda lg: _pt(lg, sites=-3), r"'sites' must be an integer >= 0 or None, got int -3"),
    "missing column": (lambda lg: {**_pt(lg), "columns": {k: v for k, v in lg.columns.items() if k != "bit"}},
                       r"'columns' lacks bit"),
    "float index": (lambda lg: _pt(lg, columns={"index": lg.columns["index"].float()}),
                    r"column 'index' has dtype torch\.float32; expected an integer dtype"),
    "int values": (lambda lg: _pt(lg, columns={"old_value": lg.columns["index"]}),
                   r"column 'old_value' has dtype torch\.int64; expected an floating-point dtype"),
    "2-d column": (lambda lg: _pt(lg, columns={"bit": lg.columns["bit"][None]}),
                   r"column 'bit' must be a 1-D tensor, got shape \(1, 20\)"),
    "not a tensor": (lambda lg: _pt(lg, columns={"bit": [1, 2]}),
                     r"column 'bit' must be a 1-D tensor, got list"),
    "short column": (lambda lg: _pt(lg, columns={"call": lg.columns["call"][:3]}), r"different lengths"),
    "name id out of range": (lambda lg: _pt(lg, names=lg.names[:1]),
                             r"row \d+: name id [12] is outside 0\.\.0 \(the log lists 1 name"),
    "negative bit": (lambda lg: _pt(lg, columns={"bit": lg.columns["bit"] - 8}),
                     r"row 0: bit -\d is outside"),
    "huge code": (lambda lg: _pt(lg, columns={"old_code": lg.columns["old_code"] + 2**40}),
                  r"row 0: old_code \d+ is outside 0\.\.4294967295"),
    "duplicated row": (lambda lg: _pt(lg, columns={k: torch.cat([v, v[5:6]]) for k, v in lg.columns.items()}),
                       r"rows 5 and 20 both flip bit"),
}  # fmt: skip


@pytest.mark.parametrize("case", list(PT_CASES))
def test_corrupt_pt_log_names_file_and_problem(tmp_path, log, case):
    make, pattern = PT_CASES[case]
    path = tmp_path / "bad.pt"
    torch.save(make(log), path)
    with pytest.raises(QfiError, match=f"fault log {re.escape(str(path))}.*{pattern}"):
        FaultLog.load(path)


@pytest.mark.parametrize(
    ("content", "pattern"),
    [
        (b"", r"the file is empty \(0 bytes\)"),
        (b"hello, not a log", r"not a torch\.save file \(it starts with b'hell'\)"),
        (pickle.dumps({"names": []}, protocol=4), r"UnpicklingError"),
        (None, r"RuntimeError: PytorchStreamReader failed"),  # a truncated torch.save file
    ],
)
def test_unreadable_pt_log_says_why(tmp_path, log, content, pattern):
    path = tmp_path / "bad.pt"
    if content is None:
        log.save(tmp_path / "good.pt")
        content = (tmp_path / "good.pt").read_bytes()[:200]
    path.write_bytes(content)
    where = f"fault log {re.escape(str(path))} is not a FaultLog.save file"
    with pytest.raises(QfiError, match=f"{where}.*{pattern}"):
        FaultLog.load(path)


def test_missing_file_stays_an_os_error(tmp_path):
    with pytest.raises(FileNotFoundError):
        FaultLog.load(tmp_path / "nope.csv")
    with pytest.raises(FileNotFoundError):
        FaultLog.load(tmp_path / "nope.pt")


def test_duplicated_weight_site_is_refused_not_replayed(model, log, tmp_path):
    """A duplicated row used to replay 2 flips fewer (the pair cancels) and skip the old-code check;
    now the constructor and load refuse it, naming both rows."""
    cols = {k: torch.cat([v, v[7:8]]) for k, v in log.columns.items()}
    with pytest.raises(QfiError, match=r"FaultLog rows 7 and 20 both flip bit \d+ of '[\w.]+'\[\d+\]"):
        FaultLog(log.names, cols)
    with qfi.weights(model, "int8") as w:
        assert w.replay(log).flips == 20  # the clean log replays
        w.undo()


def test_activation_rows_may_repeat_a_site():
    """Activation faults hit a module on several forwards (call >= 0): a repeated site is legitimate."""
    cols = {k: torch.zeros(3, dtype=d) for k, d in COLUMNS.items()}
    cols.update(index=torch.tensor([4, 4, 4]), bit=torch.tensor([2, 2, 2]), call=torch.tensor([0, 1, 1]))
    assert FaultLog(["relu"], cols).flips == 3


def test_names_listed_twice_are_refused():
    with pytest.raises(QfiError, match=r"FaultLog names list 'a' more than once"):
        FaultLog(["a", "b", "a"])


@pytest.mark.parametrize("ext", [".csv", ".pt"])
def test_failed_save_keeps_the_old_file(tmp_path, log, monkeypatch, ext):
    """A save that dies half-way (a full disk, a kill) leaves the previous log and no temporary file."""
    path = tmp_path / f"log{ext}"
    log.save(path)
    before = path.read_bytes()

    def half(obj, f, *a, **k):
        with open(f, "wb") as fh:
            fh.write(b"PK\x03\x04half")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", half)
    monkeypatch.setattr("pandas.DataFrame.to_csv", lambda self, f, **k: half(None, f))
    with pytest.raises(OSError, match="No space left"):
        log.save(path)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == [path.name]
