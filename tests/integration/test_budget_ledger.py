"""The budget ledger behind a real datasite: spend never passes the total, survives kill -9,
and two concurrent jobs cannot both take the last of it."""

from __future__ import annotations

import os
import re
import signal
import time

import pytest

from policies.accounting import epsilon
from policies.privacy import privacy_plan
from researcher import sites
from tests.conftest import last_json
from tests.integration.conftest import job, request_id

pytestmark = pytest.mark.integration
SITE_NAMES = ("hospital-a",)  # the ledger is per site: one is enough
SHARED_SITES = True  # the worker's running sites (tests/integration/conftest.py)
EMAIL = "ada.ledger@uni.edu"  # the fixture's researcher; the tests add their own (bob, cy, dee)


def test_budget_holds_and_survives_kill_9(federation) -> None:
    fed, (a,) = federation
    email = "bob@uni.edu"
    creds = last_json(a.cli("users", "add", "--email", email, "--name", "Bob", "--json"))
    (fed.path.parent / "bob.pw").write_text(creds["password"])
    login = fed.site("hospital-a").__class__(
        "hospital-a", a.url, email, fed.path.parent / "bob.pw", fingerprint=a.fingerprint
    )
    plan = {"rounds": 1, "target_epsilon": 1.2, "batch_size": 64}
    probe = job(plan)
    p = privacy_plan(probe.plan, a.published_rows("cancer"))
    mechanisms = [m for _, m in p.releases]  # training and site metrics, both charged
    mock = a.public_mechanisms("cancer")  # the DP mock, in every researcher's spend
    assert len(mock) == 1
    one, two, three = (epsilon(mock + mechanisms * k, 1e-5, "prv") for k in (1, 2, 3))
    assert 1.0 < epsilon(mechanisms, 1e-5, "prv") < 1.5  # each job spends about 1.2 on its own
    total = (two + three) / 2  # room for two composed jobs, not three
    a.cli("budget", "set", "--researcher", email, "--dataset", "cancer", "--epsilon", str(total))

    client = sites.connect(login)
    asset = sites.find_asset(client, "cancer")
    outcomes = []
    for k in range(3):
        spec = job(plan)
        sites.submit(client, spec, asset)
        rid = request_id(a, spec.name)
        if k == 2:  # the review already says it cannot fit, with what is left (issue 26)
            [item] = [i for i in last_json(a.cli("requests", "--json")) if i["job"] == spec.name]
            failed = {c["name"]: c["reason"] for c in item["report"]["checks"] if not c["passed"]}
            assert list(failed) == ["budget"] and "past the budget" in failed["budget"]
            left = re.search(r"\(([0-9.]+) remaining\)", failed["budget"])
            assert left and float(left.group(1)) == pytest.approx(total - two, abs=1e-3)
            refused = a.cli("approve", rid, check=False)
            assert refused.returncode == 1 and "budget" in refused.stderr
            a.cli("approve", rid, "--override", "--reason", "to see the runtime refuse it")
        else:
            a.cli("approve", rid)
        outcomes.append(sites.run_round(client, spec, asset, ""))
    assert [o["status"] for o in outcomes] == ["ok", "ok", "refused"]
    assert "past the budget" in outcomes[2]["reason"]
    ledger = {(r["researcher"]): r for r in last_json(a.cli("budget", "--json"))}[email]
    assert ledger["epsilon_spent"] == pytest.approx(two, rel=1e-6) and ledger["charges"] == 2

    pid = last_json(a.cli("status", "--json"))["pid"]
    os.kill(pid, signal.SIGKILL)
    time.sleep(0.5)
    a.relaunch()
    after = {(r["researcher"]): r for r in last_json(a.cli("budget", "--json"))}[email]
    assert after["epsilon_spent"] == pytest.approx(two, rel=1e-6)
    assert after["epsilon_spent"] <= after["epsilon_total"]


