"""Reading and validating the tables a data owner uploads.

Rules (documented in the README): features are numeric, boolean (booleans become 0/1, the
one-hot code of a two-valued column with its redundant twin dropped) or text with at most
``max_categories`` distinct values, which become pandas categoricals: their category lists are
published as schema, and each site one-hot encodes to the federation's layout at run time
(``policies.layout``). Missing and infinite values are refused, naming the columns; a target with
one value only is refused; a text target, and an integer target of at most 20 values that are not
already 0..k-1 (labels {1, 2}, {-1, 1}), are encoded as class codes in sorted order of their
values.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from datasites.data.mock import MAX_CLASSES
from datasites.errors import TableError

MAX_FEATURES = 2000  # 300 rows x 2,000 columns: the DP mock in about 5 s on 2 cores
DEFAULT_MAX_CATEGORIES = 32  # a text column with more distinct values is refused, not encoded

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
        """Column names and dtypes, in table order (a categorical column's dtype: "category")."""
        return [[str(c), str(t)] for c, t in self.frame.dtypes.items()]

    def categories(self) -> dict[str, list[str]]:
        """Each categorical feature's category list: published with the schema (disclosed)."""
        return {
            c: [str(v) for v in self.frame[c].cat.categories]
            for c in self.features
            if isinstance(self.frame[c].dtype, pd.CategoricalDtype)
        }


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


def validate_table(
    frame: pd.DataFrame, target: str, max_categories: int = DEFAULT_MAX_CATEGORIES
) -> Table:
    """Check a table against the upload rules and return it with a numeric target, its text
    features as pandas categoricals (the category lists become public schema)."""
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
    _check_missing(frame)
    frame, classes = _encode_target(frame, target)
    features = [c for c in frame.columns if c != target]
    for c in features:
        if pd.api.types.is_bool_dtype(frame[c]):
            frame[c] = frame[c].astype("int64")
        elif not pd.api.types.is_numeric_dtype(frame[c]):
            frame[c] = _categorical(frame[c], c, max_categories)
    _check_finite(frame)
    return Table(frame.reset_index(drop=True), target, classes)


def _encode_target(frame: pd.DataFrame, target: str) -> tuple[pd.DataFrame, list[str] | None]:
    col = frame[target]
    values = col.unique()
    if len(values) < 2:
        raise TableError(
            f"target column {target!r} has one value only ({values[0]!r}): nothing to learn; "
            "a site needs rows of at least two classes"
        )
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


def _categorical(column: pd.Series, name: str, max_categories: int) -> pd.Series:
    """A text column as a pandas categorical over its sorted values, or TableError when it has
    more than ``max_categories`` of them (an identifier or free text, not a category: one-hot
    would be as wide as the table, and the category list is published)."""
    values = column.astype(str)
    distinct = values.nunique()
    if distinct > max_categories:
        raise TableError(
            f"column {name!r} has {distinct} distinct text values, more than --max-categories "
            f"{max_categories}: drop it, group its values, or raise --max-categories (each "
            "category is published as schema)"
        )
    return values.astype(pd.CategoricalDtype(sorted(values.unique())))


def _check_missing(frame: pd.DataFrame) -> None:
    counts = frame.isna().sum()
    missing = {c: int(n) for c, n in counts.items() if n}
    if missing:
        listed = ", ".join(f"{c} ({n})" for c, n in missing.items())
        raise TableError(f"missing values in column(s) {listed}: drop or impute them before upload")


def _check_finite(frame: pd.DataFrame) -> None:
    """Infinities in float columns, one column at a time (no float64 copy of the table)."""
    cols = [
        c
        for c in frame.columns
        if pd.api.types.is_float_dtype(frame[c]) and not np.isfinite(frame[c].to_numpy()).all()
    ]
    if cols:
        raise TableError(f"infinite values in column(s) {', '.join(cols)}")
