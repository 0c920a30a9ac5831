"""The site half of issue 12's algorithms: FedProx's pull, frozen layers, personalization's cost.

Each runs the real trainer (``train_dp`` / ``run_task``) on generated rows.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch

from datasites.errors import Refused
from policies.accounting import Mechanism, epsilon
from policies.engine.dp_sgd import add_proximal_term, train_dp
from policies.engine.prepare import prepare_task
from policies.engine.round_task import run_task
from policies.errors import PlanError
from policies.plan import TrainingPlan, training_rows
from policies.privacy import privacy_plan
from policies.wire import encode_weights, frozen_digest
from researcher.job import make_job

LAYERS = [
    {"type": "Linear", "in_features": 3, "out_features": 4},
    {"type": "ReLU"},
    {"type": "Linear", "in_features": 4, "out_features": 2},
]


def test_the_proximal_hook_adds_mu_times_the_distance_to_the_start() -> None:
    p = torch.nn.Parameter(torch.tensor([1.0, 2.0]))
    optimizer = torch.optim.SGD([p], lr=0.1)
    add_proximal_term(optimizer, [p], mu=0.5)  # anchor: [1, 2]
    with torch.no_grad():
        p.copy_(torch.tensor([3.0, 0.0]))  # moved by earlier steps
    p.grad = torch.tensor([0.2, 0.2])  # the private (clipped, noised) gradient
    optimizer.step()
    # grad + mu (w - anchor) = [0.2 + 1.0, 0.2 - 1.0]; w - lr * that
    assert p.detach().tolist() == pytest.approx([3.0 - 0.1 * 1.2, 0.0 + 0.1 * 0.8])


@pytest.mark.parametrize("engine", ["auto", "opacus"])
def test_fedprox_keeps_the_local_model_near_the_global_one(engine: str) -> None:
    """Pure-noise steps random-walk away from the start; the proximal pull holds them near it."""
    x = np.zeros((64, 3), np.float32)
    y = np.zeros(64, np.int64)

    def distance(mu: float) -> float:
        torch.manual_seed(0)
        model = torch.nn.Linear(3, 2)
        start = {k: v.detach().clone().numpy() for k, v in model.named_parameters()}
        plan = TrainingPlan.of(
            noise_multiplier=5.0, batch_size=8, learning_rate=0.1, local_epochs=10, proximal_mu=mu
        )
        out = train_dp(model, x, y, plan, 5.0, engine=engine, _test_seed=3)
        return float(sum(np.sum((out.weights[k] - start[k]) ** 2) for k in start) ** 0.5)

    free, pulled = distance(0.0), distance(5.0)
    assert pulled < 0.5 * free, (free, pulled)


def _spec(plan: dict, **kw):  # noqa: ANN003, ANN202
    return make_job(
        LAYERS, "d", "y", {"noise_multiplier": 1.0, "rounds": 2, **plan}, n_features=3, **kw
    )


def _frame() -> pd.DataFrame:
    rng = np.random.default_rng(0)
    frame = pd.DataFrame(rng.normal(size=(100, 3)).astype(np.float32), columns=list("abc"))
    frame["y"] = (frame["a"] > 0).astype(int)
    return frame


def _weights(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    shapes = {"0.weight": (4, 3), "0.bias": (4,), "2.weight": (2, 4), "2.bias": (2,)}
    return {k: rng.normal(size=s).astype(np.float32) for k, s in shapes.items()}


def test_frozen_layers_do_not_train_and_do_not_leave() -> None:
    start = _weights()
    spec = _spec({"frozen": ["0"]}, initial=start)
    assert spec.frozen_digest == frozen_digest(start, ["0.weight", "0.bias"])
    task = prepare_task(spec, _frame(), "y", encode_weights(start), 1.0, 2, 1, None)
    out = run_task(task, _test_seed=1)
    assert set(out.weights) == {"2.weight", "2.bias"}
    assert not np.allclose(out.weights["2.weight"], start["2.weight"])


def test_frozen_layers_that_changed_since_approval_are_refused_before_training() -> None:
    start = _weights()
    spec = _spec({"frozen": ["0"]}, initial=start)
    moved = {**start, "0.bias": start["0.bias"] + 1e-3}
    with pytest.raises(Refused, match="frozen layers differ"):
        prepare_task(spec, _frame(), "y", encode_weights(moved), 1.0, 2, 1, None)
    with pytest.raises(Refused, match="must send its weights"):
        prepare_task(spec, _frame(), "y", "", 1.0, 2, 1, None)


@pytest.mark.parametrize(
    ("plan", "match"),
    [
        ({"frozen": ["7"]}, "no layer or parameter '7'"),
        ({"frozen": ["0", "2"]}, "nothing would train"),
        ({"frozen": ["0"]}, "need the job's initial weights"),
        ({"frozen": ["7"], "initial": "bad shapes"}, "shape"),
        ({"personalize_layers": ["2"], "personalize_epochs": 0}, "personalize_epochs"),
        ({"personalize_epochs": 2}, "needs personalize_layers"),
        ({"compression": "zip"}, "compression must be one of"),
        ({"topk_fraction": 0.0}, "topk_fraction"),
        ({"proximal_mu": -1.0}, "proximal_mu"),
        # red team: lr x mu >= 2 diverges, and whether it overflowed depended on the rows
        ({"proximal_mu": 55.0, "learning_rate": 100.0}, "must be below 1"),
    ],
)
def test_bad_algorithm_fields_are_refused_by_name(plan: dict, match: str) -> None:
    from researcher.errors import JobError

    initial = None
    if plan.pop("initial", None):
        initial = {**_weights(), "0.bias": np.zeros(5, np.float32)}
    with pytest.raises((PlanError, JobError), match=match):
        _spec(plan, initial=initial)


def test_personalization_trains_only_its_layers_and_is_charged() -> None:
    start = _weights()
    spec = _spec({"personalize_layers": ["2"], "personalize_epochs": 3})
    task = prepare_task(
        spec, _frame(), "y", encode_weights(start), 1.0, 2, 1, None, personalize=True
    )
    assert set(task.frozen) == {"0.weight", "0.bias"} and task.plan["local_epochs"] == 3
    out = run_task(task, _test_seed=2)
    assert set(out.weights) == {"2.weight", "2.bias"}

    rows = 1000
    plan, plain = spec.plan, _spec({}).plan
    with_pass, without = privacy_plan(plan, rows), privacy_plan(plain, rows)
    n_train = training_rows(rows, plan)
    per_epoch = math.ceil(n_train / plan.batch_size)  # Opacus' loader length, by hand
    assert with_pass.mechanism.steps == plan.rounds * per_epoch + 3 * per_epoch
    assert with_pass.metric_releases == 2 * (plan.rounds + 1)  # loss and accuracy, every call
    # the job's epsilon is that of every mechanism it runs, composed: recomputed here by hand
    q = 1 / per_epoch
    by_hand = epsilon(
        [
            Mechanism(1.0, q, (plan.rounds + 3) * per_epoch),
            Mechanism(20.0, 1.0, 2 * (plan.rounds + 1)),
        ],
        plan.dp.delta,
        plan.dp.accountant,
    )
    assert with_pass.epsilon_job == pytest.approx(by_hand)
    assert with_pass.epsilon_job > without.epsilon_job
