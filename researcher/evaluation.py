"""The researcher's own test evaluation: exact metrics on rows the researcher holds.

On rare labels accuracy says little (always "no default" scores 97% on ISLP's Default), so
beside it a binary model reports ROC-AUC, PR-AUC (average precision), balanced accuracy, and
the recall reachable at a chosen precision: "of the defaults, how many do we catch if at most
half of the accounts we flag are false alarms". All from scikit-learn; nothing here is private,
so nothing is noised or charged.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from sklearn import metrics as skm
from torch import nn

DEFAULT_PRECISION = 0.5


def scores(model: nn.Module, x: np.ndarray, loss: str) -> np.ndarray:
    """The model's outputs on ``x``: logits per class, or one number per row."""
    with torch.no_grad():
        out = model.eval()(torch.as_tensor(x, dtype=torch.float32))
    return out.numpy() if loss == "cross_entropy" else out.reshape(-1).numpy()


def recall_at_precision(y: np.ndarray, score: np.ndarray, precision: float) -> float:
    """The largest recall over thresholds whose precision is at least ``precision`` (0 if none)."""
    prec, rec, _ = skm.precision_recall_curve(y, score)
    reachable = rec[prec >= precision]
    return float(reachable.max()) if len(reachable) else 0.0


def held_out_metrics(
    model: nn.Module,
    x: np.ndarray,
    y: np.ndarray,
    loss: str,
    precision: float = DEFAULT_PRECISION,
) -> dict[str, Any]:
    """Accuracy for every model; for a binary one (class 1 positive) also ROC-AUC, PR-AUC,
    balanced accuracy and recall at ``precision``. A test split with one class only has no
    AUC: those keys are then absent rather than an error mid-run."""
    if not 0.0 < precision <= 1.0:
        raise ValueError(f"precision must be in (0, 1], got {precision}")
    out = scores(model, x, loss)
    y = np.asarray(y)
    if loss == "cross_entropy":
        pred = out.argmax(1)
    elif loss == "bce_with_logits":
        pred = (out > 0).astype(int)
    else:
        pred = np.rint(out)
    result: dict[str, Any] = {"accuracy": float((pred == y).mean())}
    binary = (loss == "cross_entropy" and out.shape[1] == 2) or loss == "bce_with_logits"
    labels = (y == 1).astype(int)
    if not binary or labels.min() == labels.max():
        return result
    score = out[:, 1] - out[:, 0] if loss == "cross_entropy" else out
    result.update(
        {
            "roc_auc": float(skm.roc_auc_score(labels, score)),
            "pr_auc": float(skm.average_precision_score(labels, score)),
            "balanced_accuracy": float(skm.balanced_accuracy_score(labels, (pred == 1))),
            "recall_at_precision": recall_at_precision(labels, score, precision),
            "precision_target": float(precision),
        }
    )
    return result
