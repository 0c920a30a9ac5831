"""The hospital demo runs on the defaults: its job's plan is what ``researcher submit`` makes of
a minimal job file (only ``target_epsilon``) from what the demo's three sites publish."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts"))

import demo  # noqa: E402

from policies.plan import TrainingPlan  # noqa: E402
from policies.privacy import privacy_plan  # noqa: E402
from researcher import api  # noqa: E402
from tests.unit.federation_sim import publish  # noqa: E402


def _metas() -> dict[str, dict]:
    shares, _ = demo.split_data()
    return {
        name: publish(share, "target")[1] for name, share in zip(demo.SITES, shares, strict=True)
    }


def test_the_demo_submits_what_submit_makes_of_a_minimal_job_file() -> None:
    metas = _metas()
    plan = demo.minimal_plan(metas, 3.0)
    submitted = api._auto_fill({"target_epsilon": 3.0}, metas, forced=False)
    assert submitted is not None and plan == submitted.fields
    # not the former hand-tuned plan (batch 16, 5 rounds, 10% held out for no metrics)
    hand = demo.plan(5, 3.0)
    assert (plan["batch_size"], plan["rounds"]) != (hand["batch_size"], hand["rounds"])
    assert plan["validation_fraction"] == 0.0 and plan["site_metrics"] is False


def test_rounds_given_are_kept_and_every_site_still_meets_the_target() -> None:
    metas = _metas()
    plan = demo.minimal_plan(metas, 3.0, rounds=7)
    assert plan["rounds"] == 7
    for meta in metas.values():
        assert privacy_plan(TrainingPlan.from_dict(plan), meta["rows"]).epsilon_job <= 3.0 + 1e-6
