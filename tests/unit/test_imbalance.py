"""Imbalanced labels: class weights from public counts, DP binary metrics and their accounting.

Independent references: scikit-learn (balanced weights, ROC-AUC, average precision, recall,
precision, balanced accuracy), hand-written weighted losses, Google's dp-accounting, and the
closed form of the Gaussian mechanism (Balle & Wang 2018) for the metric releases.
"""

from __future__ import annotations

import copy
import math

import dp_accounting
import numpy as np
import pandas as pd
import pytest
import torch
from scipy.optimize import brentq
from scipy.stats import norm
from sklearn import metrics as skm
from sklearn.utils.class_weight import compute_class_weight
from torch import nn

from datasites.errors import Refused
from datasites.ledger.budget import BudgetLedger
from datasites.ledger.store import SiteStore
from policies import imbalance
from policies.accounting import Mechanism, epsilon
from policies.engine.dp_sgd import criterion, private_metrics, train_dp
from policies.engine.prepare import prepare_task
from policies.errors import PlanError
from policies.plan import JobSpec, TrainingPlan
from policies.privacy import METRICS, SCORES, TRAINING, privacy_plan

DELTA = 1e-5
CPU = torch.device("cpu")


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"loss": "mse", "class_weight": "balanced"}, "class_weight needs a classifier"),
        ({"class_weight": [1.0]}, "class_weight must be"),
        ({"class_weight": [1.0, -2.0]}, "class_weight must be"),
        ({"class_weight": "even"}, "class_weight must be"),
        ({"loss": "bce_with_logits", "class_weight": [1, 2, 3]}, "takes 2 numbers"),
        ({"pos_weight": 3.0}, "pos_weight is for loss bce_with_logits"),
        ({"loss": "bce_with_logits", "pos_weight": float("nan")}, "pos_weight must be"),
        ({"loss": "bce_with_logits", "pos_weight": 2.0, "class_weight": [1, 2]}, "not both"),
        ({"binary_metrics": True, "site_metrics": False}, "binary_metrics needs"),
        ({"binary_metrics": True, "loss": "mse"}, "binary_metrics needs"),
        ({"binary_metrics": 1}, "binary_metrics must be true or false"),
    ],
)
def test_bad_imbalance_fields_are_one_line(fields: dict, message: str) -> None:
    with pytest.raises(PlanError, match=message) as info:
        TrainingPlan.of(noise_multiplier=1.0, **fields)
    assert "\n" not in str(info.value)


def _job(plan: dict, outputs: int, features: int = 3) -> JobSpec:
    layer = {"type": "Linear", "in_features": features, "out_features": outputs}
    model = {"input": [features], "layers": [layer]}
    return JobSpec("j", "d", "y", model, TrainingPlan.of(noise_multiplier=1.0, **plan))


def test_binary_metrics_and_weight_lists_must_fit_the_model() -> None:
    with pytest.raises(PlanError, match="needs a binary model"):
        _job({"binary_metrics": True}, outputs=3)
    with pytest.raises(PlanError, match="3 classes"):
        _job({"class_weight": [1.0, 2.0]}, outputs=3)
    assert _job({"binary_metrics": True}, outputs=2).plan.metrics.binary
    spec = _job({"loss": "bce_with_logits", "binary_metrics": True, "class_weight": [1, 9]}, 1)
    assert JobSpec.from_dict(spec.to_dict()).plan.imbalance.class_weight == (1.0, 9.0)  # round trip


def test_balanced_weights_are_scikit_learns_on_the_published_counts() -> None:
    counts = [9667, 333]
    labels = np.repeat([0, 1], counts)
    expected = compute_class_weight("balanced", classes=np.array([0, 1]), y=labels)
    np.testing.assert_allclose(imbalance.balanced_weights(counts), expected, rtol=1e-12)
    assert imbalance.balanced_pos_weight(counts) == pytest.approx(9667 / 333)
    # a noisy count at or below zero counts as one row; the weight stays bounded
    assert imbalance.balanced_weights([100.0, -3.0])[1] == pytest.approx(101 / 2)


def test_balanced_is_resolved_from_the_published_counts_not_the_private_labels() -> None:
    """The private table is 50/50; the published counts say 900/100: the weights follow those."""
    frame = pd.DataFrame({"a": np.arange(200.0), "y": np.arange(200) % 2})
    spec = _job({"class_weight": "balanced"}, outputs=2, features=1)
    task = prepare_task(spec, frame, "y", "", 1.0, 2, 0, None, class_counts=[900.0, 100.0])
    assert task.plan["class_weight"] == pytest.approx([1000 / 1800, 1000 / 200])
    with pytest.raises(Refused, match="publishes none"):  # before anything is charged
        prepare_task(spec, frame, "y", "", 1.0, 2, 0, None, class_counts=None)
    plain = prepare_task(_job({}, 2, 1), frame, "y", "", 1.0, 2, 0, None)
    assert plain.plan["class_weight"] is None


