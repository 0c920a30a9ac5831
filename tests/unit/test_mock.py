"""The DP mock twin: same columns and dtypes, drawn from noisy counts whose cost is known."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from scipy.stats import ks_2samp, norm

from datasites.data import mock as M
from policies.accounting import epsilon
from tests.conftest import breast_cancer_frame


@pytest.fixture(scope="module")
def private() -> pd.DataFrame:
    return breast_cancer_frame()


@pytest.fixture(scope="module")
def generous(private: pd.DataFrame) -> M.MockRelease:
    """At a large epsilon the noise is small: the mock must then look like the table."""
    return M.make_mock(private, "target", rows=1000, epsilon=50.0, seed=7)


def test_no_private_row_appears_in_the_mock(private: pd.DataFrame, generous: M.MockRelease) -> None:
    private_rows = set(map(tuple, private.to_numpy()))
    assert not any(tuple(r) in private_rows for r in generous.mock.to_numpy())


def test_columns_and_dtypes_match(private: pd.DataFrame, generous: M.MockRelease) -> None:
    assert list(generous.mock.columns) == list(private.columns)
    assert (generous.mock.dtypes == private.dtypes).all()


def test_with_little_noise_marginals_and_label_balance_are_kept(
    private: pd.DataFrame, generous: M.MockRelease
) -> None:
    mock = generous.mock
    assert abs(mock["target"].mean() - private["target"].mean()) < 0.03
    stats = [ks_2samp(private[c], mock[c]).statistic for c in private.columns[:-1]]
    # a column whose range the search got wrong scores 0.7-1.0; a heavy tail drawn uniformly
    # within 16 equal bins (area error: 7..542, median 25) up to 0.55 (650 mocks: mean of 30
    # columns at most 0.10, worst column 0.55; the noise is never seeded, so no tighter)
    assert np.mean(stats) < 0.12 and max(stats) < 0.7
    assert abs(generous.rows - len(private)) < 10


def test_the_published_row_count_is_noisy() -> None:
    frame = pd.DataFrame({"x": np.linspace(0, 1, 300), "y": np.arange(300) % 2})
    counts = {M.make_mock(frame, "y", rows=100, epsilon=0.3, seed=i).rows for i in range(5)}
    assert counts != {300} and len(counts) > 1


def test_one_row_moves_each_released_histogram_by_one_count(private: pd.DataFrame) -> None:
    """The sensitivity the charge assumes: add/remove one row, L2^2 <= 1 + 2d over all counts."""
    keys = M.class_keys(private, "target")
    columns = [c for c in private.columns if c != "target"]
    smaller = private.drop(index=123)
    moved = np.sum(
        (M._class_counts(private, "target", keys) - M._class_counts(smaller, "target", keys)) ** 2
    )
    for c in columns:
        a, b = private[c].to_numpy(float), smaller[c].to_numpy(float)
        moved += np.sum((M._grid_counts(a) - M._grid_counts(b)) ** 2)
        edges = M._edges(float(a.min()), float(a.max()), False)
        for key in keys:
            in_a = private.loc[private["target"] == key, c].to_numpy(float)
            in_b = smaller.loc[smaller["target"] == key, c].to_numpy(float)
            moved += np.sum((M._fine_counts(in_a, edges) - M._fine_counts(in_b, edges)) ** 2)
    assert moved == 1 + 2 * len(columns)


def test_the_charge_is_the_analytic_gaussian_mechanism_at_the_chosen_epsilon() -> None:
    """Balle & Wang (2018), Theorem 8: delta(eps) of a Gaussian of sensitivity 1 and scale s."""
    frame = pd.DataFrame({"x": np.linspace(0, 1, 200), "y": np.arange(200) % 2})
    release = M.make_mock(frame, "y", rows=50, epsilon=1.0, delta=1e-5, seed=0)
    s, eps = release.mechanism.noise_multiplier, release.epsilon
    delta = norm.cdf(1 / (2 * s) - eps * s) - math.exp(eps) * norm.cdf(-1 / (2 * s) - eps * s)
    assert release.mechanism.sample_rate == 1.0 and release.mechanism.steps == 1
    assert 0.5e-5 < delta <= 1e-5
    assert epsilon([release.mechanism], 1e-5) == pytest.approx(1.0, abs=0.01)


def test_opendp_agrees_on_the_cost_of_the_composed_counts() -> None:
    """zCDP rho of the d+1 and d count vectors at scale sigma = rho of one Gaussian at nm."""
    import opendp.prelude as dp

    dp.enable_features("contrib")
    d, nm = 30, 3.7
    sigma = nm * math.sqrt(1 + 2 * d)
    space = dp.vector_domain(dp.atom_domain(T=int)), dp.l2_distance(T=int)
    gauss = dp.m.make_gaussian(*space, scale=sigma)
    rho = sum(gauss.map(1) for _ in range(1 + 2 * d))  # one unit-sensitivity vector per count set
    assert rho == pytest.approx(1 / (2 * nm**2))


def test_integer_columns_stay_integers() -> None:
    rng = np.random.default_rng(0)
    frame = pd.DataFrame(
        {
            "age": rng.integers(20, 90, 3000),
            "w": rng.normal(size=3000),
            "y": rng.integers(0, 2, 3000),
        }
    )
    mock = M.make_mock(frame, "y", rows=200, epsilon=5.0, seed=1).mock
    assert mock["age"].dtype == np.int64
    assert mock["age"].between(10, 100).all()


def test_a_binary_column_stays_binary() -> None:
    rng = np.random.default_rng(1)
    frame = pd.DataFrame({"smoker": rng.integers(0, 2, 2000), "y": rng.integers(0, 3, 2000)})
    mock = M.make_mock(frame, "y", rows=500, epsilon=5.0, seed=2).mock
    assert set(mock["smoker"].unique()) <= {0, 1}
    assert set(mock["y"].unique()) <= {0, 1, 2}


def test_a_continuous_target_is_drawn_like_a_feature() -> None:
    rng = np.random.default_rng(2)
    frame = pd.DataFrame({"x": rng.normal(size=2000), "price": rng.uniform(100, 900, 2000)})
    release = M.make_mock(frame, "price", rows=300, epsilon=20.0, seed=3)
    assert M.class_keys(frame, "price") == []
    assert ks_2samp(frame["price"], release.mock["price"]).statistic < 0.2


def test_every_class_of_the_label_set_appears_even_when_its_noisy_count_is_not_positive() -> None:
    frame = pd.DataFrame({"x": np.linspace(0, 1, 500), "y": [2] * 3 + [0] * 250 + [1] * 247})
    for seed in range(3):
        mock = M.make_mock(frame, "y", rows=100, epsilon=0.2, seed=seed).mock
        assert set(mock["y"]) == {0, 1, 2}


def test_a_lone_noise_spike_far_from_the_bulk_does_not_stretch_the_range() -> None:
    """One mock in six stretched a column [8, 36] to [7, 5e5]: a single noise count past the
    threshold, far away, was taken as the range's end."""
    counts = np.zeros(len(M.GRID) - 1, np.int64)
    bulk = int(np.searchsorted(M.GRID, 10.0))  # the decade [10, 100)
    counts[bulk] = 600
    counts[bulk + 5] = 6  # a spike of noise, 5 sds, four decades up
    lo, hi, found, _ = M._dp_range(counts, sigma=1.2)
    assert found and (lo, hi) == (10.0, 100.0)
    bimodal = counts.copy()
    bimodal[bulk + 5] = 0
    bimodal[bulk + 2] = 150  # a real second mode two decades up stays in
    assert M._dp_range(bimodal, sigma=1.2)[1] == 1e4


