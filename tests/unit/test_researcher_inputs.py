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


# --- one prepare() for try, submit and Python (issue 27, structure item 2) ---------------------


def _wine_meta(rows: int, mean: float, std: float) -> dict:
    """What a site publishes for a 4-feature, 3-class dataset (no server: read as metadata)."""
    return {
        "dataset": "wine",
        "target": "y",
        "rows": rows,
        "mock_rows": rows,
        "schema": [[f"x{i}", "float64"] for i in range(4)] + [["y", "int64"]],
        "classes": ["0", "1", "2"],
        "n_classes": 3,
        "class_counts": [rows / 3] * 3,
        "feature_mean": [mean] * 4,
        "feature_std": [std] * 4,
    }


WINE = {"a": _wine_meta(300, 1.0, 1.0), "b": _wine_meta(100, 5.0, 2.0)}
FEDAVGM = {"name": "fedavgm", "server_lr": 0.5, "momentum": 0.5}


@pytest.fixture
def wine_fed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A federation of two sites whose published metadata is ``WINE`` (no site runs)."""
    from researcher import api

    path = write(
        tmp_path / "federation.toml",
        "".join(
            f'[[sites]]\nname="{s}"\nurl="http://127.0.0.1:1"\nemail="a@b.c"\npassword_env="X"\n'
            for s in WINE
        ),
    )
    monkeypatch.setattr(api, "dataset_metas", lambda _fed, _name: dict(WINE))
    return path


def _identity_free(spec) -> dict:  # noqa: ANN001
    return {k: v for k, v in spec.to_dict().items() if k not in ("job_id", "name")}


def test_prepare_is_what_try_and_submit_send(
    wine_fed: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Only `researcher submit` pooled the scaling: `try` dry-ran another spec, and `api.submit`
    sent one without it. Both commands now send what `api.prepare` gives a Python user."""
    import json

    from typer.testing import CliRunner

    from researcher import api
    from researcher.cli import app

    job = write(
        tmp_path / "job.py",
        f"DATASET = 'wine'\nPLAN = {{'target_epsilon': 3.0}}\nSTRATEGY = {FEDAVGM!r}\n",
    )
    fed = Federation.load(wine_fed)
    ready = api.prepare(fed, job)
    assert ready.strategy == FEDAVGM and ready.auto is not None  # a minimal PLAN: auto-planned
    assert ready.spec.scaling is not None
    assert ready.spec.scaling["mean"] == pytest.approx([2.0] * 4)  # (300 * 1 + 100 * 5) / 400
    # the spec the CLI built before: load_planned, then with_pooled_scaling
    old_path = api.with_pooled_scaling(fed, api.load_planned(fed, job)[0])
    assert _identity_free(ready.spec) == _identity_free(old_path)
    assert _identity_free(api.load_job(fed, job)) == _identity_free(ready.spec)

    seen: dict[str, api.PreparedJob] = {}

    def fake_submit(_fed, prepared, **_k):  # noqa: ANN001, ANN003, ANN202
        seen["submit"] = prepared
        return {"a": "r1", "b": "r2"}

    def fake_dry_run(_fed, prepared, initial=None):  # noqa: ANN001, ANN202
        seen["try"] = prepared
        return {
            "metrics": {"loss": 1.0},
            "privacy": {"noise_multiplier": 1.0},
            "shapes": {},
            "epsilon_per_site": {},
            "mock_site": "a",
            "n": 9,
            "warnings": [],
        }

    monkeypatch.setattr(api, "submit", fake_submit)
    monkeypatch.setattr(api, "dry_run", fake_dry_run)
    for verb in ("try", "submit"):
        result = CliRunner().invoke(app, [verb, str(job), "-f", str(wine_fed), "--json"])
        assert result.exit_code == 0, result.output
        assert json.loads(result.stdout)["strategy"] == FEDAVGM
        assert isinstance(seen[verb], api.PreparedJob)
        assert _identity_free(seen[verb].spec) == _identity_free(ready.spec), verb
        assert seen[verb].strategy == FEDAVGM
    # the strategy runs at the researcher: the code a site reviews is the same without it
    plain = write(tmp_path / "plain.py", "DATASET = 'wine'\nPLAN = {'target_epsilon': 3.0}\n")
    bare = api.prepare(fed, plain)
    assert bare.strategy == {"name": "fedavg"}
    assert _identity_free(bare.spec) == _identity_free(ready.spec)
    assert "fedavgm" not in render(ready.spec) and "strategy" not in render(ready.spec).lower()


@pytest.mark.parametrize(
    ("strategy", "needle"),
    [
        ("'fedprox'", "STRATEGY: unknown strategy 'fedprox'; choose one of fedavg, fedavgm"),
        ("{'name': 'fedavgm', 'lr': 0.5}", "has no parameter 'lr'; it takes server_lr, momentum"),
        ("{'name': 'fedavgm', 'momentum': 1.5}", "momentum must be in [0, 1), got 1.5"),
        ("{'name': 'fedadam', 'server_lr': 0}", "server_lr must be > 0, got 0"),
        ("{'name': 'median', 'beta': 0.1}", "'median' has no parameter 'beta'; it takes no par"),
        ("{'server_lr': 0.5}", 'STRATEGY: a strategy needs its "name"'),
        ("{'name': 'fedavgm', 'momentum': '0.5'}", "momentum must be a number, got '0.5'"),
        ("FedAvgM(server_lr=0.5)", ":3: STRATEGY must be a literal"),
    ],
)
def test_a_bad_strategy_is_one_job_error_line(
    wine_fed: Path, tmp_path: Path, strategy: str, needle: str
) -> None:
    from researcher import api

    job = write(tmp_path / "job.py", f"DATASET = 'wine'\nPLAN = {{}}\nSTRATEGY = {strategy}\n")
    with pytest.raises(JobError) as caught:
        api.prepare(Federation.load(wine_fed), job)
    assert needle in str(caught.value) and "\n" not in str(caught.value)


