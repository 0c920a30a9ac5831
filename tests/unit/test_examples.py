"""Every example job in examples/ loads as a valid job for the README's federation."""

from __future__ import annotations

import runpy
from pathlib import Path

import pytest

from researcher.job import load_job_file, read_job_file

EXAMPLES = sorted((Path(__file__).resolve().parents[2] / "examples").glob("*.py"))


def test_there_is_one_example_per_plan_algorithm() -> None:
    names = {p.stem for p in EXAMPLES}
    assert {
        "fedavg",
        "fedprox",
        "compressed_int8",
        "compressed_topk",
        "personalized",
        "transfer",
        "distributed_dp",
    } <= names


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.stem)
def test_the_example_is_a_valid_job(path: Path) -> None:
    initial = None
    if read_job_file(path)["PLAN"].get("frozen"):  # made with its initial weights
        model = runpy.run_path(str(path))["make_model"](30, 2)
        initial = {k: v.detach().numpy() for k, v in model.named_parameters()}
    spec = load_job_file(path, "target", 30, 2, initial=initial)
    assert spec.dataset == "cancer" and spec.architecture.output == (2,)
    if "STRATEGY" in read_job_file(path):  # the researcher's, checked as `try` checks it
        from researcher.strategy import strategy_from

        strategy_from(read_job_file(path)["STRATEGY"])
    assert bool(spec.frozen_digest) == bool(spec.plan.algorithm.frozen)
