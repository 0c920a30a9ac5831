"""One training round as plain data in, plain data out: what the sandboxed trainer runs.

The server-side runtime checks the approval, reserves the budget and decodes the incoming
weights, then hands a :class:`RoundTask` to a trainer process (``datasites.sandbox``). The
task holds arrays and the parsed spec only: no path, no secret, no handle on the server. The
same function runs in-process for a researcher's dry run on the mock.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from policies.plan import TrainingPlan, validation_rows
from policies.wire import Weights

Scaling = tuple[list[float], list[float]] | None


@dataclass(frozen=True)
class RoundTask:
    model: dict[str, Any]  # a parsed and normalised model spec
    plan: dict[str, Any]
    features: np.ndarray  # float32, unscaled, table order
    target: np.ndarray
    split_seed: int  # keyed by the site's secret: the researcher cannot tell rows apart
    scaling: Scaling
    weights: Weights | None  # incoming global weights, already checked
    noise_multiplier: float


@dataclass(frozen=True)
class RoundOutput:
    weights: Weights
    n: int
    metrics: dict[str, float]


def split(
    x: np.ndarray, y: np.ndarray, fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """A deterministic train/validation split: same seed -> same split every round."""
    rng = np.random.default_rng(seed)
    val = rng.permutation(len(x))[: validation_rows(len(x), fraction)]
    if len(val) == 0:  # no copy of a large table for an empty validation split
        return x, y, x[:0], y[:0]
    train = np.ones(len(x), dtype=bool)
    train[val] = False
    # training rows stay in table order: Poisson sampling draws them uniformly either way
    return x[train], y[train], x[val], y[val]


def standardise(x: np.ndarray, scaling: Scaling) -> np.ndarray:
    if scaling is None:
        return x
    mean, std = (np.asarray(v, dtype=np.float32) for v in scaling)
    x -= mean  # x is this task's own copy
    x /= np.where(std > 0, std, np.float32(1.0))
    return x


def run_task(task: RoundTask, _test_seed: int | None = None) -> RoundOutput:
    """Build the spec's model with site code, train one round of DP-SGD, evaluate, release."""
    from datasites.training import evaluate, train_dp
    from policies.modelspec import parse
    from policies.torch_model import build, load

    plan = TrainingPlan.from_dict(task.plan)
    spec = parse(task.model)
    x = standardise(task.features, task.scaling if plan.standardize else None)
    x, y, xv, yv = split(x, task.target, plan.validation_fraction, task.split_seed)
    model = build(spec)
    before: dict[str, float] = {}
    if task.weights is not None:
        load(model, task.weights)
        before = evaluate(model, xv, yv, plan.loss)  # the global model, on this site's val split
    started = time.perf_counter()
    result = train_dp(model, x, y, plan, task.noise_multiplier, _test_seed=_test_seed)
    train_seconds = time.perf_counter() - started
    load(model, result.weights)  # evaluate what is released, not what the model holds
    metrics = {
        "train_loss": result.train_loss,
        "steps": float(result.steps),
        "train_seconds": train_seconds,
    }
    metrics.update({f"val_{k}": v for k, v in evaluate(model, xv, yv, plan.loss).items()})
    metrics.update({f"global_val_{k}": v for k, v in before.items()})
    return RoundOutput(result.weights, int(len(x)), metrics)
