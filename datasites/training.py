"""Local DP-SGD training with Opacus: the loop the datasite runs on private rows.

This module is the site's, never the researcher's: clipping, noise and accounting happen here
with parameters taken from the approved plan.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from opacus import PrivacyEngine
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

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
    model = model.to(dev)
    data = TensorDataset(torch.as_tensor(x, dtype=torch.float32), targets(y, plan.loss))
    loader = DataLoader(data, batch_size=plan.batch_size)
    optimizer = _optimizer(model, plan)
    # Opacus' own secure_mode needs torchcsprng (no build for torch 2.13): see secure_noise.py
    engine = PrivacyEngine(accountant=plan.accountant)
    private_model, optimizer, loader = engine.make_private(
        module=model,
        optimizer=optimizer,
        data_loader=loader,
        noise_multiplier=noise_multiplier,
        max_grad_norm=plan.max_grad_norm,
        poisson_sampling=True,
    )
    if secure_mode:
        make_secure(optimizer)
    criterion = loss_fn(plan.loss)
    private_model.train()
    steps, total, count = 0, 0.0, 0
    for _ in range(plan.local_epochs):
        for xb, yb in loader:
            optimizer.zero_grad(set_to_none=True)
            if len(xb):
                xb, yb = xb.to(dev), yb.to(dev)
                loss = criterion(forward(private_model, xb, plan.loss), yb)
                loss.backward()
                total += float(loss.detach()) * len(xb)
                count += len(xb)
            optimizer.step()  # an empty Poisson batch still takes a noisy step
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
