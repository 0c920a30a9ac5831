"""Shared by the integration tests: a module's two-site federation, jobs, request ids."""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from researcher.federation import Federation
from researcher.job import make_job
from tests.conftest import Site, add_researcher, last_json, make_sites, upload_table

# breast cancer: 30 features, 2 classes
MODEL = [
    {"type": "Linear", "in_features": 30, "out_features": 8},
    {"type": "ReLU"},
    {"type": "Linear", "in_features": 8, "out_features": 2},
]
EMAIL = "ada@uni.edu"


def job(plan: dict, **kw):
    return make_job(MODEL, "cancer", "target", plan, n_features=30, n_outputs=2, **kw)


@pytest.fixture(scope="session")
def shared_sites(tmp_path_factory, breast_cancer_csv: Path) -> Iterator[SitePool]:
    """The worker's running sites, each with the cancer table, for the modules that set
    ``SHARED_SITES``: a server start is about 12 s of CPU (syft, the trainer pool's torch), and
    these modules need no fresh site. Started on first use, stopped at the session's end."""
    pool = SitePool(tmp_path_factory.mktemp("shared"), breast_cancer_csv)
    yield pool
    for s in pool.sites.values():
        s.cli("stop", check=False)


class SitePool:
    """``take(names)``: these sites, launched (all at once) the first time one is asked for."""

    def __init__(self, root: Path, csv: Path) -> None:
        self.root, self.csv = root, csv
        self.sites: dict[str, Site] = {}

    def take(self, names: tuple[str, ...]) -> list[Site]:
        missing = [n for n in names if n not in self.sites]
        if missing:
            made = make_sites(self.root, *missing)
            with ThreadPoolExecutor(len(made)) as pool:
                list(pool.map(lambda s: _upload(s, self.csv), made))
            for s in made:
                s.cli("policy", "set", "--dataset", "cancer", "--allow-domain", "uni.edu")
                self.sites[s.name] = s
        return [self.sites[n] for n in names]


@pytest.fixture(scope="module")
def federation(request, tmp_path_factory, breast_cancer_csv: Path):
    """The module's federation of real sites: ``SITE_NAMES`` in the module, else two.

    A module with ``SHARED_SITES = True`` gets the worker's shared sites instead of its own, and
    must then name its own researcher (``EMAIL`` in the module: budgets, requests and spends
    are per researcher) and filter what it reads to that researcher. Its policy changes are
    undone and its stopped sites relaunched when it ends, for the next module."""
    names = getattr(request.module, "SITE_NAMES", ("hospital-a", "hospital-b"))
    if getattr(request.module, "SHARED_SITES", False):
        yield from _shared_federation(request, tmp_path_factory, names)
        return
    root = tmp_path_factory.mktemp("fed")
    made = make_sites(root, *names)
    # the CLI's upload and users add are tested elsewhere; here the sites are set up at once
    with ThreadPoolExecutor(len(made)) as pool:
        passwords = list(pool.map(lambda s: _set_up(s, breast_cancer_csv), made))
    for s, password in zip(made, passwords, strict=True):
        (root / f"{s.name}.pw").write_text(password)
        s.cli("policy", "set", "--dataset", "cancer", "--allow-domain", "uni.edu")
    _write_federation(root, made, EMAIL)
    yield Federation.load(root / "federation.toml"), made
    for s in made:
        s.cli("stop", check=False)


def _shared_federation(request, tmp_path_factory, names: tuple[str, ...]):  # noqa: ANN001, ANN202
    from datasites.review.access import PolicyStore
    from datasites.serving import process
    from datasites.serving.config import SiteDir

    made = request.getfixturevalue("shared_sites").take(names)
    email = request.module.EMAIL  # its own researcher: no budget or request of another module
    assert email != EMAIL, "a module on the shared sites names its own researcher"
    root = tmp_path_factory.mktemp("fed")
    for s in made:
        (root / f"{s.name}.pw").write_text(add_researcher(s.dir, email, email))
    _write_federation(root, made, email)
    policies = {s.name: PolicyStore(SiteDir(s.dir).policies_path).all() for s in made}
    yield Federation.load(root / "federation.toml"), made
    for s in made:
        site_dir = SiteDir(s.dir)
        if not process.status(site_dir).responding:
            s.relaunch()
        store = PolicyStore(site_dir.policies_path)
        for dataset, policy in policies[s.name].items():
            store.set(dataset, policy)


def _write_federation(root: Path, made: list[Site], email: str) -> None:
    lines = []
    for s in made:
        lines += [
            "[[sites]]",
            f'name = "{s.name}"',
            f'url = "{s.url}"',
            f'email = "{email}"',
            f'password_file = "{s.name}.pw"',
            f'fingerprint = "{s.fingerprint}"',
            "",
        ]
    (root / "federation.toml").write_text("\n".join(lines))


def _upload(site: Site, csv: Path) -> None:
    """Upload the table with its DP mock, as the CLI does (over the admin channel)."""
    upload_table(site.dir, "cancer", csv, "target")


def _set_up(site: Site, csv: Path) -> str:
    """Upload the table with its DP mock and add the researcher, as the CLI does."""
    _upload(site, csv)
    return add_researcher(site.dir, EMAIL, "Ada")


def request_id(site: Site, function: str) -> str:
    items = last_json(site.cli("requests", "--json"))
    return next(i["id"] for i in items if i["function"] == function)


def events(site: Site) -> list[str]:
    return [e["event"] for e in last_json(site.cli("audit", "--json"))]
