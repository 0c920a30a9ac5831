"""Shared by the integration tests: a module's two-site federation, jobs, request ids."""

from __future__ import annotations

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
    lines = []
    for s in made:
        s.cli("upload", "--name", "cancer", "--file", str(breast_cancer_csv), "--target", "target")
        creds = last_json(s.cli("users", "add", "--email", EMAIL, "--name", "Ada", "--json"))
        (root / f"{s.name}.pw").write_text(creds["password"])
        s.cli("policy", "set", "--dataset", "cancer", "--allow-domain", "uni.edu")
        lines += [
            "[[sites]]",
            f'name = "{s.name}"',
            f'url = "{s.url}"',
            f'email = "{EMAIL}"',
            f'password_file = "{s.name}.pw"',
            "",
        ]
    (root / "federation.toml").write_text("\n".join(lines))
    yield Federation.load(root / "federation.toml"), made
    for s in made:
        s.cli("stop", check=False)


def request_id(site: Site, function: str) -> str:
    items = last_json(site.cli("requests", "--json"))
    return next(i["id"] for i in items if i["function"] == function)


def events(site: Site) -> list[str]:
    return [e["event"] for e in last_json(site.cli("audit", "--json"))]
