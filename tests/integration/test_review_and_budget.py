"""Two real datasites: submit, approve on one, deny on the other, run, attacks, budgets."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import numpy as np
import pytest
import syft as sy
from torch import nn

from datasites.errors import ReviewError
from datasites.review.queue import ReviewQueue
from datasites.serving.config import SiteDir
from policies.accounting import epsilon
from policies.plan import training_rows
from policies.privacy import privacy_plan
from researcher import api, sites
from researcher.errors import JobError
from researcher.federation import Federation
from researcher.job import TEMPLATE, make_job
from tests.conftest import Site, last_json, make_sites, run_cli

pytestmark = pytest.mark.integration

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
def federation(tmp_path_factory, breast_cancer_csv: Path):
    root = tmp_path_factory.mktemp("fed")
    made = make_sites(root, "hospital-a", "hospital-b")
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


def test_submit_approve_deny_run_and_audit_survives_restart(federation) -> None:
    fed, (a, b) = federation
    a.cli("budget", "set", "--researcher", EMAIL, "--dataset", "cancer", "--epsilon", "10")
    spec = job({"rounds": 2, "noise_multiplier": 1.5, "batch_size": 64})
    api.submit(fed, spec)
    assert {s["status"] for s in api.status(fed, spec).values()} == {"pending"}

    listed = last_json(a.cli("requests", "--json"))[0]
    assert {"id", "researcher", "status", "report"} <= set(listed)
    assert listed["report"]["passed"] and listed["researcher"] == EMAIL
    a.cli("approve", request_id(a, spec.name))
    denied = b.cli("deny", request_id(b, spec.name), "--reason", "not this quarter")
    assert denied.returncode == 0
    states = api.status(fed, spec)
    assert states["hospital-a"] == {"status": "approved", "reason": None}
    assert states["hospital-b"]["status"] == "denied"
    assert "not this quarter" in states["hospital-b"]["reason"]

    client = sites.connect(fed.site("hospital-a"))
    result = sites.run_round(client, spec, sites.find_asset(client, "cancer"), "")
    assert result["status"] == "ok", result
    from policies.wire import decode_weights

    shapes = {k: v.shape for k, v in decode_weights(result["weights"]).items()}
    assert shapes == {"0.weight": (8, 30), "0.bias": (8,), "2.weight": (2, 8), "2.bias": (2,)}
    rows = a.published_rows("cancer")  # DP: every released count follows it, not the true 569
    assert result["n"] == training_rows(rows, spec.plan) and set(result) <= {
        "status",
        "round",
        "weights",
        "n",
        "metrics",
        "privacy",
    }
    mechanisms = [m for _, m in privacy_plan(spec.plan, rows).releases]
    expected = epsilon([*a.public_mechanisms("cancer"), *mechanisms], 1e-5, "prv")
    assert result["privacy"]["epsilon_spent"] == pytest.approx(expected, rel=1e-6)
    assert result["privacy"]["noise_multiplier"] == 1.5

    client_b = sites.connect(fed.site("hospital-b"))
    with pytest.raises(Exception, match="(?i)denied|reject|approval"):
        sites.run_round(client_b, spec, sites.find_asset(client_b, "cancer"), "")

    a.cli("stop")
    a.cli("launch", "--detach")
    for needed in ("submitted", "reported", "approved", "executed", "released"):
        assert needed in events(a), needed
    assert "denied" in events(b)


ATTACKS = {
    "steal_rows": (
        "def steal_rows(data, weights):\n    return data.head(20).to_dict()\n",
        "template",
    ),
    "read_file": (
        "def read_file(data, weights):\n    return open('/etc/passwd').read()\n",
        "template",
    ),
    "import_os": (
        "def import_os(data, weights):\n    import os\n    return os.listdir('/')\n",
        "template",
    ),
}


def _plain_request(client, asset, name: str, source: str) -> None:
    """Submit arbitrary source with a plain syft client, as an attacker would."""
    import importlib.util
    import tempfile

    path = Path(tempfile.mkdtemp()) / f"{name}.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    from syft.service.policy.policy import OutputPolicyExecuteCount

    fn = sy.syft_function(  # the policies the researcher package uses, so "executed" passes
        input_policy=sy.MixedInputPolicy(data=asset, weights=str, client=client),
        output_policy=OutputPolicyExecuteCount(limit=6),
    )(getattr(module, name))
    client.code.request_code_execution(fn)


def test_models_that_cannot_be_sent_are_refused_at_the_researcher() -> None:
    """No model code travels: what the spec cannot say never leaves (tests/adversarial: e2e)."""
    with pytest.raises(JobError, match="noise_multiplier must be a number in"):
        job({"noise_multiplier": 0.0})

    class Evil(nn.Module):  # a forward of its own could do anything at a site
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(30, 2)

        def forward(self, x):  # noqa: ANN001, ANN202
            import socket  # noqa: F401

            return self.fc(x)

    with pytest.raises(JobError, match=r"layer 0 \(Evil\).*custom module"):
        make_job(Evil(), "cancer", "target", {"noise_multiplier": 1.0}, n_features=30, n_outputs=2)
    batch_norm = nn.Sequential(nn.Linear(30, 8), nn.BatchNorm1d(8), nn.Linear(8, 2))
    with pytest.raises(JobError, match=r"layer 1 \(BatchNorm1d\) is refused"):
        make_job(
            batch_norm, "cancer", "target", {"noise_multiplier": 1.0}, n_features=30, n_outputs=2
        )


def _hand_written(name: str, literal: dict) -> str:
    """The template around a job literal no researcher package would write."""
    return TEMPLATE.format(name=name, job_id=literal["job_id"], job=literal)


def test_attacks_from_a_plain_syft_client_are_flagged_and_refused(federation) -> None:
    from researcher.job import render

    fed, (a, _) = federation
    client = sites.connect(fed.site("hospital-a"))
    asset = sites.find_asset(client, "cancer")
    attacks = dict(ATTACKS)
    # below the policy's minimum noise (0.5): an admin may override, the runtime still refuses
    low_noise = job({"noise_multiplier": 0.1}, name="low_noise")
    attacks[low_noise.name] = (render(low_noise), "dp_parameters")
    wrapped = job({"noise_multiplier": 1.0}, name="wrapped")
    lines = render(wrapped).splitlines()
    attacks[wrapped.name] = (
        "\n".join([*lines[:2], "    leak = data.sum()", *lines[2:]]) + "\n",
        "template",
    )
    no_noise = job({"noise_multiplier": 1.0}, name="no_noise").to_dict()
    no_noise["plan"]["noise_multiplier"] = 0.0
    attacks["no_noise"] = (_hand_written("no_noise", no_noise), "template")
    evil_layer = job({"noise_multiplier": 1.0}, name="evil_layer").to_dict()
    evil_layer["model"]["layers"].insert(1, {"type": "BatchNorm1d", "num_features": 8})
    attacks["evil_layer"] = (_hand_written("evil_layer", evil_layer), "template")
    too_wide = job({"noise_multiplier": 1.0}, name="too_wide").to_dict()
    too_wide["model"] = {
        "input": [31],
        "layers": [{"type": "Linear", "in_features": 31, "out_features": 2}],
    }
    attacks["too_wide"] = (_hand_written("too_wide", too_wide), "model")
    why = {  # the literal is re-parsed and checked against the table, whoever wrote it
        "no_noise": "noise_multiplier must be a number in (0",
        "evil_layer": "layer 1 (BatchNorm1d) is refused",
        "too_wide": "the model takes rows of [31] but dataset 'cancer' has 30 feature(s)",
    }
    for name, (source, _) in attacks.items():
        _plain_request(client, asset, name, source)

    items = {i["function"]: i for i in last_json(a.cli("requests", "--json"))}
    # the CLI's answer once (exit code, one line); the rest through the same queue, in process
    refused = a.cli("approve", items["steal_rows"]["id"], check=False)
    assert refused.returncode == 1 and refused.stderr.count("\n") == 1
    assert "cannot be overridden" in refused.stderr
    forced = a.cli("approve", items["steal_rows"]["id"], "--override", "--reason", "x", check=False)
    assert forced.returncode == 1 and "cannot be overridden" in forced.stderr
    queue = ReviewQueue(SiteDir(a.dir))
    for name, (_, check) in attacks.items():
        report = items[name]["report"]
        assert not report["passed"], name
        reasons = {c["name"]: c["reason"] for c in report["checks"] if not c["passed"]}
        assert check in reasons, (name, report)
        assert why.get(name, "") in reasons[check], (name, reasons)
        with pytest.raises(ReviewError):
            queue.approve(items[name]["id"])
        if check != "dp_parameters":
            with pytest.raises(ReviewError, match="cannot be overridden"):
                queue.approve(items[name]["id"], override=True, reason="x")
        else:  # overriding DP is possible, but the runtime floors the noise at the policy's
            queue.approve(items[name]["id"], override=True, reason="x")  # minimum and refuses
            out = sites.run_round(client, low_noise, asset, "")  # a plan past the epsilon limit
            assert out["status"] == "refused" and "epsilon" in out["reason"], out
    for name in ATTACKS:
        with pytest.raises(Exception, match="(?i)approval|pending"):
            getattr(client.code, name)(data=asset, weights="")
    assert "overridden" in events(a)


def test_budget_holds_and_survives_kill_9(federation) -> None:
    fed, (a, _) = federation
    email = "bob@uni.edu"
    creds = last_json(a.cli("users", "add", "--email", email, "--name", "Bob", "--json"))
    (fed.path.parent / "bob.pw").write_text(creds["password"])
    login = fed.site("hospital-a").__class__("hospital-a", a.url, email, fed.path.parent / "bob.pw")
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
    for _ in range(3):
        spec = job(plan)
        sites.submit(client, spec, asset)
        a.cli("approve", request_id(a, spec.name))
        outcomes.append(sites.run_round(client, spec, asset, ""))
    assert [o["status"] for o in outcomes] == ["ok", "ok", "refused"]
    assert "past the budget" in outcomes[2]["reason"]
    ledger = {(r["researcher"]): r for r in last_json(a.cli("budget", "--json"))}[email]
    assert ledger["epsilon_spent"] == pytest.approx(two, rel=1e-6) and ledger["charges"] == 2

    pid = last_json(a.cli("status", "--json"))["pid"]
    os.kill(pid, signal.SIGKILL)
    time.sleep(0.5)
    a.cli("launch", "--detach")
    after = {(r["researcher"]): r for r in last_json(a.cli("budget", "--json"))}[email]
    assert after["epsilon_spent"] == pytest.approx(two, rel=1e-6)
    assert after["epsilon_spent"] <= after["epsilon_total"]


def test_two_concurrent_jobs_race_for_the_last_of_a_budget(federation) -> None:
    from concurrent.futures import ThreadPoolExecutor

    fed, (a, _) = federation
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
    login = fed.site("hospital-a").__class__("hospital-a", a.url, email, fed.path.parent / "cy.pw")
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


README_JOB = """import torch.nn as nn

