"""The differentially private mock twin of a private table.

Why this shape: everything the mock shows about the private table must be covered by the site's
ledger, so the mock is drawn from noisy counts alone (OpenDP's discrete Gaussian on integer
vectors, exact sampling, no floating-point leak), and every published statistic (row count,
feature mean and std) is computed from the mock, which is post-processing.

Two releases, both Gaussian with the same scale ``sigma``, under add/remove-one-row neighbours:

1. *Where the data lies.* The per-class row counts, and for every column a histogram over a fixed,
   data-independent grid of quarter-decades (..., -1.78, -1, 0, 1, 1.78, 3.16, ... up to 1e10).
   One row moves one class count and one bin per column: L2 sensitivity sqrt(1 + d). A column's
   range is the span of grid bins whose noisy count passes ``RANGE_SIGMAS * sigma``.
2. *The shape within.* Per class, per column, a histogram of ``BINS`` equal bins over that range
   (unit bins for integer columns of a narrow range). One row moves one bin per column in its
   class: sensitivity sqrt(d).

A categorical column (text at upload, a pandas categorical here) has a public domain, its
published category list, so it skips release 1 and its release 2 is a histogram over its
categories. With ``d`` columns of which ``d_num`` are numeric the sensitivity is
sqrt(1 + d_num + d).

Composed, the two are exactly one Gaussian mechanism of noise multiplier sigma / sqrt(1 + d_num +
d) (Gaussian DP composes in quadrature), charged in the ledger as ``Mechanism(nm, 1.0, 1)``.

Rows are then drawn class by class (class share from the noisy counts), each column independently
from its class's noisy histogram, uniformly within a bin. Not kept: correlations between columns.
Disclosed without noise, as schema: column names and dtypes, the label set of a class target, and
the category list of each categorical column.
On small tables with many columns the noise dominates: the mock is for running code, not for
modelling; ``--mock-epsilon`` buys fidelity with budget.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast

import numpy as np

if TYPE_CHECKING:
    import pandas as pd

    from policies.accounting import Mechanism

MAX_CLASSES = 20  # a target with more distinct values is continuous
DEFAULT_MOCK_EPSILON = 1.0
BINS = 16
RANGE_SIGMAS = 4.0
FALLBACK_WIDTH = 8
_POS = 10.0 ** (np.arange(-12, 41) / 4)  # 1e-3 .. 1e10 in quarter decades
GRID = np.concatenate([-_POS[::-1], [0.0], _POS])


@dataclass(frozen=True)
class MockRelease:
    """The mock, what it publishes, and the one mechanism its noise amounts to."""

    mock: pd.DataFrame
    rows: int  # the noisy private row count
    mechanism: Mechanism
    epsilon: float
    delta: float


def make_mock(  # noqa: PLR0913
    frame: pd.DataFrame,
    target: str,
    rows: int = 1000,
    epsilon: float = DEFAULT_MOCK_EPSILON,
    delta: float = 1e-5,
    seed: int | None = None,
) -> MockRelease:
    """Synthetic rows with the columns and dtypes of ``frame``, epsilon-DP at ``delta``.

    ``seed`` fixes the sampling from the noisy histograms only; the noise itself is never seeded.
    """
    import pandas as pd

    from policies.accounting import Mechanism, noise_for_target

    keys = class_keys(frame, target)
    columns = [c for c in frame.columns if not (keys and c == target)]
    numeric = [c for c in columns if not _is_categorical(frame[c])]
    sensitivity_sq = 1 + len(numeric) + len(columns)
    nm = noise_for_target(float(epsilon), float(delta), 1.0, 1)
    sigma = nm * math.sqrt(sensitivity_sq)
    # stage 1, one noisy vector: class counts, then each numeric column's grid histogram
    class_counts = _class_counts(frame, target, keys)
    grid = [_grid_counts(frame[c].to_numpy(np.float64)) for c in numeric]
    noisy = _noisy(np.concatenate([class_counts, *grid]), sigma)
    counts, noisy_grid = noisy[: len(class_counts)], noisy[len(class_counts) :]
    width = len(GRID) - 1
    ranges = {
        c: _dp_range(noisy_grid[i * width : (i + 1) * width], sigma) for i, c in enumerate(numeric)
    }
    edges = {c: _edges(*ranges[c], _is_int(frame[c])) for c in numeric}
    # a categorical column's domain is its public category list: one unit bin per code
    edges.update(
        {c: np.arange(len(frame[c].cat.categories) + 1) - 0.5 for c in columns if c not in ranges}
    )
    rng = np.random.default_rng(seed)
    total = max(1, int(np.clip(counts, 0, None).sum()))
    n_rows = max(1, min(rows, total))
    parts = []
    for i, key in enumerate(keys or [None]):
        group = frame if key is None else frame[frame[target] == key]
        share = _share(counts, i)
        n = max(1, round(n_rows * share))  # every class of the (public) label set appears
        part = _draw_group(group, columns, edges, sigma, n, rng)
        if key is not None:
            part[target] = key
        parts.append(part)
    mock = pd.concat(parts, ignore_index=True)
    mock = _finish(mock, frame, ranges)
    mock = mock.sample(frac=1.0, random_state=int(rng.integers(1 << 31))).reset_index(drop=True)
    return MockRelease(mock, total, Mechanism(nm, 1.0, 1), float(epsilon), float(delta))


def class_keys(frame: pd.DataFrame, target: str) -> list:
    """The label set of a class target (disclosed as schema), or [] for a continuous one."""
    values = frame[target].unique()
    if len(values) > MAX_CLASSES:
        return []
    whole = np.all(np.mod(np.asarray(values, dtype=np.float64), 1.0) == 0)
    # a float target with a few values is a measurement, not classes: as class keys its exact
    # values would be in the mock (red team)
    return sorted(values.tolist()) if whole else []


def _class_counts(frame: pd.DataFrame, target: str, keys: list) -> np.ndarray:
    if not keys:
        return np.array([len(frame)])
    return frame[target].value_counts().reindex(keys, fill_value=0).to_numpy()


def _noisy(counts: np.ndarray, sigma: float) -> np.ndarray:
    """Counts plus OpenDP's discrete Gaussian of scale ``sigma`` (exact, CSPRNG-driven)."""
    import opendp.prelude as dp

    dp.enable_features("contrib")
    space = dp.vector_domain(dp.atom_domain(T=int)), dp.l2_distance(T=int)
    measure = dp.m.make_gaussian(*space, scale=float(sigma))
    return np.asarray(measure([int(c) for c in counts]), dtype=np.int64)