def test_weighted_losses_are_the_hand_computed_ones() -> None:
    torch.manual_seed(0)
    logits2, logits1 = torch.randn(8, 2), torch.randn(8)
    y = torch.tensor([0, 1, 1, 0, 0, 0, 1, 0])
    ce = nn.functional.cross_entropy(logits2, y, reduction="none")
    plan = TrainingPlan.of(noise_multiplier=1.0, class_weight=[0.5, 4.0])
    got = criterion(plan, CPU)(logits2, y)
    torch.testing.assert_close(got, ce * torch.tensor([0.5, 4.0])[y])
    bce = nn.functional.binary_cross_entropy_with_logits(logits1, y.float(), reduction="none")
    weighted = TrainingPlan.of(noise_multiplier=1.0, loss="bce_with_logits", class_weight=[0.5, 4])
    torch.testing.assert_close(
        criterion(weighted, CPU)(logits1, y.float()), bce * torch.tensor([0.5, 4.0])[y]
    )
    pos = TrainingPlan.of(noise_multiplier=1.0, loss="bce_with_logits", pos_weight=7.0)
    p = torch.sigmoid(logits1)
    by_hand = -(7.0 * y * torch.log(p) + (1 - y) * torch.log(1 - p))
    torch.testing.assert_close(criterion(pos, CPU)(logits1, y.float()), by_hand)
    with pytest.raises(ValueError, match="resolved"):
        criterion(TrainingPlan.of(noise_multiplier=1.0, class_weight="balanced"), CPU)


