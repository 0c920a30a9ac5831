"""Privacy accounting over Opacus' accountants.

A *mechanism* is one run of DP-SGD: (noise_multiplier, sample_rate, steps). The epsilon of a
sequence of mechanisms is computed by composing all of them in one accountant (the same way
Opacus composes the steps of one training run), which is tighter than summing per-job epsilons
and equally sound: both are valid upper bounds for adaptive composition of the mechanisms.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import numpy as np
from opacus.accountants import PRVAccountant, RDPAccountant
from opacus.accountants.registry import register_accountant
from opacus.accountants.utils import get_noise_multiplier
from scipy.optimize import brentq

from policies.accounting_cache import persistent, persistent_floats
from policies.errors import PlanError

# At sample rate 1 (the metrics, the mock) Opacus' PRV takes log(0) and its RDP warns of its alpha
# range: harmless. Filtered for the process too, because catch_warnings is not thread-safe and
# sites are set up from threads.
warnings.filterwarnings("ignore", category=RuntimeWarning, module=r"opacus\.accountants\..*")
warnings.filterwarnings("ignore", message="Optimal order is the largest alpha")


@dataclass(frozen=True)
class Mechanism:
    """One DP-SGD run: noise scale, Poisson sampling rate and number of steps.

    The noise is Gaussian, or, with ``l2`` > 0, Skellam noise of total variance
    (noise_multiplier * l2)^2 on integer updates with L2 and L1 sensitivities ``l2`` and ``l1``
    (distributed DP, ``policies.skellam``).
    """

    noise_multiplier: float
    sample_rate: float
    steps: int
    l2: float = 0.0
    l1: float = 0.0

    @property
    def skellam(self) -> bool:
        return self.l2 > 0

    @classmethod
    def from_listing(cls, shown: Mapping[str, Any]) -> Mechanism:
        """The mechanism behind a release as the ledger lists it (``budget --json``), the
        Skellam sensitivities included: one reading for every consumer of the listing (the
        console rebuilt it without them and charged a Skellam release as a Gaussian one)."""
        return cls(
            float(shown["noise_multiplier"]),
            float(shown["sample_rate"]),
            int(shown["steps"]),
            float(shown.get("l2_sensitivity", 0.0)),
            float(shown.get("l1_sensitivity", 0.0)),
        )


class _RDP(RDPAccountant):  # type: ignore[misc]  # opacus ships no types
    """Opacus' RDP accountant, each (noise, rate)'s Renyi curve computed once per process.

    Why: the curve of the sampled Gaussian at Opacus' 151 orders takes ~0.1 s (its fractional
    orders sum a series in Python), and one PRV epsilon needed it three times: once here for the
    cutoff, twice in Opacus' sizing of the PRV domain. k steps are exactly k times the one-step
    curve (Opacus computes ``curve * steps``), so the answers are Opacus' to the bit
    (``tests/unit/test_accounting.py`` compares them)."""

    def get_privacy_spent(
        self, *, delta: float, alphas: Sequence[float] | None = None
    ) -> tuple[float, float]:
        from opacus.accountants.analysis.rdp import get_privacy_spent

        if not self.history:
            return 0, 0
        orders = tuple(alphas) if alphas is not None else _DEFAULT_ORDERS
        curve = sum([_one_step_rdp(s, q, orders) * steps for s, q, steps in self.history])
        eps, best = get_privacy_spent(orders=list(orders), rdp=curve, delta=delta)
        return float(eps), float(best)


class _PRV(PRVAccountant):  # type: ignore[misc]  # opacus ships no types
    """Opacus' PRV accountant with its discretisation domain sized from :class:`_RDP`'s cached
    curves: ``opacus.accountants.analysis.prv.compute_safe_domain_size``, line for line, with
    the fresh ``RDPAccountant`` it builds per history entry replaced. Same domain, same answer."""

    def _get_domain(
        self,
        prvs: list[Any],
        num_self_compositions: list[int],
        eps_error: float,
        delta_error: float,
    ) -> Any:
        from opacus.accountants.analysis.prv import Domain

        total = sum(num_self_compositions)
        composed = _RDP()
        composed.history = [
            (prv.noise_multiplier, prv.sample_rate, n)
            for prv, n in zip(prvs, num_self_compositions, strict=True)
        ]
        size = composed.get_epsilon(delta_error / 4)
        for prv in prvs:
            one = _RDP()
            one.history = [(prv.noise_multiplier, prv.sample_rate, 1)]
            size = max(size, one.get_epsilon(delta=delta_error / (8 * total)))
        size = max(size, eps_error) + 3
        mesh_size = eps_error / np.sqrt(total * np.log(12 / delta_error) / 2)
        return Domain.create_aligned(-size, size, mesh_size)


# registered with Opacus, so that its own noise search (get_noise_multiplier) runs on them
_REGISTERED = {"prv": "fedsite-prv", "rdp": "fedsite-rdp"}
register_accountant(_REGISTERED["prv"], _PRV, force=True)
register_accountant(_REGISTERED["rdp"], _RDP, force=True)


def _accountant(name: str) -> PRVAccountant | RDPAccountant:
    if name == "prv":
        return _PRV()
    if name == "rdp":
        return _RDP()
    raise PlanError(f"unknown accountant {name!r}; use prv or rdp")


def epsilon(mechanisms: Sequence[Mechanism], delta: float, accountant: str = "prv") -> float:
    """Epsilon at ``delta`` of running every mechanism in turn; inf if any adds no noise."""
    return _epsilon(merged(mechanisms), float(delta), accountant)


def merged(mechanisms: Sequence[Mechanism]) -> tuple[Mechanism, ...]:
    """The same composition with each kind of mechanism once, its steps summed.

    Why: composition does not depend on the order of the runs, and k runs of one mechanism are
    one run of k times its steps, exactly; but Opacus' PRV accountant discretises and convolves
    each history entry on its own (about 50 ms apiece here). A researcher who reruns a plan, as
    most do, grew a history of identical entries, and every review and round of theirs paid for
    each one again: ten reruns took 0.53 s to account, 0.09 s merged, to the same epsilon. The
    merged tuple, sorted, is also the cache key: histories that differ only in order share it."""
    steps: dict[tuple[float, float, float, float], int] = {}
    for m in mechanisms:
        key = (m.noise_multiplier, m.sample_rate, m.l2, m.l1)
        steps[key] = steps.get(key, 0) + m.steps
    return tuple(Mechanism(sigma, q, n, l2, l1) for (sigma, q, l2, l1), n in sorted(steps.items()))


# Above this RDP epsilon the PRV accountant is not run: RDP's bound is returned instead (sound,
# only looser). PRV's discretisation grows with the privacy loss: 200k steps at noise 0.3 took
# 97 s here, while RDP takes 0.03 s; no budget is anywhere near this value.
PRV_CUTOFF_EPSILON = 50.0


@lru_cache(maxsize=1024)
def _epsilon(mechanisms: tuple[Mechanism, ...], delta: float, accountant: str) -> float:
    # at sample rate 1 (metrics, the mock) Opacus warns of log(0) and of its alpha range: harmless
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return _composed(mechanisms, delta, accountant)


@persistent("composed")  # the same compositions recur in every process: kept on disk
def _composed(mechanisms: tuple[Mechanism, ...], delta: float, accountant: str) -> float:
    active = [m for m in mechanisms if m.steps > 0]
    if not active:
        return 0.0
    if any(m.noise_multiplier <= 0 for m in active):
        return math.inf
    if any(m.skellam for m in active):
        return _rdp_composed(active, delta)
    history = [(m.noise_multiplier, m.sample_rate, m.steps) for m in active]
    rdp = _accountant("rdp")
    rdp.history = list(history)
    bound = float(rdp.get_epsilon(delta=delta))
    if accountant == "rdp" or bound > PRV_CUTOFF_EPSILON:
        return bound
    acc = _accountant(accountant)
    acc.history = history
    return float(acc.get_epsilon(delta=delta))


def _rdp_composed(mechanisms: Sequence[Mechanism], delta: float) -> float:
    """Renyi composition when a Skellam run is among them (``policies.skellam``): each Skellam
    run counts as the sampled Gaussian at its effective noise. PRV has no Skellam, so such a
    budget is accounted in RDP throughout (sound, a little looser)."""
    from policies import skellam

    rdp = _accountant("rdp")
    rdp.history = [
        (
            skellam.effective_noise(m.noise_multiplier, m.l2, m.l1)
            if m.skellam
            else m.noise_multiplier,
            m.sample_rate,
            m.steps,
        )
        for m in mechanisms
    ]
    return float(rdp.get_epsilon(delta=delta, alphas=skellam.INTEGER_ORDERS))


def rdp_epsilon(mechanisms: Sequence[Mechanism], delta: float) -> float:
    """Renyi composition of every mechanism, as ``epsilon(..., "rdp")`` computes it, summing a
    cached one-step curve per (noise, rate) instead of recomputing each run's.

    For long histories: a dataset's total over all its researchers (``BudgetLedger``) composes
    every release ever made on it, inside the ledger's write lock. RDP is additive over steps,
    so ``steps`` times the one-step curve is exact, and the answer is a sound upper bound.
    """
    from opacus.accountants.analysis.rdp import get_privacy_spent

    active = [m for m in mechanisms if m.steps > 0]
    if not active:
        return 0.0
    if any(m.noise_multiplier <= 0 for m in active):
        return math.inf
    skellam = any(m.skellam for m in active)
    orders = _INTEGER_ORDERS if skellam else _DEFAULT_ORDERS
    total = sum(m.steps * _one_step_rdp(_rdp_noise(m), m.sample_rate, orders) for m in active)
    eps, _ = get_privacy_spent(orders=list(orders), rdp=total, delta=float(delta))
    return float(eps)


_DEFAULT_ORDERS = tuple(RDPAccountant.DEFAULT_ALPHAS)
_INTEGER_ORDERS = tuple(range(2, 257))  # policies.skellam.INTEGER_ORDERS


def _rdp_noise(m: Mechanism) -> float:
    """The Gaussian noise a run counts as in RDP (a Skellam run: its effective noise)."""
    if not m.skellam:
        return m.noise_multiplier
    from policies import skellam

    return skellam.effective_noise(m.noise_multiplier, m.l2, m.l1)


@lru_cache(maxsize=4096)
def _one_step_rdp(
    noise: float, q: float, orders: tuple[float, ...]
) -> np.ndarray[Any, np.dtype[np.float64]]:
    curve = _one_step_rdp_kept(noise, q, orders)
    if len(curve) != len(orders):  # not a curve of these orders: never trusted
        curve = _one_step_rdp_computed(noise, q, orders)
    return np.asarray(curve, dtype=np.float64)


# A run's processes (the researcher's plan, the admin's review, the site's charge) ask for the
# same curves: in the suite 647 of 1,292 curve computations (0.07 s each) repeated one made in
# another process. Kept as exact floats: the curve read back is the computed one to the bit.
@persistent_floats("one_step_rdp")
def _one_step_rdp_kept(noise: float, q: float, orders: tuple[float, ...]) -> tuple[float, ...]:
    return _one_step_rdp_computed(noise, q, orders)


def _one_step_rdp_computed(noise: float, q: float, orders: tuple[float, ...]) -> tuple[float, ...]:
    from opacus.accountants.analysis.rdp import compute_rdp

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        curve = compute_rdp(q=q, noise_multiplier=noise, steps=1, orders=list(orders))
    return tuple(float(v) for v in np.asarray(curve, dtype=np.float64))


def skellam_noise_for_target(
    target: float, delta: float, q: float, steps: int, l2: float, l1: float
) -> float:
    """The smallest total noise multiplier whose Skellam run keeps ``target``."""

    def eps(sigma: float) -> float:
        return epsilon([Mechanism(sigma, q, steps, l2, l1)], delta)

    return _smallest_noise(
        eps, target, 0.0, 1.0, f"at delta {delta} over {steps} distributed steps"
    )


@lru_cache(maxsize=256)
@persistent("noise_for_target")
def noise_for_target(
    target_epsilon: float,
    delta: float,
    sample_rate: float,
    steps: int,
    accountant: str = "prv",
    alongside: tuple[Mechanism, ...] = (),
) -> float:
    """The smallest noise multiplier that keeps one run within ``target_epsilon``.

    ``alongside``: mechanisms of fixed noise run in the same job (the site metrics); the target
    then covers their composition with the run.
    """
    if alongside:
        return _noise_with(target_epsilon, delta, sample_rate, steps, accountant, alongside)
    try:
        with warnings.catch_warnings():  # Opacus warns at sample rate 1: harmless
            warnings.simplefilter("ignore")
            return float(
                get_noise_multiplier(
                    target_epsilon=target_epsilon,
                    target_delta=delta,
                    sample_rate=sample_rate,
                    steps=steps,
                    accountant=_REGISTERED.get(accountant, accountant),
                    epsilon_tolerance=0.005,
                )
            )
    except ValueError as exc:  # Opacus: "The privacy budget is too low."
        raise PlanError(
            f"no noise multiplier reaches epsilon {target_epsilon} at delta {delta} "
            f"over {steps} steps: {exc}"
        ) from exc


MAX_SEARCH_NOISE = 1000.0
EPSILON_TOLERANCE = (
    0.005  # as Opacus' get_noise_multiplier: the answer spends at least target - this
)


def _noise_with(
    target: float,
    delta: float,
    q: float,
    steps: int,
    accountant: str,
    alongside: tuple[Mechanism, ...],
) -> float:
    """The smallest sigma whose composed epsilon keeps ``target`` (a root search over PRV,
    bracketed by RDP's answer, which is sound and looser)."""
    fixed = epsilon(alongside, delta, accountant)
    if fixed >= target:
        raise PlanError(
            f"the site metrics alone spend epsilon {fixed:.3f} of the target {target}; "
            "raise metric_noise_multiplier, or set site_metrics to false"
        )

    def eps(sigma: float) -> float:
        return epsilon([Mechanism(sigma, q, steps), *alongside], delta, accountant)

    low, high = 0.0, 10.0
    if accountant != "rdp":  # RDP's bound is above PRV's: its answer brackets PRV's from above
        try:
            high = _noise_with(target, delta, q, steps, "rdp", alongside)
            low = high / 2 if eps(high / 2) > target else 0.0
        except PlanError:  # RDP is too loose for this target; PRV may still reach it
            pass
    return _smallest_noise(
        eps, target, low, high, f"at delta {delta} over {steps} steps beside the site metrics"
    )


def _smallest_noise(
    eps: Callable[[float], float], target: float, low: float, high: float, what: str
) -> float:
    """The smallest sigma with ``eps(sigma) <= target``, within EPSILON_TOLERANCE: double
    ``high`` until it keeps the target, then Brent's method between a ``low`` above it."""
    while eps(high) > target:
        low, high = high, 2 * high
        if high > MAX_SEARCH_NOISE:
            raise PlanError(
                f"no noise multiplier up to {MAX_SEARCH_NOISE:g} reaches epsilon {target} {what}"
            )
    if target - eps(high) <= EPSILON_TOLERANCE:
        return high
    while low == 0.0 or eps(low) <= target:  # Brent needs a finite epsilon above the target
        low = high / 2 if low == 0.0 else low / 2
        if eps(low) <= target:
            high = low
    # epsilon falls smoothly with sigma: Brent's method needs ~6 PRV evaluations where the
    # bisection took ~12 (3 s a plan); the answer is then nudged up until it keeps the target
    sigma = float(brentq(lambda s: eps(s) - target, low, high, xtol=1e-6, rtol=1e-5))
    while eps(sigma) > target:
        sigma *= 1.0001
    return min(sigma, high)
