"""One training round as plain data in, plain data out: what the sandboxed trainer runs.

The server-side runtime checks the approval, reserves the budget and decodes the incoming
weights, then hands a :class:`RoundTask` to a trainer process (``datasites.training.sandbox``). The
task holds arrays and the parsed spec only: no path, no secret, no handle on the server. The
same function runs in-process for a researcher's dry run on the mock.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from policies import scaling
from policies.plan import TrainingPlan, validation_rows
from policies.wire import Weights

# (mean, std) or (mean, std, low, high), one value per input: ``policies.scaling``
Scaling = tuple[list[float], ...] | None


@dataclass(frozen=True)
class RoundTask:
    model: dict[str, Any]  # a parsed and normalised model spec
    plan: dict[str, Any]
    features: npt.NDArray[Any]  # float32, unscaled, table order
    target: npt.NDArray[Any]
    split_seed: int  # keyed by the site's secret: the researcher cannot tell rows apart
    scaling: Scaling
    weights: Weights | None  # incoming global weights, already checked
    noise_multiplier: float
    # the table's *published* (DP) row count: every count, rate and divisor that leaves the site
    # is computed from it, never from len(features); None (tests, warm-up): the true count
    public_rows: int | None = None
    # parameters that do not train and do not leave: the plan's frozen layers, or, in a
    # personalization round, every layer but the ones it tunes
    frozen: tuple[str, ...] = ()


@dataclass(frozen=True)
class RoundOutput:
    weights: dict[str, npt.NDArray[Any]]  # Weights, or a distributed round's integer sum (SUM)
    n: int
    metrics: dict[str, float]  # what the researcher receives: noised (or public) numbers only
    timing: dict[str, float]  # for the site's audit log and the benchmark, never released


def split(
    x: npt.NDArray[Any], y: npt.NDArray[Any], fraction: float, seed: int
) -> tuple[npt.NDArray[Any], npt.NDArray[Any], npt.NDArray[Any], npt.NDArray[Any]]:
    """A deterministic train/validation split: same seed -> same split every round."""
    rng = np.random.default_rng(seed)
    val = rng.permutation(len(x))[: validation_rows(len(x), fraction)]
    if len(val) == 0:  # no copy of a large table for an empty validation split
        return x, y, x[:0], y[:0]
    train = np.ones(len(x), dtype=bool)
    train[val] = False
    # training rows stay in table order: Poisson sampling draws them uniformly either way
    return x[train], y[train], x[val], y[val]


def class_codes(y: npt.NDArray[Any], n_classes: int) -> npt.NDArray[Any]:
    """Labels as integers in 0..n_classes-1, whatever the column holds.

    Out-of-range values are clamped rather than refused: a round that fails or is refused
    because of one row's label would tell the researcher about that row.
    """
    codes = np.nan_to_num(np.asarray(y, dtype=np.float64), nan=0.0, posinf=0.0, neginf=0.0)
    return np.clip(np.floor(codes), 0, n_classes - 1).astype(np.int64)


def run_task(task: RoundTask, _test_seed: int | None = None) -> RoundOutput:
    """Build the spec's model with site code, train one round of DP-SGD, measure, release.

    Everything released is accounted: the weights come from the noisy optimizer steps, the
    metrics are noised sums (``training.private_metrics``), and the row counts, the sampling
    rate and the step count are functions of the table's published (DP) size and the plan.
    """
    from policies.engine.dp_sgd import private_metrics, secure_scalar_gaussian, train_dp
    from policies.modelspec import parse
    from policies.torch_model import build, load

    plan = TrainingPlan.from_dict(task.plan)
    if plan.dp.distributed:
        raise ValueError("a distributed-DP round is distributed.distributed_step's, not this")
    spec = parse(task.model)
    # clamp, centre, divide: the one function the dry run and the researcher's --test apply
    x = scaling.apply(task.features, task.scaling if plan.standardize else None)
    y = class_codes(task.target, spec.output[-1]) if plan.loss == "cross_entropy" else task.target
    x, y, xv, yv = split(x, y, plan.validation_fraction, task.split_seed)
    public = task.public_rows if task.public_rows is not None else len(task.features)
    public_val = validation_rows(public, plan.validation_fraction)
    public_train = max(1, public - public_val)
    model = build(spec)
    if task.weights is not None:
        load(model, task.weights)
    for name, param in model.named_parameters():
        if name in task.frozen:
            param.requires_grad_(False)
    started = time.perf_counter()
    result = train_dp(
        model, x, y, plan, task.noise_multiplier, public_rows=public_train, _test_seed=_test_seed
    )
    train_seconds = time.perf_counter() - started
    load(model, result.weights)  # measure what is released, not what the model holds
    gaussian = secure_scalar_gaussian if _test_seed is None else _seeded_gaussian(_test_seed)
    metrics = {"steps": float(result.steps), "val_rows": float(public_val)}
    metrics.update(private_metrics(model, xv, yv, plan, gaussian, public_val))
    released = {k: v for k, v in result.weights.items() if k not in task.frozen}
    return RoundOutput(released, public_train, metrics, {"train_seconds": train_seconds})


def _seeded_gaussian(seed: int) -> Callable[[float], float]:
    rng = np.random.default_rng(seed)
    return lambda std: float(rng.normal(0.0, std))
