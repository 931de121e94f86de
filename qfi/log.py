"""FaultLog: one row per flipped bit, stored as columns (tensors), never per-row objects."""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from torch import Tensor

from qfi.errors import QfiError

# column -> dtype; codes are the unsigned bit patterns (int64), values float32
COLUMNS: dict[str, torch.dtype] = {
    "name_id": torch.int64,
    "index": torch.int64,
    "bit": torch.int64,
    "old_code": torch.int64,
    "new_code": torch.int64,
    "old_value": torch.float32,
    "new_value": torch.float32,
    "call": torch.int64,
}


class FaultLog:
    """Rows ``name, index, bit, old_code, new_code, old_value, new_value, call``.

    ``old_code``/``new_code`` are the whole word before/after the injection (repeated on each
    row of a multi-bit upset); ``call`` is the forward index of an activation fault, -1 for
    weights.  ``names`` maps ``name_id`` to tensor/module names; ``sites`` counts the sites
    drawn (for StuckAt, sites already at the stuck value are drawn but not rows).

    A weight site (name, index, bit) appears at most once: a repeated row would flip the bit
    back on replay, so the constructor and :meth:`load` refuse it (QfiError naming both rows).
    """

    def __init__(self, names: Sequence[str], columns: dict[str, Tensor] | None = None,
                 fmt: str = "", sites: int | None = None, *,
                 lazy: Callable[[], dict[str, Tensor]] | None = None, rows: int | None = None) -> None:
        self.names = list(names)
        self._chunks: list[dict[str, Tensor]] = []
        self._pending: list[tuple[Callable[[], dict[str, Tensor]], int | None]] = []
        # ``lazy`` builds the columns on first access (a trial that never reads its log does not
        # pay for it); ``rows`` is then the row count when already known
        self._lazy, self._rows = lazy, rows
        self._cols = self._check(columns or {}) if lazy is None else {}
        if len(set(self.names)) != len(self.names):
            dup = next(n for i, n in enumerate(self.names) if n in self.names[:i])
            raise QfiError(f"FaultLog names list {dup!r} more than once")
        if lazy is None and (d := _first_duplicate(self._cols)) is not None:
            raise QfiError(f"FaultLog {_duplicate_message(self._cols, self.names, *d, 'row', 0)}")
        self.format = fmt
        self.sites = self.flips if sites is None else int(sites)

    @staticmethod
    def _check(cols: dict[str, Tensor]) -> dict[str, Tensor]:
        out = {}
        for k, d in COLUMNS.items():
            v = cols.get(k)
            v = torch.empty(0, dtype=d) if v is None else v.detach()
            out[k] = v if v.dtype == d and v.device.type == "cpu" else v.to("cpu", d)
        n = {v.numel() for v in out.values()}
        if len(n) != 1:
            raise QfiError(f"FaultLog columns have different lengths: {n}")
        return out

    def extend(
        self,
        columns: dict[str, Tensor] | Callable[[], dict[str, Tensor]],
        sites: int,
        rows: int | None = None,
    ) -> None:
        """Append rows (used while activation faults accumulate over forwards).  ``columns`` may be
        a callable building them on first access (device tensors are then read back once per log,
        not once per forward: no GPU synchronisation inside a forward); ``rows`` is then its row
        count when known."""
        if callable(columns):
            self._pending.append((columns, rows))
        else:
            self._chunks.append(self._check(columns))
        self.sites += int(sites)

    def _materialize(self) -> None:
        if self._pending:
            self._chunks.extend(self._check(build()) for build, _ in self._pending)
            self._pending = []

    @property
    def columns(self) -> dict[str, Tensor]:
        """Column name -> 1-D CPU tensor (``name_id`` indexes ``names``)."""
        if self._lazy is not None:
            self._cols, self._lazy = self._check(self._lazy()), None
        self._materialize()
        if self._chunks:
            parts = [self._cols, *self._chunks]
            self._cols = {k: torch.cat([p[k] for p in parts]) for k in COLUMNS}
            self._chunks = []
        return self._cols

    @property
    def flips(self) -> int:
        """Number of flipped bits (rows)."""
        if self._lazy is not None and self._rows is not None:
            return self._rows
        if self._lazy is None and self._pending and all(r is not None for _, r in self._pending):
            done = self._cols["index"].numel() + sum(c["index"].numel() for c in self._chunks)
            return done + sum(r for _, r in self._pending)  # type: ignore[misc]
        return self.columns["index"].numel()

    def __len__(self) -> int:
        return self.flips

    def __getattr__(self, key: str) -> Tensor:
        if key in COLUMNS and "_cols" in self.__dict__:
            return self.columns[key]
        raise AttributeError(key)

    def __repr__(self) -> str:
        return f"FaultLog({self.flips} flips over {len(set(self.columns['name_id'].tolist()))} tensors)"

    @classmethod
    def concat(cls, logs: Sequence[FaultLog], names: Sequence[str] | None = None) -> FaultLog:
        """One log of all rows; ``names`` (default: the first log's) must cover every log's names."""
        names = list(names if names is not None else (logs[0].names if logs else []))
        pos = {n: i for i, n in enumerate(names)}
        cols: dict[str, list[Tensor]] = {k: [] for k in COLUMNS}
        for lg in logs:
            remap = torch.tensor([pos[n] for n in lg.names] or [0], dtype=torch.int64)
            for k in COLUMNS:
                c = lg.columns[k]
                cols[k].append(remap.index_select(0, c) if k == "name_id" else c)
        fmt = logs[0].format if logs else ""
        return cls(names, {k: torch.cat(v) if v else torch.empty(0) for k, v in cols.items()},
                   fmt, sum(lg.sites for lg in logs))

    def to_frame(self):
        """A pandas DataFrame with a ``name`` column instead of ``name_id``."""
        import pandas as pd

        df = pd.DataFrame({k: v.numpy() for k, v in self.columns.items() if k != "name_id"})
        ids = self.columns["name_id"].numpy()
        df.insert(0, "name", pd.Categorical.from_codes(ids, categories=self.names) if self.names
                  else pd.Series([], dtype=object))
        return df

    def save(self, path: str | Path) -> None:
        """CSV when ``path`` ends with ``.csv`` (rows only), else ``torch.save`` (everything).

        Written through a temporary file beside ``path``, so a kill or a full disk leaves the old
        file or the new one, never half a log."""
        path = Path(path)
        tmp = path.with_name(path.name + ".tmp")
        try:
            if path.suffix == ".csv":
                self.to_frame().to_csv(tmp, index=False)
            else:
                torch.save({"names": self.names, "columns": self.columns, "format": self.format,
                            "sites": self.sites}, tmp)
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)

    @classmethod
    def load(cls, path: str | Path) -> FaultLog:
        """A log written by :meth:`save`.  A file that is not one (empty, truncated, another
        format, a hand edit with a missing column, a non-integer or out-of-range index, bit or
        code, a duplicated weight site) raises QfiError naming the file, the row and the
        problem; OS errors (a missing file) propagate as they are."""
        path = Path(path)
        if path.suffix == ".csv":
            names, cols = _read_csv(path)
            fmt, sites = "", None
        else:
            names, cols, fmt, sites = _read_pt(path)
        # validated above: the lazy form skips the constructor's second duplicate check
        return cls(names, None, fmt, sites, lazy=lambda: cols, rows=cols["index"].numel())


