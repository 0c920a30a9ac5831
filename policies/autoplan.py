"""A DP-SGD plan from public numbers: what ``researcher plan`` and ``submit --auto-plan`` suggest.

Why it exists: Opacus and Flower leave DP tuning to the user, and a new user's first plan (small
batches, many epochs, the library's default learning rate) trains to the majority class. The
inputs are what every site already publishes (its DP row count, feature and class counts) and the
target epsilon, so a suggestion costs no budget and can be made before anything is submitted.

The rules follow published practice for DP-SGD (De et al. 2022, "Unlocking high-accuracy
differentially private image classification through scale"; Ponomareva et al. 2023, "How to
DP-fy ML"; the Opacus tutorials):

* clip at 1 and keep it there: the learning rate, not the clip, sets the step size;
* large batches: at a fixed number of steps and epsilon, the noise of the averaged gradient
  (sigma * clip / batch) falls as the batch grows, until sigma is large enough that privacy
  amplification by sampling is in its linear regime;
* few steps in all, a fixed budget of them (``TARGET_STEPS``): epsilon grows with the steps,
  and small tables need passes, not more noise;
* a learning rate that grows with the batch (the linear scaling rule), capped;
* no per-round validation metrics on tables too small for them: a noised count over a few
  dozen rows is noise, and it spends budget; those rows train instead.

Everything here is deterministic arithmetic plus the project's own accountant
(``policies.privacy``), so the plan's epsilon at the suggested settings is the one every site
will charge. Fields the researcher gave are kept; only missing ones are filled.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from policies.errors import PlanError
from policies.plan import TrainingPlan, step_plan, training_rows
from policies.utility import expected_batch

# The fields the auto-plan fills; every other plan field keeps TrainingPlan's default.
TUNED = (
    "rounds",
    "local_epochs",
    "batch_size",
    "learning_rate",
    "momentum",
    "max_grad_norm",
    "site_metrics",
    "validation_fraction",
)
CLIP = 1.0
TARGET_STEPS = 120  # DP-SGD steps per site over the whole job
MAX_ROUNDS = 20  # each round is a call to every site: a network round trip and a review of n
MAX_TOTAL_EPOCHS = 60
MIN_BATCH = 16
BATCH_PER_SQRT_ROW = 8  # expected batch ~ 8 sqrt(n): 53 rows -> all, 480 -> 128, 10k -> 1024
BASE_LR = 0.5  # SGD on the mean clipped gradient at batch REF_BATCH
REF_BATCH = 64
MAX_LR = 4.0
MOMENTUM = 0.0
METRICS_ROWS = 2000  # below this many rows, validation metrics at noise 20 are mostly noise
METRICS_FRACTION = 0.1
GIVEN = "given in the job file"
MAX_NOISE_TO_SIGNAL = 1.0  # sigma * clip / batch above it: the step is mostly noise


@dataclass(frozen=True)
class SiteNumbers:
    """One site's public numbers for a dataset: its DP row count and class counts."""

    name: str
    rows: int
    class_counts: tuple[float, ...] | None = None

    @classmethod
    def from_meta(cls, name: str, meta: Mapping[str, Any]) -> SiteNumbers:
        counts = meta.get("class_counts")
        return cls(name, int(meta.get("rows") or 0), tuple(counts) if counts else None)


def site_numbers(metas: Mapping[str, Mapping[str, Any]]) -> list[SiteNumbers]:
    """Each site's public numbers from its published metadata, by site name."""
    return [SiteNumbers.from_meta(name, meta) for name, meta in metas.items()]


@dataclass(frozen=True)
class AutoPlan:
    """The suggested plan fields, why each, and what the plan costs and does at every site."""

    fields: dict[str, Any]
    reasons: dict[str, str]
    noise_multiplier: dict[str, float] = field(default_factory=dict)
    epsilon: dict[str, float] = field(default_factory=dict)
    noise_to_signal: dict[str, float] = field(default_factory=dict)

    def plan(self) -> TrainingPlan:
        return TrainingPlan.from_dict(self.fields)

    def to_dict(self) -> dict[str, Any]:
        return {
            "plan": dict(self.fields),
            "reasons": dict(self.reasons),
            "noise_multiplier": dict(self.noise_multiplier),
            "epsilon": dict(self.epsilon),
            "noise_to_signal": dict(self.noise_to_signal),
        }


def suggest(
    sites: Sequence[SiteNumbers],
    target_epsilon: float,
    given: Mapping[str, Any] | None = None,
) -> AutoPlan:
    """The plan for ``sites`` at ``target_epsilon`` per site, keeping the fields in ``given``.

    PlanError when no site publishes a row count, or when the given fields make a plan that
    cannot reach the target at any noise.
    """
    given = dict(given or {})
    rows = [s.rows for s in sites if s.rows > 0]
    if not rows:
        raise PlanError("no site publishes a row count for this dataset; nothing to plan from")
    given.setdefault("target_epsilon", float(target_epsilon))
    given.pop("noise_multiplier", None)
    fields, reasons = _choose(min(rows), given)
    auto = AutoPlan(fields, reasons)
    return _with_privacy(auto, sites)


