"""Declared bounds from a plain syft client: the researcher sees the declared ranges (public
schema) and a mock inside them, never the owner's clamp counts nor a private extreme."""

from __future__ import annotations

import numpy as np
import pytest

from researcher import sites
from tests.adversarial.conftest import EVE, arrays_in, assert_nothing_private, assert_serving
from tests.conftest import breast_cancer_frame

pytestmark = pytest.mark.integration


def test_bounds_clamp_counts_and_private_extremes_stay_with_the_owner(
    arena, breast_cancer_csv, tmp_path
) -> None:
    bounds = tmp_path / "bounds.csv"
    bounds.write_text("column,lower,upper\n*,0,50\n")  # clamps the area and perimeter columns
    shown = arena.site.cli(
        "upload",
        "--name",
        "bounded",
        "--file",
        str(breast_cancer_csv),
        "--target",
        "target",
        "--bounds",
        str(bounds),
    )
    assert "clamped" in shown.stdout  # the owner is told, on the owner's terminal
    client = arena.client(EVE)
    asset = sites.find_asset(client, "bounded")
    text = asset.description.text if asset.description else ""
    meta = sites.asset_meta(asset)
    assert "owner_only" not in text and "clamped" not in text
    assert {tuple(v) for v in meta["bounds"].values()} == {(0.0, 50.0)}
    with sites.quiet():
        mock = asset.mock
    features = mock.drop(columns=["target"]).to_numpy(np.float64)
    assert features.min() >= 0.0 and features.max() <= 50.0
    private = breast_cancer_frame().drop(columns=["target"]).to_numpy(np.float64)
    over = private.max(0)[private.max(0) > 50]  # private extremes past the declared bound
    # compared as numbers: a 4-digit extreme (2501) matched inside an unrelated published float
    # (0.1250134...) as text: 7 uploads in 60 in process
    published = np.concatenate(arrays_in(meta))
    assert not np.isclose(published[:, None], over[None, :], rtol=1e-4, atol=0.0).any()
    assert_nothing_private(arena, [meta, mock.to_numpy().tolist()])
    assert_serving(arena)


def test_found_ranges_read_from_a_plain_client_are_grid_edges_and_cost_nothing(arena) -> None:
    """Issue 25's range search grows a found range by neighbouring bins, takes a one-signed
    range to zero and starts its prior where its values begin: all of it post-processing of
    the noisy grid counts. From a plain syft client, the arena's table (no declared bounds,
    so every column's range is found): each published low and high is an edge of the public
    grid or zero, never a private minimum or maximum; no published number is a private
    extreme; and reading it spends nothing."""
    from datasites.data import mock as M

    client = arena.client(EVE)
    before = arena.spent(EVE)
    meta = sites.asset_meta(arena.asset(client))
    edges = np.concatenate([M.grid(r) for _, r in M.RESOLUTIONS] + [np.zeros(1)])
    for bound in (*meta["feature_low"], *meta["feature_high"]):
        assert np.isclose(edges, bound, rtol=1e-12, atol=0.0).any(), bound
    extremes = np.concatenate([arena.rows.min(0), arena.rows.max(0)])
    extremes = extremes[~np.isclose(extremes[:, None], edges[None, :], atol=0.0).any(1)]
    published = np.concatenate(arrays_in(meta))
    assert not np.isclose(published[:, None], extremes[None, :], rtol=1e-6, atol=0.0).any()
    assert arena.spent(EVE) == before
    assert_serving(arena)


def test_the_pooled_prior_read_from_a_plain_client_holds_no_private_statistic(arena) -> None:
    """Session 12's pooled prior (``datasites.data.mock._pooled_stats``): columns on the same
    bins pool their shape counts, so a published mean or std now depends on other columns too.
    Were it pooled from rows rather than the noisy counts, a group's exact statistics would be
    out. From a plain syft client, through the researcher package's reader: the arena's table
    has groups of columns on one published range (the path runs); no published number is a
    private column's mean or std, nor a group's pooled mean or std over its rows (clamped to
    the range, as the site would), nor that of any column of it; and reading spends nothing."""
    from datasites.data import mock as M

    client = arena.client(EVE)
    before = arena.spent(EVE)
    meta = sites.asset_meta(arena.asset(client))
    ranges = list(zip(meta["feature_low"], meta["feature_high"], strict=True))
    groups = [
        [j for j, r in enumerate(ranges) if r == key]
        for key in set(ranges)
        if ranges.count(key) >= M.GROUP_MIN
    ]
    assert groups  # the pooled prior ran on this table
    private = [arena.rows.mean(0), arena.rows.std(0)]
    for members in groups:
        low, high = ranges[members[0]]
        pooled = np.clip(arena.rows[:, members], low, high)
        private += [pooled.mean(0), pooled.std(0), np.array([pooled.mean(), pooled.std()])]
    secret = np.concatenate(private)
    secret = secret[secret != 0.0]
    published = np.concatenate([meta["feature_mean"], meta["feature_std"]])
    assert not np.isclose(published[:, None], secret[None, :], rtol=1e-6, atol=0.0).any()
    assert arena.spent(EVE) == before
    assert_serving(arena)
