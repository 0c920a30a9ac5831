"""The budget ledger never lets spend pass the total, under any sequence or race.

The tests taking ``target`` run on both back ends of the site's store: a SQLite file, and a fresh
database in a real throwaway PostgreSQL (``scripts/pg_throwaway``).
"""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from datasites.ledger.audit import AuditLog
from datasites.ledger.budget import DEFAULT_EPSILON, BudgetLedger
from datasites.ledger.store import SiteStore
from policies.accounting import Mechanism, epsilon
from policies.errors import BudgetExceeded


@pytest.fixture(params=["sqlite", "postgresql"])
def target(request, tmp_path: Path) -> Path | str:
    """Where a test's store lives: a SQLite file, or a new PostgreSQL database."""
    if request.param == "sqlite":
        return tmp_path / "site.db"
    return request.getfixturevalue("pg_cluster").new_database()


mechanisms = st.builds(
    Mechanism,
    noise_multiplier=st.floats(0.6, 3.0),
    sample_rate=st.sampled_from([0.01, 0.05, 0.1]),
    steps=st.integers(1, 300),
)


@settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(jobs=st.lists(mechanisms, min_size=1, max_size=6), total=st.floats(0.5, 6.0))
def test_spend_never_passes_total(tmp_path_factory, jobs, total) -> None:
    ledger = BudgetLedger(SiteStore(tmp_path_factory.mktemp("l") / "site.db"), accountant="rdp")
    ledger.set_budget("r@x.org", "d", total, 1e-5)
    accepted = []
    for i, m in enumerate(jobs):
        try:
            ledger.reserve("r@x.org", "d", f"job{i}", m, "rdp")
            accepted.append(m)
        except BudgetExceeded:
            pass
        budget = ledger.budget("r@x.org", "d")
        assert budget.epsilon_spent <= total + 1e-9
    assert budget.epsilon_spent == pytest.approx(epsilon(accepted, 1e-5, "rdp"))


def test_reserve_is_idempotent_per_job_and_default_is_conservative(target: Path | str) -> None:
    ledger = BudgetLedger(SiteStore(target))
    b = ledger.budget("new@x.org", "d")
    assert b.is_default and b.epsilon_total == DEFAULT_EPSILON and b.epsilon_spent == 0
    m = Mechanism(3.0, 0.05, 100)
    first = ledger.reserve("new@x.org", "d", "j1", m, "prv")
    again = ledger.reserve("new@x.org", "d", "j1", m, "prv")
    assert first.id == again.id and ledger.budget("new@x.org", "d").charges == 1


def test_concurrent_reservations_cannot_both_take_the_last_of_a_budget(target: Path | str) -> None:
    store = SiteStore(target)
    m = Mechanism(1.0, 0.05, 200)
    one = epsilon([m], 1e-5, "prv")
    BudgetLedger(store).set_budget("r@x.org", "d", one * 1.2, 1e-5)  # room for one job only
    results: list[str] = []
    barrier = threading.Barrier(4)

    def race(i: int) -> None:
        ledger = BudgetLedger(SiteStore(store.path))
        barrier.wait()
        try:
            ledger.reserve("r@x.org", "d", f"job{i}", m, "prv")
            results.append("ok")
        except BudgetExceeded:
            results.append("refused")

    threads = [threading.Thread(target=race, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(results) == ["ok", "refused", "refused", "refused"]


def test_audit_log_is_append_only_and_chained(target: Path | str, tmp_path: Path) -> None:
    store = SiteStore(target)
    log = AuditLog(store, tmp_path)
    log.record("admin", "approved", "req1", "hash1", reason="fine")
    log.record("runtime", "executed", "req1", "hash1", round=1)
    assert log.verify() and [e["event"] for e in log.entries()] == ["approved", "executed"]
    with store.connect() as conn, pytest.raises(Exception, match="append-only"):
        conn.execute("UPDATE audit SET actor = 'mallory'")
    with store.connect() as conn, pytest.raises(Exception, match="append-only"):
        conn.execute("DELETE FROM audit")


def test_a_public_release_counts_in_every_researchers_budget(target: Path | str) -> None:
    """The mock twin is seen by all: its charge is in each spend, and is listed once."""
    ledger = BudgetLedger(SiteStore(target))
    mock = Mechanism(3.77, 1.0, 1)
    ledger.charge_public("d", "upload:d", "mock", mock)
    ledger.set_budget("a@x.org", "d", 10.0, 1e-5)
    job = Mechanism(1.0, 0.05, 100)
    ledger.reserve("a@x.org", "d", "j1", job, "prv")
    a, b = ledger.budget("a@x.org", "d"), ledger.budget("b@x.org", "d")
    assert b.epsilon_spent == pytest.approx(epsilon([mock], 1e-5))
    assert a.epsilon_spent == pytest.approx(epsilon([mock, job], 1e-5))
    assert a.charges == 1 and b.charges == 0
    assert [r["kind"] for r in a.releases] == ["mock", "training"]
    assert [b.researcher for b in ledger.all()] == ["a@x.org"]
    assert [r["dataset"] for r in ledger.public_releases()] == ["d"]
    assert ledger.budget("a@x.org", "other").epsilon_spent == 0


def test_a_budget_below_the_public_release_refuses_any_job(tmp_path: Path) -> None:
    ledger = BudgetLedger(SiteStore(tmp_path / "site.db"))
    ledger.charge_public("d", "upload:d", "mock", Mechanism(3.77, 1.0, 1))  # epsilon ~1
    ledger.set_budget("a@x.org", "d", 1.05, 1e-5)
    with pytest.raises(BudgetExceeded, match="public mock twin alone spends 0.99"):
        ledger.reserve("a@x.org", "d", "j1", Mechanism(2.0, 0.05, 100), "prv")


def test_a_withdrawn_public_charge_is_gone_and_the_public_is_no_researcher(tmp_path: Path) -> None:
    from policies.errors import PlanError

    ledger = BudgetLedger(SiteStore(tmp_path / "site.db"))
    charge = ledger.charge_public("d", "upload:d", "mock", Mechanism(3.77, 1.0, 1))
    ledger.withdraw_public(charge)
    assert ledger.budget("a@x.org", "d").epsilon_spent == 0 and ledger.public_releases() == []
    with pytest.raises(PlanError):
        ledger.set_budget("*", "d", 5.0, 1e-5)
