"""The job a researcher submits: a declarative model and a training plan.

Both sides read this module: the researcher builds a :class:`JobSpec`, the datasite's review and
runtime re-parse it from the submitted literal. Everything is plain data so it can be embedded in
the submitted function as a literal and checked with ``ast.literal_eval``; no code travels.

On the wire a plan is one flat dict (``TrainingPlan.to_dict``: what a job file's ``PLAN`` writes,
what a site reviews); in code it is a few core fields and typed sections
(``policies.plan_sections``): ``plan.dp``, ``plan.aggregation``, ``plan.algorithm``,
``plan.imbalance``, ``plan.metrics``.

Every plan field has a hard upper bound, and so has the number of DP-SGD steps a plan implies
(``MAX_TOTAL_STEPS``), so that a review (which computes the plan's epsilon) and a round always
take bounded time and memory, whatever was submitted.
"""

from __future__ import annotations

import enum
import math
import typing
import uuid
from collections.abc import Mapping
from dataclasses import Field, asdict, dataclass, field, fields, is_dataclass
from functools import cached_property
from typing import Any

from policies.errors import PlanError
from policies.modelspec import ModelSpec, parse
from policies.plan_sections import (
    CLASSIFIERS as CLASSIFIERS,
)
from policies.plan_sections import (
    MAX_EPOCHS,
    AggregationSection,
    AlgorithmSection,
    DPSection,
    ImbalanceSection,
    Loss,
    MetricsSection,
    Optimizer,
    member,
    positive_float,
    positive_int,
)

MAX_ROUNDS = 1000
MAX_BATCH = 65_536
MAX_TOTAL_STEPS = 200_000  # all rounds of one job; the accountants stay sub-second below it
MAX_LEARNING_RATE = 100.0

# The order of the flat dict's keys as main wrote them before the plan had sections, kept so
# that a submitted job literal reads the same; a field added later goes after them.
WIRE_ORDER = (
    "rounds", "local_epochs", "batch_size", "learning_rate", "momentum", "optimizer", "loss",
    "max_grad_norm", "delta", "noise_multiplier", "target_epsilon", "accountant",
    "validation_fraction", "standardize", "site_metrics", "metric_noise_multiplier",
    "metric_loss_clip", "proximal_mu", "frozen", "compression", "topk_fraction",
    "personalize_layers", "personalize_epochs", "aggregation", "peers", "update_norm_bound",
    "dp", "sample_rate", "min_sites", "colluding_sites", "class_weight", "pos_weight",
    "binary_metrics",
)  # fmt: skip


