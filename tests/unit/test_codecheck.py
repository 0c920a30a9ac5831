"""The automatic review: the template passes, every attack fails with a reason that names it."""

from __future__ import annotations

import pytest
from torch import nn

from datasites.review.access import DatasetPolicy
from datasites.review.report import Submission, build_report
from policies.errors import PlanError
from policies.job_template import TEMPLATE
from policies.plan import JobSpec, TrainingPlan
from researcher.errors import JobError
from researcher.job import make_job, render

MODEL = nn.Sequential(nn.Linear(30, 8), nn.ReLU(), nn.Linear(8, 2))
N_PARAMETERS = 30 * 8 + 8 + 8 * 2 + 2
POLICY = DatasetPolicy(allowed_domains=["uni.edu"])


def job(**plan) -> JobSpec:
    base = {"rounds": 3, "noise_multiplier": 1.0}
    return make_job(MODEL, "cancer", "target", {**base, **plan}, n_features=30, n_outputs=2)


def submission(code: str, researcher: str = "ada@uni.edu", **kw) -> Submission:
    fields = {"n_features": 30, "n_classes": 2, **kw}
    return Submission(code, researcher, "cancer", 500, ("data", "weights"), **fields)


def report(code: str, researcher: str = "ada@uni.edu", policy: DatasetPolicy = POLICY, **kw):
    return build_report(submission(code, researcher, **kw), policy, set())


def failed(code: str, **kw) -> dict[str, str]:
    return {c.name: c.reason for c in report(code, **kw).failures()}


def hand_written(literal: dict) -> str:
    """The template around any job literal, as a plain syft client could send it."""
    return TEMPLATE.format(name="hand_written", job_id=literal.get("job_id"), job=literal)


def test_the_rendered_template_passes() -> None:
    r = report(render(job()))
    assert r.passed, r.to_dict()
    assert r.job is not None and r.job.plan.rounds == 3
    checks = {c.name for c in r.checks}
    assert {"researcher", "executed", "template", "dataset", "model", "model_size"} <= checks
    out = r.to_dict()
    assert out["parameters"] == N_PARAMETERS
    assert [row["type"] for row in out["architecture"]] == ["Linear", "ReLU", "Linear"]


def test_returning_the_data_fails_the_template() -> None:
    code = "def f(data, weights):\n    return data\n"
    assert "template" in failed(code)


def test_returning_a_slice_of_rows_fails_the_template() -> None:
    code = "def f(data, weights):\n    return data.head(5).to_dict()\n"
    assert "template" in failed(code)


def test_extra_statements_around_the_template_fail() -> None:
    lines = render(job()).splitlines()
    wrapped = "\n".join([*lines[:2], "    import os", *lines[2:]]) + "\n"
    reasons = failed(wrapped)
    assert "body has 3 statements" in reasons["template"]
    trailing = render(job()) + "\nimport os\n"
    assert "exactly one function" in failed(trailing)["template"]


def test_passing_something_else_than_the_data_fails() -> None:
    code = render(job()).replace("data=data", "data=data.head(3)")
    assert "data must be passed through unchanged" in failed(code)["template"]


def test_oversized_code_is_not_parsed() -> None:
    code = render(job()) + "#" * 200_001
    assert "not parsed" in failed(code)["template"]


def test_what_syft_executes_must_be_the_template() -> None:
    reasons = failed(render(job()), executed_problems=("syft calls 'other', the raw code ...",))
    assert "syft calls 'other'" in reasons["executed"]
    assert "executed" not in failed(render(job()))


@pytest.mark.parametrize(
    ("layer", "needle"),
    [
        ({"type": "BatchNorm1d", "num_features": 8}, "BatchNorm1d) is refused"),
        ({"type": "Identity"}, "'Identity' is not on the site's allowlist"),
        ({"type": "Linear", "in_features": 8, "out_features": 8, "hook": "os"}, "unknown argument"),
    ],
)
def test_a_hand_written_literal_with_a_layer_off_the_allowlist_fails(
    layer: dict, needle: str
) -> None:
    """A plain syft client may put anything in the literal; the review re-parses it."""
    literal = job().to_dict()
    literal["model"]["layers"].insert(2, layer)
    reasons = failed(hand_written(literal))
    assert "job literal is not a valid job" in reasons["template"]
    assert needle in reasons["template"]


def test_a_model_that_does_not_fit_the_table_fails() -> None:
    assert "has 31 feature(s)" in failed(render(job()), n_features=31)["model"]
    assert "needs [3]" in failed(render(job()), n_classes=3)["model"]
    assert "publishes no schema" in failed(render(job()), n_features=None)["model"]


def test_model_size_is_counted_from_the_spec() -> None:
    small = DatasetPolicy(allowed_domains=["uni.edu"], max_parameters=N_PARAMETERS - 1)
    reasons = failed(render(job()), policy=small)
    assert f"{N_PARAMETERS} trainable parameters, limit {N_PARAMETERS - 1}" in reasons["model_size"]
    exact = DatasetPolicy(allowed_domains=["uni.edu"], max_parameters=N_PARAMETERS)
    assert "model_size" not in failed(render(job()), policy=exact)


