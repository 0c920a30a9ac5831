"""The job a researcher submits: a declarative model and a training plan.

Both sides read this module: the researcher builds a :class:`JobSpec`, the datasite's review and
runtime re-parse it from the submitted literal. Everything is plain data so it can be embedded in
the submitted function as a literal and checked with ``ast.literal_eval``; no code travels.

Every plan field has a hard upper bound, and so has the number of DP-SGD steps a plan implies
(``MAX_TOTAL_STEPS``), so that a review (which computes the plan's epsilon) and a round always
take bounded time and memory, whatever was submitted.
"""

from __future__ import annotations

import math
import uuid
from dataclasses import asdict, dataclass, field, fields
from functools import cached_property
from typing import Any

from policies.errors import PlanError
from policies.modelspec import ModelSpec, parse

LOSSES = ("cross_entropy", "mse", "bce_with_logits")
OPTIMIZERS = ("sgd", "adam")
ACCOUNTANTS = ("prv", "rdp")
COMPRESSIONS = ("none", "int8", "topk")
AGGREGATIONS = ("plain", "secure")
DP_MODES = ("local", "distributed")
MAX_UPDATE_BOUND = 1e4
MAX_PROXIMAL_MU = 100.0
MAX_LAYER_NAMES = 64
MAX_ROUNDS = 1000
MAX_EPOCHS = 100
MAX_BATCH = 65_536
MAX_TOTAL_STEPS = 200_000  # all rounds of one job; the accountants stay sub-second below it
MAX_LEARNING_RATE = 100.0
MAX_GRAD_NORM = 100.0
MIN_GRAD_NORM = 1e-4
MAX_NOISE = 1000.0
MAX_EPSILON = 100.0
MAX_LOSS_CLIP = 1e4
MAX_CLASS_WEIGHT = 1e3  # a weight past it would make one row's loss dwarf the clipping bound's use
MAX_WEIGHTED_CLASSES = 1024
BALANCED = "balanced"
CLASSIFIERS = ("cross_entropy", "bce_with_logits")


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
    # Validation metrics a site releases each round, as Gaussian-noised sums (policies.privacy)
    site_metrics: bool = True
    metric_noise_multiplier: float = 20.0
    metric_loss_clip: float = 5.0
    # FedProx: mu/2 ||w - w_global||^2 at the site, added to the step after clipping and noise
    proximal_mu: float = 0.0
    # Transfer learning: layers ("0", "2") or parameters ("2.bias") not trained and not returned
    frozen: tuple[str, ...] = ()
    # How the update travels back: float32 weights, int8 per tensor, or top-k with error feedback
    compression: str = "none"
    topk_fraction: float = 0.1
    # Personalization: after the last round, fine-tune these layers at each site; kept there
    personalize_layers: tuple[str, ...] = ()
    personalize_epochs: int = 0
    # Secure aggregation (policies.secagg): the researcher sees only the sum of masked updates.
    # ``peers``: the datasites allowed in a round, by identity-key fingerprint (the admin
    # approves this list); ``update_norm_bound``: each site clips its update to this L2 norm.
    aggregation: str = "plain"
    peers: tuple[str, ...] = ()
    update_norm_bound: float = 10.0
    # Distributed DP (policies.skellam): "local" (each site noises its own update fully) or
    # "distributed" (a round is one DP-SGD step over the union of the sites: each samples its
    # rows at ``sample_rate``, adds a Skellam share, masks; the shares of the honest sites add up
    # to the plan's noise). ``min_sites``: fewest survivors a round is unmasked with (0: every
    # peer); ``colluding_sites``: how many sites may pool their noise and still leave enough.
    dp: str = "local"
    sample_rate: float | None = None
    min_sites: int = 0
    colluding_sites: int = 0
    # Imbalanced labels (policies.imbalance): a per-class loss weight, "balanced" (resolved at
    # the site from its published DP class counts, never from the private labels) or one
    # number per class; ``pos_weight`` is bce_with_logits' weight of the positive term.
    class_weight: str | tuple[float, ...] | None = None
    pos_weight: str | float | None = None
    # Each round, a noised score histogram of the validation rows per class, from which the
    # site releases recall, precision, ROC-AUC, PR-AUC and balanced accuracy (binary models)
    binary_metrics: bool = False

    def __post_init__(self) -> None:
        for name in ("frozen", "personalize_layers", "peers", "class_weight"):
            value = getattr(self, name)
            if isinstance(value, list | tuple):
                object.__setattr__(self, name, tuple(value))
        self._check_ranges()
        self._check_algorithms()
        self._check_imbalance()
        if (self.noise_multiplier is None) == (self.target_epsilon is None):
            raise PlanError("give exactly one of noise_multiplier or target_epsilon")

    def _check_ranges(self) -> None:
        _positive_int("rounds", self.rounds, MAX_ROUNDS)
        _positive_int("local_epochs", self.local_epochs, MAX_EPOCHS)
        _positive_int("batch_size", self.batch_size, MAX_BATCH)
        _positive_float("learning_rate", self.learning_rate, MAX_LEARNING_RATE)
        _positive_float("max_grad_norm", self.max_grad_norm, MAX_GRAD_NORM)
        if self.max_grad_norm < MIN_GRAD_NORM:  # below it, the clip's 1e-6 stabiliser rules
            raise PlanError(f"max_grad_norm must be at least {MIN_GRAD_NORM:g}")
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
        if self.noise_multiplier is not None:
            _positive_float("noise_multiplier", self.noise_multiplier, MAX_NOISE)
        if self.target_epsilon is not None:
            _positive_float("target_epsilon", self.target_epsilon, MAX_EPSILON)
        for name in ("standardize", "site_metrics"):
            if not isinstance(getattr(self, name), bool):
                raise PlanError(f"{name} must be true or false, got {getattr(self, name)!r}")
        _positive_float("metric_noise_multiplier", self.metric_noise_multiplier, MAX_NOISE)
        _positive_float("metric_loss_clip", self.metric_loss_clip, MAX_LOSS_CLIP)

    def _check_algorithms(self) -> None:
        if self.proximal_mu != 0.0:
            _positive_float("proximal_mu", self.proximal_mu, MAX_PROXIMAL_MU)
            if self.learning_rate * self.proximal_mu >= 1.0:
                # each step multiplies w - w_global by (1 - lr*mu): at 2 and above it diverges
                # (red team: whether it overflows then depends on the rows), above 1 it overshoots
                raise PlanError(
                    f"learning_rate x proximal_mu is {self.learning_rate * self.proximal_mu:g}; "
                    "it must be below 1, or the proximal pull overshoots the global weights"
                )
        if self.compression not in COMPRESSIONS:
            raise PlanError(
                f"compression must be one of {', '.join(COMPRESSIONS)}; got {self.compression!r}"
            )
        ok = isinstance(self.topk_fraction, int | float) and not isinstance(
            self.topk_fraction, bool
        )
        if not ok or not 0.0 < self.topk_fraction <= 1.0:
            raise PlanError(f"topk_fraction must be in (0, 1], got {self.topk_fraction!r}")
        for name in ("frozen", "personalize_layers"):
            value = getattr(self, name)
            if not isinstance(value, tuple) or len(value) > MAX_LAYER_NAMES:
                raise PlanError(f"{name} must be a list of at most {MAX_LAYER_NAMES} layer names")
            if not all(isinstance(v, str) and 0 < len(v) <= 64 for v in value):
                raise PlanError(f'{name} must hold layer names such as "0" or "2.weight"')
        self._check_aggregation()
        if self.personalize_epochs != 0 or self.personalize_layers:
            _positive_int("personalize_epochs", self.personalize_epochs, MAX_EPOCHS)
            if not self.personalize_layers:
                raise PlanError("personalize_epochs needs personalize_layers (the layers to tune)")

    def _check_aggregation(self) -> None:
        if self.aggregation not in AGGREGATIONS:
            raise PlanError(
                f"aggregation must be one of {', '.join(AGGREGATIONS)}; got {self.aggregation!r}"
            )
        _positive_float("update_norm_bound", self.update_norm_bound, MAX_UPDATE_BOUND)
        peers = self.peers
        if not isinstance(peers, tuple) or len(peers) > 64:
            raise PlanError("peers must be a list of at most 64 datasite fingerprints")
        hexdigits = set("0123456789abcdef")
        if not all(isinstance(p, str) and len(p) == 64 and set(p) <= hexdigits for p in peers):
            raise PlanError("peers must be SHA-256 fingerprints: 64 lowercase hex characters")
        if self.dp not in DP_MODES:
            raise PlanError(f"dp must be one of {', '.join(DP_MODES)}; got {self.dp!r}")
        if self.aggregation == "plain":
            if peers:
                raise PlanError('peers are for aggregation "secure"')
            if self.distributed:
                raise PlanError('dp "distributed" needs aggregation "secure": the noise is shared')
            self._check_distributed()
            return
        if len(set(peers)) != len(peers) or len(peers) == 1:
            # none yet is allowed: the researcher package fills in the federation's sites
            raise PlanError("secure aggregation needs at least 2 distinct peers")
        if self.compression != "none":
            raise PlanError(
                'secure aggregation sums fixed-point updates; compression must be "none" '
                "(int8 would be quantized twice, top-k needs one index set for all sites)"
            )
        self._check_distributed()

    def _check_distributed(self) -> None:
        if not self.distributed:
            if self.sample_rate is not None or self.min_sites or self.colluding_sites:
                raise PlanError(
                    'sample_rate, min_sites and colluding_sites are for dp "distributed"'
                )
            return
        if self.sample_rate is not None:
            _positive_float("sample_rate", self.sample_rate, 1.0)
        peers = len(self.peers)
        if not isinstance(self.min_sites, int) or not 0 <= self.min_sites <= max(peers, 64):
            raise PlanError(f"min_sites must be an integer in [0, {max(peers, 64)}]")
        if peers and self.min_sites > peers:
            raise PlanError(f"min_sites is {self.min_sites}, more than the {peers} peers")
        if not isinstance(self.colluding_sites, int) or self.colluding_sites < 0:
            raise PlanError("colluding_sites must be a non-negative integer")
        if peers and self.honest_sites < 1:
            raise PlanError(
                f"colluding_sites ({self.colluding_sites}) must be below min_sites "
                f"({self.survivors_needed}): some honest site's noise must remain"
            )
        for name, value, allowed in (
            ("site_metrics", self.site_metrics, False),
            ("local_epochs", self.local_epochs, 1),
            ("personalize_epochs", self.personalize_epochs, 0),
        ):
            if value != allowed:
                raise PlanError(
                    f'dp "distributed" needs {name} = {allowed!r}: a round is one noisy step '
                    "summed over the sites, and only that sum leaves them"
                )
        if self.proximal_mu or self.frozen or self.class_weight or self.pos_weight:
            raise PlanError(
                'dp "distributed" takes one plain gradient step per round: no proximal_mu, '
                "frozen layers or class weights"
            )

    def _check_imbalance(self) -> None:
        weight = self.class_weight
        if weight is not None and weight != BALANCED:
            ok = isinstance(weight, tuple) and 2 <= len(weight) <= MAX_WEIGHTED_CLASSES
            if not ok or not all(_in_range(w, MAX_CLASS_WEIGHT) for w in weight):
                raise PlanError(
                    f'class_weight must be "balanced" or a list of 2 to {MAX_WEIGHTED_CLASSES} '
                    f"numbers in (0, {MAX_CLASS_WEIGHT:g}], got {weight!r}"
                )
        if weight is not None and self.loss not in CLASSIFIERS:
            raise PlanError(f"class_weight needs a classifier loss, not {self.loss}")
        bce = self.loss == "bce_with_logits"
        if bce and weight is not None and weight != BALANCED and len(weight) != 2:
            raise PlanError("class_weight for bce_with_logits takes 2 numbers (class 0, 1)")
        pos = self.pos_weight
        if pos is not None:
            if self.loss != "bce_with_logits":
                raise PlanError("pos_weight is for loss bce_with_logits")
            if pos != BALANCED and not _in_range(pos, MAX_CLASS_WEIGHT):
                raise PlanError(
                    f'pos_weight must be "balanced" or a number in (0, {MAX_CLASS_WEIGHT:g}], '
                    f"got {pos!r}"
                )
            if weight is not None:
                raise PlanError("give class_weight or pos_weight, not both")
        if not isinstance(self.binary_metrics, bool):
            raise PlanError(f"binary_metrics must be true or false, got {self.binary_metrics!r}")
        if self.binary_metrics and (not self.site_metrics or self.loss not in CLASSIFIERS):
            raise PlanError("binary_metrics needs site_metrics and a classifier loss")

    @property
    def secure(self) -> bool:
        return self.aggregation == "secure"

    @property
    def distributed(self) -> bool:
        return self.dp == "distributed"

    @property
    def survivors_needed(self) -> int:
        """Fewest sites a distributed round is unmasked with: ``min_sites``, or every peer."""
        return self.min_sites or len(self.peers)

    @property
    def honest_sites(self) -> int:
        """Sites whose noise shares must alone reach the plan's noise: the survivors a round
        needs, less those that may collude. Each site adds 1/honest_sites of the variance."""
        return self.survivors_needed - self.colluding_sites

    @property
    def personalizes(self) -> bool:
        return bool(self.personalize_layers)

    @property
    def calls(self) -> int:
        """Calls a site answers for this plan: its rounds, and the fine-tuning pass if any."""
        return self.rounds + (1 if self.personalizes else 0)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["frozen"] = list(self.frozen)
        data["personalize_layers"] = list(self.personalize_layers)
        data["peers"] = list(self.peers)
        if isinstance(self.class_weight, tuple):
            data["class_weight"] = list(self.class_weight)
        return data

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
        if plan.binary_metrics and not (
            (plan.loss == "bce_with_logits" and width == 1)
            or (plan.loss == "cross_entropy" and width == 2)
        ):
            raise PlanError(
                "binary_metrics needs a binary model: bce_with_logits with 1 output, or "
                f"cross_entropy with 2; this one gives {width} with {plan.loss}"
            )
        weight = plan.class_weight
        if plan.loss == "cross_entropy" and isinstance(weight, tuple) and len(weight) != width:
            raise PlanError(
                f"class_weight has {len(weight)} numbers; the model has {width} classes"
            )

    def _check_layer_names(self) -> None:
        names = list(self.architecture.parameters)
        for field_name in ("frozen", "personalize_layers"):
            for layer in getattr(self.plan, field_name):
                if not select(names, (layer,)):
                    raise PlanError(
                        f"{field_name}: the model has no layer or parameter {layer!r} "
                        f"(its parameters: {', '.join(names)})"
                    )
        if self.plan.frozen:
            if not self.trainable:
                raise PlanError("frozen covers every parameter; nothing would train")
            if self.frozen_digest is None:
                raise PlanError("frozen layers need the job's initial weights (frozen_digest)")
        if set(select(names, self.plan.personalize_layers)) & set(self.frozen_names):
            raise PlanError("personalize_layers overlaps frozen; frozen layers never train")

    @property
    def frozen_names(self) -> list[str]:
        return select(list(self.architecture.parameters), self.plan.frozen)

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
    if not isinstance(scaling, dict) or set(scaling) != {"mean", "std"}:
        raise PlanError("scaling must be a dict with exactly 'mean' and 'std'")
    for key, low, high in (("mean", -MAX_MEAN, MAX_MEAN), ("std", MIN_STD, MAX_MEAN)):
        values = scaling[key]
        if not isinstance(values, list) or len(values) != input_shape[-1]:
            raise PlanError(f"scaling {key} must be a list of {input_shape[-1]} numbers")
        for v in values:
            ok = isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)
            if not ok or not low <= v <= high:
                raise PlanError(f"scaling {key} values must be finite in [{low:g}, {high:g}]")


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
    if not plan.site_metrics or validation_rows(n_rows, plan.validation_fraction) == 0:
        return 0
    return 2 if plan.loss in CLASSIFIERS else 1


