"""Epsilon against an independent reference: Google's dp-accounting, computed in the test."""

from __future__ import annotations

import dp_accounting
import pytest
from opacus.accountants.rdp import RDPAccountant

from policies.accounting import Mechanism, epsilon, noise_for_target, rdp_epsilon

CASES = [(0.01, 1.0, 1000), (0.125, 1.64, 24), (0.05, 0.8, 300), (0.004, 1.2, 5000)]
DELTA = 1e-5


def reference(q: float, sigma: float, steps: int, kind: str) -> float:
    event = dp_accounting.SelfComposedDpEvent(
        dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma)), steps
    )
    if kind == "rdp":
        acc = dp_accounting.rdp.RdpAccountant(orders=RDPAccountant.DEFAULT_ALPHAS)
    else:
        acc = dp_accounting.pld.PLDAccountant(value_discretization_interval=1e-4)
    return acc.compose(event).get_epsilon(DELTA)


@pytest.mark.parametrize(("q", "sigma", "steps"), CASES)
@pytest.mark.parametrize("kind", ["rdp", "prv"])
def test_epsilon_matches_dp_accounting_within_1_percent(q, sigma, steps, kind) -> None:
    ours = epsilon([Mechanism(sigma, q, steps)], DELTA, kind)
    ref = reference(q, sigma, steps, kind)
    assert ours == pytest.approx(ref, rel=0.01)


def test_composition_of_history_equals_one_longer_run() -> None:
    m = Mechanism(1.1, 0.02, 200)
    two = epsilon([m, m], DELTA, "rdp")
    assert two == pytest.approx(epsilon([Mechanism(1.1, 0.02, 400)], DELTA, "rdp"), rel=1e-9)
    assert two < 2 * epsilon([m], DELTA, "rdp")  # tighter than the sum, which is also sound


def test_no_noise_is_infinite_epsilon() -> None:
    assert epsilon([Mechanism(0.0, 0.1, 10)], DELTA) == float("inf")


@pytest.mark.parametrize("kind", ["rdp", "prv"])
def test_noise_for_target_reaches_the_target(kind) -> None:
    sigma = noise_for_target(2.0, DELTA, 0.05, 400, kind)
    assert epsilon([Mechanism(sigma, 0.05, 400)], DELTA, kind) <= 2.0
    assert epsilon([Mechanism(sigma * 0.97, 0.05, 400)], DELTA, kind) > 2.0 * 0.99


def test_rdp_epsilon_is_the_rdp_composition_of_any_history() -> None:
    """The dataset cap's fast composition (cached one-step curves) answers as the accountant."""
    history = [
        Mechanism(1.1, 0.05, 120),
        Mechanism(3.77, 1.0, 1),  # the mock
        Mechanism(5.0, 1.0, 6),  # metrics
        Mechanism(1.1, 0.05, 80),  # the same mechanism again: its steps add
        Mechanism(1.4, 0.05, 10, l2=3.0, l1=9.0),  # a Skellam run: integer orders for all
    ]
    for k in range(len(history) + 1):
        assert rdp_epsilon(history[:k], 1e-5) == pytest.approx(
            epsilon(history[:k], 1e-5, "rdp"), rel=1e-9
        )
    assert rdp_epsilon([Mechanism(0.0, 0.05, 1)], 1e-5) == float("inf")


def test_a_listed_release_reads_back_as_its_mechanism_skellam_included() -> None:
    """The console rebuilt mechanisms from the ledger's listing without l2/l1, so a Skellam
    (distributed DP) release was charged in its plot as a Gaussian one."""
    from policies.accounting import Mechanism

    skellam = {
        "type": "poisson-subsampled skellam",
        "noise_multiplier": 2.0,
        "sample_rate": 0.1,
        "steps": 40,
        "l2_sensitivity": 512.0,
        "l1_sensitivity": 9000.0,
    }
    assert Mechanism.from_listing(skellam) == Mechanism(2.0, 0.1, 40, 512.0, 9000.0)
    gaussian = {"type": "gaussian", "noise_multiplier": 1.5, "sample_rate": 1.0, "steps": 1}
    assert Mechanism.from_listing(gaussian) == Mechanism(1.5, 1.0, 1)


@pytest.mark.filterwarnings("ignore:divide by zero:RuntimeWarning")  # q = 1: log(0), harmless
def test_a_history_of_repeated_runs_is_accounted_as_opacus_composes_it_unmerged() -> None:
    """``merged``: k runs of one mechanism are one run of k times its steps, in any order. The
    epsilon of a rerun plan's history is checked against Opacus' PRV accountant composing
    every entry on its own (the route before merging), and against the same history shuffled."""
    from opacus.accountants import PRVAccountant

    from policies.accounting import merged

    mock, job, other = Mechanism(4.8, 1.0, 1), Mechanism(3.0, 0.11, 18), Mechanism(1.2, 0.5, 4)
    history = [mock, job, other, job, job, other, job]
    assert merged(history) == (Mechanism(1.2, 0.5, 8), Mechanism(3.0, 0.11, 72), mock)
    unmerged = PRVAccountant()
    unmerged.history = [(m.noise_multiplier, m.sample_rate, m.steps) for m in history]
    direct = float(unmerged.get_epsilon(delta=1e-5))
    assert epsilon(history, 1e-5) == pytest.approx(direct, rel=1e-3)
    assert epsilon(history[::-1], 1e-5) == epsilon(history, 1e-5)


HISTORIES = [
    [(1.0, 0.1, 100)],
    [(0.8, 0.05, 500), (2.0, 1.0, 3)],  # a run and its site metrics (sample rate 1)
    [(3.0, 0.02, 40), (1.1, 0.3, 7), (0.7, 0.01, 900)],
]


@pytest.mark.parametrize("history", HISTORIES)
def test_the_cached_curve_accountants_answer_as_opacus_to_the_bit(history) -> None:
    """``_PRV``/``_RDP`` reuse one Renyi curve per (noise, rate) where Opacus recomputes it:
    the same floats must come out, or the speed-up changed what a site charges."""
    from opacus.accountants import PRVAccountant

    from policies.accounting import _PRV, _RDP, _one_step_rdp

    for theirs, ours in ((PRVAccountant(), _PRV()), (RDPAccountant(), _RDP())):
        _one_step_rdp.cache_clear()
        theirs.history, ours.history = list(history), list(history)
        assert ours.get_epsilon(delta=DELTA) == theirs.get_epsilon(delta=DELTA)


@pytest.mark.parametrize(("target", "q", "steps"), [(3.0, 0.05, 200), (1.0, 0.2, 30)])
def test_the_noise_search_answers_as_opacus_to_the_bit(target, q, steps) -> None:
    from opacus.accountants.utils import get_noise_multiplier

    from policies import accounting

    search = accounting.noise_for_target.__wrapped__.__wrapped__  # past both caches
    theirs = get_noise_multiplier(
        target_epsilon=target,
        target_delta=DELTA,
        sample_rate=q,
        steps=steps,
        accountant="prv",
        epsilon_tolerance=0.005,
    )
    assert search(target, DELTA, q, steps) == theirs
