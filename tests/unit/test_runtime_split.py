"""The site's train/validation split (deterministic, disjoint, complete, non-destructive), and
the dry run that takes a round through the site's code path on a table."""

from __future__ import annotations

import pathlib

import numpy as np
import pandas as pd
import pytest

from policies.engine.mock_round import dry_run
from policies.engine.prepare import table_arrays
from policies.engine.round_task import split
from policies.errors import Refused
from policies.scaling import apply as standardise
from policies.wire import decode_weights
from researcher.job import make_job


def _frame(n: int) -> pd.DataFrame:
    rng = np.random.default_rng(0)
    frame = pd.DataFrame(rng.normal(size=(n, 3)).astype(np.float32), columns=["a", "b", "c"])
    frame["y"] = np.arange(n)  # the label doubles as a row id
    return frame


def test_split_is_deterministic_disjoint_and_complete() -> None:
    frame = _frame(200)
    x, y = table_arrays(frame, "y")
    xt, yt, xv, yv = split(x, y, 0.1, seed=1)
    again = split(x, y, 0.1, seed=1)
    np.testing.assert_array_equal(yv, again[3])
    np.testing.assert_array_equal(yt, again[1])
    assert len(yv) == 20 and len(yt) == 180
    assert set(yt).isdisjoint(yv) and set(yt) | set(yv) == set(range(200))
    np.testing.assert_array_equal(xt, frame.loc[yt, ["a", "b", "c"]].to_numpy())
    np.testing.assert_array_equal(xv, frame.loc[yv, ["a", "b", "c"]].to_numpy())
    assert list(yt) == sorted(yt)  # training rows keep table order
    assert not np.array_equal(np.sort(yv), np.sort(split(x, y, 0.1, seed=2)[3]))


def test_an_empty_validation_split_keeps_every_row_for_training() -> None:
    x, y = table_arrays(_frame(50), "y")
    xt, yt, xv, yv = split(x, y, 0.0, seed=0)
    assert len(xv) == len(yv) == 0 and xv.shape[1] == 3
    assert xt is x and yt is y  # no copy of a large table


def test_scaling_standardises_without_touching_the_table() -> None:
    frame = _frame(50)
    before = frame.copy()
    mean, std = [1.0, 2.0, 3.0], [2.0, 0.0, 4.0]
    x, _ = table_arrays(frame, "y")
    assert x.dtype == np.float32
    scaled = standardise(x, (mean, std))
    expected = (frame[["a", "b", "c"]].to_numpy() - mean) / np.array([2.0, 1.0, 4.0])
    np.testing.assert_allclose(scaled, expected, rtol=1e-6)
    pd.testing.assert_frame_equal(frame, before)  # table_arrays gave the task its own copy


def test_no_scaling_leaves_the_features_as_they_are() -> None:
    x, _ = table_arrays(_frame(10), "y")
    unscaled = x.copy()
    np.testing.assert_array_equal(standardise(x, None), unscaled)


def test_a_dry_run_trains_one_round_and_releases_the_spec_parameters() -> None:
    frame = _frame(200)
    frame["y"] = (frame["a"] > 0).astype(int)
    layers = [
        {"type": "Linear", "in_features": 3, "out_features": 4},
        {"type": "ReLU"},
        {"type": "Linear", "in_features": 4, "out_features": 2},
    ]
    spec = make_job(layers, "d", "y", {"noise_multiplier": 1.0, "batch_size": 20}, n_features=3)
    out = dry_run(frame.to_dict("list"), "", spec)
    assert out["status"] == "ok" and out["mode"] == "dry-run" and out["n"] == 160
    weights = decode_weights(out["weights"])
    assert {k: v.shape for k, v in weights.items()} == {
        "0.weight": (4, 3),
        "0.bias": (4,),
        "2.weight": (2, 4),
        "2.bias": (2,),
    }
    assert out["metrics"]["steps"] == 8 and 0.0 <= out["metrics"]["val_accuracy"] <= 1.0
    # only noised or public numbers: no training loss, no exact validation figure
    assert set(out["metrics"]) == {"steps", "val_rows", "val_loss", "val_accuracy"}
    again = dry_run(frame.to_dict("list"), out["weights"], spec)  # incoming global weights
    assert again["status"] == "ok" and again["metrics"]["val_rows"] == 40
    with pytest.raises(Refused, match="has 2 feature"):
        dry_run(frame.drop(columns=["c"]).to_dict("list"), "", spec)


