"""The synthetic mock twin of a private table.

How it is made: rows are drawn class by class (the target's label balance is kept). Within a
class, every feature is drawn *independently* from that class's empirical marginal, by inverse-
CDF sampling with linear interpolation between the private order statistics; integer columns are
rounded; every value is clipped to the column's private range. A drawn row that equals a private
row, or lies closer to one (in standardised distance) than 1% of private rows lie to their own
nearest neighbour, is redrawn, and dropped after 20 tries. Exact copies are checked against every
private row (64-bit row hashes); near copies against a sample of 50,000 rows for larger tables.

What it does not protect: each column's marginal distribution per class, its range (the private
min and max appear as bounds), and the label balance are disclosed by design. It is not
differentially private. Correlations between features are not kept, so models do worse on it.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from sklearn.neighbors import NearestNeighbors

MAX_CLASSES = 20
REFERENCE_ROWS = 50_000  # near-copy check against a sample this large (exact copies: all rows)
THRESHOLD_PROBES = 5_000
TRIES = 20


def make_mock(
    frame: pd.DataFrame, target: str, rows: int = 1000, seed: int | None = None
) -> pd.DataFrame:
    """Synthetic rows with the columns, dtypes, ranges and label balance of ``frame``."""
    rng = np.random.default_rng(seed)
    rows = max(1, min(rows, len(frame)))
    groups = _groups(frame, target)
    parts = []
    for key, group in groups:
        n = max(1, round(rows * len(group[target]) / len(frame)))
        part = _sample_group(group, n, rng)
        if key is not None:
            part[target] = key
        parts.append(part)
    mock = pd.concat(parts, ignore_index=True)[list(frame.columns)]
    mock = _finish_columns(mock, frame)
    mock = _drop_near_copies(mock, frame, target, rng, groups)
    return mock.sample(frac=1.0, random_state=int(rng.integers(1 << 31))).reset_index(drop=True)


Sorted = dict[str, np.ndarray]


def _groups(frame: pd.DataFrame, target: str) -> list[tuple[object, Sorted]]:
    """Per class (or one group for a continuous target): each column's values, sorted once."""
    parts = (
        list(frame.groupby(target, sort=True))
        if frame[target].nunique() <= MAX_CLASSES
        else [(None, frame)]
    )
    return [(k, {c: np.sort(g[c].to_numpy(dtype=np.float64)) for c in g.columns}) for k, g in parts]


def _sample_group(group: Sorted, n: int, rng: np.random.Generator) -> pd.DataFrame:
    """Inverse-CDF draws: linear interpolation between order statistics (numpy's 'linear')."""
    out = {}
    for col, values in group.items():
        positions = rng.random(n) * (len(values) - 1)
        out[col] = np.interp(positions, np.arange(len(values)), values)
    return pd.DataFrame(out)


def _finish_columns(mock: pd.DataFrame, frame: pd.DataFrame) -> pd.DataFrame:
    for col in frame.columns:
        lo, hi = frame[col].min(), frame[col].max()
        values = mock[col].clip(lo, hi)
        if pd.api.types.is_integer_dtype(frame[col]):
            values = values.round()
        mock[col] = values.astype(frame[col].dtype)
    return mock


def _standardise(frame: pd.DataFrame, ref: pd.DataFrame) -> np.ndarray:
    scale = ref.std(ddof=0).replace(0, 1.0)
    return ((frame - ref.mean()) / scale).to_numpy(dtype=np.float64)


def _drop_near_copies(
    mock: pd.DataFrame, frame: pd.DataFrame, target: str, rng: np.random.Generator, groups: list
) -> pd.DataFrame:
    ref = frame if len(frame) <= REFERENCE_ROWS else frame.sample(REFERENCE_ROWS, random_state=0)
    ref_z = _standardise(ref, ref)
    nn = NearestNeighbors(n_neighbors=2).fit(ref_z)
    probe = (
        ref_z
        if len(ref_z) <= THRESHOLD_PROBES
        else ref_z[np.random.default_rng(0).choice(len(ref_z), THRESHOLD_PROBES, replace=False)]
    )
    own = nn.kneighbors(probe)[0][:, 1]
    threshold = max(float(np.quantile(own, 0.01)), 1e-9)
    exact = np.sort(_row_hashes(frame))
    by_key = dict(groups)
    for _ in range(TRIES):
        bad = _too_close(mock, ref, nn, threshold, exact)
        if not bad.any():
            return mock
        for i in np.flatnonzero(bad):
            key = mock.at[i, target] if len(by_key) > 1 or None not in by_key else None
            row = _sample_group(by_key[key], 1, rng)
            if key is not None:
                row[target] = key
            mock.loc[i] = _finish_columns(row[list(frame.columns)], frame).iloc[0]
    return mock[~_too_close(mock, ref, nn, threshold, exact)].reset_index(drop=True)


def _row_hashes(frame: pd.DataFrame) -> np.ndarray:
    """One 64-bit hash per row over its values: exact-copy checks in linear time and memory."""
    return pd.util.hash_pandas_object(frame, index=False).to_numpy()


def _too_close(
    mock: pd.DataFrame, ref: pd.DataFrame, nn: NearestNeighbors, threshold: float, exact: np.ndarray
) -> np.ndarray:
    dist = nn.kneighbors(_standardise(mock, ref), n_neighbors=1)[0][:, 0]
    hashes = _row_hashes(mock)
    pos = np.clip(np.searchsorted(exact, hashes), 0, len(exact) - 1)
    return (dist < threshold) | (exact[pos] == hashes)