@dataclass(frozen=True, kw_only=True)
class TrainingPlan:
    """Hyperparameters of local DP-SGD training at every site, for every round.

    The core fields below, then one typed section per concern; each section checks its own
    fields, and its ``check_in`` the rules that tie it to the rest of the plan. Build one from
    the flat wire dict with :meth:`from_dict` (or :meth:`of` with keywords).
    """

    rounds: int = 5
    local_epochs: int = 1
    batch_size: int = 32
    learning_rate: float = 0.1
    momentum: float = 0.0
    optimizer: Optimizer = Optimizer.SGD
    loss: Loss = Loss.CROSS_ENTROPY
    validation_fraction: float = 0.2
    standardize: bool = True
    dp: DPSection
    aggregation: AggregationSection = field(default_factory=AggregationSection)
    algorithm: AlgorithmSection = field(default_factory=AlgorithmSection)
    imbalance: ImbalanceSection = field(default_factory=ImbalanceSection)
    metrics: MetricsSection = field(default_factory=MetricsSection)

    def __post_init__(self) -> None:
        object.__setattr__(self, "optimizer", member(Optimizer, "optimizer", self.optimizer))
        object.__setattr__(self, "loss", member(Loss, "loss", self.loss))
        positive_int("rounds", self.rounds, MAX_ROUNDS)
        positive_int("local_epochs", self.local_epochs, MAX_EPOCHS)
        positive_int("batch_size", self.batch_size, MAX_BATCH)
        positive_float("learning_rate", self.learning_rate, MAX_LEARNING_RATE)
        if not _is_number(self.momentum) or not 0.0 <= self.momentum < 1.0:
            raise PlanError(f"momentum must be in [0, 1), got {self.momentum!r}")
        if not _is_number(self.validation_fraction) or not 0.0 <= self.validation_fraction < 0.9:
            raise PlanError(
                f"validation_fraction must be in [0, 0.9), got {self.validation_fraction!r}"
            )
        if not isinstance(self.standardize, bool):
            raise PlanError(f"standardize must be true or false, got {self.standardize!r}")
        for name in _SECTIONS:
            getattr(self, name).check_in(self)

    @property
    def survivors_needed(self) -> int:
        """Fewest sites a distributed round is unmasked with: ``min_sites``, or every peer."""
        return self.dp.min_sites or len(self.aggregation.peers)

    @property
    def honest_sites(self) -> int:
        """Sites whose noise shares must alone reach the plan's noise: the survivors a round
        needs, less those that may collude. Each site adds 1/honest_sites of the variance."""
        return self.survivors_needed - self.dp.colluding_sites

    @property
    def calls(self) -> int:
        """Calls a site answers for this plan: its rounds, and the fine-tuning pass if any."""
        return self.rounds + (1 if self.algorithm.personalizes else 0)

    def to_dict(self) -> dict[str, Any]:
        """The flat wire dict: every field by its flat name, enums as their strings, lists."""
        flat: dict[str, Any] = {}
        for name, value in ((f.name, getattr(self, f.name)) for f in fields(self)):
            if name not in _SECTIONS:
                flat[name] = _plain(value)
                continue
            for part in fields(value):
                flat[_wire_name(part)] = _plain(getattr(value, part.name))
        return {key: flat[key] for key in sorted(flat, key=_wire_rank)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TrainingPlan:
        """A plan from its flat wire dict; PlanError for an unknown field or a bad value."""
        if not isinstance(data, Mapping):
            raise PlanError("the plan must be a dict of fields")
        unknown = sorted(str(k) for k in set(data) - set(_WIRE))
        if unknown:
            raise PlanError(f"unknown plan fields: {', '.join(unknown)}")
        core: dict[str, Any] = {}
        parts: dict[str, dict[str, Any]] = {name: {} for name in _SECTIONS}
        for key, value in data.items():
            section, attr = _WIRE[key]
            (parts[section] if section else core)[attr] = value
        try:
            sections = {name: kind(**parts[name]) for name, kind in _SECTIONS.items()}
            return cls(**core, **sections)
        except TypeError as exc:
            raise PlanError(f"bad plan: {exc}") from exc

    @classmethod
    def of(cls, **flat: Any) -> TrainingPlan:
        """A plan from flat fields as a job file names them: ``TrainingPlan.of(rounds=3,
        noise_multiplier=1.0)``."""
        return cls.from_dict(flat)

    def with_fields(self, **flat: Any) -> TrainingPlan:
        """This plan with some flat fields changed, every check run again."""
        return TrainingPlan.from_dict({**self.to_dict(), **flat})


def _section_types() -> dict[str, type[Any]]:
    hints = typing.get_type_hints(TrainingPlan)
    return {f.name: hints[f.name] for f in fields(TrainingPlan) if is_dataclass(hints[f.name])}


def _wire_name(part: Field[Any]) -> str:
    return str(part.metadata.get("wire", part.name))


def _wire_map() -> dict[str, tuple[str | None, str]]:
    """Flat name -> (section or None for a core field, attribute in it)."""
    out: dict[str, tuple[str | None, str]] = {}
    for f in fields(TrainingPlan):
        kind = _SECTIONS.get(f.name)
        core: list[tuple[str, tuple[str | None, str]]] = [(f.name, (None, f.name))]
        parts = [(_wire_name(p), (f.name, p.name)) for p in fields(kind)] if kind else core
        for key, where in parts:
            assert key not in out, f"two plan fields travel as {key!r}"
            out[key] = where
    return out


def _wire_rank(key: str) -> tuple[int, int]:
    return (0, WIRE_ORDER.index(key)) if key in WIRE_ORDER else (1, list(_WIRE).index(key))


def _plain(value: Any) -> Any:
    """A field's value as the wire carries it: an enum as its string, a tuple as a list."""
    if isinstance(value, enum.Enum):
        return value.value
    return list(value) if isinstance(value, tuple) else value


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


_SECTIONS = _section_types()
_WIRE = _wire_map()


@dataclass(frozen=True)
class JobSpec:
    """What one submission asks a datasite to run: a model spec, a dataset, a plan."""

    name: str
    dataset: str
    target: str
    model: dict[str, Any]  # see policies.modelspec; validated and bounded on construction
    plan: TrainingPlan
    job_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    # Optional federation-wide feature standardisation {"mean": [...], "std": [...]}, derived
    # from the sites' published statistics; without it each site uses its own.
    scaling: dict[str, list[float]] | None = None
    # SHA-256 of the frozen layers of the job's initial weights (policies.wire.frozen_digest):
    # every round's incoming frozen tensors must match it, so they cannot change mid-job.
    frozen_digest: str | None = None
    # The federation-wide one-hot layout of a table with categorical columns (policies.layout),
    # built from every site's published schema; each site encodes its rows to it.
    layout: dict[str, Any] | None = None
    # The federation-wide class list of a class target (policies.labels), the union of every
    # site's published classes; each site maps its own label codes into it.
    classes: list[str] | None = None

    def __post_init__(self) -> None:
        if not self.name.isidentifier():
            raise PlanError(f"job name must be a Python identifier, got {self.name!r}")
        if not isinstance(self.dataset, str) or not self.dataset:
            raise PlanError("dataset must be named")
        object.__setattr__(self, "model", self.architecture.to_dict())  # normalised
        if self.scaling is not None:
            _check_scaling(self.scaling, self.architecture.input)
        if self.layout is not None:
            _check_layout(self.layout, self.architecture.input)
        if self.classes is not None:
            _check_classes(self.classes, self.plan.loss, self.architecture.output)
        self._check_layer_names()
        self._check_binary()

    def _check_binary(self) -> None:
        """Binary metrics and a per-class weight list must match the model's output width."""
        plan, width = self.plan, self.architecture.output[-1]
        if plan.metrics.binary and not (
            (plan.loss == "bce_with_logits" and width == 1)
            or (plan.loss == "cross_entropy" and width == 2)
        ):
            raise PlanError(
                "binary_metrics needs a binary model: bce_with_logits with 1 output, or "
                f"cross_entropy with 2; this one gives {width} with {plan.loss}"
            )
        weight = plan.imbalance.class_weight
        if plan.loss == "cross_entropy" and isinstance(weight, tuple) and len(weight) != width:
            raise PlanError(
                f"class_weight has {len(weight)} numbers; the model has {width} classes"
            )

    def _check_layer_names(self) -> None:
        names = list(self.architecture.parameters)
        algorithm = self.plan.algorithm
        for field_name in ("frozen", "personalize_layers"):
            for layer in getattr(algorithm, field_name):
                if not select(names, (layer,)):
                    raise PlanError(
                        f"{field_name}: the model has no layer or parameter {layer!r} "
                        f"(its parameters: {', '.join(names)})"
                    )
        if algorithm.frozen:
            if not self.trainable:
                raise PlanError("frozen covers every parameter; nothing would train")
            if self.frozen_digest is None:
                raise PlanError("frozen layers need the job's initial weights (frozen_digest)")
        if set(select(names, algorithm.personalize_layers)) & set(self.frozen_names):
            raise PlanError("personalize_layers overlaps frozen; frozen layers never train")

    @property
    def frozen_names(self) -> list[str]:
        return select(list(self.architecture.parameters), self.plan.algorithm.frozen)

    @property
    def trainable(self) -> dict[str, tuple[int, ...]]:
        """The parameters a site trains and returns: all but the frozen ones, in spec order."""
        frozen = set(self.frozen_names)
        return {k: v for k, v in self.architecture.parameters.items() if k not in frozen}

    @cached_property
    def architecture(self) -> ModelSpec:
        """The parsed model: shapes, parameter names and counts, by arithmetic alone."""
        return parse(self.model)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self) | {"plan": self.plan.to_dict()}

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