# -- reading and checking files -------------------------------------------------------------------
CSV_COLUMNS = ("name", "index", "bit", "old_code", "new_code", "old_value", "new_value", "call")
#: allowed range of the integer columns (None: no upper bound); no format is wider than 32 bits,
#: codes are the unsigned patterns, ``call`` is -1 for weight faults
INT_RANGES: dict[str, tuple[int, int | None]] = {
    "index": (0, None),
    "bit": (0, 31),
    "old_code": (0, 2**32 - 1),
    "new_code": (0, 2**32 - 1),
    "call": (-1, None),
}
_EXACT = 2**53  # larger integers written as floats ("1e17") are not read exactly
_F32_MAX = float(torch.finfo(torch.float32).max)


def _first(mask: Tensor) -> int | None:
    """Position of the first True in a 1-D bool tensor, or None."""
    if not bool(mask.any()):  # any() is much cheaper than nonzero() on the usual all-False mask
        return None
    return int(mask.nonzero()[0, 0])


def _first_duplicate(cols: dict[str, Tensor]) -> tuple[int, int] | None:
    """``(r1, r2)``: the first weight row ``r2`` (``call < 0``) repeating the (name_id, index,
    bit) of an earlier weight row ``r1``; None when every weight site is distinct.

    Activation rows may repeat a site legitimately (a module hit on several forwards), so only
    weight rows are compared.  One sort of a combined int64 key (three when the key would
    overflow), no per-row Python.
    """
    rows = (cols["call"] < 0).nonzero().flatten()
    if rows.numel() < 2:
        return None
    keys = [cols[k].index_select(0, rows) for k in ("name_id", "index", "bit")]
    lows = [int(k.min()) for k in keys]
    spans = [int(k.max()) - lo + 1 for k, lo in zip(keys, lows, strict=True)]
    if spans[0] * spans[1] * spans[2] < 2**62:  # one int64 key, one sort (the usual case)
        key = ((keys[0] - lows[0]) * spans[1] + keys[1] - lows[1]) * spans[2] + keys[2] - lows[2]
        sorted_key, order = torch.sort(key, stable=True)
        same = sorted_key[1:] == sorted_key[:-1]
    else:  # lexicographic order: stable sorts from the last key to the first
        order = torch.arange(rows.numel())
        for k in reversed(keys):
            order = order.index_select(0, torch.argsort(k.index_select(0, order), stable=True))
        same = torch.ones(rows.numel() - 1, dtype=torch.bool)
        for k in keys:
            ks = k.index_select(0, order)
            same &= ks[1:] == ks[:-1]
    if not bool(same.any()):
        return None
    r2 = int(order[1:][same].min())  # stable sorts: a group's later rows are its repeats
    match = (keys[0] == keys[0][r2]) & (keys[1] == keys[1][r2]) & (keys[2] == keys[2][r2])
    return int(rows[_first(match)]), int(rows[r2])


