"""Aggregation strategies, with Flower's useful hooks: ``initialize``, ``configure_round`` and
``aggregate(round, results, current, failures)``.

DP lives in the datasites' runtime. Everything here reads only what the sites released (DP
weights, DP or public counts), so every strategy is post-processing and costs no epsilon.

- ``FedAvg``: the row-weighted mean (McMahan et al. 2017).
- Server optimizers (Reddi et al. 2021, "Adaptive Federated Optimization"): the pseudo-gradient
  ``delta = fedavg(results) - current`` is fed to momentum (``FedAvgM``), Adam (``FedAdam``) or
  Yogi (``FedYogi``) at the researcher; hyper-parameters default to Flower's.
- Robust aggregation against a faulty or malicious site: coordinate-wise median (``FedMedian``),
  trimmed mean (``FedTrimmedAvg``), and norm bounding of each site's update before averaging
  (``NormBounded``, Sun et al. 2019). Of these only norm bounding could run under secure
  aggregation (each site can bound its own update); median and trimmed mean need every update.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from policies.wire import Weights
from researcher.errors import AggregationError


@dataclass(frozen=True)
class Update:
    """One site's validated reply for one round."""

    site: str
    weights: Weights
    n: int
    metrics: dict[str, float] = field(default_factory=dict)
    privacy: dict[str, Any] = field(default_factory=dict)
    site_round: int = 0  # the site's own count of this job's rounds, for resuming


class Strategy(Protocol):
    name: str

    def initialize(self, weights: Weights) -> Weights:
        """The round-1 global weights, from the model's initial ones."""
        ...

    def configure_round(self, round_no: int, weights: Weights) -> Weights:
        """The weights sent to every site for ``round_no``."""
        ...

    def aggregate(
        self,
        round_no: int,
        results: list[Update],
        current: Weights,
        failures: dict[str, str] | None = None,
    ) -> Weights:
        """The next global weights from this round's updates (``failures``: skipped sites)."""
        ...


def check_updates(round_no: int, results: list[Update], current: Weights) -> None:
    """AggregationError unless every update has exactly the current tensors and shapes."""
    if not results:
        raise AggregationError(f"round {round_no}: no updates to aggregate")
    keys = set(current)
    for u in results:
        if set(u.weights) != keys:
            raise AggregationError(
                f"round {round_no}: {u.site} sent tensors {sorted(u.weights)}, "
                f"expected {sorted(keys)}"
            )
        for k in keys:
            if u.weights[k].shape != current[k].shape:
                raise AggregationError(
                    f"round {round_no}: {u.site} sent {k} of shape "
                    f"{u.weights[k].shape}, expected {current[k].shape}"
                )


def _f32(weights: dict[str, np.ndarray]) -> Weights:
    return {k: np.asarray(v, dtype=np.float32) for k, v in weights.items()}


class FedAvg:
    """Federated averaging weighted by the number of training rows (McMahan et al. 2017)."""

    name = "fedavg"

    def initialize(self, weights: Weights) -> Weights:
        return weights

    def configure_round(self, round_no: int, weights: Weights) -> Weights:
        return weights

    def state(self) -> dict[str, np.ndarray]:
        """Arrays a resumed run needs (none for stateless strategies); names are "slot/tensor"."""
        return {}

    def load_state(self, arrays: dict[str, np.ndarray]) -> None:
        """Restore what :meth:`state` gave (called on ``--resume``)."""

    def __post_init__(self) -> None:
        """A parameter out of its range is refused when the strategy is made, by its name: a
        momentum of 1.5 would diverge rounds later, far from the job file that set it."""
        for key in parameters(type(self)).keys() & RANGES.keys():  # a subclass may add its own
            _check_range(self.name, key, getattr(self, key))

    def aggregate(
        self,
        round_no: int,
        results: list[Update],
        current: Weights,
        failures: dict[str, str] | None = None,
    ) -> Weights:
        check_updates(round_no, results, current)
        counts = np.array([u.n for u in results], dtype=np.float64)
        if counts.sum() <= 0:
            raise AggregationError(f"round {round_no}: updates cover no rows")
        return _f32(
            {
                k: np.average(np.stack([u.weights[k] for u in results]), axis=0, weights=counts)
                for k in current
            }
        )


