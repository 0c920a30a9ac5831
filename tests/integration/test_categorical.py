"""Two real banks over HTTPS with different category sets: a categorical upload through the CLI,
the federation-wide one-hot layout from both published schemas, and a round at both sites."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from datasites.ledger.budget import BudgetLedger
from datasites.ledger.store import SiteStore
from datasites.serving.config import SiteDir
from researcher import api
from researcher.federation import Federation
from tests.conftest import Site, add_researcher, approve_job, last_json, make_sites, run_cli
from tests.integration.conftest import EMAIL

pytestmark = pytest.mark.integration

# bank-a has no students in the south; bank-b has no east: each region set is partial
REGIONS = {"bank-a": ["east", "north"], "bank-b": ["north", "south", "west"]}
LAYOUT = [
    ["balance", None],
    ["region", ["east", "north", "south", "west"]],
    ["student", ["No", "Yes"]],
]
JOB = """
DATASET = "bank"
PLAN = {"rounds": 1, "noise_multiplier": 1.5, "batch_size": 32, "learning_rate": 0.5}
MODEL = [{"type": "Linear", "in_features": 7, "out_features": 2}]
"""


def _bank_csv(path: Path, regions: list[str], seed: int) -> Path:
    rng = np.random.default_rng(seed)
    n = 300
    balance = rng.normal(1000, 400, n).round(2)
    student = rng.choice(["No", "Yes"], n)
    default = np.where(balance + 300 * (student == "Yes") > 1300, "Yes", "No")
    pd.DataFrame(
        {
            "balance": balance,
            "region": rng.choice(regions, n),
            "student": student,
            "default": default,
        }
    ).to_csv(path, index=False)
    return path


def _set_up(site: Site, root: Path, seed: int) -> None:
    csv = _bank_csv(root / f"{site.name}.csv", REGIONS[site.name], seed)
    uploaded = site.cli(
        "upload", "--name", "bank", "--file", str(csv), "--target", "default", "--json"
    )
    assert last_json(uploaded)["rows"] == 300
    password = add_researcher(site.dir, EMAIL, "Ada")
    (root / f"{site.name}.pw").write_text(password)
    site.cli("policy", "set", "--dataset", "bank", "--allow-domain", "uni.edu")
    BudgetLedger(SiteStore(SiteDir(site.dir).site_db)).set_budget(EMAIL, "bank", 5.0, 1e-5)


@pytest.fixture(scope="module")
def banks(tmp_path_factory):
    root = tmp_path_factory.mktemp("banks")
    made = make_sites(root, *REGIONS)
    for seed, site in enumerate(made):  # in-process CLI calls swap sys.stdout: one at a time
        _set_up(site, root, seed)
    (root / "federation.toml").write_text(
        "\n".join(
            f'[[sites]]\nname = "{s.name}"\nurl = "{s.url}"\nemail = "{EMAIL}"\n'
            f'password_file = "{s.name}.pw"\nfingerprint = "{s.fingerprint}"\n'
            for s in made
        )
    )
    (root / "job.py").write_text(JOB)
    yield root, Federation.load(root / "federation.toml"), made
    for s in made:
        s.cli("stop", check=False)


def test_each_site_publishes_its_own_categories_as_schema(banks) -> None:
    root, fed, made = banks
    for site in made:
        meta = SiteDir(site.dir).datasets_meta()["bank"]
        assert ["region", "category"] in meta["schema"]
        assert meta["categories"] == {"region": REGIONS[site.name], "student": ["No", "Yes"]}
        assert meta["classes"] == ["No", "Yes"]
        (table,) = (site.dir / "tables").glob("bank-*.parquet")  # the rows, outside syft
        stored = pd.read_parquet(table)
        assert len(stored) == 300 and list(stored["region"].cat.categories) == REGIONS[site.name]
    listed = run_cli("researcher", "datasets", "-f", str(root / "federation.toml"))
    assert "bank categories (public): region: east|north; student: No|Yes" in listed.stdout
    assert "category lists of categorical columns are disclosed" in " ".join(listed.stdout.split())


def test_the_layout_unites_both_sites_and_a_round_trains_at_both(banks) -> None:
    root, fed, made = banks
    spec = api.with_pooled_scaling(fed, api.load_job(fed, root / "job.py"))
    assert spec.layout == {"columns": LAYOUT}
    assert spec.architecture.input == (7,)
    # 'east' is at bank-a only, 'south' and 'west' at bank-b only: pooled shares lie between
    east, south = spec.scaling["mean"][1], spec.scaling["mean"][3]
    assert 0.0 < east < 0.5 and 0.0 < south < 0.5, spec.scaling["mean"]
    assert api.dry_run(fed, spec)["status"] == "ok"
    api.submit(fed, spec, dry=False)
    for site in made:
        approve_job(site.dir, spec.name)
    result = api.train(fed, spec, root / "run", min_sites=2, timeout_s=120)
    (record,) = result.rounds
    assert sorted(record["sites"]) == ["bank-a", "bank-b"] and not record["skipped"], record
    assert np.load(root / "run" / "global.npz")["0.weight"].shape == (2, 7)
