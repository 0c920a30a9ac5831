"""The review checks the budget: a job that cannot fit fails its report, naming what is left,
with the arithmetic the ledger charges by (``BudgetLedger.would_fit``), not a sum of epsilons.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from torch import nn

from datasites.ledger.budget import BudgetLedger
from datasites.ledger.store import SiteStore
from datasites.review.access import DatasetPolicy
from datasites.review.queue import UNOVERRIDABLE, _budget_of, _privacy_of
from datasites.review.report import Submission, build_report
from policies.accounting import Mechanism
from policies.errors import BudgetExceeded
from policies.privacy import job_privacy
from researcher.job import make_job, render

MODEL = nn.Sequential(nn.Linear(30, 8), nn.ReLU(), nn.Linear(8, 2))
POLICY = DatasetPolicy(allowed_domains=["uni.edu"], max_epsilon_per_job=10.0)
MOCK = Mechanism(3.77, 1.0, 1)  # the public mock twin: epsilon ~1 of every budget
ROWS = 500


def _job(rounds: int = 3):  # noqa: ANN202
    plan = {"rounds": rounds, "noise_multiplier": 1.0}
    return make_job(MODEL, "cancer", "target", plan, n_features=30, n_outputs=2)


def _report(ledger: BudgetLedger, spec, researcher: str = "ada@uni.edu"):  # noqa: ANN001, ANN202
    sub = Submission(
        render(spec), researcher, "cancer", ROWS, ("data", "weights"), n_features=30, n_classes=2
    )
    report = build_report(
        sub, POLICY, set(), None, budget_of=_budget_of(ledger.store, _privacy_of(POLICY))
    )
    return report, {c.name: c for c in report.checks}["budget"]


def _reserve(ledger: BudgetLedger, spec, researcher: str = "ada@uni.edu"):  # noqa: ANN001, ANN202
    """What the runtime charges at round 1 (datasites.training.site_job)."""
    releases = job_privacy(spec, ROWS, POLICY.min_noise_multiplier).releases
    return ledger.reserve(researcher, "cancer", spec.job_id, releases, spec.plan.dp.accountant)


@pytest.fixture
def ledger(tmp_path: Path) -> BudgetLedger:
    ledger = BudgetLedger(SiteStore(tmp_path / "site.db"))
    ledger.charge_public("cancer", "upload:cancer", "mock", MOCK)
    return ledger


def test_a_job_that_fits_shows_its_epsilon_beside_what_is_left(ledger: BudgetLedger) -> None:
    ledger.set_budget("ada@uni.edu", "cancer", 30.0, 1e-5)
    spec = _job()
    report, check = _report(ledger, spec)
    assert report.passed and check.passed, report.to_dict()
    fit = ledger.would_fit(
        "ada@uni.edu", "cancer", job_privacy(spec, ROWS, 0.5).releases, "prv", spec.job_id
    )
    assert f"epsilon {fit.epsilon_job:.3f} for this job" in check.reason
    assert f"{fit.epsilon_after:.3f} of 30.000" in check.reason
    assert "the public mock's" in check.reason and "no cap on the dataset's total" in check.reason
    charge = _reserve(ledger, spec)  # and the runtime agrees, to the digit
    assert charge.epsilon_spent_after == pytest.approx(fit.epsilon_after)


def test_a_job_past_the_budget_fails_the_report_naming_what_is_left(ledger: BudgetLedger) -> None:
    """Issue 26: a job needing more passed review with 0.219 left, and was refused at round 1;
    the public mock had already spent part of every budget, and nothing said so."""
    ledger.set_budget("ada@uni.edu", "cancer", 1.5, 1e-5)
    spec = _job(rounds=10)
    report, check = _report(ledger, spec)
    assert not report.passed and not check.passed
    with pytest.raises(BudgetExceeded) as refused:
        _reserve(ledger, spec)
    assert str(refused.value) in check.reason  # the runtime's own words, before approval
    assert "remaining" in check.reason and "public mock twin alone spends 0.99" in check.reason
    assert "override only if the budget or cap is raised first" in check.reason
    assert "budget" not in UNOVERRIDABLE  # a raised budget lets it fit; the reason says so
    ledger.set_budget("ada@uni.edu", "cancer", 30.0, 1e-5)
    assert _report(ledger, spec)[1].passed


def test_the_report_shows_the_cap_and_fails_a_job_that_would_pass_it(
    ledger: BudgetLedger,
) -> None:
    for who in ("ada@uni.edu", "bob@uni.edu"):
        ledger.set_budget(who, "cancer", 30.0, 1e-5)
    first = _job()
    fit = ledger.would_fit("ada@uni.edu", "cancer", job_privacy(first, ROWS, 0.5).releases)
    ledger.set_cap("cancer", fit.total.epsilon_spent + 0.01)  # below the mock and one job
    _, check = _report(ledger, first)
    assert not check.passed and "past the dataset's cap" in check.reason
    ledger.set_cap("cancer", 100.0)
    _, check = _report(ledger, first)
    assert check.passed and "of its cap 100.000" in check.reason
    _reserve(ledger, first)
    # Bob's own budget is untouched, but Ada's job took most of the dataset's cap
    spent = ledger.total("cancer").epsilon_spent
    ledger.set_cap("cancer", spent + 0.05)
    second = _job()
    _, check = _report(ledger, second, "bob@uni.edu")
    with pytest.raises(BudgetExceeded) as refused:
        _reserve(ledger, second, "bob@uni.edu")
    assert not check.passed and str(refused.value) in check.reason
    assert "(0.050 remaining)" in check.reason
