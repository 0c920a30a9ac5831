"""The plan's typed sections keep the flat wire dict, and one step arithmetic serves both the
accounting and the DP-SGD loop.

The golden file (``tests/unit/data/plan_golden.json``) was written by
``tests/unit/data/make_plan_golden.py`` with main's flat ``TrainingPlan`` (the commit it names),
before the sections existed: the wire format a site reviews must not have moved.
"""

from __future__ import annotations

import ast
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from policies.engine import dp_sgd, fused_dp
from policies.engine.prepare import prepare_task
from policies.engine.round_task import run_task
from policies.errors import PlanError
from policies.plan import JobSpec, TrainingPlan, step_plan, training_rows
from policies.plan_sections import (
    Accountant,
    AggregationMode,
    Compression,
    DPMode,
    DPSection,
    Loss,
    Optimizer,
)
from policies.privacy import privacy_plan
from policies.wire import encode_weights

GOLDEN = json.loads((Path(__file__).parent / "data" / "plan_golden.json").read_text())["plans"]
BY_NAME = {g["name"]: g for g in GOLDEN}


@pytest.mark.parametrize("golden", GOLDEN, ids=[g["name"] for g in GOLDEN])
def test_the_flat_dict_is_main_s_byte_for_byte(golden: dict) -> None:
    """Same keys, same order, same values and types: the literal a job carries reads the same."""
    plan = TrainingPlan.from_dict(golden["input"])
    assert repr(plan.to_dict()) == golden["repr"]
    assert plan.to_dict() == golden["to_dict"]


@pytest.mark.parametrize("golden", GOLDEN, ids=[g["name"] for g in GOLDEN])
def test_the_flat_dict_round_trips(golden: dict) -> None:
    plan = TrainingPlan.from_dict(golden["input"])
    assert TrainingPlan.from_dict(plan.to_dict()) == plan
    assert TrainingPlan.from_dict(json.loads(json.dumps(plan.to_dict()))) == plan  # via JSON
    wire = plan.to_dict()
    assert ast.literal_eval(repr(wire)) == wire  # the job literal stays plain data
    assert all(type(v) in (str, int, float, bool, list, type(None)) for v in wire.values())


def test_the_sections_read_the_flat_fields_typed() -> None:
    plan = TrainingPlan.from_dict(BY_NAME["distributed-full"]["input"])
    assert plan.dp.mode is DPMode.DISTRIBUTED and plan.dp.distributed
    assert plan.dp.target_epsilon == 3.0 and plan.dp.accountant is Accountant.PRV
    assert plan.aggregation.mode is AggregationMode.SECURE and plan.aggregation.secure
    assert plan.aggregation.compression is Compression.NONE and len(plan.aggregation.peers) == 3
    assert (plan.survivors_needed, plan.honest_sites) == (3, 2)
    assert not plan.metrics.enabled and plan.loss is Loss.CROSS_ENTROPY
    mixed = TrainingPlan.from_dict(BY_NAME["frozen-personal-prox"]["input"])
    assert mixed.algorithm.frozen == ("0.weight",) and mixed.algorithm.personalizes
    assert mixed.calls == mixed.rounds + 1 and mixed.optimizer is Optimizer.SGD
    weighted = TrainingPlan.from_dict(BY_NAME["pos-weight"]["input"])
    assert weighted.imbalance.pos_weight == 4.0 and weighted.metrics.binary


def test_a_plan_built_from_sections_travels_flat() -> None:
    plan = TrainingPlan(rounds=3, loss=Loss.MSE, dp=DPSection(noise_multiplier=1.5))
    assert plan == TrainingPlan.of(rounds=3, loss="mse", noise_multiplier=1.5)
    assert plan.to_dict()["loss"] == "mse" and type(plan.to_dict()["dp"]) is str


@pytest.mark.parametrize(
    ("field", "allowed"),
    [
        ("optimizer", "sgd, adam"),
        ("loss", "cross_entropy, mse, bce_with_logits"),
        ("accountant", "prv, rdp"),
        ("dp", "local, distributed"),
        ("aggregation", "plain, secure"),
        ("compression", "none, int8, topk"),
    ],
)
@pytest.mark.parametrize("bad", ["bogus", "SGD ", 3, None, ["sgd"]])
def test_a_bad_mode_is_one_plan_error_naming_the_allowed_values(
    field: str, allowed: str, bad: object
) -> None:
    with pytest.raises(PlanError) as info:
        TrainingPlan.from_dict({"noise_multiplier": 1.0, field: bad})
    assert str(info.value) == f"{field} must be one of {allowed}; got {bad!r}"
    with pytest.raises(PlanError) as job:  # and the same line from a whole job
        JobSpec.from_dict(
            {
                "name": "j",
                "dataset": "d",
                "target": "y",
                "model": {"input": [3], "layers": LAYERS},
                "plan": {"noise_multiplier": 1.0, field: bad},
            }
        )
    assert str(job.value) == str(info.value)