def _choose(smallest: int, given: dict[str, Any]) -> tuple[dict[str, Any], dict[str, str]]:
    """Fill the missing tuned fields, each from the smallest site's published rows."""
    fields, reasons = dict(given), {}

    def put(name: str, value: Any, why: str) -> None:
        if name in given:
            reasons[name] = GIVEN
        else:
            fields[name] = value
            reasons[name] = why

    metrics = smallest >= METRICS_ROWS
    put(
        "site_metrics",
        metrics,
        "on: enough validation rows for a noised accuracy to mean something"
        if metrics
        else f"off: under {METRICS_ROWS} rows, a noised validation count is noise and costs "
        "budget; use researcher train --test",
    )
    fraction = METRICS_FRACTION if fields["site_metrics"] else 0.0
    put(
        "validation_fraction",
        fraction,
        "held out for the site metrics" if fraction else "every row trains (no site metrics)",
    )
    n_train = max(1, training_rows(smallest, _probe(fields)))
    batch = min(n_train, max(MIN_BATCH, _pow2(BATCH_PER_SQRT_ROW * math.sqrt(n_train))))
    put(
        "batch_size",
        batch,
        f"~{BATCH_PER_SQRT_ROW} sqrt(rows) of the smallest site's {n_train} training rows: "
        "large batches keep sigma*clip/batch small",
    )
    batch = int(fields["batch_size"])
    per_epoch = step_plan(n_train, _probe(fields)).steps_per_epoch
    epochs_total = max(1, min(MAX_TOTAL_EPOCHS, round(TARGET_STEPS / per_epoch)))
    rounds = min(MAX_ROUNDS, epochs_total)
    put("rounds", rounds, f"~{TARGET_STEPS} DP-SGD steps in all, at most {MAX_ROUNDS} rounds")
    local = max(1, round(epochs_total / int(fields["rounds"])))
    put(
        "local_epochs",
        local,
        f"{per_epoch} step(s) per epoch; {int(fields['rounds']) * local * per_epoch} steps in all",
    )
    put("max_grad_norm", CLIP, "clip at 1 (De et al. 2022): the learning rate sets the step")
    lr = min(MAX_LR, BASE_LR * batch / REF_BATCH) if batch >= REF_BATCH else BASE_LR
    put("learning_rate", round(lr, 4), f"{BASE_LR} at batch {REF_BATCH}, scaled with the batch")
    put("momentum", MOMENTUM, "plain SGD on the mean clipped gradient")
    return fields, reasons


def _probe(fields: dict[str, Any]) -> TrainingPlan:
    """A throwaway plan to read the validation split and the steps per epoch off, with the
    fields chosen so far."""
    keep = {
        k: fields[k] for k in ("validation_fraction", "target_epsilon", "batch_size") if k in fields
    }
    return TrainingPlan.from_dict(keep)


def _pow2(value: float) -> int:
    return int(2 ** round(math.log2(max(value, 1.0))))


def _with_privacy(auto: AutoPlan, sites: Sequence[SiteNumbers]) -> AutoPlan:
    """The noise and epsilon each site will compute for the plan; fewer epochs if needed."""
    from policies.privacy import privacy_plan

    fields = dict(auto.fields)
    while True:
        try:
            plan = TrainingPlan.from_dict(fields)
            privacy = {s.name: privacy_plan(plan, s.rows) for s in sites if s.rows > 0}
            break
        except PlanError:
            # too many steps for the target on a tiny table: halve the passes, then give up
            shrinkable = [
                k
                for k in ("local_epochs", "rounds")
                if auto.reasons.get(k) != GIVEN and int(fields.get(k, 1)) > 1
            ]
            if not shrinkable:
                raise
            fields[shrinkable[0]] = int(fields[shrinkable[0]]) // 2
    ratio = {
        name: p.noise_multiplier * plan.dp.max_grad_norm / expected_batch(s.rows, plan)
        for (name, p), s in zip(privacy.items(), [s for s in sites if s.rows > 0], strict=True)
    }
    return replace(
        auto,
        fields=fields,
        noise_multiplier={k: p.noise_multiplier for k, p in privacy.items()},
        epsilon={k: p.epsilon_job for k, p in privacy.items()},
        noise_to_signal=ratio,
    )


def fill(
    plan_fields: Mapping[str, Any], sites: Sequence[SiteNumbers], override: bool = False
) -> AutoPlan:
    """A job file's PLAN with its missing tuned fields filled (``override``: all of them).

    Only a local-DP plan with a ``target_epsilon`` is filled: a distributed-DP plan has its
    own shape, and a fixed noise multiplier says the researcher tuned by hand.
    """
    given = dict(plan_fields)
    target = given.get("target_epsilon")
    if target is None:
        raise PlanError("the auto-plan needs target_epsilon in the plan")
    if given.get("dp", "local") != "local":
        raise PlanError('the auto-plan is for dp "local" plans; tune a distributed plan by hand')
    if override:
        given = {k: v for k, v in given.items() if k not in TUNED}
    return suggest(sites, float(target), given)


HAND_TUNED = ("rounds", "local_epochs", "batch_size", "learning_rate")


def is_minimal(plan_fields: Mapping[str, Any]) -> bool:
    """A plan the auto-plan fills by default: a local-DP ``target_epsilon`` and none of the
    hand-tuned training fields (rounds, local_epochs, batch_size, learning_rate). A plan that
    names any of them was tuned by hand, and keeps TrainingPlan's defaults for the rest."""
    return (
        plan_fields.get("target_epsilon") is not None
        and plan_fields.get("dp", "local") == "local"
        and not any(k in plan_fields for k in HAND_TUNED)
    )


def default_model(n_features: int, n_outputs: int) -> list[dict[str, Any]]:
    """The model a job file without one gets: logistic (softmax) regression.

    On small tables under DP, a linear model is the strong baseline: it has the fewest
    parameters for the noise to land on, and it is convex, so a noisy step cannot strand it.
    """
    return [{"type": "Linear", "in_features": n_features, "out_features": n_outputs}]
