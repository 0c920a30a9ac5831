"""Researcher-side bad input: one clear line, exit code 1."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from researcher.errors import FederationError, JobError
from researcher.federation import Federation
from researcher.job import load_job_file, render
from tests.conftest import run_cli


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_inline_password_is_refused(tmp_path: Path) -> None:
    fed = write(
        tmp_path / "f.toml",
        '[[sites]]\nname="a"\nurl="http://x:1"\nemail="a@b.c"\npassword="hunter2"\n',
    )
    with pytest.raises(FederationError, match="inline passwords are not accepted"):
        Federation.load(fed)


def test_missing_federation_file_via_cli(tmp_path: Path) -> None:
    proc = run_cli("researcher", "status", "-f", str(tmp_path / "nope.toml"), check=False)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines() == [
        f"error: federation file {tmp_path / 'nope.toml'} not found"
    ]


def test_password_env_must_be_set(tmp_path: Path, monkeypatch) -> None:
    fed = Federation.load(
        write(
            tmp_path / "f.toml",
            '[[sites]]\nname="a"\nurl="http://x:1"\n'
            'email="a@b.c"\npassword_env="FEDSITE_TEST_PW"\n',
        )
    )
    monkeypatch.delenv("FEDSITE_TEST_PW", raising=False)
    with pytest.raises(FederationError, match="FEDSITE_TEST_PW is not set"):
        fed.sites[0].password()


def test_job_file_needs_dataset_and_plan(tmp_path: Path) -> None:
    job = write(tmp_path / "job.py", "import torch.nn as nn\nDATASET = 'd'\n")
    with pytest.raises(JobError, match="must define PLAN"):
        load_job_file(job, "target", 4, 2)


def test_job_file_round_trips_through_the_template(tmp_path: Path) -> None:
    job = write(
        tmp_path / "job.py",
        "import torch.nn as nn\nDATASET = 'd'\nPLAN = {'noise_multiplier': 1.0}\n"
        "def make_model(a, b):\n    return nn.Sequential(nn.Linear(a, 3), nn.ReLU(), nn.Linear(3, b))\n",
    )
    spec = load_job_file(job, "target", 4, 2)
    assert spec.dataset == "d" and spec.plan.dp.noise_multiplier == 1.0
    assert spec.job_id in render(spec) and spec.name.endswith(spec.job_id[:8])
    assert spec.name == f"job_{spec.job_id[:8]}"  # from job.py: not job_job_...
    other = load_job_file(write(tmp_path / "cancer-mlp.py", job.read_text()), "target", 4, 2)
    assert other.name == f"job_cancer_mlp_{other.job_id[:8]}"
    assert spec.architecture.input == (4,) and spec.architecture.output == (2,)
    assert spec.architecture.parameters == {
        "0.weight": (3, 4),
        "0.bias": (3,),
        "2.weight": (2, 3),
        "2.bias": (2,),
    }
    assert "make_model" not in render(spec) and "nn.Sequential" not in render(spec)


def test_job_file_may_give_the_model_as_a_literal(tmp_path: Path) -> None:
    job = write(
        tmp_path / "job.py",
        "DATASET = 'd'\nPLAN = {'noise_multiplier': 1.0, 'loss': 'mse'}\n"
        "MODEL = [{'type': 'Linear', 'in_features': 4, 'out_features': 1}]\n",
    )
    spec = load_job_file(job, "target", 4, 1)
    assert spec.model["layers"] == [
        {"type": "Linear", "in_features": 4, "out_features": 1, "bias": True}
    ]
    with pytest.raises(JobError, match="expects 4 features"):
        load_job_file(job, "target", 5, 1)


@pytest.mark.parametrize(
    ("body", "needle"),
    [
        ("def make_model(a, b):\n    return None\n", "must be an nn.Module"),
        ("def make_model(a, b):\n    return nn.BatchNorm1d(a)\n", "BatchNorm1d) is refused"),
        ("def make_model(a, b):\n    raise ValueError('no')\n", "make_model failed: ValueError"),
        ("MODEL = 3\n", "must be an nn.Module, a list of layer dicts or a spec dict, not int"),
        ("x = 1 / 0\n", "failed to run: ZeroDivisionError"),
    ],
)
def test_a_bad_job_file_is_one_clear_job_error(tmp_path: Path, body: str, needle: str) -> None:
    job = write(
        tmp_path / "job.py",
        "import torch.nn as nn\nDATASET = 'd'\nPLAN = {'noise_multiplier': 1.0}\n" + body,
    )
    with pytest.raises(JobError, match=re.escape(needle)):
        load_job_file(job, "target", 4, 2)


def test_a_job_file_without_a_model_gets_the_default_linear_one(tmp_path: Path) -> None:
    job = write(tmp_path / "job.py", "DATASET = 'd'\nPLAN = {'target_epsilon': 3.0}\n")
    spec = load_job_file(job, "target", 4, 3)
    assert spec.model["layers"] == [
        {"type": "Linear", "in_features": 4, "out_features": 3, "bias": True}
    ]


def test_train_needs_run_dir_or_resume(tmp_path: Path) -> None:
    fed = write(
        tmp_path / "f.toml",
        '[[sites]]\nname="a"\nurl="http://x:1"\nemail="a@b.c"\npassword_file="pw"\n',
    )
    proc = run_cli("researcher", "train", "-f", str(fed), check=False)
    assert proc.returncode == 1 and "--run-dir" in proc.stderr


def test_metadata_round_trips_and_tolerates_noise() -> None:
    from policies.metadata import format_meta, parse_meta

    meta = {"target": "y", "rows": 10, "schema": [["a", "float64"], ["y", "int64"]]}
    assert parse_meta("free text\n" + format_meta(meta) + "\nmore") == meta
    assert parse_meta("no metadata here") == {}
    assert parse_meta("fedsite-meta: {broken") == {}


def test_connection_errors_are_told_apart_from_other_failures() -> None:
    import requests

    from policies.errors import is_connection_error

    assert is_connection_error(requests.ConnectionError("refused"))
    assert is_connection_error(ConnectionRefusedError())
    assert is_connection_error(OSError("no route"))
    assert not is_connection_error(ValueError("bad reply"))


def _federation_with_a_saved_job(tmp_path: Path) -> Path:
    from researcher import api
    from researcher.job import make_job

    fed_file = write(
        tmp_path / "f.toml",
        '[[sites]]\nname = "a"\nurl = "http://127.0.0.1:1"\nemail = "a@b.c"\n'
        'password_file = "pw"\n',
    )
    write(tmp_path / "pw", "secret")
    layers = [{"type": "Linear", "in_features": 3, "out_features": 2}]
    spec = make_job(layers, "d", "y", {"noise_multiplier": 1.0}, n_features=3)
    api.save_job(Federation.load(fed_file), spec, {})
    return fed_file


def test_ctrl_c_during_train_exits_130_with_how_to_resume(tmp_path: Path, monkeypatch) -> None:
    from researcher import api

    def interrupted(*_a, **_k):  # noqa: ANN002, ANN003, ANN202
        raise KeyboardInterrupt

    monkeypatch.setattr(api, "train", interrupted)
    fed_file = _federation_with_a_saved_job(tmp_path)
    run = tmp_path / "runs" / "1"
    proc = run_cli("researcher", "train", "-f", str(fed_file), "--run-dir", str(run), check=False)
    assert proc.returncode == 130
    assert f"--resume {run}" in proc.stderr and proc.stderr.count("\n") == 1


def test_resume_of_nothing_and_a_new_run_over_an_old_one_are_refused(tmp_path: Path) -> None:
    fed_file = str(_federation_with_a_saved_job(tmp_path))
    nope = run_cli(
        "researcher", "train", "-f", fed_file, "--resume", str(tmp_path / "nope"), check=False
    )
    assert nope.returncode == 1 and "holds no run to resume" in nope.stderr
    old = tmp_path / "old"
    write(old / "state.json", "{}") if old.mkdir() is None else None
    again = run_cli("researcher", "train", "-f", fed_file, "--run-dir", str(old), check=False)
    assert again.returncode == 1 and "already holds a run" in again.stderr


def test_the_label_column_comes_from_the_sites_and_they_must_agree(
    tmp_path: Path, monkeypatch
) -> None:
    from researcher import api

    job = write(
        tmp_path / "job.py",
        "DATASET = 'd'\nPLAN = {'noise_multiplier': 1.0}\n"
        "MODEL = [{'type': 'Linear', 'in_features': 2, 'out_features': 2}]\n",
    )
    meta = {"target": "outcome", "schema": ["a", "b", "outcome"], "n_classes": 2}
    fed = Federation.load(_federation_with_a_saved_job(tmp_path))
    monkeypatch.setattr(api, "dataset_metas", lambda *_: {"a": meta, "b": dict(meta)})
    assert api.load_job(fed, job).target == "outcome"  # not the old default "target"
    with pytest.raises(JobError, match="publish 'outcome' as the label column, not 'label'"):
        api.load_job(fed, job, "label")
    other = {**meta, "target": "y"}
    monkeypatch.setattr(api, "dataset_metas", lambda *_: {"a": meta, "b": other})
    with pytest.raises(JobError, match="disagree on the dataset's target"):
        api.load_job(fed, job)


def test_an_unexpected_error_is_one_line_and_debug_shows_no_locals(tmp_path: Path) -> None:
    a_file = write(tmp_path / "taken", "not a folder")
    proc = run_cli("datasite", "init", "x", "--dir", str(a_file / "site"), check=False)
    assert proc.returncode == 1 and proc.stderr.count("\n") == 1, proc.stderr
    assert "unexpected" in proc.stderr and "--debug" in proc.stderr
    debug = run_cli("datasite", "init", "x", "--dir", str(a_file / "site"), "--debug", check=False)
    assert debug.returncode == 1 and "Traceback" in debug.stderr
    assert "locals" not in debug.stderr.lower() and "│" not in debug.stderr


def test_datasets_lists_the_live_sites_and_one_line_for_a_dead_one(
    tmp_path: Path, monkeypatch
) -> None:
    from researcher import sites
    from researcher.sites import Unreachable

    fed_file = write(
        tmp_path / "f.toml",
        "".join(
            f'[[sites]]\nname = "{n}"\nurl = "http://127.0.0.1:1"\nemail = "a@b.c"\n'
            'password_file = "pw"\n'
            for n in ("up", "down")
        ),
    )
    write(tmp_path / "pw", "secret")

    def connect(login):  # noqa: ANN001, ANN202
        if login.name == "down":
            raise Unreachable("down: no datasite answers at http://127.0.0.1:1")
        return login

    row = {f"feature_{i}": 0.123456 * i for i in range(12)} | {"target": 1}
    listed = [
        {"name": "d", "rows": 9, "target": "target", "schema": list(row), "mock_preview": [row]}
    ]
    monkeypatch.setattr(sites, "connect", connect)
    monkeypatch.setattr(sites, "datasets", lambda client: listed)
    proc = run_cli("researcher", "datasets", "-f", str(fed_file), check=False)
    # the live site still lists; the dead one is one line, and the exit code says one failed
    assert proc.returncode == 1, proc.stderr
    assert proc.stderr.strip() == "down: no datasite answers at http://127.0.0.1:1"
    assert "feature_1=0.123" in proc.stdout and "more)" in proc.stdout
    assert "{'" not in proc.stdout  # no dict cut in the middle

    def nobody(login):  # noqa: ANN001, ANN202
        raise Unreachable(f"{login.name}: no datasite answers")

    monkeypatch.setattr(sites, "connect", nobody)
    none = run_cli("researcher", "datasets", "-f", str(fed_file), check=False)
    assert none.returncode == 1 and none.stderr.count("\n") == 1


def test_an_unknown_key_in_the_federation_file_is_refused_by_name(tmp_path: Path) -> None:
    """A typo such as ``pasword_env`` used to be ignored; the login then failed far away."""
    path = tmp_path / "fed.toml"
    path.write_text(
        '[[sites]]\nname = "a"\nurl = "http://127.0.0.1:1"\nemail = "x@y.z"\n'
        'password_file = "pw"\npasword_env = "PW"\n'
    )
    with pytest.raises(FederationError, match="site a: unknown key\\(s\\) pasword_env"):
        Federation.load(path)
    path.write_text(
        'tiemout = 3\n[[sites]]\nname = "a"\nurl = "u"\nemail = "e"\npassword_env = "P"\n'
    )
    with pytest.raises(FederationError, match="unknown key\\(s\\) tiemout"):
        Federation.load(path)


def test_an_unknown_strategy_is_refused_before_any_site_is_contacted(tmp_path: Path) -> None:
    fed_file = write(  # a site nobody runs: the strategy is refused before it is tried
        tmp_path / "f.toml",
        '[[sites]]\nname = "a"\nurl = "http://127.0.0.1:1"\nemail = "a@b.c"\n'
        'password_file = "pw"\n',
    )
    write(tmp_path / "pw", "secret")
    proc = run_cli(
        "researcher",
        "train",
        "-f",
        str(fed_file),
        "--run-dir",
        str(tmp_path / "r"),
        "--strategy",
        "fedprox-typo",
        check=False,
    )
    assert proc.returncode == 1
    assert "unknown strategy 'fedprox-typo'; choose one of fedavg, fedavgm" in proc.stderr
    assert not (tmp_path / "r").exists()