def _fine_bulk() -> tuple[np.ndarray, np.ndarray, int]:
    """A column of values 10..100 on the grid of four bins a decade, noise sd 1: the bins of
    [10, 100) hold 1800 rows, the bins above are empty; returns edges, counts, the first empty."""
    edges = M.grid(4)
    counts = np.zeros(len(edges) - 1)
    bulk = int(np.searchsorted(edges, 10.0))
    counts[bulk : bulk + 4] = [300, 600, 600, 300]
    return edges, counts, bulk + 4


def test_a_thin_bin_atop_the_bulk_does_not_carry_empty_bins_into_the_range() -> None:
    """Breast cancer at epsilon 50: a bin of a few real rows just under the bar (4 noise sds)
    and three bins of noise passed as one window, and 0.002..0.04 was published [0.003, 31.6]."""
    edges, counts, top = _fine_bulk()
    counts[top : top + 4] = [4.0, 2.0, 2.0, 2.0]  # 10 / sqrt(4) = 5 sds: past the 4.29 bar
    low, high, found, _ = M._dp_range(counts, 1.0, edges)
    assert found and low == 10.0
    assert high == pytest.approx(edges[top + 1])  # the thin bin joins by _widen; no empty bin


@pytest.mark.parametrize(("spike", "joins"), [(5.0, False), (8.0, True)])
def test_a_window_across_empty_bins_joins_only_past_the_stricter_bound(
    spike: float, joins: bool
) -> None:
    """Within three decades, one column in a hundred linked a spike of pure noise (a column of
    0.002..0.03 published [0.001, 5623]); past FALSE_APART's bound (5.2 sds here) it is a mode."""
    edges, counts, top = _fine_bulk()
    counts[top + 3] = spike  # three empty bins between
    high = M._dp_range(counts, 1.0, edges).high
    assert high == pytest.approx(edges[top + 4] if joins else edges[top])


def test_zeros_and_their_values_do_not_link_a_spike_beyond_the_values() -> None:
    """The zeros join their values across empty decades at the usual bar (digits' pixels); a
    spike a decade past the values does not ride on that: it needs the stricter bound."""
    counts = np.zeros(len(M.GRID) - 1)
    zero = int(np.searchsorted(M.GRID, 0.0))
    counts[zero] = 900
    counts[zero + 4 : zero + 6] = [300, 300]  # [1, 10) and [10, 100)
    counts[zero + 7] = 120  # [1e3, 1e4): 4 sds, past 3.65, short of 4.69
    low, high, found, _ = M._dp_range(counts, 30.0, M.GRID)
    assert found and (low, high) == (0.0, 100.0)


def test_zeros_and_a_tail_are_one_range_and_a_hidden_range_is_weak() -> None:
    """Digits' pixels: most rows 0, the rest 1..16 over two decades. The range spans both (it
    was [0, 0.001] before, a std of 0.0003). No bin clear of the noise: a weak range."""
    counts = np.zeros(len(M.GRID) - 1, np.int64)
    zero = int(np.searchsorted(M.GRID, 0.0))
    counts[zero] = 900
    counts[zero + 4 : zero + 6] = [80, 80]  # [1, 10) and [10, 100): 160 rows
    lo, hi, found, _ = M._dp_range(counts, sigma=30.0)
    assert found and lo == 0.0 and hi == 100.0
    assert M._dp_range(np.zeros(len(M.GRID) - 1, np.int64), sigma=30.0)[2] is False
