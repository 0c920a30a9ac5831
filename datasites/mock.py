"""The synthetic mock twin of a private table.

How it is made: rows are drawn class by class (the target's label balance is kept). Within a
class, every feature is drawn *independently* from that class's empirical marginal, by inverse-
CDF sampling with linear interpolation between the private order statistics; integer columns are
rounded; every value is clipped to the column's private range. A drawn row that equals a private
row, or lies closer to one (in standardised distance) than 1% of private rows lie to their own
nearest neighbour, is redrawn, and dropped after 20 tries.

What it does not protect: each column's marginal distribution per class, its range (the private
min and max appear as bounds), and the label balance are disclosed by design. It is not
differentially private. Correlations between features are not kept, so models do worse on it.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from sklearn.neighbors import NearestNeighbors

MAX_CLASSES = 20
REFERENCE_ROWS = 50_000
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
        n = max(1, round(rows * len(group) / len(frame)))
        part = _sample_group(group, n, rng)
        if key is not None:
            part[target] = key
        parts.append(part)
    mock = pd.concat(parts, ignore_index=True)[list(frame.columns)]
    mock = _finish_columns(mock, frame)
    mock = _drop_near_copies(mock, frame, target, rng, groups)
    return mock.sample(frac=1.0, random_state=int(rng.integers(1 << 31))).reset_index(drop=True)


def _groups(frame: pd.DataFrame, target: str) -> list[tuple[object, pd.DataFrame]]:
    if frame[target].nunique() <= MAX_CLASSES:
        return [(k, g) for k, g in frame.groupby(target, sort=True)]
    return [(None, frame)]


def _sample_group(group: pd.DataFrame, n: int, rng: np.random.Generator) -> pd.DataFrame:
    out = {}
    for col in group.columns:
        values = np.sort(group[col].to_numpy(dtype=np.float64))
        out[col] = (
            np.quantile(values, rng.random(n), method="linear")
            if len(values) > 1
            else np.full(n, values[0])
        )
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
    own = nn.kneighbors(ref_z)[0][:, 1]
    threshold = max(float(np.quantile(own, 0.01)), 1e-9)
    exact = set(map(tuple, frame.to_numpy(dtype=np.float64)))
    by_key = dict(groups)
    for _ in range(TRIES):
        bad = _too_close(mock, ref, nn, threshold, exact)
        if not bad.any():
            return mock
        for i in np.flatnonzero(bad):
            key = mock.at[i, target] if len(by_key) > 1 or None not in by_key else None
            group = by_key.get(key, frame)
            row = _sample_group(group, 1, rng)
            if key is not None:
                row[target] = key
            mock.loc[i] = _finish_columns(row[list(frame.columns)], frame).iloc[0]
    return mock[~_too_close(mock, ref, nn, threshold, exact)].reset_index(drop=True)


def _too_close(
    mock: pd.DataFrame, ref: pd.DataFrame, nn: NearestNeighbors, threshold: float, exact: set
) -> np.ndarray:
    dist = nn.kneighbors(_standardise(mock, ref), n_neighbors=1)[0][:, 0]
    copies = np.array([tuple(r) in exact for r in mock.to_numpy(dtype=np.float64)])
    return (dist < threshold) | copies
