"""Rare labels: class weights from public counts, and binary metrics from a noised histogram.

Both sides read this module, and it is plain numpy:

* ``resolve`` turns a plan's ``class_weight``/``pos_weight`` of ``"balanced"`` into numbers from
  *published* class counts (the dataset's DP counts, or the public mock's labels in a dry run),
  so the weights a site trains with never depend on its private labels. A weight scales a row's
  loss before its gradient is clipped, so DP-SGD's sensitivity and accounting are unchanged.
* ``score_bins`` and ``binary_metrics`` define the one DP release of ranking quality: per class,
  a histogram of the model's log-odds over fixed unit bins, noised by the site
  (``policies.engine.dp_sgd.private_metrics``); recall, precision, ROC-AUC, PR-AUC and
  balanced accuracy are computed from the noisy counts alone (post-processing).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import numpy.typing as npt

from policies.errors import PlanError
from policies.plan import TrainingPlan
from policies.plan_sections import BALANCED, MAX_CLASS_WEIGHT

# Log-odds edges -8, -7, ..., 8: 16 bins, the outer two open-ended. Probability 0.5 is an edge,
# so the confusion counts at that threshold are exact sums of bins; unit steps of log-odds
# resolve scores from p = 3e-4 to 1 - 3e-4, which rare-event models need (a uniform grid on
# the probability would put most of a 3%-positive table in its first bin).
SCORE_LOW, SCORE_HIGH = -8, 8
N_BINS = SCORE_HIGH - SCORE_LOW
THRESHOLD_BIN = -SCORE_LOW  # the first bin of log-odds >= 0: "predicted positive"


def balanced_weights(counts: Sequence[float]) -> tuple[float, ...]:
    """scikit-learn's "balanced": n / (k * n_c), from (noisy) counts, each at least 1.

    Bounded by the plan's ``MAX_CLASS_WEIGHT``; a noisy count at or below zero counts as 1.
    """
    c = np.maximum(np.asarray(counts, dtype=np.float64), 1.0)
    weights = c.sum() / (len(c) * c)
    return tuple(float(w) for w in np.minimum(weights, MAX_CLASS_WEIGHT))


def balanced_pos_weight(counts: Sequence[float]) -> float:
    """negatives / positives from (noisy) counts of classes 0 and 1; bounded as above."""
    neg, pos = (max(float(v), 1.0) for v in counts[:2])
    return float(min(neg / pos, MAX_CLASS_WEIGHT))


def needs_counts(plan: TrainingPlan) -> bool:
    return plan.imbalance.balanced


def resolve(plan: TrainingPlan, counts: Sequence[float] | None) -> TrainingPlan:
    """The plan with ``"balanced"`` replaced by numbers from published class counts.

    ``counts``: per class, in class-code order; a PlanError (before anything is charged, and
    from metadata only) when the plan needs them and the dataset publishes none.
    """
    if not needs_counts(plan):
        return plan
    if not counts or len(counts) < 2:
        raise PlanError(
            '"balanced" weights need the DP class counts the dataset publishes, and this one '
            "publishes none; give the weights as numbers instead"
        )
    if plan.imbalance.class_weight == BALANCED:
        return plan.with_fields(class_weight=balanced_weights(counts))
    return plan.with_fields(pos_weight=balanced_pos_weight(counts))


def score_bins(scores: npt.ArrayLike) -> npt.NDArray[np.int64]:
    """Each log-odds score's bin in 0..N_BINS-1; a non-finite score counts as 0 (threshold)."""
    s = np.nan_to_num(np.asarray(scores, dtype=np.float64), nan=0.0)
    return np.clip(np.floor(s) - SCORE_LOW, 0, N_BINS - 1).astype(np.int64)


def histograms(scores: npt.ArrayLike, labels: npt.ArrayLike) -> npt.NDArray[np.float64]:
    """Exact counts, shape (2, N_BINS): row 0 the negatives' bins, row 1 the positives'.

    A label other than 1 counts as negative, so no row can fail the release.
    """
    bins = score_bins(scores)
    positive = np.asarray(labels).astype(np.float64) == 1.0
    return np.stack(
        [
            np.bincount(bins[~positive], minlength=N_BINS),
            np.bincount(bins[positive], minlength=N_BINS),
        ]
    ).astype(np.float64)


def binary_metrics(hist: npt.ArrayLike) -> dict[str, float]:
    """Recall, precision and balanced accuracy at log-odds 0, ROC-AUC and PR-AUC, from counts.

    ``hist`` may be noisy: counts are clamped at 0 first (post-processing). Ties within a bin
    count half, as scikit-learn's ROC-AUC counts tied scores. Undefined ratios (no positive at
    all) are 0 for recall/precision and 0.5 for the AUCs.
    """
    neg, pos = np.clip(np.asarray(hist, dtype=np.float64), 0.0, None)
    n_pos, n_neg = pos.sum(), neg.sum()
    tp, fp = pos[THRESHOLD_BIN:].sum(), neg[THRESHOLD_BIN:].sum()
    tn = n_neg - fp
    recall = tp / n_pos if n_pos > 0 else 0.0
    precision = tp / (tp + fp) if tp + fp > 0 else 0.0
    specificity = tn / n_neg if n_neg > 0 else 0.0
    if n_pos > 0 and n_neg > 0:
        below = np.concatenate([[0.0], np.cumsum(neg)[:-1]])  # negatives in lower bins
        roc_auc = float((pos * (below + 0.5 * neg)).sum() / (n_pos * n_neg))
        pr_auc = _average_precision(pos, neg)
    else:
        roc_auc, pr_auc = 0.5, 0.5
    return {
        "recall": float(recall),
        "precision": float(precision),
        "balanced_accuracy": float((recall + specificity) / 2),
        "roc_auc": min(max(roc_auc, 0.0), 1.0),
        "pr_auc": min(max(pr_auc, 0.0), 1.0),
    }


def _average_precision(pos: npt.NDArray[np.float64], neg: npt.NDArray[np.float64]) -> float:
    """scikit-learn's average precision with each bin as one threshold (highest first)."""
    tp, fp = np.cumsum(pos[::-1]), np.cumsum(neg[::-1])
    precision = np.divide(tp, tp + fp, out=np.zeros_like(tp), where=tp + fp > 0)
    recall = tp / tp[-1]
    steps = np.diff(np.concatenate([[0.0], recall]))
    return float((steps * precision).sum())
