"""What a whole approved plan will spend: noise, sampling rate, steps and epsilon.

Shared by the site runtime (which enforces it), the review (which reports it) and the researcher
(who estimates it before submitting), so all three compute the same numbers.

A job releases two kinds of numbers, and both are charged:

- its model updates: DP-SGD, Poisson rate q over the training rows, ``steps`` noisy steps;
- its validation metrics (unless the plan turns them off): per round, the clipped loss sum
  (sensitivity ``metric_loss_clip``) and, for a classifier, the count of correct predictions
  (sensitivity 1), each with Gaussian noise of ``metric_noise_multiplier`` times its
  sensitivity: a Gaussian mechanism at sample rate 1, one "step" per released sum;
- with ``binary_metrics``, per round one score histogram per class over the validation rows
  (``policies.imbalance``): a swapped row moves one count between bins (L2 sensitivity
  sqrt 2) and every bin gets noise ``metric_noise_multiplier`` times sqrt 2, so it is one more
  Gaussian release at that noise, charged as its own kind, ``scores``.

The validation rows are a uniformly random subset of fixed size, drawn with a key the
researcher does not know. Adding one row to a table can be coupled to a change of at most one
training row and a swap of at most one validation row, so both mechanisms keep their
sensitivity on neighbouring tables, and they compose sequentially in the same accountant.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from policies import skellam
from policies.accounting import Mechanism, epsilon, noise_for_target, skellam_noise_for_target
from policies.errors import PlanError
from policies.plan import (
    JobSpec,
    TrainingPlan,
    bounded_steps,
    metric_queries,
    score_queries,
    training_rows,
)

TRAINING, METRICS, SCORES = "training", "metrics", "scores"


@dataclass(frozen=True)
class PrivacyPlan:
    noise_multiplier: float
    sample_rate: float
    steps_per_round: int
    rounds: int
    epsilon_job: float
    metric_noise_multiplier: float = 0.0
    metric_releases: int = 0  # noised sums over the whole job
    personal_steps: int = 0  # the fine-tuning pass after the last round
    score_releases: int = 0  # noised score histograms over the whole job (binary_metrics)
    # distributed DP: the integer sensitivities of one row (policies.skellam); 0 when local
    l2: float = 0.0
    l1: float = 0.0
    scale: float = 0.0  # gamma: gradients are scaled by it before rounding

    @property
    def mechanism(self) -> Mechanism:
        """The DP-SGD steps of the whole job, the personalization pass included."""
        steps = self.steps_per_round * self.rounds + self.personal_steps
        return Mechanism(self.noise_multiplier, self.sample_rate, steps, self.l2, self.l1)

    @property
    def releases(self) -> list[tuple[str, Mechanism]]:
        """Every mechanism the job runs, by kind: what the ledger charges."""
        out = [(TRAINING, self.mechanism)]
        if self.metric_releases:
            out.append(
                (METRICS, Mechanism(self.metric_noise_multiplier, 1.0, self.metric_releases))
            )
        if self.score_releases:
            out.append((SCORES, Mechanism(self.metric_noise_multiplier, 1.0, self.score_releases)))
        return out


def job_privacy(spec: JobSpec, n_rows: int, min_noise: float = 0.0) -> PrivacyPlan:
    """:func:`privacy_plan` of a whole job: a distributed plan needs the update's size."""
    dimension = sum(math.prod(shape) for shape in spec.trainable.values())
    return privacy_plan(spec.plan, n_rows, min_noise, dimension)


def privacy_plan(
    plan: TrainingPlan, n_rows: int, min_noise: float = 0.0, dimension: int = 0
) -> PrivacyPlan:
    """Noise, sampling rate and steps of the whole approved plan on a table of ``n_rows``.

    ``n_rows`` is the whole table; the training rows are what is left after the validation
    split. With ``target_epsilon``, the training noise is the smallest that keeps training and
    metrics together within the target.
    """
    if plan.dp.distributed:
        return _distributed(plan, dimension, min_noise)
    steps = bounded_steps(training_rows(n_rows, plan), plan)  # before any accountant runs
    q, total = steps.sample_rate, steps.total_steps
    queries = metric_queries(n_rows, plan) * plan.calls  # the fine-tuning pass releases them too
    metrics = [Mechanism(plan.metrics.noise_multiplier, 1.0, queries)] if queries else []
    scores = score_queries(n_rows, plan) * plan.calls
    if scores:
        metrics.append(Mechanism(plan.metrics.noise_multiplier, 1.0, scores))
    if plan.dp.target_epsilon is not None:
        noise = noise_for_target(
            plan.dp.target_epsilon, plan.dp.delta, q, total, plan.dp.accountant, tuple(metrics)
        )
    else:
        noise = float(plan.dp.noise_multiplier or 0.0)
    noise = max(noise, min_noise)
    eps = epsilon([Mechanism(noise, q, total), *metrics], plan.dp.delta, plan.dp.accountant)
    return PrivacyPlan(
        noise,
        q,
        steps.steps_per_round,
        plan.rounds,
        eps,
        plan.metrics.noise_multiplier,
        queries,
        steps.personal_steps,
        scores,
    )


def _distributed(plan: TrainingPlan, dimension: int, min_noise: float) -> PrivacyPlan:
    """One Skellam-noised step per round, at the plan's rate, on every site's whole table.

    The noise multiplier is the *total* over the honest sites, in units of the L2 sensitivity;
    each site adds 1/``honest_sites`` of its variance. Nothing else is released: no metrics.
    """
    if plan.dp.sample_rate is None or dimension < 1:
        raise PlanError(
            'dp "distributed" needs the plan\'s sample_rate (researcher submit fills it in '
            "from the sites' published row counts) and a model with trainable parameters"
        )
    gamma = skellam.scale(plan.dp.max_grad_norm, dimension, plan.batch_size)
    l2, l1 = skellam.sensitivities(plan.dp.max_grad_norm, dimension, gamma)
    q, steps = float(plan.dp.sample_rate), plan.rounds
    if plan.dp.target_epsilon is not None:
        noise = skellam_noise_for_target(plan.dp.target_epsilon, plan.dp.delta, q, steps, l2, l1)
    else:
        noise = float(plan.dp.noise_multiplier or 0.0)
    if noise < min_noise:
        # a site may not raise only its own share: the others add the plan's (red team: the
        # floor was charged as the total while the sum carried less)
        raise PlanError(
            f"the plan's total noise multiplier {noise:.3f} is below this dataset's floor of "
            f"{min_noise}; every site adds a share of the same noise, so raise it in the plan"
        )
    mu = skellam.share((noise * l2) ** 2, plan.honest_sites)
    if mu > skellam.MAX_POISSON_MEAN:
        raise PlanError(
            f"each site's Skellam share would need a Poisson mean of {mu:.3g}, past the "
            f"{skellam.MAX_POISSON_MEAN:.3g} numpy samples exactly; lower the noise or the model"
        )
    eps = epsilon([Mechanism(noise, q, steps, l2, l1)], plan.dp.delta)
    return PrivacyPlan(noise, q, 1, plan.rounds, eps, l2=l2, l1=l1, scale=gamma)
