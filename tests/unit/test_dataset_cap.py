"""The per-dataset cap: every release on a dataset, over all researchers and the public mock,
composes within it, however many researchers each hold a budget of their own.

The race tests run on SQLite and on a real throwaway PostgreSQL (``scripts/pg_throwaway``).
"""

from __future__ import annotations

import json
import multiprocessing
import threading
from pathlib import Path

import pytest

from datasites.ledger.budget import BudgetLedger
from datasites.ledger.store import SiteStore
from policies.accounting import Mechanism, epsilon, rdp_epsilon
from policies.errors import BudgetExceeded, PlanError
from tests.conftest import last_json, run_cli

MOCK = Mechanism(3.77, 1.0, 1)  # the public mock twin, epsilon ~1 at 1e-5
JOB = Mechanism(1.2, 0.02, 100)  # epsilon ~0.95 alone
TRAINING_AND_METRICS = [("training", JOB), ("metrics", Mechanism(5.0, 1.0, 4))]
UNIT = tuple(m for _, m in TRAINING_AND_METRICS)


@pytest.fixture(params=["sqlite", "postgresql"])
def target(request, tmp_path: Path) -> Path | str:
    if request.param == "sqlite":
        return tmp_path / "site.db"
    return request.getfixturevalue("pg_cluster").new_database()


def _ledger(
    target: Path | str, cap_jobs: float, unit: tuple[Mechanism, ...] = (JOB,)
) -> BudgetLedger:
    """The mock charged, two researchers with budgets of 10 each, and a cap with room for
    ``cap_jobs`` jobs (each releasing ``unit``) beside the mock."""
    ledger = BudgetLedger(SiteStore(target))
    ledger.charge_public("d", "upload:d", "mock", MOCK)
    for who in ("ada@uni.edu", "bob@uni.edu"):
        ledger.set_budget(who, "d", 10.0, 1e-5)
    whole = int(cap_jobs)
    room = rdp_epsilon([MOCK, *unit * whole], 1e-5)
    if cap_jobs > whole:  # half way to the next job
        room = (room + rdp_epsilon([MOCK, *unit * (whole + 1)], 1e-5)) / 2
    ledger.set_cap("d", room)
    return ledger


def test_ten_budgets_do_not_add_up_past_the_cap(tmp_path: Path) -> None:
    """Ten researchers with epsilon 3 each on the same rows: the cap holds the total."""
    ledger = BudgetLedger(SiteStore(tmp_path / "site.db"))
    ledger.charge_public("d", "upload:d", "mock", MOCK)
    ledger.set_cap("d", 2.5)
    taken = [MOCK]
    for i in range(10):
        who = f"r{i}@uni.edu"
        ledger.set_budget(who, "d", 3.0, 1e-5)
        try:
            ledger.reserve(who, "d", f"job{i}", JOB, "prv")
            taken.append(JOB)
        except BudgetExceeded as exc:
            assert "past the dataset's cap of 2.500" in str(exc) and "remaining" in str(exc)
        total = ledger.total("d")
        assert total.epsilon_spent <= 2.5 + 1e-9
        assert total.epsilon_spent == pytest.approx(rdp_epsilon(taken, 1e-5))
    assert 2 <= len(taken) - 1 < 10  # some fitted each budget, the cap stopped the rest
    assert ledger.total("d").researchers == len(taken) - 1


def test_a_refused_job_names_what_is_left_and_writes_nothing(tmp_path: Path) -> None:
    ledger = _ledger(tmp_path / "site.db", 1.5, UNIT)
    ledger.reserve("ada@uni.edu", "d", "a1", TRAINING_AND_METRICS, "prv")
    before = ledger.total("d")
    with pytest.raises(BudgetExceeded) as refused:
        ledger.reserve("bob@uni.edu", "d", "b1", TRAINING_AND_METRICS, "prv")
    message = str(refused.value)
    assert f"({before.remaining:.3f} remaining)" in message and "every researcher" in message
    assert ledger.budget("bob@uni.edu", "d").charges == 0  # his own budget had room
    assert ledger.total("d") == before
    assert ledger.budget("bob@uni.edu", "d").epsilon_spent < 10.0