def test_the_site_entry_point_runs_only_in_a_server_that_named_its_site(monkeypatch) -> None:
    """``run_job`` has one mode: the site's. Outside a server that called ``serve_site`` it
    refuses, whatever the environment says (``FEDSITE_DIR`` unset once made it a dry run)."""
    from datasites.training import runtime

    frame = _frame(40)
    frame["y"] = (frame["a"] > 0).astype(int)
    layers = [{"type": "Linear", "in_features": 3, "out_features": 2}]
    job = make_job(layers, "d", "y", {"noise_multiplier": 1.0}, n_features=3).to_dict()
    monkeypatch.setattr(runtime, "_SITE", [])
    for env in (None, "/nonexistent-site"):
        if env is None:
            monkeypatch.delenv("FEDSITE_DIR", raising=False)
        else:
            monkeypatch.setenv("FEDSITE_DIR", env)
        reply = runtime.run_job(data=frame.to_dict("list"), weights="", job=job)
        assert reply == {
            "status": "refused",
            "reason": "run_job runs inside a datasite's server only; nothing ran",
        }
    monkeypatch.setattr(runtime, "_SITE", [])
    runtime.serve_site(pathlib.Path("/some/site"))
    reply = runtime.run_job(data=frame.to_dict("list"), weights="", job=job)
    assert reply["status"] == "refused" and "not called by syft" in reply["reason"]


def test_private_labels_never_decide_a_refusal() -> None:
    """Red team: 'class labels must be 0..k-1' was raised from the private labels before any
    charge, a free yes/no about one row. Now both tables give a task, and labels are clamped."""
    from policies.engine.prepare import prepare_task
    from policies.engine.round_task import class_codes

    layers = [{"type": "Linear", "in_features": 3, "out_features": 2}]
    spec = make_job(layers, "d", "y", {"noise_multiplier": 1.0}, n_features=3)
    for outlier in (1.9, 2.1):
        frame = _frame(100)
        frame["y"] = np.where(np.arange(100) % 2 == 0, 0.0, 1.0)
        frame.loc[42, "y"] = outlier
        task = prepare_task(spec, frame, "y", "", 1.0, 2, 7, None)
        assert task.target[42] == outlier  # the trainer sees it; it decides nothing here
    codes = class_codes(np.array([0.0, 1.0, 1.9, 2.1, -3.0, np.nan]), 2)
    assert codes.tolist() == [0, 1, 1, 1, 0, 0]


def test_released_counts_follow_the_published_row_count_not_the_private_one() -> None:
    """Attack: tell a table of 300 rows from one of 301 by the round's n, val_rows or steps.
    The site computes all three, and the sampling rate, from the published DP count."""
    from policies.engine.prepare import prepare_task
    from policies.engine.round_task import run_task
    from policies.plan import TrainingPlan, training_rows, validation_rows

    layers = [{"type": "Linear", "in_features": 3, "out_features": 2}]
    plan = {"noise_multiplier": 1.0, "batch_size": 32, "site_metrics": False}
    spec = make_job(layers, "d", "y", plan, n_features=3)
    replies = []
    for n in (300, 301):
        frame = _frame(n)
        frame["y"] = np.arange(n) % 2
        task = prepare_task(spec, frame, "y", "", 1.0, 2, 7, None, public_rows=256)
        out = run_task(task, _test_seed=0)
        replies.append((out.n, out.metrics["val_rows"], out.metrics["steps"]))
    p = TrainingPlan.from_dict(plan)
    public_train = training_rows(256, p)
    assert (
        replies[0]
        == replies[1]
        == (
            public_train,
            float(validation_rows(256, p.validation_fraction)),
            float(-(-public_train // 32)),
        )
    )
