"""Issue 26 item 2: `researcher datasets` and `status` keep their logins between commands.

The first command starts the agent (syft imported once, one login per site); a second command,
in a fresh process, neither imports syft nor logs in, and still answers from the live site. A
kept session the site refuses logs in afresh without the user seeing it.
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from researcher import agent
from tests.integration.conftest import job

SITE_NAMES = ("hospital-a",)

PROBE = (
    "import sys, time\n"
    "t, code = time.perf_counter(), 0\n"
    "from researcher.cli import main\n"
    "try:\n    main()\n"
    "except SystemExit as exc:\n"
    "    code = exc.code\n"
    "print('PROBE', code, 'syft' in sys.modules, round(time.perf_counter() - t, 2))\n"
)


def _cli(*args: str) -> tuple[str, int, bool, float]:
    """(stdout, exit code, syft imported, seconds) of a researcher command in a fresh process."""
    env = {**os.environ, "FEDSITE_AGENT": "on", "FEDSITE_AGENT_IDLE_S": "300"}
    proc = subprocess.run(
        [sys.executable, "-c", PROBE, *args], capture_output=True, text=True, env=env, timeout=300
    )
    *body, last = proc.stdout.strip().splitlines()
    assert last.startswith("PROBE"), proc.stdout + proc.stderr
    _, code, syft, took = last.split()
    assert proc.stderr.strip() == "", proc.stderr
    return "\n".join(body), int(code or 0), syft == "True", float(took)


@pytest.fixture(scope="module")
def fed_file(federation):
    fed, _ = federation
    from researcher import api

    api.save_job(fed, job({"rounds": 1, "noise_multiplier": 1.0}, name="agentjob"), {})
    yield fed.path
    (fed.path.parent / agent.AGENT_DIR / agent.SOCKET_NAME).unlink(missing_ok=True)  # it exits


def _logins(fed_file: Path) -> int:
    return int(agent.ask(fed_file, "stats")["logins"])


def test_a_second_command_in_a_fresh_process_neither_imports_syft_nor_logs_in(
    fed_file: Path,
) -> None:
    first, code, _, _ = _cli("datasets", "-f", str(fed_file), "--json")
    assert code in (0, None) and json.loads(first.splitlines()[-1])["hospital-a"][0]["name"]
    folder = fed_file.parent / agent.AGENT_DIR
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700
    assert stat.S_IMODE((folder / agent.SOCKET_NAME).lstat().st_mode) == 0o600
    assert _logins(fed_file) == 1
    for verb in ("datasets", "status"):
        shown, code, syft, took = _cli(verb, "-f", str(fed_file), "--json")
        assert code in (0, None) and not syft, (verb, shown)
        print(f"{verb}: {took:.2f} s (second command, fresh process)")
    status = json.loads(shown.splitlines()[-1])
    assert status["job"].startswith("agentjob_")
    assert status["sites"] == {"hospital-a": {"status": "not submitted", "reason": None}}
    assert _logins(fed_file) == 1  # the kept session served both


def test_a_kept_session_the_site_refuses_logs_in_afresh(fed_file: Path) -> None:
    """A session whose signing key the site does not know (a restarted site, a removed
    account) fails; the agent drops it and logs in again, once, and the command works."""
    from syft.server.credentials import SyftSigningKey

    from researcher import sites
    from researcher.federation import Federation

    fed = Federation.load(fed_file)
    client = sites.connect(fed.sites[0])
    before = sites.LOGINS
    wrong = SyftSigningKey.generate()
    client.credentials = wrong
    client.api.signing_key = wrong
    call = {"op": "status", "federation": str(fed_file), "args": {}, "env": {}}
    reply = agent.handle(json.dumps(call).encode())
    assert reply["ok"] and reply["result"]["hospital-a"]["status"] == "not submitted", reply
    assert before + 1 == sites.LOGINS
    assert sites.connect(fed.sites[0]) is not client


def test_the_agent_leaves_when_its_socket_is_removed(fed_file: Path) -> None:
    folder = fed_file.parent / agent.AGENT_DIR
    pid = agent.ask(fed_file, "stats")["pid"]
    (folder / agent.SOCKET_NAME).unlink()
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and Path(f"/proc/{pid}").exists():
        time.sleep(0.2)
    state = (
        Path(f"/proc/{pid}/stat").read_text().split()[2] if Path(f"/proc/{pid}").exists() else ""
    )
    assert state in ("", "Z"), state
