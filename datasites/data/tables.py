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

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.csv as pcsv
import pyarrow.parquet as pq

from datasites.data.mock import MAX_CLASSES
from datasites.errors import TableError

MAX_FEATURES = 2000  # 300 rows x 2,000 columns: the DP mock in about 5 s on 2 cores
DEFAULT_MAX_CATEGORIES = 32  # a text column with more distinct values is refused, not encoded
# a category held by fewer rows is published as OTHER, not by name: a rare value (a diagnosis
# one patient has) would tell who is in the table (red team). Not DP: a k-threshold.
MIN_CATEGORY_ROWS = 5
OTHER = "(other)"
_DATE_KINDS = {"date", "datetime", "datetime64", "time", "timedelta", "timedelta64", "period"}

CSV_SUFFIXES = (".csv",)
PARQUET_SUFFIXES = (".parquet", ".pq")
EXCEL_SUFFIXES = (".xlsx", ".xlsm", ".xls", ".ods")
EXCEL_MAGIC = (b"PK\x03\x04", b"\xd0\xcf\x11\xe0")  # zip (xlsx, ods) and OLE2 (xls)
DEFAULT_MAX_MEMORY_MB = 1536  # what one upload may hold in memory (peak RSS goal)
# Peak RSS of an upload over the table's size at 8 bytes a cell (read, validate, mock, Parquet,
# syft's import), measured with scripts/bench --upload-scale: a table of more than
# budget / PEAK_FACTOR is refused before it is read.
PEAK_FACTOR = 3.0
SNIFF_BYTES = 1 << 16
DICT_CARDINALITY = 1001  # text columns with more values arrive as plain strings (refused later)


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