def _grid_counts(values: np.ndarray) -> np.ndarray:
    bins = np.clip(np.searchsorted(GRID, values, side="right") - 1, 0, len(GRID) - 2)
    return np.bincount(bins, minlength=len(GRID) - 1)


def _dp_range(noisy: np.ndarray, sigma: float) -> tuple[float, float]:
    """The span of grid bins that stand clear of the noise (post-processing of one histogram).

    Bins are summed in windows of 1, 2, 4... neighbours (a window's noise grows as its square
    root) until some window passes ``RANGE_SIGMAS`` noise sds; the range spans every window that
    passes at that width. A spread-out column then still finds its bulk, not a noise spike. When
    none passes (few rows, much noise), the fullest window of ``FALLBACK_WIDTH`` bins is used.
    """
    noisy = noisy.astype(np.float64)
    for width in (1, 2, 4, 8):
        sums = np.convolve(noisy, np.ones(width), mode="valid")
        passing = np.flatnonzero(sums > RANGE_SIGMAS * sigma * math.sqrt(width))
        if len(passing):
            lo, hi = _bulk(passing, int(passing[np.argmax(sums[passing])]))
            return float(GRID[lo]), float(GRID[hi + width])
    start = int(np.argmax(sums))
    return float(GRID[start]), float(GRID[start + FALLBACK_WIDTH])


MAX_GAP = 8  # grid bins (two decades) between passing windows that still belong to one bulk