def select(names: list[str], layers: tuple[str, ...]) -> list[str]:
    """Parameter names a list of layer names picks: "2" picks "2.weight" and "2.bias"."""
    return [n for n in names if any(n == layer or n.startswith(f"{layer}.") for layer in layers)]


MIN_STD = 1e-6
MAX_MEAN = 1e12


def _check_layout(layout: Any, input_shape: tuple[int, ...]) -> None:
    from policies.layout import check_layout, width

    check_layout(layout)
    if (width(layout),) != tuple(input_shape):
        raise PlanError(
            f"the model takes {list(input_shape)} inputs; the layout gives {width(layout)}"
        )


def _check_classes(classes: Any, loss: str, output: tuple[int, ...]) -> None:
    """The job's label space: well-formed, and as wide as a classifier's output needs."""
    from policies.labels import check_classes

    check_classes(classes)
    need = n_outputs(loss, len(classes)) if loss == "cross_entropy" else 1
    if loss in CLASSIFIERS and tuple(output) != (need,):
        raise PlanError(
            f"the model gives {list(output)} per row; the job's {len(classes)} classes need "
            f"[{need}] with {loss}"
        )
    if loss == "bce_with_logits" and len(classes) != 2:
        raise PlanError(
            f"bce_with_logits is for 2 classes; the job's label space has {len(classes)} "
            f"({', '.join(classes)}): use cross_entropy"
        )


