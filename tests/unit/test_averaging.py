"""The model a run hands back is the mean of its last half of global models (researcher.averaging):
by hand, through the round loop's checkpoint files, and across a resume."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from researcher.averaging import TAIL_FILE, TailAverage, first_averaged


def _w(value: float) -> dict[str, np.ndarray]:
    return {"w": np.full((2, 2), value, np.float32), "b": np.array([value], np.float32)}


@pytest.mark.parametrize(("rounds", "first"), [(1, 1), (2, 2), (3, 2), (5, 3), (20, 11)])
def test_the_window_is_the_last_half_of_the_rounds(rounds: int, first: int) -> None:
    assert first_averaged(rounds) == first


def test_before_the_window_the_global_model_and_then_the_running_mean() -> None:
    tail = TailAverage(5)  # rounds 3, 4 and 5 are averaged
    assert tail.add(1, _w(1.0))["w"][0, 0] == 1.0
    assert tail.add(2, _w(2.0))["w"][0, 0] == 2.0
    assert tail.add(3, _w(3.0))["w"][0, 0] == 3.0
    assert tail.add(4, _w(5.0))["w"][0, 0] == 4.0
    out = tail.add(5, _w(10.0))
    assert out["w"][0, 0] == pytest.approx(6.0) and out["b"][0] == pytest.approx(6.0)
    assert out["w"].dtype == np.float32 and out["w"].shape == (2, 2)


def test_a_resumed_run_hands_back_what_an_uninterrupted_one_does(tmp_path: Path) -> None:
    values = [1.0, 2.0, 4.0, 8.0, 16.0, 32.0]
    whole = TailAverage(6)
    for r, v in enumerate(values, 1):
        whole_out = whole.add(r, _w(v))
    first = TailAverage(6)
    for r, v in enumerate(values[:4], 1):
        first.add(r, _w(v))
    first.save(tmp_path)
    again = TailAverage(6)
    again.load(tmp_path, done=4)
    for r, v in enumerate(values[4:], 5):
        out = again.add(r, _w(v))
    np.testing.assert_allclose(out["w"], whole_out["w"])
    assert out["w"][0, 0] == pytest.approx((8 + 16 + 32) / 3)


def test_a_saved_sum_that_does_not_match_the_rounds_done_is_not_used(tmp_path: Path) -> None:
    """A run dir from another point (the file written after round 5, resumed as if after 4)
    must not mix its sum in: the average starts afresh from the next round."""
    tail = TailAverage(6)
    for r in range(1, 6):
        tail.add(r, _w(100.0))
    tail.save(tmp_path)
    again = TailAverage(6)
    again.load(tmp_path, done=4)
    assert again.count == 0 and again.add(5, _w(1.0))["w"][0, 0] == 1.0
    (tmp_path / TAIL_FILE).unlink()
    fresh = TailAverage(6)
    fresh.load(tmp_path, done=4)  # a run saved before averaging existed
    assert fresh.count == 0
