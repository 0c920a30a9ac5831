"""A new user's own small table, every default, on two real sites: the minimal job file (only
``target_epsilon``) through the two CLIs lands within a stated margin of centralized.

Issue 25: with the defaults, wine (2 sites of ~66 rows) scored 0.400, the majority share, while
logistic regression on the pooled rows scores 1.000; nothing warned. Here nothing is tuned: the
upload takes its default mock epsilon, the plan and the model come from the auto-plan, the
scaling from what the sites publish. One run has its own DP noise: MARGIN is wider than the
goal (5 points on the mean over seeds, measured by ``scripts/bench --utility``).
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from sklearn.datasets import load_wine
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import train_test_split
from sklearn.preprocessing import StandardScaler

from tests.conftest import approve_job, last_json, make_sites, pending_item, run_cli
from tests.integration.conftest import EMAIL

pytestmark = pytest.mark.integration

# One run, 36 test rows (one row is 0.028). Undeclared wine at the default mock epsilon varies
# from run to run with the DP ranges (0.62-0.92 in process over 5 seeds; 0.907 mean over 3 in
# the bench): the goal of 5 points is on the mean over seeds (docs/benchmarks.md). One run must
# learn (the majority share is 0.40), and a run that falls short is warned before it spends.
MARGIN = 0.30
WARNED_BELOW = 0.05
MINIMAL_JOB = 'DATASET = "wine"\nPLAN = {"target_epsilon": 3.0}\n'


def _split(seed: int = 0) -> tuple[list[pd.DataFrame], pd.DataFrame]:
    wine = load_wine(as_frame=True).frame.rename(columns={"target": "cultivar"})
    train, test = train_test_split(
        wine, test_size=0.2, stratify=wine["cultivar"], random_state=seed
    )
    a, b = train_test_split(train, test_size=0.5, stratify=train["cultivar"], random_state=seed)
    return [a.reset_index(drop=True), b.reset_index(drop=True)], test


def _centralized(shares: list[pd.DataFrame], test: pd.DataFrame) -> float:
    pooled = pd.concat(shares)
    scaler = StandardScaler().fit(pooled.drop(columns="cultivar"))
    model = LogisticRegression(max_iter=2000).fit(
        scaler.transform(pooled.drop(columns="cultivar")), pooled["cultivar"]
    )
    predicted = model.predict(scaler.transform(test.drop(columns="cultivar")))
    return float(np.mean(predicted == test["cultivar"].to_numpy()))


@pytest.fixture(scope="module")
def wineries(tmp_path_factory):
    root = tmp_path_factory.mktemp("defaults")
    shares, test = _split()
    made = make_sites(root, "winery-a", "winery-b")
    lines = []
    for site, share in zip(made, shares, strict=True):
        csv = root / f"{site.name}.csv"
        share.to_csv(csv, index=False)
        uploaded = site.cli("upload", "--name", "wine", "--file", str(csv), "--target", "cultivar")
        # ~70 rows, 13 columns, no bounds: the owner is told what would make the statistics
        # worth scaling with (declared bounds), where only the owner can act on it
        said = " ".join(uploaded.stdout.split())  # rich folds it at the terminal's width
        assert "note: " in said and "--bounds FILE" in said
        site.cli("policy", "set", "--dataset", "wine", "--allow-domain", "uni.edu")
        creds = last_json(site.cli("users", "add", "--email", EMAIL, "--name", "Ada", "--json"))
        (root / f"{site.name}.pw").write_text(creds["password"])
        # the admin grants a budget: the job's 3 beside the public mock's default 1
        site.cli("budget", "set", "--researcher", EMAIL, "--dataset", "wine", "--epsilon", "5")
        lines.append(
            f'[[sites]]\nname = "{site.name}"\nurl = "{site.url}"\nemail = "{EMAIL}"\n'
            f'password_file = "{site.name}.pw"\nfingerprint = "{site.fingerprint}"\n'
        )
    (root / "federation.toml").write_text("\n".join(lines))
    (root / "job.py").write_text(MINIMAL_JOB)
    test.to_csv(root / "test.csv", index=False)
    yield root, made, _centralized(shares, test)
    for s in made:
        s.cli("stop", check=False)


def test_the_minimal_job_file_with_every_default_learns(wineries) -> None:
    root, made, centralized = wineries
    fed = str(root / "federation.toml")
    submitted = last_json(
        run_cli("researcher", "submit", str(root / "job.py"), "-f", fed, "--json")
    )
    assert submitted["auto_plan"] is not None  # the plan came from the sites' public numbers
    for site in made:
        report = pending_item(site.dir, submitted["job"])["report"]
        assert report["passed"], [c for c in report["checks"] if not c["passed"]]
        approve_job(site.dir, submitted["job"])
    trained = last_json(
        run_cli(
            "researcher",
            "train",
            "-f",
            fed,
            "--run-dir",
            str(root / "run"),
            "--test",
            str(root / "test.csv"),
            "--json",
        )
    )
    accuracy = trained["test_accuracy"]
    print(f"wine, every default: {accuracy:.3f} against centralized {centralized:.3f}")
    assert trained["complete"] and trained["rounds"] == submitted["plan"]["rounds"]
    assert accuracy >= centralized - MARGIN, (accuracy, centralized, submitted["warnings"])
    if accuracy < centralized - WARNED_BELOW:  # the shortfall was named before any epsilon
        kinds = {w["kind"] for w in submitted["warnings"]}
        assert "statistics" in kinds, submitted["warnings"]
