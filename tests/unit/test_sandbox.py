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
