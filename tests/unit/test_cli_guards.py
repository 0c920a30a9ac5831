"""Every command fails the same way on a directory that is not a datasite, and the researcher
command starts without syft."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import click
import pytest
import typer

from datasites.cli import app
from tests.conftest import run_cli


def _site_commands() -> list[list[str]]:
    """Each command path that takes --dir of an existing site (all but init)."""
    paths = []

    def walk(cmd: click.Command, path: list[str]) -> None:
        if isinstance(cmd, click.Group):
            if any("--dir" in p.opts for p in cmd.params):
                paths.append(path)
            for name, sub in cmd.commands.items():
                walk(sub, [*path, name])
        elif any("--dir" in p.opts for p in cmd.params) and path != ["init"]:
            paths.append(path)

    walk(typer.main.get_command(app), [])
    return paths


def test_every_site_command_is_listed() -> None:
    listed = {" ".join(p) for p in _site_commands()}
    assert {"requests", "review", "approve", "deny", "upload", "budget", "budget set"} <= listed
    assert len(listed) >= 15


@pytest.mark.parametrize("kind", ["missing", "empty"])
def test_a_dir_that_is_no_datasite_is_one_line_exit_1_and_nothing_written(
    tmp_path: Path, kind: str
) -> None:
    where = tmp_path / "nonexistent" if kind == "missing" else tmp_path
    for path in _site_commands():
        proc = run_cli("datasite", *path, "--dir", str(where), check=False)
        assert proc.returncode == 1, (path, proc.stderr)
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and "is not an initialised datasite" in lines[0], (path, lines)
    assert not (tmp_path / "nonexistent").exists() and list(tmp_path.iterdir()) == []


def test_researcher_help_imports_neither_syft_nor_torch() -> None:
    """`researcher --help` was 6.3 s: researcher/__init__ imported api, sites, then syft."""
    code = (
        "import sys\n"
        "from researcher.cli import app\n"
        "try:\n"
        "    app(['--help'])\n"
        "except SystemExit:\n"
        "    pass\n"
        "heavy = [m for m in ('syft', 'torch', 'opacus', 'pandas') if m in sys.modules]\n"
        "print('HEAVY', heavy)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert "Usage" in proc.stdout and "HEAVY []" in proc.stdout, proc.stdout + proc.stderr


def test_revoking_access_is_case_insensitive_like_the_check(tmp_path: Path) -> None:
    """Attack: the admin revokes ada@uni.edu, but 'Ada@Uni.edu' was allowed: she kept access."""
    import json

    from datasites.review.access import PolicyStore
    from datasites.serving.config import SiteDir, init_site

    init_site(tmp_path / "s", "s", port=1)
    site = SiteDir(tmp_path / "s")
    site.save_dataset_meta("d", {"dataset": "d", "target": "y"})
    d = str(site.root)
    run_cli("datasite", "policy", "set", "--dir", d, "--dataset", "d", "--allow", "Ada@Uni.edu")
    assert PolicyStore(site.policies_path).get("d").allows("ada@uni.edu")
    run_cli("datasite", "policy", "set", "--dir", d, "--dataset", "d", "--revoke", "ada@uni.edu")
    assert not PolicyStore(site.policies_path).get("d").allows("ada@uni.edu")
    shown = json.loads(
        run_cli("datasite", "policy", "show", "--dir", d, "--json").stdout.splitlines()[-1]
    )
    assert shown["d"]["allowed_researchers"] == []


SERVER_COMMANDS = [
    ["users", "list"],
    ["users", "add", "--email", "ada@uni.edu", "--name", "Ada"],
    ["users", "remove", "--email", "ada@uni.edu"],
    ["users", "reset-password", "--email", "ada@uni.edu"],
    ["requests"],
    ["review", "abc"],
    ["approve", "abc"],
    ["deny", "abc", "--reason", "not now"],
]


def _idle_site(tmp_path: Path) -> str:
    """An initialised site whose server was never launched, on a port nothing listens on."""
    import socket

    from datasites.serving.config import init_site

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    init_site(tmp_path / "s", "s", port=port)
    return str(tmp_path / "s")


def test_a_site_that_is_not_running_is_one_line_at_once(tmp_path: Path) -> None:
    """It was 10 s of urllib3 retries and three warnings before the error, for every command."""
    d = _idle_site(tmp_path)
    for path in SERVER_COMMANDS:
        proc = run_cli("datasite", *path, "--dir", d, check=False)
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 1, (path, proc.stderr)
        assert len(lines) == 1 and "no datasite answers" in lines[0], (path, lines)
        assert f"datasite launch --dir {d}" in lines[0]


def test_arguments_are_checked_before_the_server(tmp_path: Path) -> None:
    d = _idle_site(tmp_path)
    proc = run_cli("datasite", "deny", "abc", "--dir", d, check=False)
    assert proc.returncode == 1 and "deny needs --reason" in proc.stderr
    proc = run_cli("datasite", "approve", "abc", "--override", "--dir", d, check=False)
    assert proc.returncode == 1 and "--override needs --reason" in proc.stderr


def test_commands_that_read_the_site_dir_import_no_syft(tmp_path: Path) -> None:
    """status, datasets, audit, policy show and a dead server's refusal: no syft import (~5 s)."""
    d = _idle_site(tmp_path)
    code = (
        "import sys\n"
        "from datasites.cli import app\n"
        f"for args in (['status'], ['datasets'], ['audit'], ['policy', 'show'], ['users', 'list']):\n"
        "    try:\n"
        f"        app([*args, '--dir', {d!r}], standalone_mode=False)\n"
        "    except Exception as exc:\n"
        "        print('ERR', type(exc).__name__)\n"
        "print('SYFT', 'syft' in sys.modules)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert "SYFT False" in proc.stdout, proc.stdout + proc.stderr
    assert proc.stdout.count("ERR") == 1  # users list: the server is down


def test_trusted_peers_bound_the_peer_list_in_the_review_and_at_a_round(tmp_path: Path) -> None:
    """Red team: a peer the researcher runs is a colluder nobody counted. With trusted peers
    set, a job naming any other datasite fails the review and its rounds are refused."""
    import json

    import pytest

    from datasites.errors import Refused
    from datasites.review.access import DatasetPolicy, PolicyStore
    from datasites.review.report import untrusted_peers
    from datasites.serving.config import SiteDir, init_site
    from datasites.training.site_job import _secure_round
    from policies.errors import PlanError
    from policies.plan import TrainingPlan
    from policies.wire import SecAggMask

    init_site(tmp_path / "s", "s", port=1)
    site = SiteDir(tmp_path / "s")
    site.save_dataset_meta("d", {"dataset": "d", "target": "y"})
    d, ours, theirs, rogue = str(site.root), "a" * 64, "b" * 64, "c" * 64
    for fp in (ours, theirs):
        run_cli("datasite", "policy", "set", "--dir", d, "--dataset", "d", "--trust-peer", fp)
    policy = PolicyStore(site.policies_path).get("d")
    assert policy.trusted_peers == [ours, theirs]
    plan = TrainingPlan.of(aggregation="secure", peers=(ours, theirs, rogue), noise_multiplier=1.0)
    assert untrusted_peers(plan, policy) == [
        "peer(s) cccccccccccc are not among this dataset's trusted peers"
    ]
    assert untrusted_peers(plan, DatasetPolicy()) == []  # no list: the admin reads the peers
    fair = TrainingPlan.of(aggregation="secure", peers=(ours, theirs), noise_multiplier=1.0)
    assert untrusted_peers(fair, policy) == []

    class Spec:  # what _secure_round reads of a job
        plan = TrainingPlan.of(aggregation="secure", peers=(ours, rogue), noise_multiplier=1.0)

    with pytest.raises(Refused, match="trusted peers; nothing ran"):
        _secure_round(site, None, None, None, Spec(), policy, SecAggMask("r1", "", ()), False)
    with pytest.raises(PlanError, match="fingerprints"):
        DatasetPolicy(trusted_peers=["not-hex"]).validate()
    run_cli("datasite", "policy", "set", "--dir", d, "--dataset", "d", "--untrust-peer", theirs)
    shown = json.loads(
        run_cli("datasite", "policy", "show", "--dir", d, "--json").stdout.splitlines()[-1]
    )
    assert shown["d"]["trusted_peers"] == [ours]


def test_a_missing_or_broken_federation_file_is_refused_before_syft_is_imported(
    tmp_path: Path,
) -> None:
    """Issue 26: `researcher datasets -f missing.toml` took 11 s to say the file is missing:
    the command imported syft first. The file is now read while the arguments are parsed."""
    broken = tmp_path / "broken.toml"
    broken.write_text('[[sites]]\nname = "a"\n')
    probe = (
        "import sys\n"
        "from researcher.cli import main\n"
        "try:\n    main()\n"
        "except SystemExit as exc:\n"
        "    print('exit', exc.code, 'syft' in sys.modules, 'torch' in sys.modules)\n"
    )
    for verb, path, why in (
        ("datasets", tmp_path / "missing.toml", "not found"),
        ("status", broken, "lacks url"),
    ):
        proc = subprocess.run(
            [sys.executable, "-c", probe, verb, "-f", str(path)],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert proc.stdout.strip().splitlines()[-1] == "exit 1 False False", proc.stdout
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and why in lines[0], lines


@pytest.mark.parametrize("verb", ["try", "submit"])
def test_a_bad_strategy_in_the_job_file_is_one_line_before_any_site(
    tmp_path: Path, verb: str
) -> None:
    """The job file's STRATEGY is read before a site is contacted (the federation's one site
    answers nowhere: reaching it would be a different line), and nothing is written."""
    fed = tmp_path / "f.toml"
    fed.write_text(
        '[[sites]]\nname = "a"\nurl = "http://127.0.0.1:1"\nemail = "a@b.c"\npassword_file = "pw"\n'
    )
    (tmp_path / "pw").write_text("secret")
    job = tmp_path / "job.py"
    job.write_text(
        "DATASET = 'd'\nPLAN = {'target_epsilon': 3.0}\n"
        "STRATEGY = {'name': 'fedavgm', 'server_lr': 0.5, 'momentum': 1.5}\n"
    )
    proc = run_cli("researcher", verb, str(job), "-f", str(fed), check=False)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 1 and len(lines) == 1, proc.stderr
    assert f"{job}: STRATEGY: strategy 'fedavgm': momentum must be in [0, 1), got 1.5" in lines[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f.toml", "job.py", "pw"]


@pytest.mark.parametrize("delay", ["0.5", "0", "-3", "1e9"])
def test_a_login_delay_that_lets_guesses_run_fast_is_one_line_exit_1(
    tmp_path: Path, delay: str
) -> None:
    from datasites.serving.config import init_site

    init_site(tmp_path / "s", "s", port=1)
    proc = run_cli(
        "datasite", "console", "--dir", str(tmp_path / "s"), "--login-delay", delay, check=False
    )
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 1 and len(lines) == 1 and "--login-delay" in lines[0], lines
