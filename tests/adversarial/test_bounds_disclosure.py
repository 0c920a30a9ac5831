"""Declared bounds from a plain syft client: the researcher sees the declared ranges (public
schema) and a mock inside them, never the owner's clamp counts nor a private extreme."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest

from researcher import sites
from tests.adversarial.conftest import EVE, assert_nothing_private, assert_serving
from tests.conftest import breast_cancer_frame

pytestmark = pytest.mark.integration


def _numbers(value: Any) -> Iterator[float]:
    """Every number in a JSON-like value, however deeply nested."""
    if isinstance(value, bool):
        return
    if isinstance(value, int | float):
        yield float(value)
    elif isinstance(value, dict):
        for item in value.values():
            yield from _numbers(item)
    elif isinstance(value, list | tuple):
        for item in value:
            yield from _numbers(item)


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
    published = np.array(list(_numbers(meta)), dtype=np.float64)
    assert not np.isclose(published[:, None], over[None, :], rtol=1e-4, atol=0.0).any()
    assert_nothing_private(arena, [meta, mock.to_numpy().tolist()])
    assert_serving(arena)
