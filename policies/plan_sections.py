"""The typed sections of a training plan: its modes as enums, its fields, and their checks.

A job file writes its plan as one flat dict (the wire format, ``TrainingPlan.to_dict``); the
code reads it in sections (``plan.dp``, ``plan.aggregation``, ``plan.algorithm``,
``plan.imbalance``, ``plan.metrics``), each a frozen dataclass that checks its own fields when
it is built. A field's flat name is its name here unless its ``metadata["wire"]`` says
otherwise (``plan.dp.mode`` travels as ``"dp"``). A rule that reads another part of the plan
(the loss, the learning rate, another section) is the section's ``check_in(plan)``, which
``TrainingPlan`` runs once every section is built: the checks of a section stay with it.

An algorithm that needs plan fields adds a section here (or fields to the one it belongs to)
and names it in ``TrainingPlan``; the flat dict, the round trip and the generated plan
reference follow from the field definitions.
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar

from policies.errors import PlanError

if TYPE_CHECKING:
    from policies.plan import TrainingPlan

MAX_UPDATE_BOUND = 1e4
MAX_PROXIMAL_MU = 100.0
MAX_LAYER_NAMES = 64
MAX_PEERS = 64
MAX_EPOCHS = 100
MAX_GRAD_NORM = 100.0
MIN_GRAD_NORM = 1e-4
MAX_NOISE = 1000.0
MAX_EPSILON = 100.0
MAX_LOSS_CLIP = 1e4
MAX_CLASS_WEIGHT = 1e3  # a weight past it would make one row's loss dwarf the clipping bound's use
MAX_WEIGHTED_CLASSES = 1024
BALANCED = "balanced"


class Loss(enum.StrEnum):
    CROSS_ENTROPY = "cross_entropy"
    MSE = "mse"
    BCE_WITH_LOGITS = "bce_with_logits"

    @property
    def classifier(self) -> bool:
        return self is not Loss.MSE


CLASSIFIERS = (Loss.CROSS_ENTROPY, Loss.BCE_WITH_LOGITS)


class Optimizer(enum.StrEnum):
    SGD = "sgd"
    ADAM = "adam"


class Accountant(enum.StrEnum):
    PRV = "prv"
    RDP = "rdp"


class DPMode(enum.StrEnum):
    LOCAL = "local"
    DISTRIBUTED = "distributed"


class AggregationMode(enum.StrEnum):
    PLAIN = "plain"
    SECURE = "secure"


class Compression(enum.StrEnum):
    NONE = "none"
    INT8 = "int8"
    TOPK = "topk"


E = TypeVar("E", bound=enum.StrEnum)


def member(kind: type[E], name: str, value: Any) -> E:
    """``value`` as a member of ``kind``; one PlanError naming the allowed values if it is none."""
    try:
        return kind(value)
    except (ValueError, TypeError):
        allowed = ", ".join(m.value for m in kind)
        raise PlanError(f"{name} must be one of {allowed}; got {value!r}") from None


def wire(name: str, default: Any) -> Any:
    """A section field whose flat (job file) name differs from its name in the section."""
    return field(default=default, metadata={"wire": name})


def _set(obj: object, name: str, value: object) -> None:
    object.__setattr__(obj, name, value)  # normalising a frozen dataclass's field on creation


@dataclass(frozen=True)
class DPSection:
    """Differential privacy of the updates: how much noise, on which clipped gradients, and
    whether each site noises its own update (``local``) or the sites share one noise
    (``distributed``). Give exactly one of ``noise_multiplier`` or ``target_epsilon``."""

    mode: DPMode = wire("dp", DPMode.LOCAL)
    noise_multiplier: float | None = None
    target_epsilon: float | None = None
    delta: float = 1e-5
    max_grad_norm: float = 1.0
    accountant: Accountant = Accountant.PRV
    # Distributed DP (policies.skellam): a round is one DP-SGD step over the union of the
    # sites: each samples its rows at ``sample_rate``, adds a Skellam share, masks; the shares
    # of the honest sites add up to the plan's noise. ``min_sites``: fewest survivors a round
    # is unmasked with (0: every peer); ``colluding_sites``: how many sites may pool their
    # noise and still leave enough.
    sample_rate: float | None = None
    min_sites: int = 0
    colluding_sites: int = 0

    def __post_init__(self) -> None:
        _set(self, "mode", member(DPMode, "dp", self.mode))
        _set(self, "accountant", member(Accountant, "accountant", self.accountant))
        positive_float("max_grad_norm", self.max_grad_norm, MAX_GRAD_NORM)
        if self.max_grad_norm < MIN_GRAD_NORM:  # below it, the clip's 1e-6 stabiliser rules
            raise PlanError(f"max_grad_norm must be at least {MIN_GRAD_NORM:g}")
        if not _is_number(self.delta) or not 0.0 < self.delta < 1.0:
            raise PlanError(f"delta must be in (0, 1), got {self.delta!r}")
        if self.noise_multiplier is not None:
            positive_float("noise_multiplier", self.noise_multiplier, MAX_NOISE)
        if self.target_epsilon is not None:
            positive_float("target_epsilon", self.target_epsilon, MAX_EPSILON)
        if (self.noise_multiplier is None) == (self.target_epsilon is None):
            raise PlanError("give exactly one of noise_multiplier or target_epsilon")
        self._check_distributed_fields()

    def _check_distributed_fields(self) -> None:
        if not self.distributed:
            if self.sample_rate is not None or self.min_sites or self.colluding_sites:
                raise PlanError(
                    'sample_rate, min_sites and colluding_sites are for dp "distributed"'
                )
            return
        if self.sample_rate is not None:
            positive_float("sample_rate", self.sample_rate, 1.0)
        if not _is_int(self.min_sites) or not 0 <= self.min_sites <= MAX_PEERS:
            raise PlanError(f"min_sites must be an integer in [0, {MAX_PEERS}]")
        if not _is_int(self.colluding_sites) or self.colluding_sites < 0:
            raise PlanError("colluding_sites must be a non-negative integer")

    @property
    def distributed(self) -> bool:
        return self.mode is DPMode.DISTRIBUTED

    def check_in(self, plan: TrainingPlan) -> None:
        """Distributed DP: secure aggregation among the peers, and one plain step per round."""
        if not self.distributed:
            return
        if not plan.aggregation.secure:
            raise PlanError('dp "distributed" needs aggregation "secure": the noise is shared')
        peers = len(plan.aggregation.peers)
        if peers and self.min_sites > peers:
            raise PlanError(f"min_sites is {self.min_sites}, more than the {peers} peers")
        if peers and plan.honest_sites < 1:
            raise PlanError(
                f"colluding_sites ({self.colluding_sites}) must be below min_sites "
                f"({plan.survivors_needed}): some honest site's noise must remain"
            )
        for name, value, allowed in (
            ("site_metrics", plan.metrics.enabled, False),
            ("local_epochs", plan.local_epochs, 1),
            ("personalize_epochs", plan.algorithm.personalize_epochs, 0),
        ):
            if value != allowed:
                raise PlanError(
                    f'dp "distributed" needs {name} = {allowed!r}: a round is one noisy step '
                    "summed over the sites, and only that sum leaves them"
                )
        imbalance = plan.imbalance.class_weight or plan.imbalance.pos_weight
        if plan.algorithm.proximal_mu or plan.algorithm.frozen or imbalance:
            raise PlanError(
                'dp "distributed" takes one plain gradient step per round: no proximal_mu, '
                "frozen layers or class weights"
            )


@dataclass(frozen=True)
class AggregationSection:
    """How the updates travel back and are summed. With ``secure`` (policies.secagg) the
    researcher sees only the sum of masked updates: ``peers`` are the datasites allowed in a
    round, by identity-key fingerprint (the admin approves this list), and each site clips its
    update to ``update_norm_bound`` in L2 norm."""

    mode: AggregationMode = wire("aggregation", AggregationMode.PLAIN)
    peers: tuple[str, ...] = ()
    update_norm_bound: float = 10.0
    # How the update travels back: float32 weights, int8 per tensor, or top-k with error feedback
    compression: Compression = Compression.NONE
    topk_fraction: float = 0.1

    def __post_init__(self) -> None:
        _set(self, "mode", member(AggregationMode, "aggregation", self.mode))
        _set(self, "compression", member(Compression, "compression", self.compression))
        _set(self, "peers", _tuple(self.peers))
        if not _is_number(self.topk_fraction) or not 0.0 < self.topk_fraction <= 1.0:
            raise PlanError(f"topk_fraction must be in (0, 1], got {self.topk_fraction!r}")
        positive_float("update_norm_bound", self.update_norm_bound, MAX_UPDATE_BOUND)
        self._check_peers()
        if self.secure and self.compression is not Compression.NONE:
            raise PlanError(
                'secure aggregation sums fixed-point updates; compression must be "none" '
                "(int8 would be quantized twice, top-k needs one index set for all sites)"
            )

    def _check_peers(self) -> None:
        peers = self.peers
        if not isinstance(peers, tuple) or len(peers) > MAX_PEERS:
            raise PlanError(f"peers must be a list of at most {MAX_PEERS} datasite fingerprints")
        hexdigits = set("0123456789abcdef")
        if not all(isinstance(p, str) and len(p) == 64 and set(p) <= hexdigits for p in peers):
            raise PlanError("peers must be SHA-256 fingerprints: 64 lowercase hex characters")
        if not self.secure and peers:
            raise PlanError('peers are for aggregation "secure"')
        if self.secure and (len(set(peers)) != len(peers) or len(peers) == 1):
            # none yet is allowed: the researcher package fills in the federation's sites
            raise PlanError("secure aggregation needs at least 2 distinct peers")

    @property
    def secure(self) -> bool:
        return self.mode is AggregationMode.SECURE

    def check_in(self, plan: TrainingPlan) -> None:
        """Nothing outside the section constrains it (distributed DP checks its side)."""


@dataclass(frozen=True)
class AlgorithmSection:
    """What each site does beyond plain DP-SGD (FedAvg): FedProx's proximal pull ``proximal_mu``
    (mu/2 ||w - w_global||^2, added to the step after clipping and noise), layers kept frozen
    for transfer learning, and a personalization pass after the last round."""

    proximal_mu: float = 0.0
    # Transfer learning: layers ("0", "2") or parameters ("2.bias") not trained and not returned
    frozen: tuple[str, ...] = ()
    # Personalization: after the last round, fine-tune these layers at each site; kept there
    personalize_layers: tuple[str, ...] = ()
    personalize_epochs: int = 0

    def __post_init__(self) -> None:
        _set(self, "frozen", _tuple(self.frozen))
        _set(self, "personalize_layers", _tuple(self.personalize_layers))
        if self.proximal_mu != 0.0:
            positive_float("proximal_mu", self.proximal_mu, MAX_PROXIMAL_MU)
        for name in ("frozen", "personalize_layers"):
            value = getattr(self, name)
            if not isinstance(value, tuple) or len(value) > MAX_LAYER_NAMES:
                raise PlanError(f"{name} must be a list of at most {MAX_LAYER_NAMES} layer names")
            if not all(isinstance(v, str) and 0 < len(v) <= 64 for v in value):
                raise PlanError(f'{name} must hold layer names such as "0" or "2.weight"')
        if self.personalize_epochs != 0 or self.personalize_layers:
            positive_int("personalize_epochs", self.personalize_epochs, MAX_EPOCHS)
            if not self.personalize_layers:
                raise PlanError("personalize_epochs needs personalize_layers (the layers to tune)")

    @property
    def personalizes(self) -> bool:
        return bool(self.personalize_layers)

    def check_in(self, plan: TrainingPlan) -> None:
        """The proximal pull must not overshoot: each step multiplies w - w_global by
        (1 - lr*mu); at 2 and above it diverges (red team: whether it overflows then depends on
        the rows), above 1 it overshoots."""
        if self.proximal_mu and plan.learning_rate * self.proximal_mu >= 1.0:
            raise PlanError(
                f"learning_rate x proximal_mu is {plan.learning_rate * self.proximal_mu:g}; "
                "it must be below 1, or the proximal pull overshoots the global weights"
            )


@dataclass(frozen=True)
class ImbalanceSection:
    """Imbalanced labels (policies.imbalance): a per-class loss weight, "balanced" (resolved at
    the site from its published DP class counts, never from the private labels) or one number
    per class; ``pos_weight`` is bce_with_logits' weight of the positive term."""

    class_weight: str | tuple[float, ...] | None = None
    pos_weight: str | float | None = None

    def __post_init__(self) -> None:
        if isinstance(self.class_weight, list):
            _set(self, "class_weight", tuple(self.class_weight))
        weight = self.class_weight
        if weight is not None and weight != BALANCED:
            ok = isinstance(weight, tuple) and 2 <= len(weight) <= MAX_WEIGHTED_CLASSES
            if not ok or not all(_in_range(w, MAX_CLASS_WEIGHT) for w in weight):
                raise PlanError(
                    f'class_weight must be "balanced" or a list of 2 to {MAX_WEIGHTED_CLASSES} '
                    f"numbers in (0, {MAX_CLASS_WEIGHT:g}], got {weight!r}"
                )
        pos = self.pos_weight
        if pos is not None and pos != BALANCED and not _in_range(pos, MAX_CLASS_WEIGHT):
            raise PlanError(
                f'pos_weight must be "balanced" or a number in (0, {MAX_CLASS_WEIGHT:g}], '
                f"got {pos!r}"
            )

    @property
    def balanced(self) -> bool:
        """A weight the site resolves from its published class counts before training."""
        return BALANCED in (self.class_weight, self.pos_weight)

    def check_in(self, plan: TrainingPlan) -> None:
        """The weights must fit the loss: a classifier's, and pos_weight only for BCE."""
        weight, loss = self.class_weight, plan.loss
        if weight is not None and not loss.classifier:
            raise PlanError(f"class_weight needs a classifier loss, not {loss}")
        bce = loss is Loss.BCE_WITH_LOGITS
        if bce and isinstance(weight, tuple) and len(weight) != 2:
            raise PlanError("class_weight for bce_with_logits takes 2 numbers (class 0, 1)")
        if self.pos_weight is not None:
            if not bce:
                raise PlanError("pos_weight is for loss bce_with_logits")
            if weight is not None:
                raise PlanError("give class_weight or pos_weight, not both")


