"""What a whole approved plan will spend: noise, sampling rate, steps and epsilon.

Shared by the site runtime (which enforces it), the review (which reports it) and the researcher
(who estimates it before submitting), so all three compute the same numbers.
"""

from __future__ import annotations

from dataclasses import dataclass

from policies.accounting import Mechanism, epsilon, noise_for_target
from policies.plan import TrainingPlan, sample_rate, steps_per_epoch, total_steps


@dataclass(frozen=True)
class PrivacyPlan:
    noise_multiplier: float
    sample_rate: float
    steps_per_round: int
    rounds: int
    epsilon_job: float

    @property
    def mechanism(self) -> Mechanism:
        return Mechanism(
            self.noise_multiplier, self.sample_rate, self.steps_per_round * self.rounds
        )


def privacy_plan(plan: TrainingPlan, n_train: int, min_noise: float = 0.0) -> PrivacyPlan:
    """Noise, sampling rate and steps of the whole approved plan, and what it will spend."""
    q = sample_rate(n_train, plan.batch_size)
    per_round = plan.local_epochs * steps_per_epoch(n_train, plan.batch_size)
    total = total_steps(n_train, plan)  # bounded before any accountant runs
    if plan.target_epsilon is not None:
        noise = noise_for_target(plan.target_epsilon, plan.delta, q, total, plan.accountant)
    else:
        noise = float(plan.noise_multiplier or 0.0)
    noise = max(noise, min_noise)
    eps = epsilon([Mechanism(noise, q, total)], plan.delta, plan.accountant)
    return PrivacyPlan(noise, q, per_round, plan.rounds, eps)
