"""The suite's sites fork from one warm parent (``tests/server_zygote.py``), which imported syft
before any site's identity was in its environment: syft 0.9.5 reads a server's key, uid and
admin account when ``syft.server.server`` is imported. Each forked site must still be its own
DIR's server, and syft's built-in defaults must open nothing, as on a site ``datasite launch``
started (``test_site_lifecycle``)."""

from __future__ import annotations

import pytest
from syft.types.errors import SyftException

from datasites.serving.config import SiteDir
from policies.secagg import identity_of, public_bytes

pytestmark = pytest.mark.integration
SHARED_SITES = True  # the worker's running sites: forked, and no new start for this check
EMAIL = "ada.forked@uni.edu"

SYFT_DEFAULT_ADMIN = ("info@openmined.org", "changethis")  # syft 0.9.5's server/env.py


def test_each_forked_site_serves_its_own_identity_and_admin(federation) -> None:
    _, made = federation
    seen = set()
    for site in made:
        client = site.admin()  # the DIR's admin-password logs in as the DIR's admin
        meta = client.metadata
        site_dir = SiteDir(site.dir)
        assert str(meta.id).replace("-", "") == site_dir.config().server_uid.replace("-", "")
        # syft's verify key is the ed25519 public key of the seed in DIR
        expected = public_bytes(identity_of(site_dir.signing_key()).public_key()).hex()
        assert str(meta.verify_key) == expected
        assert client.account.email == site_dir.config().admin_email
        seen.add(str(meta.verify_key))
    assert len(seen) == len(made)  # no two sites share the parent's (or each other's) key


def test_syft_default_password_does_not_open_a_forked_sites_admin(federation) -> None:
    """The parent imported syft with no password in its environment, so syft's default
    ("changethis") is what its ``Server`` would have created the admin with."""
    _, made = federation
    for site in made:
        with pytest.raises(SyftException, match="Invalid credentials"):  # the admin is there
            site.login(SiteDir(site.dir).config().admin_email, SYFT_DEFAULT_ADMIN[1])
        with pytest.raises(SyftException, match="Item not found"):  # syft's own admin is not
            site.login(*SYFT_DEFAULT_ADMIN)


TWO_TRAINERS = """
import multiprocessing as mp
import sys
from multiprocessing import forkserver

from tests.server_zygote import TRAINER_PRELOAD


def draw():
    import numpy as np
    import torch

    return float(np.random.rand()), float(torch.rand(1))


if __name__ == "__main__":
    forkserver.set_forkserver_preload([m for m in TRAINER_PRELOAD if m in sys.argv[1:]])
    context = mp.get_context("forkserver")
    draws = []
    for _ in range(2):
        with context.Pool(1) as trainer:
            draws.append(trainer.apply(draw))
    print(draws[0] != draws[1] and all(a != b for a, b in zip(*draws)))
"""


@pytest.mark.parametrize("reseeded", [True, False])
def test_trainers_of_the_shared_fork_server_draw_their_own_numbers(tmp_path, reseeded) -> None:  # noqa: ANN001
    """Trainers forked from one parent that imported numpy and torch share its global generators'
    state, unlike a launched site's trainers (each imports both afresh). The zygote's trainer
    fork server preloads ``tests.trainer_parent``, which reseeds both in every trainer; without
    it, two trainers draw the same numbers (the False case shows the check can fail)."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    script = tmp_path / "two_trainers.py"
    script.write_text(TWO_TRAINERS)
    modules = ["torch", "numpy", *(["tests.trainer_parent"] if reseeded else [])]
    root = Path(__file__).resolve().parents[2]
    proc = subprocess.run(
        [sys.executable, str(script), *modules],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=root,
        env={**os.environ, "PYTHONPATH": str(root)},
    )
    assert proc.stdout.strip().splitlines()[-1:] == [str(reseeded)], proc.stdout + proc.stderr


def test_the_shared_trainer_fork_server_and_its_trainers_hold_no_site_secret(federation) -> None:
    """Attack: read what the trainers of the suite's forked sites hold (their parent is the
    zygote's fork server, not the site): their environment must be the trainers' clean one,
    and no site's admin password, signing key or DIR may be in it."""
    import psutil

    from datasites.training.sandbox import clean_environment
    from tests import server_zygote

    _, made = federation
    zygote = psutil.Process(server_zygote._ZYGOTE.pid())
    (parent,) = [p for p in zygote.children() if "forkserver" in " ".join(p.cmdline())]
    secrets = [s.password for s in made] + [str(s.dir) for s in made]
    secrets += [SiteDir(s.dir).signing_key() for s in made]
    for process in [parent, *parent.children()]:
        try:
            env = process.environ()
        except psutil.NoSuchProcess:  # a stopped site's trainer, gone meanwhile
            continue
        assert set(env) <= set(clean_environment()) | {"PWD"}, sorted(env)
        held = "\n".join(f"{k}={v}" for k, v in env.items())
        assert not [s for s in secrets if s and s in held], process.pid
