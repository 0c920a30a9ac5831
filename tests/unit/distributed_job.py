"""What the distributed-DP unit tests share: a small model, its rows and its start weights."""

from __future__ import annotations

import numpy as np
import torch

from policies.modelspec import parse
from policies.torch_model import build

MODEL = parse(
    {
        "input": [4],
        "layers": [
            {"type": "Linear", "in_features": 4, "out_features": 3},
            {"type": "ReLU"},
            {"type": "Linear", "in_features": 3, "out_features": 2},
        ],
    }
).to_dict()


def small_table(n: int = 50, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """n rows of 4 features (wide enough that per-row gradients clip) and 0/1 labels."""
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, 4)).astype(np.float32) * 3, rng.integers(0, 2, n)


def start_weights() -> dict[str, np.ndarray]:
    torch.manual_seed(0)
    return {k: v.detach().numpy().copy() for k, v in build(MODEL).named_parameters()}
