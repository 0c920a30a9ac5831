"""The job's model on the researcher's side: built by the same builder the sites use."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn

from policies.plan import JobSpec
from policies.plan import n_outputs as outputs_for
from policies.torch_model import build as build_spec
from policies.torch_model import load, weights_of

__all__ = ["accuracy", "build", "load", "n_features", "n_outputs", "weights_of"]


def build(spec: JobSpec, seed: int = 0) -> nn.Module:
    """The spec's model with seeded initial weights (the round-1 global model)."""
    torch.manual_seed(seed)
    return build_spec(spec.architecture)


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
    return outputs_for(loss, meta.get("n_classes"))


def n_features(meta: dict[str, Any]) -> int:
    """Inputs of one site's own table: a categorical column counts one per category (a job for
    a federation uses the layout of every site's categories, ``policies.layout``)."""
    from policies.layout import site_columns

    return sum(1 if cats is None else len(cats) for _, cats in site_columns(meta))
