"""Site metrics are noised sums, charged beside training: the attack, the accounting, the ledger.

The reference accountant is Google's dp-accounting, composed in the test.
"""

from __future__ import annotations

import dp_accounting
import numpy as np
import pytest
import torch
from opacus.accountants.rdp import RDPAccountant
from torch import nn

from datasites.ledger.budget import BudgetLedger
from datasites.ledger.store import SiteStore
from policies.accounting import epsilon
from policies.engine.dp_sgd import private_metrics, secure_scalar_gaussian
from policies.plan import TrainingPlan
from policies.privacy import METRICS, TRAINING, privacy_plan

DELTA = 1e-5


def _encoder() -> nn.Module:
    """out = x0, so with target 0 and mse each row's loss is x0**2: a private value, exactly."""
    model = nn.Linear(1, 1)
    with torch.no_grad():
        model.weight.fill_(1.0)
        model.bias.zero_()
    return model


def _decoder_error(plan: TrainingPlan, trials: int = 400) -> tuple[float, float]:
    """RMSE of the best (posterior-mean) decoder of a private value in [0, clip] from one
    released val_loss, and the RMSE of guessing the middle of the range without looking."""
    rng = np.random.default_rng(0)
    clip, n = plan.metrics.loss_clip, 20
    grid = np.linspace(0.0, clip, 401)
    std = plan.metrics.noise_multiplier * clip
    errors, blind = [], []
    for _ in range(trials):
        value = rng.uniform(0.0, clip)
        x = np.zeros((n, 1), np.float32)
        x[0, 0] = np.sqrt(value)  # row 0's loss is the value; every other row's is 0
        released = private_metrics(_encoder(), x, np.zeros(n), plan, secure_scalar_gaussian)
        observed = released["val_loss"] * n  # the sum, clamped to [0, n * clip]
        # posterior mean over a uniform prior; the clamp only loses information
        likelihood = np.exp(-0.5 * ((observed - grid) / std) ** 2)
        guess = float((grid * likelihood).sum() / likelihood.sum())
        errors.append(guess - value)
        blind.append(clip / 2 - value)
    return float(np.sqrt(np.mean(np.square(errors)))), float(np.sqrt(np.mean(np.square(blind))))


def test_a_loss_built_to_encode_a_private_value_does_not_recover_it() -> None:
    plan = TrainingPlan.of(noise_multiplier=1.0, loss="mse")  # the default metric noise, 20
    best, blind = _decoder_error(plan)
    assert best > 0.95 * blind  # the release tells the decoder next to nothing
    # the same attack with almost no noise recovers the value: the test can fail
    leaky = TrainingPlan.of(noise_multiplier=1.0, loss="mse", metric_noise_multiplier=0.001)
    best_leaky, _ = _decoder_error(leaky, trials=50)
    assert best_leaky < 0.05 * blind


def test_released_metrics_are_clipped_noised_and_in_range() -> None:
    plan = TrainingPlan.of(noise_multiplier=1.0, metric_noise_multiplier=1.0)
    model = nn.Linear(3, 2)
    x = np.random.default_rng(1).normal(size=(50, 3)).astype(np.float32)
    x[0] = np.inf  # a non-finite loss counts as the clip, and nothing turns NaN
    y = np.arange(50) % 2
    draws = [private_metrics(model, x, y, plan, secure_scalar_gaussian) for _ in range(30)]
    for d in draws:
        assert set(d) == {"val_loss", "val_accuracy"}
        assert 0.0 <= d["val_accuracy"] <= 1.0 and 0.0 <= d["val_loss"] <= plan.metrics.loss_clip
    assert len({d["val_loss"] for d in draws}) == 30  # fresh noise each release
    off = TrainingPlan.of(noise_multiplier=1.0, site_metrics=False)
    assert private_metrics(model, x, y, off, secure_scalar_gaussian) == {}


def _reference(plan: TrainingPlan, n_rows: int, kind: str) -> float:
    p = privacy_plan(plan, n_rows)
    (_, train), (_, metrics) = p.releases
    event = dp_accounting.ComposedDpEvent(
        [
            dp_accounting.SelfComposedDpEvent(
                dp_accounting.PoissonSampledDpEvent(
                    train.sample_rate, dp_accounting.GaussianDpEvent(train.noise_multiplier)
                ),
                train.steps,
            ),
            dp_accounting.SelfComposedDpEvent(
                dp_accounting.GaussianDpEvent(metrics.noise_multiplier), metrics.steps
            ),
        ]
    )
    if kind == "rdp":
        acc = dp_accounting.rdp.RdpAccountant(orders=RDPAccountant.DEFAULT_ALPHAS)
    else:
        acc = dp_accounting.pld.PLDAccountant(value_discretization_interval=1e-4)
    return acc.compose(event).get_epsilon(DELTA)


@pytest.mark.parametrize("kind", ["rdp", "prv"])
def test_a_job_epsilon_covers_training_and_metrics_as_an_independent_accountant_says(kind) -> None:
    plan = TrainingPlan.of(noise_multiplier=1.1, rounds=5, batch_size=32, accountant=kind)
    p = privacy_plan(plan, 569)
    assert [k for k, _ in p.releases] == [TRAINING, METRICS]
    assert p.metric_releases == 2 * 5  # loss sum and correct count, each round
    assert p.epsilon_job == pytest.approx(_reference(plan, 569, kind), rel=0.01)
    without = privacy_plan(TrainingPlan.of(**{**plan.to_dict(), "site_metrics": False}), 569)
    assert [k for k, _ in without.releases] == [TRAINING]
    assert without.epsilon_job < p.epsilon_job


def test_a_target_epsilon_covers_the_metrics_too() -> None:
    plan = TrainingPlan.of(target_epsilon=3.0, rounds=5, batch_size=16, local_epochs=2)
    p = privacy_plan(plan, 190)
    assert 2.99 <= p.epsilon_job <= 3.0
    alone = privacy_plan(TrainingPlan.of(**{**plan.to_dict(), "site_metrics": False}), 190)
    assert p.noise_multiplier > alone.noise_multiplier  # the metrics take part of the budget


def test_the_ledger_lists_every_release_and_composes_them(tmp_path) -> None:
    ledger = BudgetLedger(SiteStore(tmp_path / "site.db"))
    ledger.set_budget("ada@uni.edu", "cancer", 10.0, DELTA)
    plan = TrainingPlan.of(noise_multiplier=1.1, rounds=5, batch_size=32)
    p = privacy_plan(plan, 569)
    charge = ledger.reserve("ada@uni.edu", "cancer", "job1", p.releases, "prv")
    again = ledger.reserve("ada@uni.edu", "cancer", "job1", p.releases, "prv")
    assert again.id == charge.id  # one charge per job, whatever the round
    budget = ledger.budget("ada@uni.edu", "cancer").to_dict()
    kinds = [(r["kind"], r["job"], r["mechanism"]["steps"]) for r in budget["releases"]]
    assert kinds == [(TRAINING, "job1", p.mechanism.steps), (METRICS, "job1", 10)]
    assert budget["charges"] == 1
    assert budget["epsilon_spent"] == pytest.approx(_reference(plan, 569, "prv"), rel=0.01)
    assert budget["epsilon_spent"] == pytest.approx(
        epsilon([m for _, m in p.releases], DELTA, "prv"), rel=1e-9
    )
    ledger.commit(charge.id)
    statuses = {r["status"] for r in ledger.releases("ada@uni.edu", "cancer")}
    assert statuses == {"committed"}
