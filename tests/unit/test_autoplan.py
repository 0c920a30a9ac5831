"""The auto-plan: sane, deterministic suggestions from public numbers, within the target epsilon
by the project's own accountant (the one every site charges with)."""

from __future__ import annotations

import pytest

from policies import autoplan
from policies.autoplan import SiteNumbers, fill, is_minimal, suggest
from policies.errors import PlanError
from policies.plan import TrainingPlan
from policies.privacy import privacy_plan

SIZES = (66, 480, 5_000, 60_000)


RDP = {"accountant": "rdp"}  # the quick accountant where the check is not about the charge


def sites(*rows: int) -> list[SiteNumbers]:
    return [SiteNumbers(f"site-{i}", r) for i, r in enumerate(rows)]


@pytest.mark.parametrize("rows", [(66, 67), (480, 490)])
def test_the_plan_keeps_the_target_at_every_site_by_the_sites_accountant(rows) -> None:
    auto = suggest(sites(*rows), 3.0)
    plan = auto.plan()
    assert plan.dp.target_epsilon == 3.0 and plan.dp.max_grad_norm == 1.0
    for site in sites(*rows):
        privacy = privacy_plan(plan, site.rows)  # what the site computes when it trains
        assert privacy.epsilon_job <= 3.0 + 1e-9
        assert privacy.epsilon_job == pytest.approx(auto.epsilon[site.name])
        assert privacy.noise_multiplier == pytest.approx(auto.noise_multiplier[site.name])
        # a noise multiplier the target needs, not an idle one: the budget is used
        assert privacy.epsilon_job > 2.9


def test_suggestions_are_deterministic() -> None:
    first = suggest(sites(480, 470, 490), 3.0, RDP)
    again = suggest(sites(480, 470, 490), 3.0, RDP)
    assert first == again


def test_batch_and_learning_rate_grow_with_rows_and_steps_stay_bounded() -> None:
    plans = [suggest(sites(n), 3.0, RDP).plan() for n in SIZES]
    batches = [p.batch_size for p in plans]
    assert batches == sorted(batches) and batches[0] < batches[-1]
    rates = [p.learning_rate for p in plans]
    assert rates == sorted(rates)
    for n, plan in zip(SIZES, plans, strict=True):
        assert plan.batch_size <= n  # never above the table
        steps = plan.rounds * plan.local_epochs * -(-n // plan.batch_size)
        assert steps <= 3 * autoplan.TARGET_STEPS
        assert plan.rounds <= autoplan.MAX_ROUNDS


def test_small_tables_train_on_every_row_large_ones_keep_site_metrics() -> None:
    small, large = suggest(sites(66), 3.0, RDP).plan(), suggest(sites(50_000), 3.0, RDP).plan()
    assert not small.metrics.enabled and small.validation_fraction == 0.0
    assert large.metrics.enabled and large.validation_fraction > 0.0


def test_the_smallest_site_sizes_the_batch() -> None:
    alone = suggest(sites(66), 3.0, RDP).plan().batch_size
    assert suggest(sites(66, 50_000), 3.0, RDP).plan().batch_size == alone


def test_given_fields_are_kept_and_override_replaces_them() -> None:
    given = {"target_epsilon": 3.0, "batch_size": 8, "optimizer": "adam", **RDP}
    kept = fill(given, sites(480)).fields
    assert kept["batch_size"] == 8 and kept["optimizer"] == "adam"
    replaced = fill(given, sites(480), override=True).fields
    assert replaced["batch_size"] != 8 and replaced["optimizer"] == "adam"


def test_only_a_minimal_local_plan_is_filled_by_default() -> None:
    assert is_minimal({"target_epsilon": 3.0})
    assert is_minimal({"target_epsilon": 3.0, "loss": "cross_entropy"})
    assert not is_minimal({"target_epsilon": 3.0, "batch_size": 16})
    assert not is_minimal({"noise_multiplier": 1.0})
    assert not is_minimal({"target_epsilon": 3.0, "aggregation": "secure", "dp": "distributed"})


def test_no_public_rows_or_no_target_is_one_clear_error() -> None:
    with pytest.raises(PlanError, match="row count"):
        suggest([SiteNumbers("a", 0)], 3.0)
    with pytest.raises(PlanError, match="target_epsilon"):
        fill({"noise_multiplier": 1.0}, sites(100))


def test_a_tiny_budget_on_a_tiny_table_gets_fewer_steps_not_a_failure() -> None:
    auto = suggest(sites(20), 0.3, RDP)
    plan = auto.plan()
    assert privacy_plan(plan, 20).epsilon_job <= 0.3 + 1e-9
    assert isinstance(plan, TrainingPlan)