def load_table(path: Path, max_memory_mb: int = DEFAULT_MAX_MEMORY_MB) -> pd.DataFrame:
    """Read a CSV or Parquet file, turning every failure into one TableError line.

    Checked before any row is read: the file type (an Excel workbook gets its own line, also
    when it is named .csv), the column count (``MAX_FEATURES``: a 5,000-column CSV used to run
    for minutes), and the table's size in memory against ``max_memory_mb`` (a table that cannot
    fit is refused, never killed for memory half-way). CSVs are read by pyarrow: a UTF-8 BOM is
    skipped, a semicolon-separated file (with decimal commas or points) is read as such, text
    columns arrive dictionary-encoded (pandas categoricals, a few bytes a row).
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix in EXCEL_SUFFIXES:
        raise TableError(f"{path}: Excel workbooks are not read; save the sheet as CSV or Parquet")
    if suffix not in CSV_SUFFIXES + PARQUET_SUFFIXES:
        raise TableError(f"{path}: unsupported file type {path.suffix!r}; use .csv or .parquet")
    if not path.is_file():
        raise TableError(f"{path}: file not found")
    try:
        if suffix in PARQUET_SUFFIXES:
            return _read_parquet(path, max_memory_mb)
        return _read_csv(path, max_memory_mb)
    except TableError:
        raise
    except (OSError, ValueError, UnicodeDecodeError, pa.ArrowException) as exc:
        message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise TableError(f"{path}: cannot be read: {message}") from exc


def _read_parquet(path: Path, max_memory_mb: int) -> pd.DataFrame:
    meta = pq.ParquetFile(path).metadata  # the footer only: rows and columns, no data
    _check_size(path, meta.num_rows, meta.num_columns, max_memory_mb)
    frame = pq.read_table(path).to_pandas()
    if frame.empty:
        raise TableError(f"{path}: the table is empty")
    return frame


def _read_csv(path: Path, max_memory_mb: int) -> pd.DataFrame:
    with path.open("rb") as fh:
        head = fh.read(SNIFF_BYTES)
    if head.startswith(EXCEL_MAGIC):
        raise TableError(
            f"{path}: this is an Excel workbook named .csv; save the sheet as CSV or Parquet"
        )
    text = head.decode("utf-8-sig", errors="replace")
    lines = text.splitlines()
    if not text.strip():
        raise TableError(f"{path}: the table is empty")
    delimiter = max(",;\t", key=lines[0].count)
    columns = lines[0].count(delimiter) + 1
    body = lines[1:-1] if len(head) == SNIFF_BYTES else lines[1:]  # the last may be cut
    line_bytes = max(1.0, sum(len(line.encode()) + 1 for line in body) / max(1, len(body)))
    rows = int((path.stat().st_size - len(lines[0])) / line_bytes) if body else 0
    _check_size(path, rows, columns, max_memory_mb, estimated=True)
    decimal = "," if delimiter == ";" and _decimal_commas(body, delimiter) else "."
    table = pcsv.read_csv(
        path,
        parse_options=pcsv.ParseOptions(delimiter=delimiter),
        convert_options=pcsv.ConvertOptions(
            decimal_point=decimal,
            strings_can_be_null=True,  # an empty text cell is missing, as in a numeric column
            auto_dict_encode=True,
            auto_dict_max_cardinality=DICT_CARDINALITY,
        ),
    )
    return table.to_pandas()


def _decimal_commas(lines: list[str], delimiter: str) -> bool:
    """Whether a semicolon-separated file writes numbers as 1,5 (the European convention)."""
    return any(DECIMAL_COMMA.match(cell) for line in lines[:50] for cell in line.split(delimiter))


DECIMAL_COMMA = re.compile(r"^\s*-?\d+,\d+\s*$")


def _check_size(
    path: Path, rows: int, columns: int, max_memory_mb: int, estimated: bool = False
) -> None:
    if columns - 1 > MAX_FEATURES:
        raise TableError(
            f"{path}: {columns - 1} feature columns; at most {MAX_FEATURES} are accepted (the DP "
            "mock adds noise to about 120 counts per column, and past this it takes long and is "
            "mostly noise): select or aggregate columns first"
        )
    need_mb = rows * columns * 8 * PEAK_FACTOR / 2**20
    if need_mb > max_memory_mb:
        about = "about " if estimated else ""
        raise TableError(
            f"{path}: {about}{rows:,} rows x {columns} columns would need about "
            f"{need_mb / 1024:.1f} GB to upload, more than the {max_memory_mb} MB memory budget "
            "(--max-memory-mb): upload it in parts as separate datasets, or raise the budget"
        )


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
    frame = frame.copy(deep=False)  # columns are replaced below, never written into: no copy
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
    frame[target] = _numbers_or_text(frame[target], target)
    frame, classes = _encode_target(frame, target)
    features = [c for c in frame.columns if c != target]
    for c in features:
        if pd.api.types.is_bool_dtype(frame[c]):
            frame[c] = frame[c].astype("int64")
        elif not pd.api.types.is_numeric_dtype(frame[c]):
            column = _numbers_or_text(frame[c], c)
            is_text = not pd.api.types.is_numeric_dtype(column)
            frame[c] = _categorical(column, c, max_categories) if is_text else column
    _check_finite(frame)
    return Table(frame.reset_index(drop=True), target, classes)


def _numbers_or_text(column: pd.Series, name: str) -> pd.Series:
    """A column that is not numeric by dtype: numbers it holds (decimals, numeric strings) as
    float64; refused when it holds dates or mixes numbers with text. Its values would otherwise
    become a category list, published exactly (red team: balances, birth dates and ages with
    one 'unknown' cell were all published)."""
    if pd.api.types.is_numeric_dtype(column) or pd.api.types.is_bool_dtype(column):
        return column
    values = column.cat.categories if isinstance(column.dtype, pd.CategoricalDtype) else column
    kind = pd.api.types.infer_dtype(values, skipna=True)
    if kind in _DATE_KINDS or pd.api.types.is_datetime64_any_dtype(column):
        raise TableError(
            f"column {name!r} holds dates or times: convert them to numbers (days since an "
            "event, a year) before upload; as categories each value would be published"
        )
    distinct = pd.Series(pd.unique(np.asarray(values, dtype=object)))
    numeric = pd.to_numeric(distinct.astype(str), errors="coerce").notna()
    if numeric.all():
        return pd.to_numeric(column.astype(str), errors="raise").astype("float64")
    if numeric.mean() >= 0.5:
        text = [str(v) for v in distinct[~numeric].head(3)]
        raise TableError(
            f"column {name!r} holds numbers and text ({', '.join(map(repr, text))}): clean it "
            "(as categories its numbers would be published exactly)"
        )
    return column


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
        labels = sorted(col.unique().tolist())
        if len(labels) > MAX_CLASSES or labels == list(range(len(labels))):
            return frame, None  # a continuous target, or codes 0..k-1 already
        # labels such as {1, 2} or {-1, 1}: codes 0..k-1 in sorted order, the labels published
        frame[target] = col.map({v: i for i, v in enumerate(labels)}).astype("int64")
        return frame, [str(v) for v in labels]
    if pd.api.types.is_numeric_dtype(col):
        return frame, None
    classes = sorted(col.astype(str).unique())
    if len(classes) > MAX_CLASSES:
        # every label is published as the class list (red team: 300 names went out verbatim)
        raise TableError(
            f"target column {target!r} has {len(classes)} distinct text values, more than "
            f"{MAX_CLASSES} classes: a text target must be class labels"
        )
    frame[target] = col.astype(str).map({c: i for i, c in enumerate(classes)}).astype("int64")
    return frame, classes


def _categorical(column: pd.Series, name: str, max_categories: int) -> pd.Series:
    """A text column as a pandas categorical over its sorted values, or TableError when it has
    more than ``max_categories`` of them (an identifier or free text, not a category: one-hot
    would be as wide as the table, and the category list is published)."""
    if isinstance(column.dtype, pd.CategoricalDtype):  # read dictionary-encoded: no strings
        column = column.cat.remove_unused_categories()
        names = [str(c) for c in column.cat.categories]
        any_rare = column.value_counts().lt(MIN_CATEGORY_ROWS).any()
        if len(set(names)) == len(names) and not any_rare:
            _check_categories(name, len(names), max_categories)
            column = column.cat.rename_categories(names)
            return column.cat.reorder_categories(sorted(names))
    values = column.astype(str)
    _check_categories(name, values.nunique(), max_categories)
    counts = values.value_counts()
    rare = counts.index[counts < MIN_CATEGORY_ROWS]
    if len(rare):
        values = values.where(~values.isin(rare), OTHER)
    return values.astype(pd.CategoricalDtype(sorted(values.unique())))


def _check_categories(name: str, distinct: int, max_categories: int) -> None:
    if distinct > max_categories:
        raise TableError(
            f"column {name!r} has {distinct} distinct text values, more than --max-categories "
            f"{max_categories}: drop it, group its values, or raise --max-categories (each "
            "category is published as schema)"
        )


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


BOUNDS_SUFFIXES = (".toml", ".yaml", ".yml", ".csv")
ANY_COLUMN = "*"  # a bounds entry for every numeric column the file does not name


def load_bounds(path: Path, table: Table) -> dict[str, tuple[float, float]]:
    """Owner-declared public bounds per numeric feature column, from TOML, YAML or CSV.

    TOML and YAML map a column to ``[lower, upper]`` or ``{lower = .., upper = ..}`` (TOML may
    put them under a ``[bounds]`` table); a CSV has the header ``column,lower,upper``. The
    entry ``*`` covers every numeric column not named. Every numeric feature column needs bounds
    (a data dictionary lists them all); a column the table lacks, a categorical column, a
    missing, non-finite or non-numeric value, and lower > upper are each one TableError line.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in BOUNDS_SUFFIXES:
        raise TableError(f"{path}: bounds must be a .toml, .yaml or .csv file")
    if not path.is_file():
        raise TableError(f"{path}: file not found")
    try:
        raw = _read_bounds(path, suffix)
    except (OSError, ValueError, UnicodeDecodeError) as exc:
        message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise TableError(f"{path}: cannot be read as bounds: {message}") from exc
    numeric = [
        c for c in table.features if not isinstance(table.frame[c].dtype, pd.CategoricalDtype)
    ]
    unknown = [c for c in raw if c != ANY_COLUMN and c not in numeric]
    if unknown:
        raise TableError(
            f"{path}: bounds for {', '.join(map(repr, unknown[:5]))}, not a numeric feature column "
            f"of the table (numeric features: {', '.join(numeric[:10])})"
        )
    missing = [c for c in numeric if c not in raw and ANY_COLUMN not in raw]
    if missing:
        raise TableError(
            f"{path}: no bounds for column(s) {', '.join(map(repr, missing[:5]))}"
            f"{' and more' if len(missing) > 5 else ''}; declare every numeric feature "
            f"(or a '{ANY_COLUMN}' entry for the rest)"
        )
    return {c: _bound_pair(path, c, raw.get(c, raw.get(ANY_COLUMN))) for c in numeric}


