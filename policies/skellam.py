"""Distributed DP with the Skellam mechanism: fixed point, sensitivities and Renyi accounting.

In distributed-DP mode (plan ``dp = "distributed"``) a round is one DP-SGD step over the union
of the sites. Each site Poisson-samples its rows at the plan's rate q, clips each per-sample
gradient to L2 norm C, scales it by gamma and rounds it to integers, sums them, adds its share of
Skellam noise and masks the result (``policies.secagg``). The researcher's unmasked sum is then
one central DP-SGD step whose noise is the sum of the honest sites' shares.

Why Skellam (Agarwal, Kairouz and Liu, "The Skellam Mechanism for Differentially Private
Federated Learning", NeurIPS 2021): it is integer-valued, so it survives the modular arithmetic
of secure aggregation, and it is closed under summation: Sk(mu_1) + Sk(mu_2) = Sk(mu_1 + mu_2),
so the honest sites' shares add up to exactly the Skellam variance the accounting assumes (the
distributed discrete Gaussian of Kairouz et al. 2021 is only approximately closed).

Sensitivity. Each per-sample gradient g (||g||_2 <= C) becomes round(gamma * g), rounded
coordinate by coordinate (down or up at random, unbiased). Each coordinate moves by less than 1,
so ||round(gamma g)||_2 <= gamma C + sqrt(d) and ||.||_1 <= sqrt(d) gamma C + d: deterministic
bounds, no conditional rounding needed. Rounding each row (not the sum) keeps one row's
contribution within them whatever the other rows are.

Accounting (Renyi DP, integer orders):

* the multi-dimensional Skellam mechanism with Poisson parameter mu per coordinate (variance
  2 mu) and sensitivities D2, D1 is (alpha, eps(alpha))-RDP with (Agarwal et al. 2021, Thm 3.5)
  ``eps(alpha) = alpha D2^2 / (4 mu) + min(((2 alpha - 1) D2^2 + 6 D1) / (16 mu^2), 3 D1 / (4 mu))``;
  with the total variance written as (sigma D2)^2 the first term is the Gaussian's alpha/(2 sigma^2);
* Poisson subsampling at rate q: the general upper bound of Zhu and Wang ("Poisson Subsampled
  Renyi Differential Privacy", ICML 2019, Thm 6), which holds for any mechanism and both
  directions of the add/remove relation;
* T steps compose by adding the RDP curves; the conversion to (epsilon, delta) is Opacus' (the
  bound of Balle et al. 2020 / Canonne, Kamath and Steinke 2020).

``tests/unit/test_skellam.py`` checks these bounds against Renyi divergences computed directly
from the Skellam distribution's probabilities (scipy), an independent route.
"""

from __future__ import annotations

import math
from functools import lru_cache

import numpy as np
from scipy.special import gammaln, logsumexp

# integer orders: the subsampling bound needs them
ORDERS = tuple(range(2, 65)) + (80, 96, 128, 192, 256)
MODULUS_HALF = 1 << 31
# the rounding's sqrt(d) is at most 1/RESOLUTION of gamma C, so it adds under 1% to D2
RESOLUTION = 128
# the expected global batch's sum times this headroom stays below 2^31: no wrap in practice
HEADROOM = 8


def scale(clip: float, dimension: int, batch: int) -> float:
    """gamma: gradients are multiplied by this before rounding, the same at every site.

    Large enough that rounding barely adds to the sensitivity (gamma C = RESOLUTION sqrt(d)),
    small enough that a whole expected batch of the largest gradients, with headroom, does not
    wrap modulo 2^32. Wrapping would cost utility only: privacy holds modulo anything.
    """
    fine = RESOLUTION * math.sqrt(dimension) / clip
    safe = MODULUS_HALF / (HEADROOM * max(1, batch) * clip)
    return min(fine, safe)


def sensitivities(clip: float, dimension: int, gamma: float) -> tuple[float, float]:
    """(L2, L1) bounds of one row's rounded, scaled gradient: see the module's docstring."""
    l2 = gamma * clip + math.sqrt(dimension)
    l1 = min(math.sqrt(dimension) * gamma * clip + dimension, math.sqrt(dimension) * l2)
    return l2, l1


def skellam_rdp(alpha: float, sigma: float, l2: float, l1: float) -> float:
    """RDP of one Skellam release whose total variance is (sigma * l2)^2 (Agarwal et al.)."""
    mu = (sigma * l2) ** 2 / 2.0  # Poisson parameter of Sk(mu, mu): variance 2 mu
    main = alpha * l2**2 / (4.0 * mu)
    extra = min(((2.0 * alpha - 1.0) * l2**2 + 6.0 * l1) / (16.0 * mu**2), 3.0 * l1 / (4.0 * mu))
    return main + extra


def _log_comb(n: int, k: int) -> float:
    return float(gammaln(n + 1) - gammaln(k + 1) - gammaln(n - k + 1))


def subsampled_rdp(alpha: int, q: float, rdp_of) -> float:  # noqa: ANN001
    """Zhu and Wang's general bound for Poisson subsampling at rate q, integer alpha >= 2."""
    if q >= 1.0:
        return rdp_of(alpha)
    if q <= 0.0:
        return 0.0
    terms = [(alpha - 1) * math.log1p(-q) + math.log(alpha * q - q + 1)]
    terms.append(_log_comb(alpha, 2) + 2 * math.log(q) + (alpha - 2) * math.log1p(-q) + rdp_of(2))
    for j in range(3, alpha + 1):
        terms.append(
            math.log(3.0)
            + _log_comb(alpha, j)
            + j * math.log(q)
            + (alpha - j) * math.log1p(-q)
            + (j - 1) * rdp_of(j)
        )
    return float(logsumexp(terms)) / (alpha - 1)


@lru_cache(maxsize=512)
def rdp_curve(sigma: float, q: float, steps: int, l2: float, l1: float) -> tuple[float, ...]:
    """RDP at ``ORDERS`` of ``steps`` Poisson-subsampled Skellam releases."""
    if sigma <= 0:
        return tuple(math.inf for _ in ORDERS)

    def one(alpha: int) -> float:
        return skellam_rdp(alpha, sigma, l2, l1)

    return tuple(steps * subsampled_rdp(a, q, one) for a in ORDERS)


def to_epsilon(rdp: np.ndarray, delta: float) -> float:
    """(epsilon, delta) from an RDP curve at ``ORDERS``: Opacus' conversion."""
    from opacus.accountants.analysis.rdp import get_privacy_spent

    eps, _ = get_privacy_spent(orders=list(ORDERS), rdp=np.asarray(rdp, float), delta=delta)
    return float(eps)


def share(variance_units: float, honest_sites: int) -> float:
    """Poisson parameter of one site's Skellam share, so that ``honest_sites`` shares sum to a
    total variance of ``variance_units`` (the noise the accounting assumes)."""
    return variance_units / (2.0 * honest_sites)


def sample_skellam(mu: float, size: int, rng: np.random.Generator) -> np.ndarray:
    """Sk(mu, mu) noise: the difference of two Poisson(mu) draws, as int64."""
    return rng.poisson(mu, size).astype(np.int64) - rng.poisson(mu, size).astype(np.int64)