def _duplicate_message(cols: dict[str, Tensor], names: Sequence[str], r1: int, r2: int, unit: str,
                       offset: int) -> str:
    i, b, n = int(cols["index"][r2]), int(cols["bit"][r2]), int(cols["name_id"][r2])
    name = names[n] if 0 <= n < len(names) else n
    return (
        f"{unit}s {r1 + offset} and {r2 + offset} both flip bit {b} of {name!r}[{i}]: replaying "
        "them would flip it twice (no fault) and skip the old-code check; a log has one row per "
        "flipped bit, remove the duplicate"
    )


def _check_values(path: Path, cols: dict[str, Tensor], names: Sequence[str], unit: str, offset: int,
                  shown: Callable[[str, int], object]) -> None:
    """Ranges of the integer columns and distinct weight sites; ``shown(col, row)`` is the value
    as written in the file."""
    ranges = {**INT_RANGES, "name_id": (0, len(names) - 1)}
    for k, (lo, hi) in ranges.items():
        c = cols[k]
        if c.numel() == 0 or (int(c.min()) >= lo and (hi is None or int(c.max()) <= hi)):
            continue
        r = _first(c < lo if hi is None else (c < lo) | (c > hi))
        if r is not None:
            allowed = f"{lo} or more" if hi is None else f"{lo}..{hi}"
            if k == "name_id":
                allowed += f" (the log lists {len(names)} name(s))"
            what = "name id" if k == "name_id" else k
            raise QfiError(f"fault log {path}, {unit} {r + offset}: {what} {shown(k, r)} is outside "
                           f"{allowed}")
    dup = _first_duplicate(cols)
    if dup is not None:
        raise QfiError(f"fault log {path}: {_duplicate_message(cols, names, *dup, unit, offset)}")