def _bulk(passing: np.ndarray, peak: int) -> tuple[int, int]:
    """The run of passing windows around the fullest one, gaps of up to ``MAX_GAP`` bins allowed.

    With ~100 grid bins per column and 4 sds, a lone noise spike passes somewhere in one mock in
    six (30 columns); spanning first-to-last passing window stretched a column [8, 36] to
    [7, 5e5]. A spike is far from the bulk; a real second mode is rarely two decades away.
    """
    lo = hi = int(np.searchsorted(passing, peak))
    while lo > 0 and passing[lo] - passing[lo - 1] <= MAX_GAP:
        lo -= 1
    while hi < len(passing) - 1 and passing[hi + 1] - passing[hi] <= MAX_GAP:
        hi += 1
    return int(passing[lo]), int(passing[hi])


def _is_int(column: pd.Series) -> bool:
    return not _is_categorical(column) and np.issubdtype(
        cast("np.dtype[Any]", column.dtype), np.integer
    )


def _is_categorical(column: pd.Series) -> bool:
    return getattr(column.dtype, "name", "") == "category"


def _values(column: pd.Series) -> np.ndarray:
    """A column as float64 for histograms: a categorical one as its category codes."""
    if _is_categorical(column):
        return column.cat.codes.to_numpy(np.float64)
    return column.to_numpy(np.float64)


def _edges(lo: float, hi: float, integer: bool) -> np.ndarray:
    """Fine bins over a released range: unit bins for a narrow integer column, else ``BINS``."""
    if integer and math.floor(hi) - math.ceil(lo) < 2 * BINS:
        return np.arange(math.ceil(lo), math.floor(hi) + 2) - 0.5
    return np.linspace(lo, hi, BINS + 1)


def _fine_counts(values: np.ndarray, edges: np.ndarray) -> np.ndarray:
    bins = np.clip(np.searchsorted(edges, values, side="right") - 1, 0, len(edges) - 2)
    return np.bincount(bins, minlength=len(edges) - 1)


def _share(counts: np.ndarray, i: int) -> float:
    kept = np.clip(counts, 0, None).astype(np.float64)
    return float(kept[i] / kept.sum()) if kept.sum() > 0 else 1.0 / len(counts)


def _draw_group(  # noqa: PLR0913
    group: pd.DataFrame,
    columns: list[str],
    edges: dict[str, np.ndarray],
    sigma: float,
    n: int,
    rng: np.random.Generator,
) -> pd.DataFrame:
    """Each column from its noisy histogram in this class, uniformly within the drawn bin.

    Stage 2's noise for the whole class is one vector (iid per count, as separate calls)."""
    fine = [_fine_counts(_values(group[c]), edges[c]) for c in columns]
    noisy_all = np.clip(_noisy(np.concatenate(fine), sigma), 0, None)
    splits = np.cumsum([len(f) for f in fine])[:-1]
    out = {}
    for col, noisy in zip(columns, np.split(noisy_all, splits), strict=True):
        e = edges[col]
        p = noisy / noisy.sum() if noisy.sum() > 0 else np.full(len(noisy), 1.0 / len(noisy))
        bins = rng.choice(len(p), size=n, p=p)
        out[col] = rng.uniform(e[bins], e[bins + 1])
    import pandas as pd

    return pd.DataFrame(out, columns=columns)


def _finish(mock: pd.DataFrame, frame: pd.DataFrame, ranges: dict) -> pd.DataFrame:
    """Clip to the released ranges; integer columns rounded; the private table's dtypes (a
    categorical column's drawn codes back to its categories).

    On numpy arrays, not per pandas column: 5,000 columns took 3 s through ``Series.clip``."""
    import pandas as pd

    out: dict[str, Any] = {}  # numpy arrays and, for categorical columns, pd.Categorical
    for col in frame.columns:
        values = mock[col].to_numpy(np.float64)
        if _is_categorical(frame[col]) and col in mock.columns:
            categories = frame[col].cat.categories
            codes = np.clip(np.round(values), 0, len(categories) - 1).astype(np.int64)
            out[col] = pd.Categorical.from_codes(codes, categories=categories)
            continue
        if col in ranges:
            values = np.clip(values, *ranges[col])
        if _is_int(frame[col]):
            values = np.round(values)
        out[col] = values.astype(cast("np.dtype[Any]", frame[col].dtype))  # numpy: not a category
    return pd.DataFrame(out, columns=list(frame.columns))
