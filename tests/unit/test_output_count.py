"""Both wings agree on the model's output width, from the same published metadata.

The bug this guards: for an integer target with labels {1, 2} the researcher built 2 outputs
(``n_classes or 2``) and the site 3 (``y.max() + 1``), so every site's update was rejected.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from datasites.data.mock import make_mock
from datasites.data.tables import validate_table
from datasites.serving.admin import _meta
from datasites.training.site_job import public_rows
from policies.engine.prepare import prepare_task
from policies.engine.round_task import run_task
from researcher import model as researcher_model
from researcher.job import make_job


@pytest.mark.parametrize(
    ("labels", "classes"),
    [
        ([1, 2], ["1", "2"]),
        ([-1, 1], ["-1", "1"]),
        ([0, 1, 2], None),
        (["no", "yes"], ["no", "yes"]),
    ],
)
def test_researcher_and_site_build_the_same_output_width(labels: list, classes) -> None:
    rng = np.random.default_rng(0)
    n = 300
    frame = pd.DataFrame({"a": rng.normal(size=n), "b": rng.normal(size=n)})
    frame["y"] = [labels[i % len(labels)] for i in range(n)]
    table = validate_table(frame, "y")
    assert table.classes == classes
    assert sorted(table.frame["y"].unique()) == list(range(len(labels)))
    meta = _meta(table, "d", make_mock(table.frame, "y", rows=100, epsilon=5.0, seed=0))
    assert meta["n_classes"] == len(labels) and meta["class_codes"] is True

    # the researcher's side: width from the metadata, the model built from the spec
    width = researcher_model.n_outputs(meta, "cross_entropy")
    layers = [{"type": "Linear", "in_features": 2, "out_features": width}]
    spec = make_job(layers, "d", "y", {"noise_multiplier": 1.0}, n_features=2)
    initial = researcher_model.weights_of(researcher_model.build(spec))

    # the site's side: the same metadata decides, and the update has the researcher's shapes
    task = prepare_task(
        spec, table.frame, "y", "", 1.0, meta["n_classes"], 7, None, public_rows(meta, frame)
    )
    update = run_task(task, _test_seed=0).weights
    assert {k: v.shape for k, v in update.items()} == {k: v.shape for k, v in initial.items()}
    assert update["0.weight"].shape == (len(labels), 2)