def test_would_fit_is_the_arithmetic_reserve_uses_and_writes_nothing(tmp_path: Path) -> None:
    """Composition with the history, not a sum of epsilons: the same numbers as the charge."""
    ledger = _ledger(tmp_path / "site.db", 2.5, UNIT)
    fitted = []
    for i, who in enumerate(["ada@uni.edu", "bob@uni.edu", "ada@uni.edu"]):
        fit = ledger.would_fit(who, "d", TRAINING_AND_METRICS, "prv", f"j{i}")
        fitted.append(fit.fits)
        assert ledger.would_fit(who, "d", TRAINING_AND_METRICS, "prv") == fit  # read-only
        history = [r["mechanism"] for r in ledger.budget(who, "d").releases]
        assert fit.epsilon_after < fit.budget.epsilon_spent + fit.epsilon_job  # not a sum
        expected = rdp_epsilon([MOCK, *UNIT * (i + 1)], 1e-5)
        assert fit.total_after == pytest.approx(expected)
        if fit.fits:
            charge = ledger.reserve(who, "d", f"j{i}", TRAINING_AND_METRICS, "prv")
            assert charge.epsilon_spent_after == pytest.approx(fit.epsilon_after)
            assert ledger.total("d").epsilon_spent == pytest.approx(fit.total_after)
            assert len(ledger.budget(who, "d").releases) == len(history) + 2
            again = ledger.would_fit(who, "d", TRAINING_AND_METRICS, "prv", f"j{i}")
            assert again.charged and again.fits and "already charged" in again.summary()
        else:
            assert i == 2 and not fit.fits_cap and fit.fits_budget
            assert fit.refusal() is not None and "cap" in fit.refusal()
            with pytest.raises(BudgetExceeded, match="cap"):
                ledger.reserve(who, "d", f"j{i}", TRAINING_AND_METRICS, "prv")
    assert fitted == [True, True, False]  # room for 2.5 jobs: the third does not fit


def test_a_cap_below_the_spend_refuses_every_job_and_bad_caps_are_refused(tmp_path: Path) -> None:
    ledger = BudgetLedger(SiteStore(tmp_path / "site.db"))
    ledger.charge_public("d", "upload:d", "mock", MOCK)
    ledger.set_cap("d", 0.5)  # below the mock alone
    assert ledger.total("d").remaining == 0.0
    with pytest.raises(BudgetExceeded, match=r"cap of 0\.500 \(0\.000 remaining\)"):
        ledger.reserve("ada@uni.edu", "d", "j", Mechanism(50.0, 0.01, 1), "prv")
    for bad in (0.0, -1.0, float("inf"), float("nan")):
        with pytest.raises(PlanError):
            ledger.set_cap("d", bad)
    assert ledger.total("d").epsilon_cap == 0.5
    assert ledger.total("other").epsilon_cap is None and ledger.total("other").epsilon_spent == 0


