"""Declared bounds from a plain syft client: the researcher sees the declared ranges (public
schema) and a mock inside them, never the owner's clamp counts nor a private extreme."""

from __future__ import annotations

import json

import numpy as np
import pytest

from researcher import sites
from tests.adversarial.conftest import EVE, assert_nothing_private, assert_serving
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
    dumped = json.dumps(meta)
    assert not any(f"{v:.4g}" in dumped for v in over)
    assert_nothing_private(arena, [meta, mock.to_numpy().tolist()])
    assert_serving(arena)
