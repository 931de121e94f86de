"""FaultLog: one row per flipped bit, stored as columns (tensors), never per-row objects."""

from __future__ import annotations

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
    """

    def __init__(self, names: Sequence[str], columns: dict[str, Tensor] | None = None,
                 fmt: str = "", sites: int | None = None, *,
                 lazy: Callable[[], dict[str, Tensor]] | None = None, rows: int | None = None) -> None:
        self.names = list(names)
        self._chunks: list[dict[str, Tensor]] = []
        # ``lazy`` builds the columns on first access (a trial that never reads its log does not
        # pay for it); ``rows`` is then the row count when already known
        self._lazy, self._rows = lazy, rows
        self._cols = self._check(columns or {}) if lazy is None else {}
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

    def extend(self, columns: dict[str, Tensor], sites: int) -> None:
        """Append rows (used while activation faults accumulate over forwards)."""
        self._chunks.append(self._check(columns))
        self.sites += int(sites)

    @property
    def columns(self) -> dict[str, Tensor]:
        """Column name -> 1-D CPU tensor (``name_id`` indexes ``names``)."""
        if self._lazy is not None:
            self._cols, self._lazy = self._check(self._lazy()), None
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
        """CSV when ``path`` ends with ``.csv`` (rows only), else ``torch.save`` (everything)."""
        path = Path(path)
        if path.suffix == ".csv":
            self.to_frame().to_csv(path, index=False)
        else:
            torch.save({"names": self.names, "columns": self.columns, "format": self.format,
                        "sites": self.sites}, path)

    @classmethod
    def load(cls, path: str | Path) -> FaultLog:
        path = Path(path)
        if path.suffix == ".csv":
            import pandas as pd

            # names stay strings ("0.weight", "nan"); an empty log has no rows to infer dtypes from
            nan = {k: ["", "nan", "NaN"] for k in ("old_value", "new_value")}
            df = pd.read_csv(path, dtype={"name": str}, keep_default_na=False, na_values=nan)
            names = list(dict.fromkeys(df["name"]))
            pos = {n: i for i, n in enumerate(names)}
            np_dtype = {torch.int64: "int64", torch.float32: "float32"}
            cols = {
                k: torch.from_numpy(df[k].to_numpy(dtype=np_dtype[d], copy=True))
                for k, d in COLUMNS.items() if k != "name_id"
            }
            cols["name_id"] = torch.tensor([pos[n] for n in df["name"]], dtype=torch.int64)
            return cls(names, cols)
        d = torch.load(path, weights_only=True)
        return cls(d["names"], d["columns"], d.get("format", ""), d.get("sites"))