@dataclass
class FedAvgM(FedAvg):
    """Server momentum: v = momentum * v + delta; w = w + server_lr * v."""

    server_lr: float = 1.0
    momentum: float = 0.9
    velocity: dict[str, np.ndarray] = field(default_factory=dict)
    name = "fedavgm"

    def state(self) -> dict[str, np.ndarray]:
        return {f"velocity/{k}": np.asarray(v) for k, v in self.velocity.items()}

    def load_state(self, arrays: dict[str, np.ndarray]) -> None:
        self.velocity = {
            k.split("/", 1)[1]: v for k, v in arrays.items() if k.startswith("velocity/")
        }

    def aggregate(self, round_no, results, current, failures=None) -> Weights:  # noqa: ANN001
        mean = super().aggregate(round_no, results, current, failures)
        out = {}
        for k in current:
            delta = mean[k].astype(np.float64) - current[k]
            self.velocity[k] = self.momentum * self.velocity.get(k, 0.0) + delta
            out[k] = current[k] + self.server_lr * self.velocity[k]
        return _f32(out)


@dataclass
class FedAdam(FedAvg):
    """Adam on the pseudo-gradient, as Reddi et al. 2021 (no bias correction; tau for 0/0)."""

    server_lr: float = 0.1
    beta_1: float = 0.9
    beta_2: float = 0.99
    tau: float = 1e-9
    m: dict[str, np.ndarray] = field(default_factory=dict)
    v: dict[str, np.ndarray] = field(default_factory=dict)
    name = "fedadam"

    def state(self) -> dict[str, np.ndarray]:
        return {
            **{f"m/{k}": np.asarray(x) for k, x in self.m.items()},
            **{f"v/{k}": np.asarray(x) for k, x in self.v.items()},
        }

    def load_state(self, arrays: dict[str, np.ndarray]) -> None:
        self.m = {k[2:]: x for k, x in arrays.items() if k.startswith("m/")}
        self.v = {k[2:]: x for k, x in arrays.items() if k.startswith("v/")}

    def _second_moment(self, v: np.ndarray | float, delta: np.ndarray) -> np.ndarray:
        return self.beta_2 * v + (1 - self.beta_2) * delta**2

    def aggregate(self, round_no, results, current, failures=None) -> Weights:  # noqa: ANN001
        mean = super().aggregate(round_no, results, current, failures)
        out = {}
        for k in current:
            delta = mean[k].astype(np.float64) - current[k]
            self.m[k] = self.beta_1 * self.m.get(k, 0.0) + (1 - self.beta_1) * delta
            self.v[k] = self._second_moment(self.v.get(k, 0.0), delta)
            out[k] = current[k] + self.server_lr * self.m[k] / (np.sqrt(self.v[k]) + self.tau)
        return _f32(out)


@dataclass
class FedYogi(FedAdam):
    """Yogi's additive second moment: v = v - (1 - beta_2) delta^2 sign(v - delta^2)."""

    server_lr: float = 0.01
    tau: float = 1e-3
    name = "fedyogi"

    def _second_moment(self, v: np.ndarray | float, delta: np.ndarray) -> np.ndarray:
        squared = delta**2
        return v - (1 - self.beta_2) * squared * np.sign(v - squared)


class FedMedian(FedAvg):
    """The coordinate-wise median of the sites' weights (unweighted)."""

    name = "median"

    def aggregate(self, round_no, results, current, failures=None) -> Weights:  # noqa: ANN001
        check_updates(round_no, results, current)
        return _f32({k: np.median(np.stack([u.weights[k] for u in results]), 0) for k in current})


@dataclass
class FedTrimmedAvg(FedAvg):
    """Per coordinate, drop the ``beta`` fraction highest and lowest values, average the rest."""

    beta: float = 0.2
    name = "trimmed-mean"

    def aggregate(self, round_no, results, current, failures=None) -> Weights:  # noqa: ANN001
        check_updates(round_no, results, current)
        cut = int(np.floor(self.beta * len(results)))
        out = {}
        for k in current:
            ranked = np.sort(np.stack([u.weights[k] for u in results]), axis=0)
            out[k] = ranked[cut : len(results) - cut].mean(0)
        return _f32(out)


