"""Two real wine sites under label skew: one holds cultivars 0 and 1, the other 1 and 2.

Each re-codes its own labels 0..1 at upload. Before the federation's label space, both
published 2 classes, the job trained a 2-output model that passed every review, and code 0
meant cultivar 0 at one site and cultivar 1 at the other (0.578 on the 3-class test split).
Here: each site publishes its class list, the job carries their union, the codes agree, both
reviews pass, and the model scored through the real servers matches the same rounds run
in-process on the same rows (``researcher.site.InProcessSite``, the site's own code path).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from sklearn.datasets import load_wine
from sklearn.model_selection import train_test_split

from datasites.data.tables import validate_table
from datasites.ledger.budget import BudgetLedger
from datasites.ledger.store import SiteStore
from datasites.serving.config import SiteDir
from datasites.training.site_job import public_rows, split_seed
from policies.engine.prepare import prepare_task, release, site_scaling
from policies.engine.round_task import run_task
from policies.labels import site_classes, site_to_job
from researcher import api
from researcher.api import read_test_rows
from researcher.federation import Federation
from researcher.rounds import run_federation
from researcher.site import InProcessSite
from tests.conftest import (
    Site,
    add_researcher,
    approve_job,
    make_sites,
    pending_item,
    run_cli,
    upload_table,
)
from tests.integration.conftest import EMAIL

pytestmark = pytest.mark.integration

CULTIVARS = {"vineyard-a": (0, 1), "vineyard-b": (1, 2)}
# the test split's accuracy through the servers against the median of IN_PROCESS_RUNS in-process
# runs on the same rows, statistics and validation split: 36 test rows (one is 0.028), and each
# run's own DP noise and sampling. Measured 2026-12-06: 8 served runs were within 0.03 of their
# in-process medians; in process, 240 runs over 8 uploads' statistics ranged 0.889-0.972 on one
# split, and 0.833-0.972 when each run drew its own split (CI once saw 0.778 against 0.917 when
# this reference used a fixed split and the server its own keyed one). One-sided: the bug this
# guards against makes the served run WORSE (0.578 with each site's own codes); a served run
# above the reference is one lucky draw, not a fault (2026-12-07: served 0.861 against an
# in-process median of 0.722 failed the old two-sided check).
MARGIN = 0.12
IN_PROCESS_RUNS = 9
JOB = """
DATASET = "wine"
PLAN = {"rounds": 5, "local_epochs": 4, "batch_size": 16, "learning_rate": 0.3,
        "noise_multiplier": 1.0}
