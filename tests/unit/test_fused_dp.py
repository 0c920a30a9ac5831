"""The fused clipper against two independent references: Opacus, and a per-sample loop.

The per-sample loop computes each row's gradient on its own with autograd, clips it to C with
Opacus' factor and sums; it shares no code with either implementation.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from opacus import GradSampleModule
from opacus.optimizers import DPOptimizer
from torch import nn
from torch.nn import functional as F

from policies.engine import fused_dp
from policies.engine.dp_sgd import train_dp
from policies.plan import TrainingPlan

C = 1.0


class Shared(nn.Module):
    """One Linear applied twice: its per-sample gradients add up before clipping."""

    def __init__(self) -> None:
        super().__init__()
        self.inner = nn.Linear(6, 6)
        self.head = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.inner(torch.tanh(self.inner(x)))))


class Sequence(nn.Module):
    """A Linear over (B, T, d) inputs: per-sample gradients sum over T."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(5, 4)
        self.head = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.proj(x)).mean(1))


CASES = {
    "linear": (lambda: nn.Linear(6, 3), (24, 6)),
    "mlp_inplace_relu": (
        lambda: nn.Sequential(nn.Linear(6, 8), nn.ReLU(inplace=True), nn.Linear(8, 3)),
        (24, 6),
    ),
    "cnn": (
        lambda: nn.Sequential(
            nn.Conv2d(2, 4, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(4, 4, 3, stride=2, bias=False),
            nn.Conv2d(4, 4, (2, 1), padding=(1, 0)),
            nn.Flatten(),
            nn.Linear(4 * 4 * 3, 3),
        ),
        (24, 2, 8, 8),
    ),
    "dilated_cnn": (
        lambda: nn.Sequential(
            nn.Conv2d(1, 3, 3, dilation=2), nn.Flatten(), nn.Linear(3 * 4 * 4, 3)
        ),
        (24, 1, 8, 8),
    ),
    "shared_layer": (Shared, (24, 6)),
    "sequence": (Sequence, (24, 7, 5)),
}


def _data(shape: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(*shape, generator=gen) * 4  # large rows: most gradients get clipped
    return x, torch.randint(0, 3, (shape[0],), generator=gen)


def _per_sample_reference(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> list:
    """Sum over rows of each row's own gradient, clipped to C, row by row."""
    params = [p for p in model.parameters()]
    total = [torch.zeros_like(p) for p in params]
    for i in range(len(x)):
        loss = F.cross_entropy(model(x[i : i + 1]), y[i : i + 1], reduction="sum")
        grads = torch.autograd.grad(loss, params)
        norm = torch.sqrt(sum((g.double() ** 2).sum() for g in grads))
        factor = min(1.0, C / (float(norm) + 1e-6))
        for t, g in zip(total, grads, strict=True):
            t += factor * g
    return total


def _fused_grads(model: nn.Module, x: torch.Tensor, y: torch.Tensor, scale: float) -> list:
    clipper = fused_dp.FusedClipper(model, x[:2])
    zeros = [torch.zeros_like(p) for p in clipper.params]
    loss = F.cross_entropy(model(x), y, reduction="sum")
    grads = clipper.noisy_grads(loss, C, scale, zeros)
    clipper.remove()
    return grads


def _opacus(
    model: nn.Module, reduction: str, lr: float, expected: int
) -> tuple[GradSampleModule, DPOptimizer]:
    """Opacus' own DP-SGD around ``model``, without noise: the reference engine."""
    gsm = GradSampleModule(model, batch_first=True, loss_reduction=reduction)
    opt = DPOptimizer(
        torch.optim.SGD(gsm.parameters(), lr=lr),
        noise_multiplier=0.0,
        max_grad_norm=C,
        expected_batch_size=expected,
        loss_reduction=reduction,
    )
    return gsm, opt


@pytest.mark.parametrize("case", sorted(CASES))
def test_clipped_sum_matches_a_per_sample_loop(case: str) -> None:
    make, shape = CASES[case]
    torch.manual_seed(0)
    model = make()
    x, y = _data(shape)
    assert fused_dp.supports(model)
    reference = _per_sample_reference(copy.deepcopy(model), x, y)
    fused = _fused_grads(model, x, y, scale=0.25)
    for ref, got in zip(reference, fused, strict=True):
        torch.testing.assert_close(got, 0.25 * ref, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("case", ["linear", "cnn"])
def test_a_step_matches_opacus_dp_optimizer(case: str) -> None:
    make, shape = CASES[case]
    torch.manual_seed(0)
    ours = make()
    theirs = copy.deepcopy(ours)
    x, y = _data(shape)
    gsm, opt = _opacus(theirs, "mean", lr=0.5, expected=20)
    F.cross_entropy(gsm(x), y).backward()
    opt.step()
    step = fused_dp.FusedDPSGD(
        ours,
        torch.optim.SGD(ours.parameters(), lr=0.5),
        0.0,
        C,
        20,
        lambda std, shape: torch.zeros(shape),
        x[:2],
    )
    step.step(F.cross_entropy(ours(x), y, reduction="sum"))
    for (name, mine), theirs_p in zip(ours.named_parameters(), theirs.parameters(), strict=True):
        torch.testing.assert_close(mine, theirs_p, rtol=1e-5, atol=1e-7, msg=name)


def test_noise_has_opacus_std_over_the_expected_batch_size() -> None:
    torch.manual_seed(0)
    model = nn.Linear(100, 50)
    x, y = torch.randn(8, 100), torch.randint(0, 50, (8,))
    sigma, expected = 1.3, 16
    clean = [g.clone() for g in _fused_grads(copy.deepcopy(model), x, y, 1 / expected)]
    step = fused_dp.FusedDPSGD(
        model,
        torch.optim.SGD(model.parameters(), lr=0.0),
        sigma,
        C,
        expected,
        lambda std, shape: torch.normal(0.0, std, shape),
        x[:2],
    )
    step.step(F.cross_entropy(model(x), y, reduction="sum"))
    noise = torch.cat(
        [(p.grad - c).flatten() for p, c in zip(model.parameters(), clean, strict=True)]
    )
    assert noise.numel() == 5050
    assert abs(float(noise.std()) / (sigma * C / expected) - 1) < 0.04
    assert abs(float(noise.mean())) < 0.1 * sigma * C / expected


@pytest.mark.parametrize(
    "layer",
    [nn.LayerNorm(4), nn.Embedding(4, 4), nn.Conv2d(2, 2, 1, groups=2), nn.GroupNorm(1, 4)],
)
def test_other_layers_are_left_to_opacus(layer: nn.Module) -> None:
    assert not fused_dp.supports(nn.Sequential(layer, nn.Linear(4, 2)))


def test_frozen_model_and_parameter_free_layers() -> None:
    frozen = nn.Linear(3, 2).requires_grad_(False)
    assert not fused_dp.supports(frozen)
    assert fused_dp.supports(nn.Sequential(nn.Flatten(), nn.Linear(3, 2), nn.Dropout(0.1)))


def test_train_dp_gives_opacus_weights_without_noise() -> None:
    """Same seed, same Poisson batches, no noise: the two engines end at the same weights."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(300, 6)).astype(np.float32) * 3
    y = (x[:, 0] > 0).astype(np.int64)
    # a plan needs noise > 0; train_dp takes the noise the site computed, here none
    plan = TrainingPlan.of(noise_multiplier=1.0, batch_size=32, learning_rate=0.3, local_epochs=2)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 2))
    fused = train_dp(copy.deepcopy(model), x, y, plan, 0.0, _test_seed=3)
    opacus = train_dp(copy.deepcopy(model), x, y, plan, 0.0, _test_seed=3, engine="opacus")
    assert fused.steps == opacus.steps == 20
    assert abs(fused.train_loss - opacus.train_loss) < 1e-5
    for key, value in fused.weights.items():
        np.testing.assert_allclose(value, opacus.weights[key], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("engine", ["fused", "opacus"])
def test_a_row_with_a_non_finite_gradient_adds_nothing(engine: str) -> None:
    """One row that overflows to inf/NaN must not turn the update NaN (a data-dependent failure).

    Reference: the per-sample loop over the finite rows alone.
    """
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))
    x, y = _data((24, 6))
    x[3, 0] = float("nan")
    x[7, 2] = float("inf")
    keep = torch.isfinite(x).all(1)
    reference = _per_sample_reference(copy.deepcopy(model), x[keep], y[keep])
    if engine == "fused":
        got = _fused_grads(model, x, y, scale=1.0)
    else:
        gsm, opt = _opacus(model, "sum", lr=0.0, expected=1)
        F.cross_entropy(gsm(x), y, reduction="sum").backward()
        from policies.engine.dp_sgd import zero_non_finite_rows

        zero_non_finite_rows(opt)
        opt.step()
        got = [p.grad for p in gsm.parameters()]
    for ref, mine in zip(reference, got, strict=True):
        assert torch.isfinite(mine).all()
        torch.testing.assert_close(mine, ref, rtol=1e-4, atol=1e-6)


def test_training_on_a_table_with_an_overflowing_row_releases_finite_weights() -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(200, 6)).astype(np.float32)
    x[5] = np.float32(3e38)  # overflows to inf in the first layer, NaN after
    y = (x[:, 0] > 0).astype(np.int64)
    plan = TrainingPlan.of(noise_multiplier=1.0, batch_size=50, learning_rate=0.1, local_epochs=2)
    for engine in ("auto", "opacus"):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 2))
        result = train_dp(model, x, y, plan, 1.0, engine=engine, _test_seed=1)
        assert all(np.isfinite(w).all() for w in result.weights.values()), engine
        assert np.isfinite(result.train_loss), engine


def test_a_row_whose_squared_gradient_underflows_is_still_clipped() -> None:
    """Red team: inputs near 1e18 (researcher scaling) and a logit margin that makes the
    cross-entropy gradient ~1e-23: in float32 |g|^2 underflowed to 0, the row read as norm 0
    and went in unclipped (up to ~460x the clipping norm). Each row alone must stay within it."""
    d, clip, big = 64, 1e-4, 2.2e18  # clip: the smallest max_grad_norm a plan may ask for
    x = torch.full((1, d), big)  # |x|^2 just below float32's largest value
    worst = 0.0
    for margin in (45.0, 48.0, 50.0, 51.0, 52.0, 53.0, 55.0, 60.0):
        model = nn.Linear(d, 2)
        with torch.no_grad():
            model.weight.zero_()
            model.weight[1] = margin / (d * big)
            model.bias.zero_()
        clipper = fused_dp.FusedClipper(model, x)
        zeros = [torch.zeros_like(p) for p in clipper.params]
        loss = F.cross_entropy(model(x), torch.tensor([1]), reduction="sum")
        grads = clipper.noisy_grads(loss, clip, 1.0, zeros)
        clipper.remove()
        worst = max(worst, float(torch.sqrt(sum((t.double() ** 2).sum() for t in grads))))
    assert worst <= clip * (1 + 1e-4), worst / clip
