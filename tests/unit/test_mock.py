"""The mock twin: same shape of data, none of the rows."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from scipy.stats import ks_2samp

from datasites.mock import make_mock
from tests.conftest import breast_cancer_frame


@pytest.fixture(scope="module")
def private() -> pd.DataFrame:
    return breast_cancer_frame()


@pytest.fixture(scope="module")
def mock(private: pd.DataFrame) -> pd.DataFrame:
    return make_mock(private, "target", rows=1000, seed=7)


def test_no_private_row_appears_in_the_mock(private: pd.DataFrame, mock: pd.DataFrame) -> None:
    private_rows = set(map(tuple, private.to_numpy()))
    assert not any(tuple(r) in private_rows for r in mock.to_numpy())


def test_no_near_copy_of_a_private_row(private: pd.DataFrame, mock: pd.DataFrame) -> None:
    from sklearn.neighbors import NearestNeighbors

    scale = private.std(ddof=0)
    z_priv = ((private - private.mean()) / scale).to_numpy()
    z_mock = ((mock - private.mean()) / scale).to_numpy()
    own = NearestNeighbors(n_neighbors=2).fit(z_priv).kneighbors(z_priv)[0][:, 1]
    dist = NearestNeighbors(n_neighbors=1).fit(z_priv).kneighbors(z_mock)[0][:, 0]
    assert dist.min() >= np.quantile(own, 0.01)


def test_columns_dtypes_and_ranges_match(private: pd.DataFrame, mock: pd.DataFrame) -> None:
    assert list(mock.columns) == list(private.columns)
    assert (mock.dtypes == private.dtypes).all()
    assert (mock.min() >= private.min()).all() and (mock.max() <= private.max()).all()


def test_label_balance_is_kept(private: pd.DataFrame, mock: pd.DataFrame) -> None:
    assert abs(mock["target"].mean() - private["target"].mean()) < 0.02


def test_marginals_are_close(private: pd.DataFrame, mock: pd.DataFrame) -> None:
    for col in private.columns[:-1]:
        assert ks_2samp(private[col], mock[col]).statistic < 0.1, col


def test_mock_is_capped_by_private_size() -> None:
    frame = pd.DataFrame({"x": np.arange(50, dtype=float), "y": np.arange(50) % 2})
    assert len(make_mock(frame, "y", rows=1000, seed=0)) <= 50


def test_integer_columns_stay_integers() -> None:
    rng = np.random.default_rng(0)
    frame = pd.DataFrame(
        {"age": rng.integers(20, 90, 300), "w": rng.normal(size=300), "y": rng.integers(0, 2, 300)}
    )
    mock = make_mock(frame, "y", rows=200, seed=1)
    assert mock["age"].dtype == np.int64
    assert mock["age"].between(frame["age"].min(), frame["age"].max()).all()