def test_the_converter_refuses_a_custom_module() -> None:
    class Leaky(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(30, 2)

        def forward(self, x):  # noqa: ANN001, ANN202
            return self.fc(x)

    with pytest.raises(JobError, match=r"layer 1 \(Leaky\).*custom module"):
        make_job(
            nn.Sequential(nn.ReLU(), Leaky()),
            "cancer",
            "target",
            {"noise_multiplier": 1.0},
            n_features=30,
            n_outputs=2,
        )


def test_training_without_noise_is_refused_before_and_at_the_review() -> None:
    with pytest.raises(JobError, match="noise_multiplier must be a number in"):
        job(noise_multiplier=0.0)
    literal = job().to_dict()
    literal["plan"]["noise_multiplier"] = 0.0  # as a plain syft client could send it
    assert "noise_multiplier must be a number in" in failed(hand_written(literal))["template"]


def test_noise_below_the_policy_fails_dp_check() -> None:
    reasons = failed(render(job(noise_multiplier=0.1)))
    assert "noise multiplier 0.1 is below the policy's 0.5" in reasons["dp_parameters"]


def test_large_delta_clipping_and_rounds_fail() -> None:
    reasons = failed(render(job(delta=0.01, max_grad_norm=50.0, rounds=500)))
    assert "delta 0.01 exceeds" in reasons["dp_parameters"]
    assert "max_grad_norm 50.0 exceeds" in reasons["dp_parameters"]
    assert "500 round(s), limit 50" in reasons["rounds"]


def test_a_plan_past_the_step_bound_fails_dp_check() -> None:
    from policies.privacy import privacy_plan

    # 1000 rounds x 100 epochs x 16 batches of 32 over 500 rows: far past MAX_TOTAL_STEPS,
    # refused before any accountant runs
    r = build_report(
        submission(render(job(rounds=1000, local_epochs=100))),
        POLICY,
        set(),
        epsilon_of=lambda spec, rows: privacy_plan(spec.plan, rows).epsilon_job,
    )
    reasons = {c.name: c.reason for c in r.failures()}
    assert "1300000 DP-SGD steps in all" in reasons["dp_parameters"]


def test_researcher_not_allowed() -> None:
    assert (
        "not on this dataset's allowed"
        in failed(render(job()), researcher="eve@evil.com")["researcher"]
    )


def test_epsilon_of_the_plan_is_checked_when_given() -> None:
    r = build_report(
        submission(render(job(noise_multiplier=0.6))),
        POLICY,
        set(),
        epsilon_of=lambda spec, rows: 9.0,
    )
    assert "spends epsilon 9.000" in {c.name: c.reason for c in r.failures()}["dp_parameters"]


def test_plan_validation_messages() -> None:
    with pytest.raises(PlanError, match="exactly one of noise_multiplier or target_epsilon"):
        TrainingPlan.of()
    with pytest.raises(PlanError, match=r"batch_size must be an integer in \[1, 65536\]"):
        TrainingPlan.of(noise_multiplier=1.0, batch_size=0)
    with pytest.raises(PlanError, match="noise_multiplier must be a number in"):
        TrainingPlan.of(noise_multiplier=0.0)
    with pytest.raises(PlanError, match="learning_rate must be a number in"):
        TrainingPlan.of(noise_multiplier=1.0, learning_rate=float("nan"))


# --- the template check is exact (issue 24, item 5) -------------------------------------------

EXACT_DEPARTURES = [
    # (what a plain syft client changes, a needle of the one-line finding)
    (
        lambda s: s.replace("(data, weights):", "(data: 'x', weights):", 1),
        "'data' has an annotation",
    ),
    (lambda s: s.replace("(data, weights):", "(data, weights) -> dict:", 1), "return annotation"),
    (lambda s: s.replace("(data, weights):", "(data, weights=print('hi')):", 1), "default value"),
    (lambda s: "@staticmethod\n" + s, "has a decorator"),
    (lambda s: s.replace("    from datasites", "    x = 1\n    from datasites", 1), "3 statements"),
    # not one of the named ones: the keywords reordered, caught by the node-for-node comparison
    (
        lambda s: s.replace("data=data, weights=weights, job=", "weights=weights, data=data, job="),
        "differs from the template",
    ),
]


@pytest.mark.parametrize(("change", "needle"), EXACT_DEPARTURES)
def test_anything_beyond_the_template_fails_on_raw_and_on_syfts_parsed_code(
    change, needle: str
) -> None:
    from syft.service.code.user_code import parse_user_code

    from datasites.review.codecheck import parse_template, parsed_problems

    spec = job()
    code = change(render(spec))
    literal, findings = parse_template(code)
    assert literal is None
    assert needle in "; ".join(str(f) for f in findings)
    assert needle in failed(code)["template"]
    # syft strips decorators from what it executes; everything else reaches its parsed code
    parsed = parse_user_code(code, f"user_func_{spec.name}", spec.name, ["data", "weights"])
    if needle != "has a decorator":
        assert parsed_problems(parsed, spec.name)


def test_the_true_template_passes_on_raw_and_on_syfts_parsed_code() -> None:
    from syft.service.code.user_code import parse_user_code

    from datasites.review.codecheck import parse_template, parsed_problems

    spec = job()
    code = render(spec)
    literal, findings = parse_template(code)
    assert findings == [] and literal == spec.to_dict()
    parsed = parse_user_code(code, f"user_func_{spec.name}", spec.name, ["data", "weights"])
    assert parsed_problems(parsed, spec.name) == []
    # a wrapper syft never made (an extra statement after the call) is refused
    assert parsed_problems(parsed + "\n    print(result)", spec.name)


def test_the_submitted_function_is_the_rendered_text_and_leaves_no_file_behind() -> None:
    """syft reads the submitted function's source with ``inspect`` when it wraps it: the file
    must exist then, and be gone after (each submission left a folder in the temp dir)."""
    import inspect
    import sys
    from pathlib import Path

    from researcher.job import as_function

    spec = job()
    with as_function(spec) as function:
        path = Path(inspect.getsourcefile(function) or "")
        assert path.is_file()
        assert inspect.getsource(function) in render(spec)
        module = function.__module__
    assert not path.parent.exists()
    assert module not in sys.modules