MODEL = [{"type": "Linear", "in_features": 13, "out_features": 3}]
"""


def _split() -> tuple[dict[str, pd.DataFrame], pd.DataFrame]:
    wine = load_wine(as_frame=True).frame
    train, test = train_test_split(wine, test_size=0.2, stratify=wine["target"], random_state=0)
    middle = train[train["target"] == 1]
    half = len(middle) // 2
    parts = {
        "vineyard-a": pd.concat([train[train["target"] == 0], middle.iloc[:half]]),
        "vineyard-b": pd.concat([middle.iloc[half:], train[train["target"] == 2]]),
    }
    return {k: v.reset_index(drop=True) for k, v in parts.items()}, test


def _set_up(site: Site, root: Path, frame: pd.DataFrame) -> None:
    site_dir = SiteDir(site.dir)
    # a mock at epsilon 4: its statistics scale the job (issue 25 item 1 is about epsilon 1)
    upload_table(site.dir, "wine", frame, "target", mock_epsilon=4.0)
    (root / f"{site.name}.pw").write_text(add_researcher(site.dir, EMAIL, "Ada"))
    site.cli(
        "policy",
        "set",
        "--dataset",
        "wine",
        "--allow-domain",
        "uni.edu",
        "--max-epsilon-per-job",
        "25",  # the plan spends 16.3: the point here is the label codes, not a tight budget
    )
    BudgetLedger(SiteStore(site_dir.site_db)).set_budget(EMAIL, "wine", 30.0, 1e-5)


@pytest.fixture(scope="module")
def vineyards(tmp_path_factory):
    root = tmp_path_factory.mktemp("wine")
    parts, test = _split()
    made = make_sites(root, *CULTIVARS)
    for site in made:  # in-process CLI calls swap sys.stdout: one at a time
        _set_up(site, root, parts[site.name])
    (root / "federation.toml").write_text(
        "\n".join(
            f'[[sites]]\nname = "{s.name}"\nurl = "{s.url}"\nemail = "{EMAIL}"\n'
            f'password_file = "{s.name}.pw"\nfingerprint = "{s.fingerprint}"\n'
            for s in made
        )
    )
    (root / "job.py").write_text(JOB)
    test.to_csv(root / "test.csv", index=False)
    yield root, Federation.load(root / "federation.toml"), made, parts
    for s in made:
        s.cli("stop", check=False)


def test_each_site_publishes_its_classes_and_the_codes_agree(vineyards) -> None:
    root, fed, made, parts = vineyards
    metas = {s.name: SiteDir(s.dir).datasets_meta()["wine"] for s in made}
    assert {n: m["classes"] for n, m in metas.items()} == {
        "vineyard-a": ["0", "1"],
        "vineyard-b": ["1", "2"],
    }
    assert {m["n_classes"] for m in metas.values()} == {2}  # the old ambiguity: same count
    spec = api.load_job(fed, root / "job.py")
    assert spec.classes == ["0", "1", "2"] and spec.architecture.output == (3,)
    for site in made:  # each site's stored codes, mapped, are the cultivars it was given
        (table,) = (site.dir / "tables").glob("wine-*.parquet")
        stored = pd.read_parquet(table)["target"].to_numpy()
        assert sorted(set(stored.tolist())) == [0, 1]  # its own codes
        mapped = site_to_job(stored, site_classes(metas[site.name]), spec.classes)
        np.testing.assert_array_equal(mapped, parts[site.name]["target"].to_numpy())
    listed = run_cli("researcher", "datasets", "-f", str(root / "federation.toml"))
    assert "wine classes (public): 1|2" in listed.stdout


def test_the_job_passes_review_and_matches_an_in_process_run(vineyards) -> None:
    root, fed, made, parts = vineyards
    spec = api.with_pooled_scaling(fed, api.load_job(fed, root / "job.py"))
    assert api.dry_run(fed, spec)["status"] == "ok"
    api.submit(fed, spec)  # with the dry run on the first mock, mapped as its site maps rows
    for site in made:
        report = pending_item(site.dir, spec.name)["report"]
        checks = {c["name"]: c for c in report["checks"]}
        assert report["passed"], [c for c in report["checks"] if not c["passed"]]
        assert "cover this dataset's 2" in checks["labels"]["reason"]
        approve_job(site.dir, spec.name)
    test = read_test_rows(root / "test.csv", spec.target, None, spec.classes)
    served = api.train(fed, spec, root / "run", min_sites=2, timeout_s=180, test=test)
    assert all(not r["skipped"] for r in served.rounds), served.rounds
    over_servers = served.rounds[-1]["test_accuracy"]

    runs = []
    for k in range(IN_PROCESS_RUNS):
        local = [_in_process_site(s, parts[s.name]) for s in made]
        inproc = run_federation(None, spec, root / f"inproc{k}", sites=local, test=test)
        runs.append(inproc.rounds[-1]["test_accuracy"])
    in_process = float(np.median(runs))
    print(f"wine label skew: servers {over_servers:.3f}, in-process {in_process:.3f}")
    assert over_servers >= in_process - MARGIN, (over_servers, in_process)
    # The served run must learn: the majority share is 0.40. Not a floor near the bug's 0.578
    # (each site's own codes): both paths read one upload's DP statistics, and uploads gave
    # in-process medians from 0.61 (2026-12-08: served 0.639, in-process 0.611) to 0.94, so
    # no absolute floor separates the bug from an unlucky upload. The mapping itself is
    # checked exactly in test_each_site_publishes_its_classes_and_the_codes_agree.
    assert over_servers >= 0.5


def _in_process_site(site: Site, frame: pd.DataFrame) -> InProcessSite:
    """The site's rows and published metadata through its own round code, without syft.

    Same rows, statistics and validation split (the site's keyed seed for this job) as the
    served site: only each run's DP noise and sampling differ. A fixed split here once set the
    in-process median on a different fifth of each site's 57 rows than the server trained on.
    """
    meta = SiteDir(site.dir).datasets_meta()["wine"]
    table = validate_table(frame, "target")  # the upload's coding: the site's own codes
    rounds = iter(range(1, 100))

    def handler(spec, weights):  # noqa: ANN001, ANN202
        task = prepare_task(
            spec,
            table.frame,
            "target",
            weights,
            float(spec.plan.dp.noise_multiplier),
            meta.get("n_classes"),
            split_seed(SiteDir(site.dir), spec.job_id),  # the served site's validation split
            site_scaling(spec, meta),
            public_rows(meta, table.frame),
            class_counts=meta.get("class_counts"),
            site_classes=site_classes(meta),
        )
        reply, _ = release(spec, run_task(task), next(rounds), task.weights)
        return reply

    return InProcessSite(site.name, meta, handler)