@dataclass
class NormBounded(FedAvg):
    """Each site's update (its weights minus the current ones) is scaled to an L2 norm of at
    most ``max_norm`` over all tensors, then the bounded updates are averaged by rows."""

    max_norm: float = 1.0
    name = "norm-bounded"

    def aggregate(self, round_no, results, current, failures=None) -> Weights:  # noqa: ANN001
        check_updates(round_no, results, current)
        bounded = []
        for u in results:
            diff = {k: u.weights[k].astype(np.float64) - current[k] for k in current}
            norm = np.sqrt(sum(float((d**2).sum()) for d in diff.values()))
            scale = min(1.0, self.max_norm / norm) if norm > 0 else 1.0
            bounded.append(
                Update(u.site, {k: current[k] + scale * d for k, d in diff.items()}, u.n)
            )
        return super().aggregate(round_no, bounded, current, failures)


STRATEGIES: dict[str, type] = {
    s.name: s for s in (FedAvg, FedAvgM, FedAdam, FedYogi, FedMedian, FedTrimmedAvg, NormBounded)
}


STATE_FIELDS = ("velocity", "m", "v")  # a strategy's running state, never one of its parameters
# each parameter's range (low, high, whether low itself is allowed); high is never allowed
RANGES: dict[str, tuple[float, float, bool]] = {
    "server_lr": (0.0, math.inf, False),
    "tau": (0.0, math.inf, False),
    "max_norm": (0.0, math.inf, False),
    "momentum": (0.0, 1.0, True),
    "beta_1": (0.0, 1.0, True),
    "beta_2": (0.0, 1.0, True),
    "beta": (0.0, 0.5, True),
}


def parameters(cls: type) -> dict[str, Any]:
    """A strategy class's tunable parameters and their defaults (none for fedavg and median)."""
    if not dataclasses.is_dataclass(cls):
        return {}
    return {f.name: f.default for f in dataclasses.fields(cls) if f.name not in STATE_FIELDS}


def _check_range(name: str, key: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise AggregationError(f"strategy {name!r}: {key} must be a number, got {value!r}")
    low, high, closed = RANGES[key]
    if value < low or (value == low and not closed) or value >= high:
        raise AggregationError(
            f"strategy {name!r}: {key} must be {_range_text(low, high, closed)}, got {value!r}"
        )


def _range_text(low: float, high: float, closed: bool) -> str:
    if high == math.inf:
        return f"{'>=' if closed else '>'} {low:g}"
    return f"in {'[' if closed else '('}{low:g}, {high:g})"


def strategy_from(config: str | Mapping[str, Any]) -> Strategy:
    """The strategy a job file's ``STRATEGY`` names: ``"fedavgm"``, or a dict of its name and
    parameters, ``{"name": "fedavgm", "server_lr": 0.5, "momentum": 0.5}`` (the rest keep their
    defaults). An unknown name, an unknown parameter or a value out of range is an
    AggregationError that names it, before any site is contacted."""
    if isinstance(config, str):
        config = {"name": config}
    if not isinstance(config, Mapping):
        raise AggregationError(
            'a strategy is a name or a dict such as {"name": "fedavgm", "server_lr": 0.5}, '
            f"not {type(config).__name__}"
        )
    fields = dict(config)
    name = fields.pop("name", None)
    if name is None:
        raise AggregationError(f'a strategy needs its "name": one of {", ".join(STRATEGIES)}')
    if not isinstance(name, str) or name not in STRATEGIES:
        raise AggregationError(f"unknown strategy {name!r}; choose one of {', '.join(STRATEGIES)}")
    cls = STRATEGIES[name]
    allowed = parameters(cls)
    unknown = sorted(set(fields) - set(allowed))
    if unknown:
        takes = ", ".join(allowed) or "no parameters"
        raise AggregationError(
            f"strategy {name!r} has no parameter {', '.join(map(repr, unknown))}; it takes {takes}"
        )
    for key, value in fields.items():
        _check_range(name, key, value)
    strategy: Strategy = cls(**{k: float(v) for k, v in fields.items()})
    return strategy


def strategy_config(strategy: Strategy) -> dict[str, Any]:
    """``{"name": ..., parameter: value, ...}``: every parameter spelled out, which
    :func:`strategy_from` reads back to the same strategy (state not included)."""
    return {
        "name": strategy.name,
        **{key: getattr(strategy, key) for key in parameters(type(strategy))},
    }


def strategy_named(name: str) -> Strategy:
    """A strategy with its default hyper-parameters, by the name ``researcher train`` takes."""
    return strategy_from(name)
