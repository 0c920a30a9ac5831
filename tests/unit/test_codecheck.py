"""The automatic review: the template passes, every attack fails with a reason that names it."""

from __future__ import annotations

import pytest

from policies.access import DatasetPolicy
from policies.codecheck import check_model_source
from policies.plan import JobSpec, TrainingPlan
from policies.report import Submission, build_report
from researcher.job import make_job, render

MODEL = """import torch.nn as nn

def make_model(n_features, n_outputs):
    return nn.Sequential(nn.Linear(n_features, 8), nn.ReLU(), nn.Linear(8, n_outputs))
"""
POLICY = DatasetPolicy(allowed_domains=["uni.edu"])


def job(**plan) -> JobSpec:
    base = {"rounds": 3, "noise_multiplier": 1.0}
    return make_job(MODEL, "cancer", "target", {**base, **plan})


def report(code: str, researcher: str = "ada@uni.edu", policy: DatasetPolicy = POLICY):
    return build_report(
        Submission(code, researcher, "cancer", 500, ("data", "weights")), policy, set()
    )


def failed(code: str, **kw) -> dict[str, str]:
    return {c.name: c.reason for c in report(code, **kw).failures()}


def test_the_rendered_template_passes() -> None:
    r = report(render(job()))
    assert r.passed, r.to_dict()
    assert r.job is not None and r.job.plan.rounds == 3


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


@pytest.mark.parametrize(
    ("snippet", "needle"),
    [
        ("import os\n", "import of 'os'"),
        ("import subprocess\n", "import of 'subprocess'"),
        ("import socket\n", "import of 'socket'"),
        ("from pathlib import Path\n", "import from 'pathlib'"),
        ("x = open('/etc/passwd').read()\n", "'open'"),
        ("y = eval('1+1')\n", "'eval'"),
        ("z = ().__class__.__bases__\n", "dunder attribute '__class__'"),
        ("import torch\nw = torch.load('x')\n", "attribute 'load'"),
        ("k = getattr(print, '__self__')\n", "'getattr'"),
    ],
)
def test_model_code_escapes_are_flagged(snippet: str, needle: str) -> None:
    findings = check_model_source(MODEL + snippet)
    assert any(needle in str(f) for f in findings), findings
    reasons = failed(
        render(make_job(MODEL + snippet, "cancer", "target", {"noise_multiplier": 1.0}))
    )
    assert needle in reasons["model_code"]


def test_training_without_noise_fails_dp_check() -> None:
    assert (
        "noise multiplier 0.0 is below"
        in failed(render(job(noise_multiplier=0.0)))["dp_parameters"]
    )


def test_large_delta_clipping_and_rounds_fail() -> None:
    reasons = failed(render(job(delta=0.01, max_grad_norm=50.0, rounds=500)))
    assert "delta 0.01 exceeds" in reasons["dp_parameters"]
    assert "max_grad_norm 50.0 exceeds" in reasons["dp_parameters"]
    assert "500 round(s), limit 50" in reasons["rounds"]


def test_researcher_not_allowed() -> None:
    assert (
        "not on this dataset's allowed"
        in failed(render(job()), researcher="eve@evil.com")["researcher"]
    )


def test_epsilon_of_the_plan_is_checked_when_given() -> None:
    r = build_report(
        Submission(
            render(job(noise_multiplier=0.6)), "ada@uni.edu", "cancer", 500, ("data", "weights")
        ),
        POLICY,
        set(),
        epsilon_of=lambda spec, rows: 9.0,
    )
    assert "spends epsilon 9.000" in {c.name: c.reason for c in r.failures()}["dp_parameters"]


def test_plan_validation_messages() -> None:
    from policies.errors import PlanError

    with pytest.raises(PlanError, match="exactly one of noise_multiplier or target_epsilon"):
        TrainingPlan()
    with pytest.raises(PlanError, match="batch_size must be a positive integer"):
        TrainingPlan(noise_multiplier=1.0, batch_size=0)
