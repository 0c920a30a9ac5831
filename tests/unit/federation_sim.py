"""A federation in this process through the site's own code path, for utility regression tests.

Each site: ``validate_table`` -> ``make_mock`` -> the published metadata (``admin._meta``), as an
upload does; the researcher pools the published statistics (``pooled_scaling``); each round is
``site_scaling`` -> ``prepare_task`` -> ``run_task`` -> ``release``, as ``site_job`` runs it, with
no syft, ledger or HTTP. ``seeded_noise`` replaces OpenDP's CSPRNG noise by a seeded discrete
Gaussian (rounded normal) so that a regression is reproducible.
"""

from __future__ import annotations

import dataclasses
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from datasites.data.mock import make_mock
from datasites.data.tables import validate_table
from datasites.serving.admin import _meta
from policies.engine.prepare import prepare_task, release, site_scaling
from policies.engine.round_task import run_task
from policies.privacy import job_privacy
from researcher.job import make_job
from researcher.rounds import pooled_scaling, run_federation
from researcher.site import InProcessSite


def seeded_noise(seed: int) -> Callable[[np.ndarray, float], np.ndarray]:
    """A stand-in for ``datasites.data.mock._noisy``: counts plus a seeded rounded Gaussian."""
    rng = np.random.default_rng(seed)

    def noisy(counts: np.ndarray, sigma: float) -> np.ndarray:
        counts = np.asarray(counts, dtype=np.int64)
        return counts + np.round(rng.normal(0.0, sigma, len(counts))).astype(np.int64)

    return noisy


def publish(frame: pd.DataFrame, target: str, **kw: Any) -> tuple[pd.DataFrame, dict[str, Any]]:
    """The validated private table and the metadata an upload publishes for it."""
    table = validate_table(frame, target)
    return table.frame, _meta(table, "d", make_mock(table.frame, target, seed=0, **kw))


def site_inputs(frame: pd.DataFrame, target: str, spec: Any, meta: dict[str, Any]) -> np.ndarray:
    """The inputs a site's round trains on: its rows under the job's scaling."""
    from policies.scaling import apply as standardise

    x = frame.drop(columns=[target]).to_numpy(np.float32, copy=True)
    scaling = site_scaling(spec, meta)
    return standardise(x, tuple(list(v) for v in scaling))


def federate(  # noqa: PLR0913
    shares: list[pd.DataFrame],
    target: str,
    layers: list[dict[str, Any]],
    plan: dict[str, Any],
    test: tuple[np.ndarray, np.ndarray],
    seed: int = 0,
) -> tuple[float, Any, list[tuple[pd.DataFrame, dict[str, Any]]]]:
    """Final test accuracy of a federation of ``shares``, the job, and each site's (rows, meta)."""
    torch.manual_seed(seed)
    sites = [publish(s, target) for s in shares]
    features, outputs = layers[0]["in_features"], layers[-1]["out_features"]
    spec = make_job(layers, "d", target, plan, n_features=features, n_outputs=outputs)
    spec = dataclasses.replace(spec, scaling=pooled_scaling([m for _, m in sites]))
    links = [
        InProcessSite(f"s{i}", meta, _handler(frame, meta, target, i))
        for i, (frame, meta) in enumerate(sites)
    ]
    with tempfile.TemporaryDirectory() as run_dir:
        result = run_federation(None, spec, Path(run_dir), sites=links, test=test)
    return result.rounds[-1]["test_accuracy"], spec, sites


def _handler(frame: pd.DataFrame, meta: dict[str, Any], target: str, i: int) -> Callable:
    calls = [0]

    def call(spec: Any, weights: str) -> dict[str, Any]:
        calls[0] += 1
        privacy = job_privacy(spec, meta["rows"])
        task = prepare_task(
            spec,
            frame,
            target,
            weights,
            privacy.noise_multiplier,
            meta.get("n_classes"),
            1000 + i,
            site_scaling(spec, meta),
            meta["rows"],
            class_counts=meta.get("class_counts"),
        )
        reply, _ = release(spec, run_task(task, _test_seed=1000 * i + calls[0]), 1, task.weights)
        reply["privacy"] = {"epsilon_spent": privacy.epsilon_job}
        return reply

    return call
