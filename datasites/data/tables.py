"""Reading and validating the tables a data owner uploads.

Rules (documented in the README): features must be numeric or boolean (booleans become 0/1);
text columns are refused (encode them first); missing and infinite values are refused, naming the
columns; a text target, and an integer target of at most 20 values that are not already 0..k-1
(labels {1, 2}, {-1, 1}), are encoded as class codes in sorted order of their values.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from datasites.data.mock import MAX_CLASSES
from datasites.errors import TableError

MAX_FEATURES = 2000  # 300 rows x 2,000 columns: the DP mock in about 5 s on 2 cores

READERS = {".csv": pd.read_csv, ".parquet": pd.read_parquet, ".pq": pd.read_parquet}


@dataclass(frozen=True)
class Table:
    frame: pd.DataFrame
    target: str
    classes: list[str] | None

    @property
    def features(self) -> list[str]:
        return [c for c in self.frame.columns if c != self.target]

    def schema(self) -> list[list[str]]:
        """Column names and dtypes, in table order."""
        return [[str(c), str(t)] for c, t in self.frame.dtypes.items()]


def load_table(path: Path) -> pd.DataFrame:
    """Read a CSV or Parquet file, turning every failure into one TableError line."""
    path = Path(path)
    reader = READERS.get(path.suffix.lower())
    if reader is None:
        raise TableError(f"{path}: unsupported file type {path.suffix!r}; use .csv or .parquet")
    if not path.is_file():
        raise TableError(f"{path}: file not found")
    try:
        frame = reader(path)
    except pd.errors.EmptyDataError as exc:
        raise TableError(f"{path}: the table is empty") from exc
    except (OSError, ValueError, pd.errors.ParserError, UnicodeDecodeError) as exc:
        raise TableError(f"{path}: cannot be read: {str(exc).splitlines()[0]}") from exc
    return frame


def validate_table(frame: pd.DataFrame, target: str) -> Table:
    """Check a table against the upload rules and return it with a numeric target."""
    if frame.empty or len(frame.columns) == 0:
        raise TableError("the table is empty")
    columns = [str(c) for c in frame.columns]
    if len(set(columns)) != len(columns):
        raise TableError("the table has duplicate column names")
    frame = frame.copy()
    frame.columns = columns
    if target not in frame.columns:
        raise TableError(f"target column {target!r} not found; columns are {', '.join(columns)}")
    if len(frame.columns) < 2:
        raise TableError("the table needs at least one feature column besides the target")
    if len(frame.columns) - 1 > MAX_FEATURES:
        raise TableError(
            f"the table has {len(frame.columns) - 1} feature columns; at most {MAX_FEATURES} are "
            "accepted (the DP mock adds noise to about 120 counts per column, and past this "
            "it takes long and is mostly noise): select or aggregate columns first"
        )
    frame, classes = _encode_target(frame, target)
    features = [c for c in frame.columns if c != target]
    _check_numeric(frame, features)
    frame[features] = frame[features].astype(
        {c: "int64" for c in features if frame[c].dtype == bool}
    )
    _check_finite(frame)
    return Table(frame.reset_index(drop=True), target, classes)


def _encode_target(frame: pd.DataFrame, target: str) -> tuple[pd.DataFrame, list[str] | None]:
    col = frame[target]
    if col.isna().any():
        raise TableError(f"target column {target!r} has {int(col.isna().sum())} missing values")
    if pd.api.types.is_bool_dtype(col):
        frame[target] = col.astype("int64")
        return frame, None
    if pd.api.types.is_integer_dtype(col):
        values = sorted(col.unique().tolist())
        if len(values) > MAX_CLASSES or values == list(range(len(values))):
            return frame, None  # a continuous target, or codes 0..k-1 already
        # labels such as {1, 2} or {-1, 1}: codes 0..k-1 in sorted order, the labels published
        frame[target] = col.map({v: i for i, v in enumerate(values)}).astype("int64")
        return frame, [str(v) for v in values]
    if pd.api.types.is_numeric_dtype(col):
        return frame, None
    classes = sorted(col.astype(str).unique())
    frame[target] = col.astype(str).map({c: i for i, c in enumerate(classes)}).astype("int64")
    return frame, classes


def _check_numeric(frame: pd.DataFrame, features: list[str]) -> None:
    bad = [
        c
        for c in features
        if not (pd.api.types.is_numeric_dtype(frame[c]) or pd.api.types.is_bool_dtype(frame[c]))
    ]
    if bad:
        raise TableError(
            f"non-numeric feature column(s) {', '.join(bad)}: encode them as numbers "
            "(one-hot or integer codes) before upload"
        )


def _check_finite(frame: pd.DataFrame) -> None:
    counts = frame.isna().sum()
    missing = {c: int(n) for c, n in counts.items() if n}
    if missing:
        listed = ", ".join(f"{c} ({n})" for c, n in missing.items())
        raise TableError(f"missing values in column(s) {listed}: drop or impute them before upload")
    values = frame.to_numpy(dtype=np.float64)
    if not np.isfinite(values).all():
        cols = [
            c
            for c, ok in zip(frame.columns, np.isfinite(values).all(axis=0), strict=True)
            if not ok
        ]
        raise TableError(f"infinite values in column(s) {', '.join(cols)}")