def _read_bounds(path: Path, suffix: str) -> dict[str, object]:
    if suffix == ".csv":
        import csv

        with path.open(newline="", encoding="utf-8-sig") as fh:
            rows = list(csv.DictReader(fh))
        if not rows or not {"column", "lower", "upper"} <= set(rows[0]):
            raise ValueError("a CSV of bounds needs the header column,lower,upper")
        return {str(r["column"]).strip(): [r["lower"], r["upper"]] for r in rows}
    if suffix == ".toml":
        import tomllib

        data = tomllib.loads(path.read_text(encoding="utf-8"))
    else:
        import yaml  # type: ignore[import-untyped]

        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8"))
        except yaml.YAMLError as exc:
            raise ValueError(str(exc).replace("\n", " ")) from exc
    if isinstance(data, dict) and isinstance(data.get("bounds"), dict) and len(data) == 1:
        data = data["bounds"]
    if not isinstance(data, dict):
        raise ValueError("expected a mapping of column -> [lower, upper]")
    return {str(k): v for k, v in data.items()}


def _bound_pair(path: Path, column: str, value: object) -> tuple[float, float]:
    if isinstance(value, dict):
        value = [value.get("lower"), value.get("upper")]
    if not isinstance(value, list | tuple) or len(value) != 2:
        raise TableError(f"{path}: column {column!r} needs a lower and an upper value")
    try:
        lower, upper = (float(v) for v in value)
    except (TypeError, ValueError):
        raise TableError(
            f"{path}: column {column!r} has bounds {value!r}: both must be numbers"
        ) from None
    if not (np.isfinite(lower) and np.isfinite(upper)):
        raise TableError(f"{path}: column {column!r} has a bound that is not a finite number")
    if lower > upper:
        raise TableError(f"{path}: column {column!r} has lower {lower:g} > upper {upper:g}")
    if max(abs(lower), abs(upper)) > MAX_BOUND:
        raise TableError(f"{path}: column {column!r} has a bound beyond +-{MAX_BOUND:g}")
    return lower, upper


MAX_BOUND = 1e12  # what a job's scaling may carry (policies.plan)


def clamp(
    frame: pd.DataFrame, bounds: dict[str, tuple[float, float]]
) -> tuple[pd.DataFrame, dict[str, int]]:
    """The table with each bounded column clamped to its bounds, and how many values each had
    outside them: for the owner's eyes only (a count of outliers is not DP, never published)."""
    frame = frame.copy(deep=False)
    counts = {}
    for column, (lower, upper) in bounds.items():
        values = frame[column]
        outside = int(((values < lower) | (values > upper)).sum())
        counts[column] = outside
        if outside:  # an integer column stays one when its bounds are whole numbers
            frame[column] = values.clip(lower, upper)
    return frame, counts
