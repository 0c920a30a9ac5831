"""The run's one server zygote (``tests/server_zygote.py``): who makes its directory, who may
reach its socket, and who stops it. Its forking itself is tested by every integration module
(and what a forked site holds, by ``tests/integration/test_forked_sites.py``)."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest

from tests import server_zygote


@pytest.fixture
def fresh_run(monkeypatch: pytest.MonkeyPatch) -> None:
    """This process as the owner of a run that has no zygote directory yet."""
    monkeypatch.delenv(server_zygote.DIR_ENV, raising=False)
    monkeypatch.delenv(server_zygote.OWNER_ENV, raising=False)


def test_the_owner_makes_a_directory_only_it_may_open_and_removes_it(
    fresh_run: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Attack: the socket forks a site server of any DIR it is sent; another local user must not
    reach it, nor read the environment the zygote starts with."""
    monkeypatch.setenv("PYTEST_CURRENT_TEST", "a test's own variable")
    server_zygote.configure()
    home = Path(os.environ[server_zygote.DIR_ENV])
    try:
        assert home.stat().st_uid == os.getuid()
        assert stat.S_IMODE(home.stat().st_mode) == 0o700
        env = json.loads((home / "env.json").read_text())
        assert env[server_zygote.OWNER_ENV] == str(os.getpid())
        assert "PYTEST_CURRENT_TEST" not in env  # the run's environment, not a test's
    finally:
        server_zygote.unconfigure()  # no zygote was started: only the directory to remove
    assert not home.exists()
    assert server_zygote.DIR_ENV not in os.environ


def test_a_worker_uses_its_owners_directory_and_never_removes_it(
    fresh_run: None, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """A worker inherits the owner's variables: it makes no zygote of its own, and its end
    (pytest_unconfigure runs in every worker) leaves the owner's zygote to the other workers."""
    monkeypatch.setenv(server_zygote.DIR_ENV, str(tmp_path))
    monkeypatch.setenv(server_zygote.OWNER_ENV, str(os.getppid()))
    server_zygote.configure()
    assert os.environ[server_zygote.DIR_ENV] == str(tmp_path)
    server_zygote.unconfigure()
    assert tmp_path.exists() and os.environ[server_zygote.DIR_ENV] == str(tmp_path)
