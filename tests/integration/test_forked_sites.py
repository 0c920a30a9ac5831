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