def _check_scaling(scaling: Any, input_shape: tuple[int, ...]) -> None:
    """Researcher-supplied standardisation: finite, bounded, one value per feature.

    A subnormal std or an infinite mean would turn rows into infinities, and whether a round
    then fails would depend on private values.
    """
    keys = set(scaling) if isinstance(scaling, dict) else set()
    if keys not in ({"mean", "std"}, {"mean", "std", "low", "high"}):
        raise PlanError("scaling must be a dict of 'mean' and 'std', and optionally 'low', 'high'")
    ranged = (("low", -MAX_MEAN, MAX_MEAN), ("high", -MAX_MEAN, MAX_MEAN)) if "low" in keys else ()
    for key, low, high in (("mean", -MAX_MEAN, MAX_MEAN), ("std", MIN_STD, MAX_MEAN), *ranged):
        values = scaling[key]
        if not isinstance(values, list) or len(values) != input_shape[-1]:
            raise PlanError(f"scaling {key} must be a list of {input_shape[-1]} numbers")
        for v in values:
            ok = isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)
            if not ok or not low <= v <= high:
                raise PlanError(f"scaling {key} values must be finite in [{low:g}, {high:g}]")
    if "low" in keys and any(a > b for a, b in zip(scaling["low"], scaling["high"], strict=True)):
        raise PlanError("scaling low must not exceed high for any input")


def validation_rows(n_rows: int, fraction: float) -> int:
    """Rows a site holds out for validation; the rest train (and are what the accounting sees)."""
    return int(round(n_rows * fraction))


def training_rows(n_rows: int, plan: TrainingPlan) -> int:
    return n_rows - validation_rows(n_rows, plan.validation_fraction)


def metric_queries(n_rows: int, plan: TrainingPlan) -> int:
    """Noised sums a site releases per round on its validation rows.

    The clipped loss sum, and for a classifier the count of correct predictions; none when the
    plan turns site metrics off or the table is too small to hold validation rows.
    """
    if not plan.metrics.enabled or validation_rows(n_rows, plan.validation_fraction) == 0:
        return 0
    return 2 if plan.loss.classifier else 1


