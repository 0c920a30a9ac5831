"""The researcher's test evaluation on rare labels, against scikit-learn and a brute-force sweep;
and a run of the round loop whose sites release the DP binary metrics (in process, no syft)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from sklearn import metrics as skm
from torch import nn

from policies.engine.prepare import prepare_task, release
from policies.engine.round_task import run_task
from researcher.evaluation import held_out_metrics, recall_at_precision
from researcher.job import make_job
from researcher.rounds import run_federation
from researcher.site import InProcessSite


def _rare(n: int = 4000, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 2)).astype(np.float32)
    y = (x[:, 0] + 0.7 * rng.normal(size=n) > 2.2).astype(int)  # about 3% positive
    return x, y


def _fixed(weight: list[float], bias: float) -> nn.Module:
    model = nn.Linear(2, 1)
    with torch.no_grad():
        model.weight.copy_(torch.tensor([weight]))
        model.bias.fill_(bias)
    return model


def _sweep(y: np.ndarray, score: np.ndarray, precision: float) -> float:
    """Recall at every threshold 'score >= t', the best whose precision reaches the target."""
    best = 0.0
    for t in np.unique(score):
        flagged = score >= t
        tp = (flagged & (y == 1)).sum()
        if tp and tp / flagged.sum() >= precision:
            best = max(best, tp / (y == 1).sum())
    return float(best)


def test_binary_metrics_are_scikit_learns_and_accuracy_says_little() -> None:
    x, y = _rare()
    assert 0.01 < y.mean() < 0.06
    model = _fixed([2.0, 0.0], -4.4)
    got = held_out_metrics(model, x, y, "bce_with_logits", precision=0.5)
    score = 2.0 * x[:, 0] - 4.4
    assert got["roc_auc"] == pytest.approx(skm.roc_auc_score(y, score), abs=1e-6)
    assert got["pr_auc"] == pytest.approx(skm.average_precision_score(y, score), abs=1e-6)
    assert got["balanced_accuracy"] == pytest.approx(skm.balanced_accuracy_score(y, score > 0))
    assert got["recall_at_precision"] == pytest.approx(_sweep(y, score, 0.5), abs=1e-9)
    assert 0.0 < got["recall_at_precision"] < 1.0
    # a model that always says "no": high accuracy, chance AUC, balanced accuracy 0.5
    never = held_out_metrics(_fixed([0.0, 0.0], -5.0), x, y, "bce_with_logits")
    assert never["accuracy"] > 0.94 and never["roc_auc"] == 0.5
    assert never["balanced_accuracy"] == 0.5


def test_two_logit_models_score_class_one_and_edge_cases_are_clear() -> None:
    x, y = _rare(seed=1)
    model = nn.Linear(2, 2)
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[0.0, 0.0], [1.5, 0.2]]))
        model.bias.copy_(torch.tensor([0.0, -3.0]))
    got = held_out_metrics(model, x, y, "cross_entropy", precision=0.3)
    score = 1.5 * x[:, 0] + 0.2 * x[:, 1] - 3.0
    assert got["roc_auc"] == pytest.approx(skm.roc_auc_score(y, score), abs=1e-6)
    assert got["recall_at_precision"] == pytest.approx(recall_at_precision(y, score, 0.3))
    one_class = held_out_metrics(model, x, np.zeros(len(x), int), "cross_entropy")
    assert set(one_class) == {"accuracy"}  # no AUC without both classes; no crash mid-run
    with pytest.raises(ValueError, match="precision must be in"):
        held_out_metrics(model, x, y, "cross_entropy", precision=0.0)


def _bank(seed: int, n: int = 1500) -> pd.DataFrame:
    x, y = _rare(n, seed)
    frame = pd.DataFrame(x, columns=["a", "b"])
    frame["y"] = y.astype(np.float32)
    return frame


def test_a_run_reports_dp_binary_metrics_per_site_and_exact_ones_on_test(tmp_path: Path) -> None:
    plan = {
        "rounds": 2,
        "noise_multiplier": 1.0,
        "batch_size": 64,
        "learning_rate": 0.5,
        "loss": "bce_with_logits",
        "pos_weight": "balanced",
        "binary_metrics": True,
        "metric_noise_multiplier": 2.0,
    }
    layers = [{"type": "Linear", "in_features": 2, "out_features": 1}]
    spec = make_job(layers, "d", "y", plan, n_features=2, n_outputs=1)
    seen: list[dict] = []

    def handler(frame: pd.DataFrame):  # noqa: ANN202
        def answer(spec, weights: str) -> dict:  # noqa: ANN001
            counts = [float((frame.y == 0).sum()), float((frame.y == 1).sum())]
            task = prepare_task(spec, frame, "y", weights, 1.0, 2, 3, None, class_counts=counts)
            seen.append(task.plan)
            reply, _ = release(spec, run_task(task, _test_seed=len(seen)), 1, task.weights)
            return reply

        return answer

    meta = {"rows": 1500, "n_classes": 2, "target": "y"}
    sites = [InProcessSite(n, meta, handler(_bank(i))) for i, n in enumerate("ab")]
    x, y = _rare(2000, seed=9)
    result = run_federation(None, spec, tmp_path, sites=sites, test=(x, y), test_precision=0.5)
    assert all(isinstance(p["pos_weight"], float) and p["pos_weight"] > 10 for p in seen)
    last = result.rounds[-1]
    for site_metrics in last["sites"].values():
        for key in ("val_recall", "val_precision", "val_roc_auc", "val_pr_auc"):
            assert 0.0 <= site_metrics[key] <= 1.0
    assert set(last["test_metrics"]) >= {"roc_auc", "pr_auc", "recall_at_precision"}
    assert last["test_metrics"]["roc_auc"] > 0.8  # the rare class is learnt, not ignored
    with open(tmp_path / "metrics.csv") as fh:
        rows = list(csv.DictReader(fh))
    glob = [r for r in rows if r["site"] == "global"][-1]
    assert float(glob["test_roc_auc"]) == pytest.approx(last["test_metrics"]["roc_auc"])
    state = json.loads((tmp_path / "state.json").read_text())
    assert state["history"][-1]["test_metrics"]["precision_target"] == 0.5