def _read_csv(path: Path) -> tuple[list[str], dict[str, Tensor]]:
    import numpy as np
    import pandas as pd

    expected = ", ".join(CSV_COLUMNS)
    # names stay strings ("0.weight", "nan"); empty and NaN values are NaN
    nan = {k: ["", "nan", "NaN"] for k in ("old_value", "new_value")}
    try:
        df = pd.read_csv(path, dtype={"name": str}, keep_default_na=False, na_values=nan)
    except pd.errors.EmptyDataError:
        size = path.stat().st_size
        raise QfiError(f"fault log {path} is empty ({size} bytes); a fault log CSV starts with the "
                       f"header {expected}") from None
    except (pd.errors.ParserError, UnicodeDecodeError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise QfiError(f"fault log {path} is not a readable CSV: {first}") from None
    missing = [c for c in CSV_COLUMNS if c not in df.columns]
    if missing:
        raise QfiError(f"fault log {path} lacks the column(s) {', '.join(missing)}; a fault log CSV "
                       f"has the columns {expected}")
    line = 2  # row r of the frame is line r + 2 of the file (line 1 is the header)
    cols: dict[str, Tensor] = {}
    for k in CSV_COLUMNS[1:]:
        s = df[k]
        if COLUMNS[k] == torch.float32:
            f = pd.to_numeric(s, errors="coerce").to_numpy(dtype=np.float64, na_value=np.nan)
            r = _first(torch.from_numpy(np.isnan(f) & ~s.isna().to_numpy(dtype=bool)))
            if r is None:
                r = _first(torch.from_numpy(np.isfinite(f) & (np.abs(f) > _F32_MAX)))
                if r is not None:
                    raise QfiError(f"fault log {path}, line {r + line}: {k} {_cell(s.iloc[r])} is beyond the "
                                   f"float32 range (+-{_F32_MAX:.6g})")
                cols[k] = torch.from_numpy(f.astype(np.float32))
                continue
        elif s.dtype == np.int64:  # the common case: exact, checked by range below
            cols[k] = torch.from_numpy(s.to_numpy(dtype=np.int64, copy=True))
            continue
        else:  # floats, strings, uint64 or Python ints too large for int64
            f = pd.to_numeric(s, errors="coerce").to_numpy(dtype=np.float64, na_value=np.nan)
            lo, hi = INT_RANGES[k]
            big = np.abs(f) >= _EXACT
            r = _first(torch.from_numpy(~np.isfinite(f) | (f != np.floor(f))))
            if r is None:
                r = _first(torch.from_numpy(big | (f < lo) | ((f > hi) if hi is not None else big)))
                if r is not None:
                    allowed = f"{lo}..{hi}" if hi is not None else f"{lo}..{_EXACT - 1}"
                    raise QfiError(f"fault log {path}, line {r + line}: {k} {_cell(s.iloc[r])} is outside "
                                   f"{allowed}")
                cols[k] = torch.from_numpy(f.astype(np.int64))
                continue
        raise QfiError(f"fault log {path}, line {r + line}: {k} {_cell(s.iloc[r])} is not "
                       f"{'a number' if COLUMNS[k] == torch.float32 else 'an integer'}")
    ids, uniques = pd.factorize(df["name"].astype(object), sort=False)
    names = [str(n) for n in uniques]
    cols["name_id"] = torch.from_numpy(ids.astype(np.int64))
    _check_values(path, cols, names, "line", line,
                  lambda k, r: _cell(df[k].iloc[r]) if k in df else int(cols[k][r]))
    return names, cols


def _read_pt(path: Path) -> tuple[list[str], dict[str, Tensor], str, int | None]:
    what = "a FaultLog.save file (a dict with 'names', 'columns', 'format', 'sites')"
    try:
        with warnings.catch_warnings():  # a plain pickle warns before it fails: keep the failure
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            d = torch.load(path, map_location="cpu", weights_only=True)
    except OSError:
        raise
    except Exception as e:  # noqa: BLE001 - torch raises many types for a foreign file
        raise QfiError(f"fault log {path} is not {what}: {_load_reason(path, e)}") from None
    if not isinstance(d, dict) or not {"names", "columns"} <= set(d):
        got = f"a dict with keys {sorted(map(str, d))}" if isinstance(d, dict) else type(d).__name__
        raise QfiError(f"fault log {path} holds {got}; expected {what}")
    names, columns, fmt, sites = d["names"], d["columns"], d.get("format", ""), d.get("sites")
    if not isinstance(names, (list, tuple)) or not all(isinstance(n, str) for n in names):
        raise QfiError(f"fault log {path}: 'names' must be a list of strings, got {_short(names)}")
    if len(set(names)) != len(names):
        dup = next(n for i, n in enumerate(names) if n in names[:i])
        raise QfiError(f"fault log {path}: 'names' lists {dup!r} more than once")
    if not isinstance(fmt, str):
        raise QfiError(f"fault log {path}: 'format' must be a format name string, got {_short(fmt)}")
    if sites is not None and (isinstance(sites, bool) or not isinstance(sites, int) or sites < 0):
        raise QfiError(f"fault log {path}: 'sites' must be an integer >= 0 or None, got {_short(sites)}")
    if not isinstance(columns, dict):
        raise QfiError(f"fault log {path}: 'columns' must be a dict of 1-D tensors, got {_short(columns)}")
    missing = [k for k in COLUMNS if k not in columns]
    if missing:
        raise QfiError(f"fault log {path}: 'columns' lacks {', '.join(missing)} (a log has the columns "
                       f"{', '.join(COLUMNS)})")
    cols: dict[str, Tensor] = {}
    for k, dtype in COLUMNS.items():
        v = columns[k]
        if not isinstance(v, Tensor) or v.dim() != 1:
            got = f"shape {tuple(v.shape)}" if isinstance(v, Tensor) else type(v).__name__
            raise QfiError(f"fault log {path}: column {k!r} must be a 1-D tensor, got {got}")
        ok = v.is_floating_point() if dtype.is_floating_point else not (
            v.is_floating_point() or v.is_complex() or v.dtype == torch.bool)
        if not ok:
            kind = "floating-point" if dtype.is_floating_point else "integer"
            raise QfiError(f"fault log {path}: column {k!r} has dtype {v.dtype}; expected an {kind} dtype")
        cols[k] = v.detach().to("cpu", dtype)
    if len({v.numel() for v in cols.values()}) != 1:
        lengths = ", ".join(f"{k} {v.numel()}" for k, v in cols.items())
        raise QfiError(f"fault log {path}: columns have different lengths ({lengths})")
    _check_values(path, cols, names, "row", 0, lambda k, r: int(cols[k][r]))
    return list(names), cols, fmt, sites


def _cell(v: object) -> str:
    """A CSV cell as written: strings quoted, numbers plain (not ``np.float64(2.5)``)."""
    return repr(v) if isinstance(v, str) else str(v)


def _short(v: object) -> str:
    r = repr(v)
    return f"{type(v).__name__} {r if len(r) <= 60 else r[:57] + '...'}"


def _load_reason(path: Path, e: BaseException) -> str:
    """Why ``torch.load`` failed, in words (its own message is often empty or a bare key)."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(4)
    except OSError:
        size, head = -1, b""
    if size == 0:
        return "the file is empty (0 bytes)"
    if head and not head.startswith((b"PK\x03\x04", b"\x80")):
        return f"not a torch.save file (it starts with {head!r})"
    msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
    msg = msg.split(". ")[0][:200]  # torch's messages run on with advice that does not apply
    return f"{type(e).__name__}: {msg}" if msg else f"{type(e).__name__} (truncated or corrupt file?)"