def score_queries(n_rows: int, plan: TrainingPlan) -> int:
    """Noised score histograms a site releases per round (``binary_metrics``): 0 or 1.

    One histogram is one Gaussian release: a swapped validation row moves one count out of a
    bin and one into another (L2 sensitivity sqrt 2), and every bin gets noise of
    ``metric_noise_multiplier`` times that (``policies.imbalance``).
    """
    if not plan.metrics.binary or metric_queries(n_rows, plan) == 0:
        return 0
    return 1


@dataclass(frozen=True)
class StepPlan:
    """The DP-SGD step arithmetic of a plan on a site's training rows, as Opacus' Poisson
    loader takes it: every step samples each row with ``sample_rate`` = 1 / ``steps_per_epoch``.

    One computation for the accounting (``policies.privacy``: what the review and the ledger
    charge) and the training loop (``policies.engine.dp_sgd``: what the site runs), so that the
    steps a site takes are the steps it was charged for. ``rows`` is the published training-row
    count, never the exact private one.
    """

    rows: int
    steps_per_epoch: int  # ceil(rows / batch_size), at least 1
    sample_rate: float
    expected_batch: float  # the mean Poisson batch: rows / steps_per_epoch, at least 1
    steps_per_round: int  # local_epochs x steps_per_epoch
    personal_steps: int  # the personalization pass after the last round (0 without one)
    total_steps: int  # every round and the personalization pass

    @property
    def batch_divisor(self) -> int:
        """What a step's noisy gradient sum is divided by: the expected batch rounded down,
        as Opacus' ``make_private`` computes ``expected_batch_size``."""
        return int(self.expected_batch)


def step_plan(rows: int, plan: TrainingPlan) -> StepPlan:
    """The steps, sampling rate and expected batch of ``plan`` on ``rows`` training rows."""
    per_epoch = max(1, -(-rows // plan.batch_size))
    per_round = plan.local_epochs * per_epoch
    personal = plan.algorithm.personalize_epochs * per_epoch
    return StepPlan(
        rows=rows,
        steps_per_epoch=per_epoch,
        sample_rate=1.0 / per_epoch,
        expected_batch=max(1.0, rows / per_epoch),
        steps_per_round=per_round,
        personal_steps=personal,
        total_steps=plan.rounds * per_round + personal,
    )


def bounded_steps(rows: int, plan: TrainingPlan) -> StepPlan:
    """:func:`step_plan`, refused past ``MAX_TOTAL_STEPS`` (before any accountant runs)."""
    steps = step_plan(rows, plan)
    if steps.total_steps > MAX_TOTAL_STEPS:
        raise PlanError(
            f"the plan takes {steps.total_steps} DP-SGD steps in all ({plan.rounds} rounds x "
            f"{plan.local_epochs} epochs x {steps.steps_per_epoch} batches), "
            f"more than the limit {MAX_TOTAL_STEPS}; use fewer rounds or epochs, or larger batches"
        )
    return steps


def class_count(spec: JobSpec, n_classes: int | None) -> int | None:
    """The class count a round trains for: the job's label space when it carries one, else
    the dataset's own published count (a job built before the label space was)."""
    return len(spec.classes) if spec.classes else n_classes


def n_outputs(loss: str, n_classes: int | None) -> int:
    """Model outputs a loss needs: one per class for cross-entropy (labels 0..n-1), else one.

    The one rule for both sides; ``n_classes`` is the dataset's published class count.
    """
    return int(n_classes or 2) if loss == "cross_entropy" else 1


def check_fits(spec: JobSpec, n_features: int, outputs: int) -> None:
    """PlanError unless the model maps a row of ``n_features`` to ``outputs`` numbers."""
    arch = spec.architecture
    if arch.input != (n_features,):
        raise PlanError(
            f"the model takes rows of {list(arch.input)} but dataset {spec.dataset!r} has "
            f"{n_features} feature(s)"
        )
    if arch.output != (outputs,):
        raise PlanError(
            f"the model gives {list(arch.output)} per row but loss {spec.plan.loss} on "
            f"{spec.dataset!r} needs [{outputs}]"
        )
