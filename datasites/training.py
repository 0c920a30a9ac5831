"""Local DP-SGD training with Opacus: the loop the datasite runs on private rows.

This module is the site's, never the researcher's: clipping, noise and accounting happen here
with parameters taken from the approved plan.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
from opacus import GradSampleModule
from opacus.optimizers import DPOptimizer
from torch import nn

from datasites.secure_noise import make_secure
from policies.plan import TrainingPlan

Weights = dict[str, np.ndarray]


@dataclass(frozen=True)
class TrainResult:
    weights: Weights
    train_loss: float
    steps: int


def device() -> torch.device:
    """CUDA when the site has it, else CPU; the project never needs a GPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def state_to_numpy(model: nn.Module) -> Weights:
    """Plain arrays with Opacus' ``_module.`` wrapper prefix stripped."""
    return {
        k.removeprefix("_module."): v.detach().cpu().numpy().astype(np.float32)
        for k, v in model.state_dict().items()
    }


def load_numpy(model: nn.Module, weights: Weights) -> None:
    model.load_state_dict({k: torch.as_tensor(v) for k, v in weights.items()})


def loss_fn(name: str) -> nn.Module:
    return {
        "cross_entropy": nn.CrossEntropyLoss,
        "mse": nn.MSELoss,
        "bce_with_logits": nn.BCEWithLogitsLoss,
    }[name]()


def targets(y: np.ndarray, loss: str) -> torch.Tensor:
    return torch.as_tensor(y, dtype=torch.long if loss == "cross_entropy" else torch.float32)


def forward(model: nn.Module, x: torch.Tensor, loss: str) -> torch.Tensor:
    out = model(x)
    return out if loss == "cross_entropy" else out.reshape(-1)


def poisson_batches(n: int, steps: int, rng: np.random.Generator) -> Iterator[np.ndarray]:
    """Index sets of Poisson sampling: every row in each batch independently with q = 1/steps.

    Drawing the batch size from Binomial(n, q) and then that many distinct rows uniformly is the
    same distribution as n independent Bernoulli(q) draws, at O(batch) cost per step instead of
    Opacus' O(n) mask (which made an epoch grow with n^2/B: 1M rows took 15x the time of 100k).
    The accounting is unchanged: sample rate q = 1/ceil(n/B), the same number of steps.
    """
    q = 1.0 / steps
    for _ in range(steps):
        k = int(rng.binomial(n, q))
        yield np.sort(rng.choice(n, size=k, replace=False)) if k else np.empty(0, np.int64)


def train_dp(
    model: nn.Module,
    x: np.ndarray,
    y: np.ndarray,
    plan: TrainingPlan,
    noise_multiplier: float,
    seed: int,
    secure_mode: bool = False,
) -> TrainResult:
    """Run ``plan.local_epochs`` of DP-SGD with Poisson sampling and per-sample clipping."""
    torch.manual_seed(seed)
    dev = device()
    xt = torch.as_tensor(x, dtype=torch.float32, device=dev)
    yt = targets(y, plan.loss).to(dev)
    n = len(xt)
    steps_per_epoch = max(1, -(-n // plan.batch_size))
    private_model = GradSampleModule(model.to(dev), batch_first=True, loss_reduction="mean")
    optimizer = DPOptimizer(
        _optimizer(private_model, plan),
        noise_multiplier=noise_multiplier,
        max_grad_norm=plan.max_grad_norm,
        expected_batch_size=int(n / steps_per_epoch),  # as Opacus' make_private computes it
        loss_reduction="mean",
    )
    if secure_mode:
        make_secure(optimizer)
    sampler_seed = int.from_bytes(os.urandom(8), "little") if secure_mode else seed
    rng = np.random.default_rng(sampler_seed)
    criterion = loss_fn(plan.loss)
    private_model.train()
    steps, total, count = 0, 0.0, 0
    for _ in range(plan.local_epochs):
        for idx in poisson_batches(n, steps_per_epoch, rng):
            index = torch.as_tensor(idx, device=dev)
            xb, yb = xt[index], yt[index]
            optimizer.zero_grad(set_to_none=True)
            loss = criterion(forward(private_model, xb, plan.loss), yb)
            loss.backward()  # an empty batch still gives (empty) per-sample grads: noise only
            optimizer.step()
            if len(idx):
                total += float(loss.detach()) * len(idx)
                count += len(idx)
            steps += 1
    return TrainResult(state_to_numpy(private_model), total / max(count, 1), steps)


def _optimizer(model: nn.Module, plan: TrainingPlan) -> torch.optim.Optimizer:
    if plan.optimizer == "adam":
        return torch.optim.Adam(model.parameters(), lr=plan.learning_rate)
    return torch.optim.SGD(model.parameters(), lr=plan.learning_rate, momentum=plan.momentum)


@torch.no_grad()
def evaluate(model: nn.Module, x: np.ndarray, y: np.ndarray, loss: str) -> dict[str, float]:
    """Loss, and accuracy for classification, of ``model`` on (x, y)."""
    if len(x) == 0:
        return {}
    model = model.to(device()).eval()
    xt = torch.as_tensor(x, dtype=torch.float32, device=device())
    yt = targets(y, loss).to(device())
    out = forward(model, xt, loss)
    metrics = {"loss": float(loss_fn(loss)(out, yt))}
    if loss == "cross_entropy":
        metrics["accuracy"] = float((out.argmax(1) == yt).float().mean())
    elif loss == "bce_with_logits":
        metrics["accuracy"] = float(((out > 0).float() == yt).float().mean())
    return metrics