def test_a_secure_job_refuses_a_strategy_that_needs_each_update(
    wine_fed: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Refused at try/submit, not after every site approved the job and train began."""
    from researcher import api

    monkeypatch.setattr(api, "with_peers", lambda _fed, spec: spec)  # no site to ask
    job = write(
        tmp_path / "job.py",
        "DATASET = 'wine'\nPLAN = {'noise_multiplier': 1.0, 'aggregation': 'secure', "
        "'peers': ['" + "a" * 64 + "', '" + "b" * 64 + "']}\nSTRATEGY = 'median'\n",
    )
    with pytest.raises(JobError, match="STRATEGY: strategy 'median' needs each site's update"):
        api.prepare(Federation.load(wine_fed), job)


def _fake_rounds(monkeypatch: pytest.MonkeyPatch) -> dict:
    """``api.train`` with no site: approval, the round loop and the plots replaced; what the
    round loop was given is kept."""
    from researcher import api, plots, rounds

    given: dict = {}

    def run_federation(fed, spec, run_dir, **kw):  # noqa: ANN001, ANN003, ANN202
        given.update(kw, run_dir=run_dir)
        return rounds.RunResult(Path(run_dir), {}, [])

    monkeypatch.setattr(api, "_check_approved_somewhere", lambda *_: None)
    monkeypatch.setattr(rounds, "run_federation", run_federation)
    monkeypatch.setattr(plots, "plot_run", lambda *_: None)
    return given


def test_train_takes_the_strategy_the_job_file_named(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`--strategy fedavgm` could not set server_lr or momentum; the job file's STRATEGY can,
    and `train` (CLI or Python) uses it unless --strategy overrides it."""
    from typer.testing import CliRunner

    from researcher import api
    from researcher.cli import app
    from researcher.job import make_job
    from researcher.strategy import FedAdam, FedAvgM, FedYogi

    given = _fake_rounds(monkeypatch)
    fed_file = _federation_with_a_saved_job(tmp_path)
    fed = Federation.load(fed_file)
    layers = [{"type": "Linear", "in_features": 3, "out_features": 2}]
    spec = make_job(layers, "d", "y", {"noise_multiplier": 1.0}, n_features=3)
    api.save_job(fed, spec, {"a": "r1"}, strategy=FEDAVGM)

    api.train(fed, spec, tmp_path / "py")
    chosen = given["strategy"]
    assert isinstance(chosen, FedAvgM) and (chosen.server_lr, chosen.momentum) == (0.5, 0.5)

    run = tmp_path / "cli"
    cli = ["train", "-f", str(fed_file), "--job", spec.name]
    result = CliRunner().invoke(app, [*cli, "--run-dir", str(run)])
    assert result.exit_code == 0, result.output
    assert isinstance(given["strategy"], FedAvgM) and given["strategy"].server_lr == 0.5
    assert "strategy: fedavgm (server_lr=0.5, momentum=0.5)" in result.stdout
    override = [*cli, "--run-dir", str(tmp_path / "o"), "--strategy", "fedadam"]
    result = CliRunner().invoke(app, override)
    assert result.exit_code == 0, result.output
    assert type(given["strategy"]) is FedAdam

    # a resumed run goes on with the strategy it was trained with, not the job file's
    run.mkdir()
    (run / "state.json").write_text("{}")
    (run / "strategy.json").write_text('{"name": "fedyogi", "server_lr": 0.02}')
    api.train(fed, spec, run, resume=True)
    assert type(given["strategy"]) is FedYogi and given["strategy"].server_lr == 0.02


def test_the_run_directory_checks_are_the_apis(tmp_path: Path, monkeypatch) -> None:
    """They lived only in `researcher train`: `api.train` overwrote a finished run's checkpoint
    and 'resumed' a folder with nothing in it from round 1."""
    from researcher import api
    from researcher.job import make_job

    given = _fake_rounds(monkeypatch)
    fed = Federation.load(_federation_with_a_saved_job(tmp_path))
    layers = [{"type": "Linear", "in_features": 3, "out_features": 2}]
    spec = make_job(layers, "d", "y", {"noise_multiplier": 1.0}, n_features=3)
    old = tmp_path / "old"
    write(old / "state.json", "{}") if old.mkdir() is None else None
    with pytest.raises(JobError, match=f"^{old} already holds a run; continue it with --resume"):
        api.train(fed, spec, old)
    nothing = tmp_path / "nothing"
    with pytest.raises(JobError, match="holds no run to resume \\(no state.json\\)"):
        api.train(fed, spec, nothing, resume=True)
    assert not nothing.exists() and not given  # nothing created, the round loop never called