def test_unknown_and_misplaced_fields_are_refused() -> None:
    with pytest.raises(PlanError, match="unknown plan fields: mode, noise"):
        TrainingPlan.from_dict({"noise_multiplier": 1.0, "mode": "local", "noise": 1})
    with pytest.raises(PlanError, match="plan must be a dict"):
        TrainingPlan.from_dict([("noise_multiplier", 1.0)])  # type: ignore[arg-type]


def test_with_fields_runs_every_check_again() -> None:
    plan = TrainingPlan.of(noise_multiplier=1.0, learning_rate=0.5)
    assert plan.with_fields(rounds=7).rounds == 7 and plan.rounds == 5
    with pytest.raises(PlanError, match='needs aggregation "secure"'):
        plan.with_fields(dp="distributed")  # a cross-section rule, the DP section's
    with pytest.raises(PlanError, match="learning_rate x proximal_mu"):
        plan.with_fields(proximal_mu=2.0)  # the algorithm section's, reading the core


# --- one step arithmetic -------------------------------------------------------------------

LAYERS = [{"type": "Linear", "in_features": 3, "out_features": 2}]


def _frame(n: int) -> pd.DataFrame:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(n, 3))
    return pd.DataFrame({"a": x[:, 0], "b": x[:, 1], "c": x[:, 2], "y": (x[:, 0] > 0) * 1})


@pytest.mark.parametrize(
    ("rows", "published", "fields"),
    [
        (100, 100, {"batch_size": 16}),
        (97, 120, {"batch_size": 7, "local_epochs": 2}),  # the published count rules
        (50, 50, {"batch_size": 64, "validation_fraction": 0.0}),  # one step an epoch
        (333, 300, {"batch_size": 10, "validation_fraction": 0.35}),
        (80, 80, {"batch_size": 12, "personalize_layers": ["0"], "personalize_epochs": 2}),
    ],
)
def test_the_loop_takes_the_steps_the_accounting_charged(
    rows: int, published: int, fields: dict, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Through the site's own path (prepare_task, run_task): the Poisson loop's steps per epoch
    and rate, the divisor of the noisy sum, and the steps run are the privacy plan's."""
    spec = JobSpec(
        "j",
        "d",
        "y",
        {"input": [3], "layers": LAYERS},
        TrainingPlan.of(noise_multiplier=1.0, rounds=3, **fields),
    )
    seen: dict[str, list[int]] = {"steps": [], "divisor": []}
    schedule, engine = dp_sgd.poisson_schedule, fused_dp.FusedDPSGD

    def poisson(n: int, steps: int, rng: np.random.Generator):  # noqa: ANN202
        seen["steps"].append(steps)
        return schedule(n, steps, rng)

    class Recording(engine):  # type: ignore[misc, valid-type]
        def __init__(self, model, optimizer, sigma, clip, expected, *rest) -> None:  # noqa: ANN001
            seen["divisor"].append(expected)
            super().__init__(model, optimizer, sigma, clip, expected, *rest)

    monkeypatch.setattr(dp_sgd, "poisson_schedule", poisson)
    monkeypatch.setattr(fused_dp, "FusedDPSGD", Recording)
    charged = privacy_plan(spec.plan, published)
    n_train = training_rows(published, spec.plan)
    per_epoch = -(-n_train // spec.plan.batch_size)  # by hand: Opacus' loader length
    calls = [False, True] if spec.plan.algorithm.personalizes else [False]
    ran = []
    for personalize in calls:
        task = prepare_task(
            spec,
            _frame(rows),
            "y",
            encode_weights(
                {"0.weight": np.zeros((2, 3), np.float32), "0.bias": np.zeros(2, np.float32)}
            ),
            charged.noise_multiplier,
            2,
            1,
            None,
            public_rows=published,
            personalize=personalize,
        )
        ran.append(int(run_task(task, _test_seed=1).metrics["steps"]))
    assert set(seen["steps"]) == {per_epoch} == {step_plan(n_train, spec.plan).steps_per_epoch}
    assert charged.sample_rate == 1.0 / per_epoch
    assert set(seen["divisor"]) == {max(1, int(n_train / per_epoch))}
    assert ran[0] == charged.steps_per_round == spec.plan.local_epochs * per_epoch
    assert sum(ran[1:]) == charged.personal_steps
    assert charged.mechanism.steps == spec.plan.rounds * ran[0] + sum(ran[1:])


def test_step_plan_is_opacus_arithmetic() -> None:
    plan = TrainingPlan.of(noise_multiplier=1.0, batch_size=32, local_epochs=2, rounds=4)
    steps = step_plan(1000, plan)
    assert (steps.steps_per_epoch, steps.sample_rate) == (32, 1 / 32)
    assert (steps.expected_batch, steps.batch_divisor) == (1000 / 32, 31)
    assert (steps.steps_per_round, steps.total_steps, steps.personal_steps) == (64, 256, 0)
    tiny = step_plan(0, plan)
    assert (tiny.steps_per_epoch, tiny.expected_batch, tiny.batch_divisor) == (1, 1.0, 1)
