"""``researcher plan``, the minimal job file and ``--auto-plan``, on published metadata alone.

The sites' metadata is what ``researcher.api.dataset_metas`` would read from them; it is
replaced here so that the researcher's side runs without servers (the wire is tested in the
integration suite). The plan filled in is the one ``policies.autoplan`` suggests."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from researcher import api
from researcher.cli import app
from researcher.federation import Federation

FEATURES = [f"x{i}" for i in range(13)]


def meta(rows: int) -> dict:
    return {
        "dataset": "wine",
        "target": "y",
        "rows": rows,
        "mock_rows": rows,
        "mock_epsilon": 1.0,
        "schema": [[c, "float64"] for c in FEATURES] + [["y", "int64"]],
        "classes": ["0", "1", "2"],
        "n_classes": 3,
        "class_counts": [rows / 3] * 3,
        "feature_mean": [0.0] * 13,
        "feature_std": [1.0] * 13,
    }


METAS = {"winery-a": meta(66), "winery-b": meta(67)}


@pytest.fixture
def fed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    path = tmp_path / "federation.toml"
    path.write_text(
        "".join(
            f'[[sites]]\nname="{s}"\nurl="http://127.0.0.1:1"\nemail="a@b.c"\npassword_env="X"\n'
            for s in METAS
        )
    )
    monkeypatch.setattr(api, "dataset_metas", lambda _fed, _name: dict(METAS))
    listing = {s: [{"name": "wine", **m}] for s, m in METAS.items()}
    monkeypatch.setattr(api, "datasets", lambda _fed: listing)
    return path


def job_file(tmp_path: Path, plan: dict) -> Path:
    path = tmp_path / "job.py"
    path.write_text(f'DATASET = "wine"\nPLAN = {plan!r}\n')
    return path


def test_plan_command_suggests_from_public_numbers(fed: Path) -> None:
    result = CliRunner().invoke(app, ["plan", "-f", str(fed), "--epsilon", "3", "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["dataset"] == "wine"
    assert data["plan"]["target_epsilon"] == 3.0 and data["plan"]["max_grad_norm"] == 1.0
    assert set(data["epsilon"]) == set(METAS)
    assert all(e <= 3.0 + 1e-9 for e in data["epsilon"].values())
    # a 66-row mock at epsilon 1 gives statistics too noisy to scale with: said, not hidden
    assert any(w["kind"] == "statistics" for w in data["warnings"])


def test_plan_command_shows_a_table_and_the_minimal_job_file(fed: Path) -> None:
    result = CliRunner().invoke(app, ["plan", "-f", str(fed), "--epsilon", "3"])
    assert result.exit_code == 0, result.output
    assert "batch_size" in result.output and "target_epsilon" in result.output


def test_a_minimal_job_file_is_filled_by_the_auto_plan(fed: Path, tmp_path: Path) -> None:
    spec, auto = api.load_planned(
        Federation.load(fed), job_file(tmp_path, {"target_epsilon": 3.0, "accountant": "rdp"})
    )
    assert auto is not None
    assert spec.plan.batch_size == auto.fields["batch_size"] != 32  # not the static default
    assert not spec.plan.metrics.enabled and spec.plan.validation_fraction == 0.0
    assert spec.model["layers"][0]["type"] == "Linear"  # the default model: 13 -> 3
    assert spec.architecture.input == (13,) and spec.architecture.output == (3,)


def test_a_hand_tuned_plan_is_kept_unless_auto_plan_is_asked(fed: Path, tmp_path: Path) -> None:
    path = job_file(tmp_path, {"target_epsilon": 3.0, "batch_size": 8, "accountant": "rdp"})
    spec, auto = api.load_planned(Federation.load(fed), path)
    assert auto is None and spec.plan.batch_size == 8 and spec.plan.learning_rate == 0.1
    spec, auto = api.load_planned(Federation.load(fed), path, auto_plan=True)
    assert auto is not None and spec.plan.batch_size == auto.fields["batch_size"] != 8


def test_auto_plan_without_target_epsilon_is_one_clear_error(fed: Path, tmp_path: Path) -> None:
    path = job_file(tmp_path, {"noise_multiplier": 1.0})
    from researcher.errors import JobError

    with pytest.raises(JobError, match="auto-plan needs target_epsilon"):
        api.load_planned(Federation.load(fed), path, auto_plan=True)
