"""The site's DP-SGD loop: Poisson batches, empty batches, and a model that learns."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from policies.engine.dp_sgd import poisson_schedule, private_metrics, train_dp
from policies.plan import TrainingPlan
from policies.torch_model import load


@pytest.mark.parametrize("n", [200, 5000])  # Bernoulli masks; Binomial size + distinct rows
def test_poisson_batches_include_each_row_with_probability_q(n: int) -> None:
    rng = np.random.default_rng(0)
    steps, reps = 10, 300
    counts = np.zeros(n)
    sizes = []
    for _ in range(reps):
        for rows, chunk_sizes in poisson_schedule(n, steps, rng):
            for idx in np.split(rows, np.cumsum(chunk_sizes)[:-1]):  # as train_dp slices them
                assert len(np.unique(idx)) == len(idx)
                counts[idx] += 1
                sizes.append(len(idx))
    freq = counts / (reps * steps)
    assert len(sizes) == reps * steps
    assert abs(freq.mean() - 0.1) < 0.003 and freq.min() > 0.05 and freq.max() < 0.15
    variance = n * 0.1 * 0.9  # binomial, not a fixed batch size
    assert abs(np.var(sizes) - variance) < 0.1 * variance


def test_empty_batches_are_noisy_steps_not_errors() -> None:
    x = np.zeros((3, 2), np.float32)
    y = np.array([0, 1, 0])
    plan = TrainingPlan.of(noise_multiplier=1.0, batch_size=1, local_epochs=30)
    result = train_dp(torch.nn.Linear(2, 2), x, y, plan, 1.0, _test_seed=1)
    assert result.steps == 90  # 30 epochs x 3 steps, empty Poisson batches included
    assert np.isfinite(result.weights["weight"]).all()


def test_dp_sgd_learns_a_separable_problem() -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2000, 5)).astype(np.float32)
    y = (x[:, 0] - x[:, 1] > 0).astype(np.int64)
    model = torch.nn.Linear(5, 2)
    plan = TrainingPlan.of(noise_multiplier=0.8, batch_size=64, learning_rate=0.5, local_epochs=3)
    result = train_dp(model, x, y, plan, 0.8, _test_seed=0)
    released = load(torch.nn.Linear(5, 2), result.weights)  # a fresh model: what left the site
    exact = private_metrics(released, x, y, plan, lambda std: 0.0)  # a site's metric, no noise
    assert exact["val_accuracy"] > 0.9


@pytest.mark.parametrize("engine", ["auto", "opacus"])
def test_only_trainable_parameters_moved_by_the_optimizer_are_released(engine: str) -> None:
    x = np.random.default_rng(0).normal(size=(64, 4)).astype(np.float32)
    y = (x[:, 0] > 0).astype(np.int64)
    model = torch.nn.Sequential(torch.nn.Linear(4, 2))
    model.register_buffer("rows_seen", torch.zeros(64))
    layer = model[0]

    def tamper(module: torch.nn.Module, args: tuple) -> None:  # writes outside the optimizer
        with torch.no_grad():
            module.bias.add_(100.0)

    layer.register_forward_pre_hook(tamper)
    plan = TrainingPlan.of(noise_multiplier=1.0, batch_size=16, learning_rate=0.1)
    result = train_dp(model, x, y, plan, 1.0, engine=engine, _test_seed=0)
    assert set(result.weights) == {"0.weight", "0.bias"}  # no buffer
    assert float(layer.bias.detach().abs().min()) > 100.0  # the model holds the tampering
    assert np.abs(result.weights["0.bias"]).max() < 10.0  # what is released does not


@pytest.mark.parametrize("engine", ["auto", "opacus"])
def test_the_model_leaves_training_without_wrappers_or_hooks(engine: str) -> None:
    x = np.random.default_rng(0).normal(size=(64, 4)).astype(np.float32)
    y = (x[:, 0] > 0).astype(np.int64)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.ReLU(), torch.nn.Linear(3, 2))
    plan = TrainingPlan.of(noise_multiplier=1.0, batch_size=16)
    model.eval()  # as ``private_metrics`` leaves the global model before a round
    train_dp(model, x, y, plan, 1.0, engine=engine)
    for layer in model.modules():
        assert "forward" not in vars(layer)
        assert not layer._forward_hooks and not layer._backward_hooks
        assert not layer._forward_pre_hooks
    model(torch.as_tensor(x)).sum().backward()  # plain autograd works on it afterwards
    assert all(p.grad is not None for p in model.parameters())
