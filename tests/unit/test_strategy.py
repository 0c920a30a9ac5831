"""FedAvg against np.average, and its typed errors."""

from __future__ import annotations

import numpy as np
import pytest

from researcher.errors import AggregationError
from researcher.rounds import pooled_scaling
from researcher.strategy import FedAvg, Update


def updates(rng: np.random.Generator, ns: list[int]) -> list[Update]:
    return [
        Update(
            f"s{i}",
            {
                "w": rng.normal(size=(3, 2)).astype(np.float32),
                "b": rng.normal(size=2).astype(np.float32),
            },
            n,
        )
        for i, n in enumerate(ns)
    ]


def test_fedavg_equals_weighted_np_average() -> None:
    rng = np.random.default_rng(0)
    ups = updates(rng, [10, 30, 60])
    out = FedAvg().aggregate(1, ups, ups[0].weights)
    for k in ("w", "b"):
        ref = np.average(np.stack([u.weights[k] for u in ups]), axis=0, weights=[10, 30, 60])
        np.testing.assert_allclose(out[k], ref, rtol=1e-6)


def test_fedavg_rejects_empty_and_mismatched_updates() -> None:
    rng = np.random.default_rng(1)
    ups = updates(rng, [5, 5])
    with pytest.raises(AggregationError, match="no updates"):
        FedAvg().aggregate(2, [], ups[0].weights)
    bad = Update("evil", {"w": np.zeros((4, 2), np.float32), "b": np.zeros(2, np.float32)}, 5)
    with pytest.raises(AggregationError, match="evil sent w of shape"):
        FedAvg().aggregate(2, [ups[0], bad], ups[0].weights)


def test_pooled_scaling_matches_the_pooled_data() -> None:
    rng = np.random.default_rng(2)
    parts = [rng.normal(loc=i, scale=1 + i, size=(50 * (i + 1), 3)) for i in range(3)]
    metas = [
        {"rows": len(p), "feature_mean": p.mean(0).tolist(), "feature_std": p.std(0).tolist()}
        for p in parts
    ]
    pooled = np.concatenate(parts)
    got = pooled_scaling(metas)
    np.testing.assert_allclose(got["mean"], pooled.mean(0), rtol=1e-9)
    np.testing.assert_allclose(got["std"], pooled.std(0), rtol=1e-9)


def test_pooled_scaling_leaves_out_a_site_whose_dp_range_missed() -> None:
    """A small site's DP mock can miss a column's range (std 1e9 where others say ~2)."""
    rng = np.random.default_rng(3)
    parts = [rng.normal(loc=5, scale=2, size=(100, 2)) for _ in range(3)]
    metas = [
        {"rows": len(p), "feature_mean": p.mean(0).tolist(), "feature_std": p.std(0).tolist()}
        for p in parts
    ]
    metas[1]["feature_mean"][0], metas[1]["feature_std"][0] = 3e8, 1e9
    got = pooled_scaling(metas)
    kept = np.concatenate([parts[0], parts[2]])[:, 0]
    np.testing.assert_allclose(got["mean"][0], kept.mean(), rtol=1e-9)
    np.testing.assert_allclose(got["std"][0], kept.std(), rtol=1e-9)
    np.testing.assert_allclose(got["std"][1], np.concatenate(parts)[:, 1].std(), rtol=1e-9)
