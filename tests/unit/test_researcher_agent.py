"""The researcher agent's folder and socket, attacked as another local user would; and every
researcher command refusing bad input before syft is imported (issue 26 item 2)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from researcher import agent

OTHER_UID = 4242


def _fed(tmp_path: Path) -> Path:
    (tmp_path / "a.pw").write_text("pw")
    fed = tmp_path / "federation.toml"
    fed.write_text(
        '[[sites]]\nname = "a"\nurl = "http://127.0.0.1:9"\nemail = "ada@uni.edu"\n'
        'password_file = "a.pw"\n'
    )
    return fed


def test_the_agent_folder_is_private_and_made_so(tmp_path: Path) -> None:
    fed = _fed(tmp_path)
    folder = agent.agent_dir(fed)
    assert folder == tmp_path / agent.AGENT_DIR and (folder.stat().st_mode & 0o777) == 0o700
    folder.chmod(0o755)  # loosened by someone (a umask, a copy): tightened, not used as is
    assert agent.agent_dir(fed) == folder and (folder.stat().st_mode & 0o777) == 0o700


def test_a_symlinked_or_foreign_agent_folder_is_never_used(tmp_path: Path) -> None:
    """Attack: another user plants the folder (or a symlink to one they read) beside a
    federation file in a shared directory, to receive the socket and the calls."""
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir(mode=0o700)
    (tmp_path / "one").mkdir()
    (tmp_path / "one" / agent.AGENT_DIR).symlink_to(elsewhere)
    assert agent.agent_dir(_fed(tmp_path / "one")) is None
    (tmp_path / "two").mkdir()
    planted = tmp_path / "two" / agent.AGENT_DIR
    planted.mkdir(mode=0o700)
    if os.getuid() != 0:
        pytest.skip("changing a folder's owner needs root")
    os.chown(planted, OTHER_UID, OTHER_UID)
    assert agent.agent_dir(_fed(tmp_path / "two")) is None
    (tmp_path / "three").mkdir()
    (tmp_path / "three" / agent.AGENT_DIR).write_text("not a folder")
    assert agent.agent_dir(_fed(tmp_path / "three")) is None


def test_a_look_alike_socket_of_another_user_never_receives_a_call(tmp_path: Path) -> None:
    """Attack: a socket at the agent's path that the researcher does not own would receive
    the password_env values of the call; the command must not even connect to it."""
    if os.getuid() != 0:
        pytest.skip("changing a socket's owner needs root")
    folder = agent.agent_dir(_fed(tmp_path))
    assert folder is not None
    path = folder / agent.SOCKET_NAME
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    with agent._unix_address(path) as address:
        listener.bind(address)
    listener.listen(1)
    listener.settimeout(1.0)
    os.chown(path, OTHER_UID, OTHER_UID)
    got: list[bytes] = []

    def accept() -> None:
        try:
            conn, _ = listener.accept()
            got.append(conn.recv(1024))
        except TimeoutError:
            pass

    thread = threading.Thread(target=accept)
    thread.start()
    assert agent._exchange(folder, b'{"env": {"PW": "secret"}}\n') is None
    thread.join()
    listener.close()
    assert got == []


def test_the_agent_answers_bad_calls_with_one_error_and_no_detail(tmp_path: Path) -> None:
    assert agent.handle(b'{"op": "ping"}') == {"ok": True, "result": None}
    assert agent.handle(b"not json")["ok"] is False
    unknown = agent.handle(json.dumps({"op": "exec", "federation": str(_fed(tmp_path))}).encode())
    assert unknown == {"ok": False, "kind": "ResearcherError", "error": "agent: KeyError"}
    missing = agent.handle(json.dumps({"op": "status", "federation": "/nope.toml"}).encode())
    assert missing["kind"] == "FederationError" and "not found" in missing["error"]


def test_the_call_carries_this_commands_password_variables_only(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from researcher.federation import Federation

    fed = tmp_path / "f.toml"
    fed.write_text(
        '[[sites]]\nname = "a"\nurl = "http://127.0.0.1:9"\nemail = "a@b.c"\n'
        'password_env = "A_PW"\n'
    )
    monkeypatch.setenv("A_PW", "s3cret")
    monkeypatch.setenv("UNRELATED_SECRET", "x")
    assert agent._password_env(Federation.load(fed)) == {"A_PW": "s3cret"}
    with agent._environment({"A_PW": "other"}):
        assert os.environ["A_PW"] == "other"
    assert os.environ["A_PW"] == "s3cret"


def test_the_agent_is_off_when_asked_or_when_syft_is_loaded(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("FEDSITE_AGENT", "off")
    assert not agent.enabled()
    monkeypatch.setenv("FEDSITE_AGENT", "on")
    monkeypatch.setitem(sys.modules, "syft", object())
    assert not agent.enabled()


def test_every_command_refuses_bad_input_before_syft_is_imported(tmp_path: Path) -> None:
    """Issue 26: a bad job file, unknown job, bad flag or bad weights file took 10 s or more
    to be refused: the commands imported syft (and logged in) first."""
    fed = str(_fed(tmp_path))
    bad_job = tmp_path / "job.py"
    bad_job.write_text("MODEL = []\n")  # no DATASET, no PLAN
    good_job = tmp_path / "good.py"
    good_job.write_text('DATASET = "d"\nPLAN = {"target_epsilon": 1.0}\n')
    cases = [
        (["status", "-f", fed], "no submitted jobs"),
        (["try", str(tmp_path / "missing.py"), "-f", fed], "cannot read job file"),
        (["submit", str(bad_job), "-f", fed], "must define DATASET"),
        (["try", str(good_job), "-f", fed, "--init-weights", str(bad_job)], "initial weights"),
        (["plan", "-f", fed, "--epsilon", "-1"], "--epsilon must be"),
        (["train", "-f", fed], "exactly one of --run-dir"),
        (["train", "-f", fed, "--run-dir", str(tmp_path / "r"), "--strategy", "x"], "x"),
        (
            ["train", "-f", fed, "--run-dir", str(tmp_path / "r"), "--test", "nope.csv"],
            "test file nope.csv not found",
        ),
    ]
    probe = (
        "import io, json, sys\n"
        "from researcher.cli import main\n"
        "cases, seen = json.loads(sys.argv[1]), []\n"
        "for argv in cases:\n"
        "    sys.argv, err, sys.stderr = ['researcher', *argv], io.StringIO(), sys.stderr\n"
        "    saved, sys.stderr = sys.stderr, err\n"
        "    try:\n        main()\n        code = 0\n"
        "    except SystemExit as exc:\n        code = exc.code\n"
        "    sys.stderr = saved\n"
        "    seen.append([code, err.getvalue()])\n"
        "print(json.dumps({'seen': seen, 'syft': 'syft' in sys.modules}))\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", probe, json.dumps([argv for argv, _ in cases])],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "FEDSITE_AGENT": "on"},
    )
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    for (argv, why), (code, stderr) in zip(cases, result["seen"], strict=True):
        lines = stderr.strip().splitlines()
        assert code == 1 and len(lines) == 1 and why in lines[0], (argv, code, stderr)
    assert result["syft"] is False
    assert not (tmp_path / agent.AGENT_DIR / agent.SOCKET_NAME).exists()  # no agent started
