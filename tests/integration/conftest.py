"""Shared by the integration tests: a module's two-site federation, jobs, request ids."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from researcher.federation import Federation
from researcher.job import make_job
from tests.conftest import Site, last_json, make_sites

# breast cancer: 30 features, 2 classes
MODEL = [
    {"type": "Linear", "in_features": 30, "out_features": 8},
    {"type": "ReLU"},
    {"type": "Linear", "in_features": 8, "out_features": 2},
]
EMAIL = "ada@uni.edu"


def job(plan: dict, **kw):
    return make_job(MODEL, "cancer", "target", plan, n_features=30, n_outputs=2, **kw)


@pytest.fixture(scope="module")
def federation(request, tmp_path_factory, breast_cancer_csv: Path):
    """The module's federation of real sites: ``SITE_NAMES`` in the module, else two."""
    root = tmp_path_factory.mktemp("fed")
    names = getattr(request.module, "SITE_NAMES", ("hospital-a", "hospital-b"))
    made = make_sites(root, *names)
    # the CLI's upload and users add are tested elsewhere; here the sites are set up at once
    with ThreadPoolExecutor(len(made)) as pool:
        passwords = list(pool.map(lambda s: _set_up(s, breast_cancer_csv), made))
    lines = []
    for s, password in zip(made, passwords, strict=True):
        (root / f"{s.name}.pw").write_text(password)
        s.cli("policy", "set", "--dataset", "cancer", "--allow-domain", "uni.edu")
        lines += [
            "[[sites]]",
            f'name = "{s.name}"',
            f'url = "{s.url}"',
            f'email = "{EMAIL}"',
            f'password_file = "{s.name}.pw"',
            f'fingerprint = "{s.fingerprint}"',
            "",
        ]
    (root / "federation.toml").write_text("\n".join(lines))
    yield Federation.load(root / "federation.toml"), made
    for s in made:
        s.cli("stop", check=False)


def _set_up(site: Site, csv: Path) -> str:
    """Upload the table with its DP mock and add the researcher, as the CLI does."""
    from datasites.data.tables import load_table, validate_table
    from datasites.serving import admin
    from datasites.serving.config import SiteDir

    site_dir = SiteDir(site.dir)
    admin.upload(site_dir, "cancer", validate_table(load_table(csv), "target"))
    return admin.add_user(site_dir, EMAIL, "Ada")


def request_id(site: Site, function: str) -> str:
    items = last_json(site.cli("requests", "--json"))
    return next(i["id"] for i in items if i["function"] == function)


def events(site: Site) -> list[str]:
    return [e["event"] for e in last_json(site.cli("audit", "--json"))]
