"""Building the job's model on the researcher's side: initial weights and evaluation."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn

from policies.plan import JobSpec

Weights = dict[str, np.ndarray]


def build(spec: JobSpec, n_features: int, n_outputs: int, seed: int = 0) -> nn.Module:
    """Run the researcher's own model source locally and call its factory."""
    torch.manual_seed(seed)
    namespace: dict[str, Any] = {"__name__": "fedsite_model"}
    exec(compile(spec.model_source, "<model>", "exec"), namespace)  # noqa: S102  own code
    return namespace[spec.model_factory](n_features, n_outputs)


def weights_of(model: nn.Module) -> Weights:
    return {k: v.detach().cpu().numpy().astype(np.float32) for k, v in model.state_dict().items()}


def load(model: nn.Module, weights: Weights) -> nn.Module:
    model.load_state_dict({k: torch.as_tensor(v) for k, v in weights.items()})
    return model


@torch.no_grad()
def accuracy(model: nn.Module, x: np.ndarray, y: np.ndarray, loss: str) -> float:
    out = model.eval()(torch.as_tensor(x, dtype=torch.float32))
    if loss == "cross_entropy":
        pred = out.argmax(1).numpy()
    elif loss == "bce_with_logits":
        pred = (out.reshape(-1) > 0).numpy().astype(int)
    else:
        pred = np.rint(out.reshape(-1).numpy())
    return float((pred == np.asarray(y)).mean())


def n_outputs(meta: dict[str, Any], loss: str) -> int:
    return int(meta.get("n_classes") or 2) if loss == "cross_entropy" else 1


def n_features(meta: dict[str, Any]) -> int:
    return len(meta.get("schema") or []) - 1