@pytest.mark.parametrize(
    "fields", [{"class_weight": [1.0, 6.0]}, {"loss": "bce_with_logits", "pos_weight": 6.0}]
)
def test_both_engines_train_the_weighted_loss_alike(fields: dict) -> None:
    """Same seed and batches, no noise: fused and Opacus end at the same weights, and the
    weighting changes them (so it is applied, in both). The clip is set high: a row's weighted
    gradient is still clipped to ``max_grad_norm``, so a weight moves only rows below it."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(300, 5)).astype(np.float32)
    y = (x[:, 0] > 1.0).astype(np.int64)
    loss = fields.get("loss", "cross_entropy")
    y = y.astype(np.float32) if loss == "bce_with_logits" else y
    common = {"noise_multiplier": 1.0, "batch_size": 32, "learning_rate": 0.1, "max_grad_norm": 50}
    plan = TrainingPlan.of(**common, **fields)
    unweighted = TrainingPlan.of(**common, loss=loss)
    torch.manual_seed(0)
    outputs = 1 if loss == "bce_with_logits" else 2
    model = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, outputs))
    fused = train_dp(copy.deepcopy(model), x, y, plan, 0.0, _test_seed=3)
    opacus = train_dp(copy.deepcopy(model), x, y, plan, 0.0, _test_seed=3, engine="opacus")
    plain = train_dp(copy.deepcopy(model), x, y, unweighted, 0.0, _test_seed=3)
    for key, value in fused.weights.items():
        np.testing.assert_allclose(value, opacus.weights[key], rtol=1e-4, atol=1e-6)
    assert np.abs(fused.weights["2.bias"] - plain.weights["2.bias"]).max() > 0.05


def test_histogram_metrics_are_scikit_learns_on_the_binned_scores() -> None:
    rng = np.random.default_rng(4)
    scores = rng.normal(-2.0, 3.0, size=3000)
    labels = (scores + rng.normal(0, 3.0, size=3000) > 2.0).astype(int)
    got = imbalance.binary_metrics(imbalance.histograms(scores, labels))
    binned = imbalance.score_bins(scores)
    pred = (binned >= imbalance.THRESHOLD_BIN).astype(int)
    assert got["roc_auc"] == pytest.approx(skm.roc_auc_score(labels, binned), abs=1e-12)
    assert got["pr_auc"] == pytest.approx(skm.average_precision_score(labels, binned), abs=1e-12)
    assert got["recall"] == pytest.approx(skm.recall_score(labels, pred))
    assert got["precision"] == pytest.approx(skm.precision_score(labels, pred))
    assert got["balanced_accuracy"] == pytest.approx(skm.balanced_accuracy_score(labels, pred))
    assert (pred == (scores >= 0)).all()  # the threshold bin edge is log-odds 0 exactly
    empty = imbalance.binary_metrics(np.zeros((2, imbalance.N_BINS)))
    assert empty == {
        "recall": 0.0,
        "precision": 0.0,
        "balanced_accuracy": 0.0,
        "roc_auc": 0.5,
        "pr_auc": 0.5,
    }


def _linear(weight: float, bias: float) -> nn.Module:
    model = nn.Linear(1, 1)
    with torch.no_grad():
        model.weight.fill_(weight)
        model.bias.fill_(bias)
    return model


def test_the_site_noises_every_bin_at_sqrt2_times_the_metric_noise() -> None:
    plan = TrainingPlan.of(
        noise_multiplier=1.0, loss="bce_with_logits", binary_metrics=True, metric_noise_multiplier=3
    )
    rng = np.random.default_rng(2)
    x = rng.normal(size=(400, 1)).astype(np.float32)
    y = (x[:, 0] + rng.normal(size=400) > 1.0).astype(np.float32)
    stds: list[float] = []

    def record(std: float) -> float:
        stds.append(std)
        return 0.0

    released = private_metrics(_linear(2.0, -1.0), x, y, plan, record)
    # loss sum (z * clip), correct count (z), then 2 x 16 bins at z * sqrt 2
    assert stds[:2] == [3 * plan.metrics.loss_clip, 3]
    assert stds[2:] == pytest.approx([3 * math.sqrt(2)] * 2 * imbalance.N_BINS)
    scores = 2.0 * x[:, 0] - 1.0
    assert released["val_roc_auc"] == pytest.approx(
        skm.roc_auc_score(y, imbalance.score_bins(scores)), abs=1e-9
    )
    pred = scores >= 0
    assert released["val_recall"] == pytest.approx(skm.recall_score(y, pred))
    noisy = private_metrics(_linear(2.0, -1.0), x, y, plan, lambda s: float(rng.normal(0, s)))
    assert noisy["val_recall"] != released["val_recall"]  # noised, when noise is drawn
    assert all(0.0 <= noisy[k] <= 1.0 for k in ("val_recall", "val_roc_auc", "val_pr_auc"))


def _gaussian_epsilon(mu: float, delta: float) -> float:
    """Exact epsilon of a Gaussian mechanism of sensitivity/noise ratio mu (Balle & Wang 2018,
    Thm 8): delta(eps) = Phi(-eps/mu + mu/2) - e^eps Phi(-eps/mu - mu/2)."""

    def gap(eps: float) -> float:
        return norm.cdf(-eps / mu + mu / 2) - math.exp(eps) * norm.cdf(-eps / mu - mu / 2) - delta

    return brentq(gap, 1e-9, 100.0)


def test_the_score_release_is_charged_as_a_gaussian_of_the_metric_noise(tmp_path) -> None:
    rounds, z = 4, 3.0
    plan = TrainingPlan.of(
        noise_multiplier=1.2,
        rounds=rounds,
        batch_size=32,
        binary_metrics=True,
        metric_noise_multiplier=z,
    )
    p = privacy_plan(plan, 1000)
    kinds = [(k, m.noise_multiplier, m.steps) for k, m in p.releases]
    assert kinds == [(TRAINING, 1.2, p.mechanism.steps), (METRICS, z, 8), (SCORES, z, 4)]
    # metrics and scores alone: 12 Gaussian releases at noise z compose to one of mu=sqrt(12)/z
    released = [m for k, m in p.releases if k != TRAINING]
    hand = _gaussian_epsilon(math.sqrt(3 * rounds) / z, DELTA)
    assert epsilon(released, DELTA, "prv") == pytest.approx(hand, rel=0.01)
    assert epsilon(released, DELTA, "prv") > epsilon(released[:1], DELTA, "prv") * 1.1
    # the whole job against dp-accounting's PLD, composed here
    (_, train), *_ = p.releases
    event = dp_accounting.ComposedDpEvent(
        [
            dp_accounting.SelfComposedDpEvent(
                dp_accounting.PoissonSampledDpEvent(
                    train.sample_rate, dp_accounting.GaussianDpEvent(train.noise_multiplier)
                ),
                train.steps,
            ),
            dp_accounting.SelfComposedDpEvent(dp_accounting.GaussianDpEvent(z), 3 * rounds),
        ]
    )
    pld = dp_accounting.pld.PLDAccountant(value_discretization_interval=1e-4)
    assert p.epsilon_job == pytest.approx(pld.compose(event).get_epsilon(DELTA), rel=0.01)
    # the ledger charges it as its own kind, and its total is the composition of all three
    ledger = BudgetLedger(SiteStore(tmp_path / "site.db"))
    ledger.set_budget("ada@uni.edu", "bank", 50.0, DELTA)
    ledger.reserve("ada@uni.edu", "bank", "job1", p.releases, "prv")
    budget = ledger.budget("ada@uni.edu", "bank").to_dict()
    rows = [(r["kind"], r["mechanism"]["steps"]) for r in budget["releases"]]
    assert rows == [(TRAINING, p.mechanism.steps), (METRICS, 8), (SCORES, 4)]
    assert budget["epsilon_spent"] == pytest.approx(p.epsilon_job, rel=1e-6)


def test_a_target_epsilon_pays_for_the_score_release_too() -> None:
    fields = {"target_epsilon": 3.0, "rounds": 3, "batch_size": 32, "metric_noise_multiplier": 5}
    with_scores = privacy_plan(TrainingPlan.of(**fields, binary_metrics=True), 2000)
    without = privacy_plan(TrainingPlan.of(**fields), 2000)
    assert with_scores.score_releases == 3 and without.score_releases == 0
    assert 2.99 <= with_scores.epsilon_job <= 3.0
    assert with_scores.noise_multiplier > without.noise_multiplier
    training = Mechanism(
        with_scores.noise_multiplier, with_scores.sample_rate, with_scores.mechanism.steps
    )
    composed = epsilon([training, Mechanism(5, 1.0, 9)], DELTA)
    assert composed == pytest.approx(with_scores.epsilon_job, rel=1e-9)
