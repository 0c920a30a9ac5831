"""The trainer sandbox's claims, checked from inside a real trainer process."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import numpy as np
import pytest

from datasites.training import sandbox


@pytest.fixture(scope="module")
def pool():
    p = sandbox.TrainerPool(1)
    yield p
    p.close()


def test_trainer_has_a_clean_environment_and_no_network(pool, tmp_path: Path) -> None:
    with socket.socket() as server:  # a listener the trainer would reach over loopback
        server.bind(("127.0.0.1", 0))
        server.listen()
        port = server.getsockname()[1]
        secret = tmp_path / "admin-password"
        secret.write_text("s3cret\n")
        secret.chmod(0o600)
        seen = pool.probe([str(secret)], "127.0.0.1", port)
    assert "error" not in seen["isolation"], seen
    assert not any(k.startswith(("FEDSITE", "SYFT", "DEFAULT_ROOT")) for k in seen["env"])
    if os.geteuid() == 0:  # CAP_SYS_ADMIN: a network namespace of its own
        assert seen["isolation"]["network"] == "isolated"
    if seen["isolation"]["network"] == "isolated":
        assert seen["network"] is False
    if seen["isolation"]["user"] == "nobody":
        assert seen["uid"] == sandbox.NOBODY
        assert seen["readable"][str(secret)] is False
    else:  # the report says why the privilege drop was not possible here
        assert seen["uid"] == os.getuid() and "uid" in seen["isolation"]["user"]


def test_the_warm_up_trains_through_both_engines() -> None:
    """It once built a plan that raised in a background thread, so nothing was ever warmed."""
    from datasites.training.sandbox import _warm

    fused, opacus = _warm()
    for out in (fused, opacus):
        assert out.metrics["steps"] >= 1 and out.n >= 1
        assert all(np.isfinite(w).all() for w in out.weights.values())
    assert set(opacus.weights) > set(fused.weights)  # the LayerNorm's parameters too


def test_a_site_pays_for_torch_only_when_a_job_is_approved() -> None:
    """The fork server starts at launch and loads no torch; the workers (which import it) start
    at ``warm_soon`` (an approval) or at the first round, and the pool is handed out only once
    its worker is warm. In a fresh process, as a server runs
    it: a test process's own fork server may already be up."""
    import subprocess
    import sys

    script = """
import time
from multiprocessing import forkserver
from datasites.training import sandbox

def torch_in(pid):
    with open(f"/proc/{pid}/maps") as fh:
        return "libtorch" in fh.read()

sandbox.start_early()
server = forkserver._forkserver._forkserver_pid
time.sleep(1)  # a preload, were there one, would be under way
print("fork server loads torch:", torch_in(server), "pool:", sandbox._POOL is not None)
sandbox.warm_soon()
for _ in range(600):
    if sandbox._POOL is not None:
        break
    time.sleep(0.1)
(worker,) = sandbox.pool()._pool._pool
warm = torch_in(worker.pid)  # the pool is handed out warm: a round's limit counts the round
print("worker loads torch:", sandbox.pool().probe([])["isolation"].get("error"), warm)
sandbox.pool().close()
"""
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120, check=True
    ).stdout.splitlines()
    assert out == ["fork server loads torch: False pool: False", "worker loads torch: None True"]
