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
distributed discrete Gaussian of Kairouz et al. 2021 is only approximately closed). That holds
when every site runs the same plan: keys and pair seeds are bound to a digest of the whole
approved job (``secagg.job_tag``), and a site refuses a plan whose total noise is below its
floor rather than raising its own share alone (red team: both had let the sum carry less noise
than a site charged).

Sensitivity. Each per-sample gradient g (||g||_2 <= C) becomes round(gamma * g), rounded
coordinate by coordinate (down or up at random, unbiased). Each coordinate moves by less than 1,
so ||round(gamma g)||_2 <= gamma C + sqrt(d) and ||.||_1 <= sqrt(d) gamma C + d: deterministic
bounds, no conditional rounding needed. Rounding each row (not the sum) keeps one row's
contribution within them whatever the other rows are.

Accounting (Renyi DP):

* the multi-dimensional Skellam mechanism with Poisson parameter mu per coordinate (variance
  2 mu) and sensitivities D2, D1 is (alpha, eps(alpha))-RDP with (Agarwal et al. 2021, Thm 3.5)
  ``eps(alpha) = alpha D2^2 / (4 mu) + min(((2 alpha - 1) D2^2 + 6 D1) / (16 mu^2), 3 D1 / (4 mu))``;
  with the total variance written as (sigma D2)^2 the first term is the Gaussian's alpha/(2 sigma^2),
  and the whole is at most the Gaussian's with a slightly smaller ``effective_noise``;
* Poisson subsampling and composition: the sampled Gaussian mechanism's RDP (Mironov, Talwar and
  Zhang 2019; Opacus' RDP accountant) at that effective noise, at integer orders only
  (``INTEGER_ORDERS``). For the *add* direction this is a proof: at integer orders the
  subsampled divergence is a binomial sum of the base mechanism's divergences (their Sec. 3.3),
  each bounded above. For the *remove* direction Mironov et al. prove the Gaussian's is the
  smaller; for Skellam we check it numerically, in one dimension only (the multi-dimensional
  case is neither checked nor proved), instead of proving it (the general bound of Zhu and Wang 2019, Thm 6, which needs no such
  check, needed twice the noise here: sigma 4.1 against 1.9 at epsilon 4, q 0.18, 60 steps);
* the conversion to (epsilon, delta) is Opacus' (Balle et al. 2020).

``tests/unit/test_skellam.py`` checks these bounds against Renyi divergences computed directly
from the Skellam distribution's probabilities (scipy), an independent route.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import numpy.typing as npt

MODULUS_HALF = 1 << 31
# the rounding's sqrt(d) is at most 1/RESOLUTION of gamma C, so it adds under 1% to D2
RESOLUTION = 128
# the expected global batch's sum times this headroom stays below 2^31: no wrap in practice.
# Not enforced (a site's sampled batch can exceed it); a wrap costs accuracy, never privacy.
HEADROOM = 8
# numpy's Poisson sampler loses the low bits near 2^53 (red team: only even draws there, so the
# parity of the gradient sum left unnoised); shares stay far below
MAX_POISSON_MEAN = float(2**48)
# integer Renyi orders: the subsampling argument (a binomial sum) holds at integer orders only
INTEGER_ORDERS = list(range(2, 257))


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


def effective_noise(sigma: float, l2: float, l1: float) -> float:
    """A Gaussian noise multiplier whose RDP is at least the Skellam release's at every order.

    ``skellam_rdp(alpha) <= alpha / (2 sigma^2) + ((2 alpha - 1) l2^2 + 6 l1) / (4 sigma^4 l2^4)``
    and ``(2 alpha - 1) / alpha < 2``, ``6 l1 / alpha <= 6 l1`` for alpha >= 1, so
    ``1 / sigma_eff^2 = 1 / sigma^2 + (l2^2 + 3 l1) / (sigma^4 l2^4)`` covers every order. At the
    scales used here (l2 in the thousands) sigma_eff is below sigma by under 1e-6.
    """
    if sigma <= 0:
        return 0.0
    inverse = 1.0 / sigma**2 + (l2**2 + 3.0 * l1) / (sigma**4 * l2**4)
    return 1.0 / math.sqrt(inverse)


def share(variance_units: float, honest_sites: int) -> float:
    """Poisson parameter of one site's Skellam share, so that ``honest_sites`` shares sum to a
    total variance of ``variance_units`` (the noise the accounting assumes)."""
    return variance_units / (2.0 * honest_sites)


def sample_skellam(mu: float, size: int, rng: np.random.Generator) -> npt.NDArray[np.int64]:
    """Sk(mu, mu) noise: the difference of two Poisson(mu) draws, as int64."""
    return rng.poisson(mu, size).astype(np.int64) - rng.poisson(mu, size).astype(np.int64)


def signed(total: npt.ArrayLike) -> npt.NDArray[np.int64]:
    """A sum modulo 2^32 (uint32) as the signed integers it stands for."""
    out = np.asarray(total).astype(np.int64) % (2 * MODULUS_HALF)
    out[out >= MODULUS_HALF] -= 2 * MODULUS_HALF
    return out


def gradient(
    total: npt.ArrayLike, gamma: float, expected_batch: float
) -> npt.NDArray[np.floating[Any]]:
    """The noisy mean clipped gradient of a distributed step from its integer sum: divide out
    gamma and the expected batch size (q times the rows), as central DP-SGD does."""
    return signed(total).astype(np.float64) / (gamma * max(expected_batch, 1e-12))
