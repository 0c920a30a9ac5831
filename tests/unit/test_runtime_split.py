"""The site's train/validation split: deterministic, disjoint, complete, and non-destructive."""

from __future__ import annotations

import numpy as np
import pandas as pd

from datasites.runtime import split


def _frame(n: int) -> pd.DataFrame:
    rng = np.random.default_rng(0)
    frame = pd.DataFrame(rng.normal(size=(n, 3)).astype(np.float32), columns=["a", "b", "c"])
    frame["y"] = np.arange(n)  # the label doubles as a row id
    return frame


def test_split_is_deterministic_disjoint_and_complete() -> None:
    frame = _frame(200)
    x, y, xv, yv = split(frame, "y", 0.1, "job-1")
    again = split(frame, "y", 0.1, "job-1")
    np.testing.assert_array_equal(yv, again[3])
    assert len(yv) == 20 and len(y) == 180
    assert set(y).isdisjoint(yv) and set(y) | set(yv) == set(range(200))
    np.testing.assert_array_equal(x, frame.loc[y, ["a", "b", "c"]].to_numpy())
    assert not np.array_equal(np.sort(yv), np.sort(split(frame, "y", 0.1, "job-2")[3]))


def test_scaling_standardises_without_touching_the_table() -> None:
    frame = _frame(50)
    before = frame.copy()
    mean, std = [1.0, 2.0, 3.0], [2.0, 0.0, 4.0]
    x, y, xv, yv = split(frame, "y", 0.0, "job", (mean, std))
    assert len(xv) == 0 and len(x) == 50
    expected = (frame[["a", "b", "c"]].to_numpy() - mean) / np.array([2.0, 1.0, 4.0])
    np.testing.assert_allclose(x, expected, rtol=1e-6)
    pd.testing.assert_frame_equal(frame, before)
