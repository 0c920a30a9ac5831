"""The job a researcher submits: a model's source and a training plan.

Both sides read this module: the researcher builds a :class:`JobSpec`, the datasite's review and
runtime re-parse it from the submitted literal. Everything is plain data so it can be embedded in
the submitted function as a literal and checked with ``ast.literal_eval``.
"""

from __future__ import annotations

import math
import uuid
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from policies.errors import PlanError

LOSSES = ("cross_entropy", "mse", "bce_with_logits")
OPTIMIZERS = ("sgd", "adam")
ACCOUNTANTS = ("prv", "rdp")


@dataclass(frozen=True)
class TrainingPlan:
    """Hyperparameters of local DP-SGD training at every site, for every round."""

    rounds: int = 5
    local_epochs: int = 1
    batch_size: int = 32
    learning_rate: float = 0.1
    momentum: float = 0.0
    optimizer: str = "sgd"
    loss: str = "cross_entropy"
    max_grad_norm: float = 1.0
    delta: float = 1e-5
    noise_multiplier: float | None = None
    target_epsilon: float | None = None
    accountant: str = "prv"
    validation_fraction: float = 0.2
    standardize: bool = True

    def __post_init__(self) -> None:
        self._check_ranges()
        if (self.noise_multiplier is None) == (self.target_epsilon is None):
            raise PlanError("give exactly one of noise_multiplier or target_epsilon")

    def _check_ranges(self) -> None:
        _positive_int("rounds", self.rounds)
        _positive_int("local_epochs", self.local_epochs)
        _positive_int("batch_size", self.batch_size)
        _positive_float("learning_rate", self.learning_rate)
        _positive_float("max_grad_norm", self.max_grad_norm)
        if not 0.0 < self.delta < 1.0:
            raise PlanError(f"delta must be in (0, 1), got {self.delta}")
        if not 0.0 <= self.momentum < 1.0:
            raise PlanError(f"momentum must be in [0, 1), got {self.momentum}")
        if not 0.0 <= self.validation_fraction < 0.9:
            raise PlanError(
                f"validation_fraction must be in [0, 0.9), got {self.validation_fraction}"
            )
        for name, value, allowed in (
            ("loss", self.loss, LOSSES),
            ("optimizer", self.optimizer, OPTIMIZERS),
            ("accountant", self.accountant, ACCOUNTANTS),
        ):
            if value not in allowed:
                raise PlanError(f"{name} must be one of {', '.join(allowed)}; got {value!r}")
        if self.noise_multiplier is not None and not (
            math.isfinite(self.noise_multiplier) and self.noise_multiplier >= 0
        ):
            raise PlanError(f"noise_multiplier must be >= 0, got {self.noise_multiplier}")
        if self.target_epsilon is not None:
            _positive_float("target_epsilon", self.target_epsilon)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainingPlan:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise PlanError(f"unknown plan fields: {', '.join(unknown)}")
        try:
            return cls(**data)
        except TypeError as exc:
            raise PlanError(f"bad plan: {exc}") from exc


@dataclass(frozen=True)
class JobSpec:
    """What one submission asks a datasite to run: model source, factory name, dataset, plan."""

    name: str
    dataset: str
    target: str
    model_source: str
    plan: TrainingPlan
    model_factory: str = "make_model"
    job_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    # Optional federation-wide feature standardisation {"mean": [...], "std": [...]}, derived
    # from the sites' published statistics; without it each site uses its own.
    scaling: dict[str, list[float]] | None = None

    def __post_init__(self) -> None:
        if not self.name.isidentifier():
            raise PlanError(f"job name must be a Python identifier, got {self.name!r}")
        if not self.model_factory.isidentifier():
            raise PlanError(f"model_factory must be an identifier, got {self.model_factory!r}")
        if not self.dataset:
            raise PlanError("dataset must be named")

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["plan"] = self.plan.to_dict()
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> JobSpec:
        if not isinstance(data, dict):
            raise PlanError("job spec must be a dict")
        data = dict(data)
        try:
            plan = TrainingPlan.from_dict(dict(data.pop("plan")))
            return cls(plan=plan, **data)
        except (KeyError, TypeError) as exc:
            raise PlanError(f"bad job spec: {exc}") from exc


def validation_rows(n_rows: int, fraction: float) -> int:
    """Rows a site holds out for validation; the rest train (and are what the accounting sees)."""
    return int(round(n_rows * fraction))


def training_rows(n_rows: int, plan: TrainingPlan) -> int:
    return n_rows - validation_rows(n_rows, plan.validation_fraction)


def steps_per_epoch(n_rows: int, batch_size: int) -> int:
    """Optimizer steps per epoch as Opacus' Poisson loader takes them: ceil(n / batch)."""
    return max(1, math.ceil(n_rows / batch_size))


def sample_rate(n_rows: int, batch_size: int) -> float:
    """Poisson sampling rate Opacus uses: 1 / len(loader)."""
    return 1.0 / steps_per_epoch(n_rows, batch_size)


def _positive_int(name: str, value: Any) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise PlanError(f"{name} must be a positive integer, got {value!r}")


def _positive_float(name: str, value: Any) -> None:
    if not isinstance(value, int | float) or not math.isfinite(value) or value <= 0:
        raise PlanError(f"{name} must be a positive number, got {value!r}")