def score_queries(n_rows: int, plan: TrainingPlan) -> int:
    """Noised score histograms a site releases per round (``binary_metrics``): 0 or 1.

    One histogram is one Gaussian release: a swapped validation row moves one count out of a
    bin and one into another (L2 sensitivity sqrt 2), and every bin gets noise of
    ``metric_noise_multiplier`` times that (``policies.imbalance``).
    """
    if not plan.binary_metrics or metric_queries(n_rows, plan) == 0:
        return 0
    return 1


def steps_per_epoch(n_rows: int, batch_size: int) -> int:
    """Optimizer steps per epoch as Opacus' Poisson loader takes them: ceil(n / batch)."""
    return max(1, math.ceil(n_rows / batch_size))


def sample_rate(n_rows: int, batch_size: int) -> float:
    """Poisson sampling rate Opacus uses: 1 / len(loader)."""
    return 1.0 / steps_per_epoch(n_rows, batch_size)


def total_steps(n_rows: int, plan: TrainingPlan) -> int:
    """DP-SGD steps of the whole plan on ``n_rows`` training rows; refused past the bound."""
    per_epoch = steps_per_epoch(n_rows, plan.batch_size)
    steps = plan.rounds * plan.local_epochs * per_epoch + personal_steps(n_rows, plan)
    if steps > MAX_TOTAL_STEPS:
        raise PlanError(
            f"the plan takes {steps} DP-SGD steps in all ({plan.rounds} rounds x "
            f"{plan.local_epochs} epochs x {steps_per_epoch(n_rows, plan.batch_size)} batches), "
            f"more than the limit {MAX_TOTAL_STEPS}; use fewer rounds or epochs, or larger batches"
        )
    return steps


def personal_steps(n_rows: int, plan: TrainingPlan) -> int:
    """DP-SGD steps of the personalization pass after the last round (0 without one)."""
    return plan.personalize_epochs * steps_per_epoch(n_rows, plan.batch_size)


def _positive_int(name: str, value: Any, high: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= high:
        raise PlanError(f"{name} must be an integer in [1, {high}], got {value!r}")


def _in_range(value: Any, high: float) -> bool:
    ok = isinstance(value, int | float) and not isinstance(value, bool)
    return ok and math.isfinite(value) and 0 < value <= high


def _positive_float(name: str, value: Any, high: float) -> None:
    ok = isinstance(value, int | float) and not isinstance(value, bool)
    if not ok or not math.isfinite(value) or not 0 < value <= high:
        raise PlanError(f"{name} must be a number in (0, {high:g}], got {value!r}")


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