@dataclass(frozen=True)
class MetricsSection:
    """Validation metrics a site releases each round, as Gaussian-noised sums
    (policies.privacy): the clipped loss sum and, for a classifier, the count of correct
    predictions."""

    enabled: bool = wire("site_metrics", True)
    noise_multiplier: float = wire("metric_noise_multiplier", 20.0)
    loss_clip: float = wire("metric_loss_clip", 5.0)
    # Each round, a noised score histogram of the validation rows per class, from which the
    # site releases recall, precision, ROC-AUC, PR-AUC and balanced accuracy (binary models)
    binary: bool = wire("binary_metrics", False)

    def __post_init__(self) -> None:
        for name, value in (("site_metrics", self.enabled), ("binary_metrics", self.binary)):
            if not isinstance(value, bool):
                raise PlanError(f"{name} must be true or false, got {value!r}")
        positive_float("metric_noise_multiplier", self.noise_multiplier, MAX_NOISE)
        positive_float("metric_loss_clip", self.loss_clip, MAX_LOSS_CLIP)

    def check_in(self, plan: TrainingPlan) -> None:
        """Binary metrics are site metrics of a classifier (the model's width: ``JobSpec``)."""
        if self.binary and (not self.enabled or not plan.loss.classifier):
            raise PlanError("binary_metrics needs site_metrics and a classifier loss")


def _tuple(value: Any) -> Any:
    """A list from a job file as the tuple a frozen plan holds; anything else as it is."""
    return tuple(value) if isinstance(value, list | tuple) else value


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def positive_int(name: str, value: Any, high: int) -> None:
    """PlanError unless ``value`` is an integer in [1, high]."""
    if not _is_int(value) or not 1 <= value <= high:
        raise PlanError(f"{name} must be an integer in [1, {high}], got {value!r}")


def positive_float(name: str, value: Any, high: float) -> None:
    """PlanError unless ``value`` is a finite number in (0, high]."""
    if not _is_number(value) or not math.isfinite(value) or not 0 < value <= high:
        raise PlanError(f"{name} must be a number in (0, {high:g}], got {value!r}")


def _in_range(value: Any, high: float) -> bool:
    return _is_number(value) and math.isfinite(value) and 0 < value <= high