def test_two_researchers_racing_for_the_last_of_the_cap(target: Path | str) -> None:
    """Threads, each with its own connection: exactly one wins, the cap is never passed."""
    ledger = _ledger(target, 1.5)
    results: dict[str, str] = {}
    barrier = threading.Barrier(2)

    def race(who: str) -> None:
        mine = BudgetLedger(SiteStore(target))
        barrier.wait()
        try:
            mine.reserve(who, "d", f"job-{who}", JOB, "prv")
            results[who] = "won"
        except BudgetExceeded as exc:
            results[who] = str(exc)

    threads = [threading.Thread(target=race, args=(w,)) for w in ("ada@uni.edu", "bob@uni.edu")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(results.values()).count("won") == 1, results
    [lost] = [r for r in results.values() if r != "won"]
    assert "past the dataset's cap" in lost and "remaining" in lost
    total = ledger.total("d")
    assert total.epsilon_spent <= total.epsilon_cap + 1e-9
    assert total.epsilon_spent == pytest.approx(rdp_epsilon([MOCK, JOB], 1e-5))


def _process_race(db: str, who: str, barrier, results) -> None:  # noqa: ANN001
    ledger = BudgetLedger(SiteStore(Path(db)))
    barrier.wait()
    try:
        ledger.reserve(who, "d", f"job-{who}", JOB, "prv")
        results.put((who, "won"))
    except BudgetExceeded as exc:
        results.put((who, str(exc)))


def test_two_processes_racing_for_the_last_of_the_cap(tmp_path: Path) -> None:
    """As the server and a second server process would: separate processes, one SQLite file."""
    db = tmp_path / "site.db"
    ledger = _ledger(db, 1.5)
    ctx = multiprocessing.get_context("fork")
    barrier, results = ctx.Barrier(2), ctx.Queue()
    procs = [
        ctx.Process(target=_process_race, args=(str(db), w, barrier, results))
        for w in ("ada@uni.edu", "bob@uni.edu")
    ]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
    outcome = dict(results.get(timeout=5) for _ in procs)
    assert list(outcome.values()).count("won") == 1, outcome
    assert ledger.total("d").epsilon_spent <= ledger.total("d").epsilon_cap + 1e-9
    assert sum(ledger.budget(w, "d").charges for w in outcome) == 1


def test_datasite_policy_set_caps_and_budget_shows_the_total(tmp_path: Path) -> None:
    from datasites.serving.config import SiteDir, init_site

    init_site(tmp_path / "s", "s", port=1)
    site = SiteDir(tmp_path / "s")
    site.save_dataset_meta("d", {"dataset": "d", "target": "y"})
    d = str(site.root)
    ledger = BudgetLedger(SiteStore(site.db_path))
    ledger.charge_public("d", "upload:d", "mock", MOCK)
    ledger.set_budget("ada@uni.edu", "d", 10.0, 1e-5)
    ledger.reserve("ada@uni.edu", "d", "a1", JOB, "prv")

    for bad in (["--max-total-epsilon", "inf"], ["--max-total-delta", "1e-6"]):
        proc = run_cli("datasite", "policy", "set", "--dir", d, "--dataset", "d", *bad, check=False)
        assert proc.returncode == 1 and len(proc.stderr.strip().splitlines()) == 1
        assert ledger.total("d").epsilon_cap is None and not site.policies_path.exists()
    proc = run_cli(
        "datasite", "policy", "set", "--dir", d, "--dataset", "d", "--max-total-epsilon", "6"
    )
    assert "capped at 6" in proc.stdout and "left" in proc.stdout
    assert ledger.total("d").epsilon_cap == 6.0
    shown = json.loads(
        run_cli("datasite", "policy", "show", "--dir", d, "--json").stdout.splitlines()[-1]
    )
    assert shown["d"]["max_total_epsilon"] == 6.0

    [row] = last_json(run_cli("datasite", "budget", "--dir", d, "--json"))
    spent = rdp_epsilon([MOCK, JOB], 1e-5)
    assert row["researcher"] == "ada@uni.edu" and row["epsilon_spent"] == pytest.approx(
        epsilon([MOCK, JOB], 1e-5)
    )
    assert row["dataset_total"]["epsilon_spent"] == pytest.approx(spent)
    assert row["dataset_total"]["epsilon_cap"] == 6.0
    assert row["dataset_total"]["epsilon_remaining"] == pytest.approx(6.0 - spent)
    text = run_cli("datasite", "budget", "--dir", d).stdout
    assert f"{spent:.3f}" in text and "6.000" in text and "dataset total" in text
