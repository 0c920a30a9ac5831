"""Secure noise: right distribution, right std, and DP-SGD runs with it."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.stats import kstest

from policies.engine.dp_sgd import train_dp
from policies.engine.secure_noise import secure_gaussian_like, secure_normal, secure_uniform
from policies.plan import TrainingPlan


def test_uniforms_are_in_the_open_interval_and_not_repeated() -> None:
    u = secure_uniform(10_000)
    assert (u > 0).all() and (u < 1).all()
    assert not np.array_equal(u, secure_uniform(10_000))


def test_normals_pass_a_kolmogorov_smirnov_test() -> None:
    assert kstest(secure_normal(20_001), "norm").pvalue > 1e-3


def test_noise_has_the_requested_std_and_shape() -> None:
    ref = torch.zeros(200, 100)
    noise = secure_gaussian_like(2.5, ref)
    assert noise.shape == ref.shape and noise.dtype == ref.dtype
    # 20,000 draws: the mean's sd is 2.5 / sqrt(20000) = 0.018 and the std's 0.0125. Both
    # bounds sit past 5 sds (a bound of 0.05 on the mean, 2.8 sds, failed one run in 200)
    assert abs(float(noise.std()) - 2.5) < 0.07 and abs(float(noise.mean())) < 0.09
    assert float(secure_gaussian_like(0.0, ref).abs().sum()) == 0.0


@pytest.mark.parametrize("engine", ["auto", "opacus"])
def test_dp_sgd_noise_is_secure_unless_a_test_seed_is_given(engine: str, monkeypatch) -> None:
    """Without ``_test_seed`` two runs differ (CSPRNG); with the same one they repeat exactly."""
    import policies.engine.secure_noise as secure_noise

    draws = []
    real = secure_noise.secure_normal
    monkeypatch.setattr(secure_noise, "secure_normal", lambda n: draws.append(n) or real(n))
    rng = np.random.default_rng(0)
    x = rng.normal(size=(256, 4)).astype(np.float32)
    y = (x[:, 0] > 0).astype(np.int64)
    plan = TrainingPlan.of(noise_multiplier=1.0, batch_size=32, learning_rate=0.5, local_epochs=3)

    def run(test_seed: int | None) -> dict[str, np.ndarray]:
        torch.manual_seed(5)  # same initial weights; a site's seeding cannot fix the noise
        result = train_dp(
            torch.nn.Linear(4, 2), x, y, plan, 1.0, engine=engine, _test_seed=test_seed
        )
        assert result.steps == 24 and set(result.weights) == {"weight", "bias"}
        assert np.isfinite(result.weights["weight"]).all()
        return result.weights

    seeded = run(0), run(0)
    np.testing.assert_array_equal(seeded[0]["weight"], seeded[1]["weight"])
    assert not np.array_equal(seeded[0]["weight"], run(1)["weight"])
    assert draws == []  # test noise: torch.normal, never the CSPRNG
    secure = run(None), run(None)
    assert not np.array_equal(secure[0]["weight"], secure[1]["weight"])
    # every step's noise, all parameters (10 values), comes from the CSPRNG as four draws each
    # (Opacus' defence), in one read (fused) or one per parameter (Opacus)
    assert sum(draws) >= 2 * 24 * 4 * 10 and len(draws) >= 2 * 24