DATASET = "cancer"
PLAN = {"rounds": 3, "batch_size": 64, "learning_rate": 0.5, "target_epsilon": 2.0}


def make_model(n_features, n_outputs):
    return nn.Sequential(nn.Linear(n_features, 16), nn.ReLU(), nn.Linear(16, n_outputs))
"""


def test_the_readme_researcher_sequence(federation, tmp_path: Path) -> None:
    """submit, status, train, status, train --resume: each exits 0 (status crashed on the
    progress file that train writes beside the saved jobs)."""
    fed, made = federation
    for s in made:
        s.cli("budget", "set", "--researcher", EMAIL, "--dataset", "cancer", "--epsilon", "30")
    f = str(fed.path)
    # a job that cannot run on these tables stops at submit, one line, before any site sees it
    misfit = tmp_path / "misfit.py"
    misfit.write_text(
        'DATASET = "cancer"\nPLAN = {"rounds": 1, "noise_multiplier": 1.0}\n'
        'MODEL = [{"type": "Linear", "in_features": 6, "out_features": 2}]\n'
    )
    before = len(ReviewQueue(SiteDir(made[0].dir)).items())
    refused = run_cli("researcher", "submit", str(misfit), "-f", f, check=False)
    assert refused.returncode == 1 and refused.stderr.count("\n") == 1, refused.stderr
    assert "expects 6 features, gets [30]" in refused.stderr
    narrow = make_job(  # the Python API, with a spec built by hand: the mock dry run stops it
        [{"type": "Linear", "in_features": 6, "out_features": 2}],
        "cancer",
        "target",
        {"rounds": 1, "noise_multiplier": 1.0},
        n_features=6,
    )
    with pytest.raises(JobError, match=r"dry run on hospital-a's mock: .*has 30 feature"):
        api.submit(fed, narrow)
    assert len(ReviewQueue(SiteDir(made[0].dir)).items()) == before
    job_py = tmp_path / "job.py"
    job_py.write_text(README_JOB)
    run_cli("researcher", "submit", str(job_py), "-f", f)
    spec = api.saved_job(fed, None)
    pending = last_json(run_cli("researcher", "status", "-f", f, "--json"))
    assert {v["status"] for v in pending["sites"].values()} == {"pending"}, pending
    early = run_cli(
        "researcher", "train", "-f", f, "--run-dir", str(tmp_path / "early"), check=False
    )
    assert early.returncode == 1 and early.stderr.count("\n") == 1, early.stderr
    assert "pending at hospital-a, hospital-b" in early.stderr
    assert not (tmp_path / "early").exists()
    for s in made:
        queue = ReviewQueue(SiteDir(s.dir))
        item = next(i for i in queue.items() if i.request.code.service_func_name == spec.name)
        queue.approve(item.request_id)
    run_dir = tmp_path / "runs" / "1"
    run_cli("researcher", "train", "-f", f, "--run-dir", str(run_dir))
    assert (run_dir / "model.pt").exists() and (run_dir / "state.json").exists()
    done = last_json(run_cli("researcher", "status", "-f", f, "--json"))
    assert {v["status"] for v in done["sites"].values()} == {"done"}, done
    resumed = run_cli("researcher", "train", "-f", f, "--resume", str(run_dir), check=False)
    assert resumed.returncode == 0, resumed.stderr


def test_a_round_lost_by_the_researcher_is_replayed_on_resume(federation, tmp_path) -> None:
    """The sites release round 2 but the researcher never receives it (Ctrl-C mid-round): on
    --resume each site hands back that same reply, untrained and uncharged, and the run ends."""
    from policies.wire import REPLAY_LAST, decode_weights, encode_weights
    from researcher.rounds import Checkpoint

    fed, made = federation
    for s in made:
        s.cli("budget", "set", "--researcher", EMAIL, "--dataset", "cancer", "--epsilon", "50")
    spec = api.with_pooled_scaling(fed, job({"rounds": 2, "noise_multiplier": 1.5}))
    api.submit(fed, spec, dry=False)
    for s in made:
        queue = ReviewQueue(SiteDir(s.dir))
        item = next(i for i in queue.items() if i.request.code.service_func_name == spec.name)
        queue.approve(item.request_id)
    run = tmp_path / "run"

    class Interrupted(Exception):
        pass

    def stop_after_round_1(rec) -> None:  # noqa: ANN001
        raise Interrupted

    with pytest.raises(Interrupted):
        api.train(fed, spec, run, on_round=stop_after_round_1)
    _, done, weights, _ = Checkpoint(run).load()
    assert done == 1
    lost = {}  # what the interrupted client had asked for, and never saw
    for login in fed.sites:
        client = sites.connect(login)
        asset = sites.find_asset(client, "cancer")
        assert sites.run_round(client, spec, asset, REPLAY_LAST)["round"] == 1
        lost[login.name] = sites.run_round(client, spec, asset, encode_weights(weights))
        assert lost[login.name]["status"] == "ok" and lost[login.name]["round"] == 2
    spent = {s.name: last_json(s.cli("budget", "--json")) for s in made}
    seen = {}
    result = api.train(
        fed, spec, run, resume=True, on_round=lambda rec: seen.setdefault(rec.round, rec)
    )
    assert len(result.rounds) == 2 and (run / "model.pt").exists()
    for update in seen[2].updates:  # the lost replies, byte for byte, not a third round
        np.testing.assert_array_equal(
            update.weights["0.weight"], decode_weights(lost[update.site]["weights"])["0.weight"]
        )
    assert {s.name: last_json(s.cli("budget", "--json")) for s in made} == spent