def test_two_concurrent_jobs_race_for_the_last_of_a_budget(federation) -> None:
    from concurrent.futures import ThreadPoolExecutor

    fed, (a,) = federation
    plan = {"rounds": 1, "target_epsilon": 1.2, "batch_size": 64}
    p = privacy_plan(job(plan).plan, a.published_rows("cancer"))
    mechanisms = [m for _, m in p.releases]
    mock = a.public_mechanisms("cancer")
    one = epsilon(mock + mechanisms, 1e-5, "prv")
    two = epsilon(mock + mechanisms * 2, 1e-5, "prv")
    email = "cy@uni.edu"
    creds = last_json(a.cli("users", "add", "--email", email, "--name", "Cy", "--json"))
    (fed.path.parent / "cy.pw").write_text(creds["password"])
    a.cli(
        "budget",
        "set",
        "--researcher",
        email,
        "--dataset",
        "cancer",
        "--epsilon",
        str((one + two) / 2),
    )
    login = fed.site("hospital-a").__class__(
        "hospital-a", a.url, email, fed.path.parent / "cy.pw", fingerprint=a.fingerprint
    )
    client = sites.connect(login)
    asset = sites.find_asset(client, "cancer")
    specs = [job(plan) for _ in range(2)]
    for spec in specs:
        sites.submit(client, spec, asset)
    items = {i["function"]: i["id"] for i in last_json(a.cli("requests", "--json"))}
    for spec in specs:
        a.cli("approve", items[spec.name])

    def call(spec):
        return sites.run_round(sites.connect(login), spec, asset, "")["status"]

    with ThreadPoolExecutor(2) as pool:
        outcomes = sorted(pool.map(call, specs))
    assert outcomes == ["ok", "refused"]
    ledger = {r["researcher"]: r for r in last_json(a.cli("budget", "--json"))}[email]
    assert ledger["charges"] == 1 and ledger["epsilon_spent"] <= ledger["epsilon_total"]


def test_dp_recall_and_auc_are_released_and_charged_as_scores(federation) -> None:
    """A rare-label job on a real site: "balanced" weights from the published DP class counts,
    recall/precision/ROC-AUC from one noised score histogram a round, in the ledger as its own
    release, and the spend is the hand composition of mock, training, metrics and scores."""
    from datasites.serving.config import SiteDir
    from policies import imbalance
    from policies.accounting import Mechanism

    fed, (a,) = federation
    email = "dee@uni.edu"
    creds = last_json(a.cli("users", "add", "--email", email, "--name", "Dee", "--json"))
    (fed.path.parent / "dee.pw").write_text(creds["password"])
    a.cli("budget", "set", "--researcher", email, "--dataset", "cancer", "--epsilon", "8")
    login = fed.site("hospital-a").__class__(
        "hospital-a", a.url, email, fed.path.parent / "dee.pw", fingerprint=a.fingerprint
    )
    plan = {
        "rounds": 1,
        "noise_multiplier": 1.5,
        "batch_size": 64,
        "class_weight": "balanced",
        "binary_metrics": True,
        "metric_noise_multiplier": 4.0,  # the job stays within the per-job 3
    }
    spec = job(plan)
    meta = SiteDir(a.dir).datasets_meta()["cancer"]
    counts = meta["class_counts"]  # published: the mock's label shares times the DP row count
    assert len(counts) == 2 and sum(counts) == pytest.approx(meta["rows"], abs=1)
    assert imbalance.balanced_weights(counts)[0] > 1 > imbalance.balanced_weights(counts)[1]
    client = sites.connect(login)
    asset = sites.find_asset(client, "cancer")
    sites.submit(client, spec, asset)
    rid = request_id(a, spec.name)
    shown = a.cli("review", rid).stdout
    assert "published DP class counts" in shown and "'scores'" in shown
    a.cli("approve", rid)
    reply = sites.run_round(client, spec, asset, "")
    assert reply["status"] == "ok", reply
    released = reply["metrics"]
    for key in ("val_recall", "val_precision", "val_roc_auc", "val_pr_auc"):
        assert 0.0 <= released[key] <= 1.0
    assert reply["privacy"]["score_releases"] == 1 and reply["privacy"]["metric_releases"] == 2
    row = {r["researcher"]: r for r in last_json(a.cli("budget", "--json"))}[email]
    kinds = {r["kind"]: r["mechanism"] for r in row["releases"] if r["job"] == spec.job_id}
    assert set(kinds) == {"training", "metrics", "scores"}
    assert kinds["scores"]["steps"] == 1 and kinds["scores"]["noise_multiplier"] == 4.0
    p = privacy_plan(spec.plan, a.published_rows("cancer"))
    hand = [
        *a.public_mechanisms("cancer"),
        Mechanism(1.5, p.sample_rate, p.mechanism.steps),
        Mechanism(4.0, 1.0, 3),  # 2 metric sums and 1 histogram, all at noise 4
    ]
    assert row["epsilon_spent"] == pytest.approx(epsilon(hand, 1e-5, "prv"), rel=1e-6)
    without = epsilon(hand[:-1] + [Mechanism(4.0, 1.0, 2)], 1e-5, "prv")
    assert row["epsilon_spent"] > without  # the histogram is charged, not free
