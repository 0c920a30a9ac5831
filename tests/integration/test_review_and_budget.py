"""Two real datasites: submit, approve on one, deny on the other, run, attacks, budgets."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest
import syft as sy

from policies.accounting import epsilon
from policies.privacy import privacy_plan
from researcher import api, sites
from researcher.federation import Federation
from researcher.job import make_job
from tests.conftest import Site, last_json, make_site

pytestmark = pytest.mark.integration

MODEL = """import torch.nn as nn

def make_model(n_features, n_outputs):
    return nn.Sequential(nn.Linear(n_features, 8), nn.ReLU(), nn.Linear(8, n_outputs))
"""
EMAIL = "ada@uni.edu"


@pytest.fixture(scope="module")
def federation(tmp_path_factory, breast_cancer_csv: Path):
    root = tmp_path_factory.mktemp("fed")
    made = [make_site(root, "hospital-a"), make_site(root, "hospital-b")]
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
    spec = make_job(
        MODEL, "cancer", "target", {"rounds": 2, "noise_multiplier": 1.5, "batch_size": 64}
    )
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
    assert result["n"] == 455 and set(result) <= {
        "status",
        "round",
        "weights",
        "n",
        "metrics",
        "privacy",
    }
    expected = privacy_plan(spec.plan, 455).epsilon_job
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
    fn = sy.syft_function(input_policy=sy.MixedInputPolicy(data=asset, weights=str, client=client))(
        getattr(module, name)
    )
    client.code.request_code_execution(fn)


def test_attacks_from_a_plain_syft_client_are_flagged_and_refused(federation) -> None:
    from researcher.job import render

    fed, (a, _) = federation
    client = sites.connect(fed.site("hospital-a"))
    asset = sites.find_asset(client, "cancer")
    attacks = dict(ATTACKS)
    no_noise = make_job(MODEL, "cancer", "target", {"noise_multiplier": 0.0}, name="no_noise")
    attacks[no_noise.name] = (render(no_noise), "dp_parameters")
    wrapped = make_job(MODEL, "cancer", "target", {"noise_multiplier": 1.0}, name="wrapped")
    lines = render(wrapped).splitlines()
    attacks[wrapped.name] = (
        "\n".join([*lines[:2], "    leak = data.sum()", *lines[2:]]) + "\n",
        "template",
    )
    evil_model = make_job(
        MODEL + "import socket\n", "cancer", "target", {"noise_multiplier": 1.0}, name="evil_model"
    )
    attacks[evil_model.name] = (render(evil_model), "model_code")
    for name, (source, _) in attacks.items():
        _plain_request(client, asset, name, source)

    items = {i["function"]: i for i in last_json(a.cli("requests", "--json"))}
    for name, (_, check) in attacks.items():
        report = items[name]["report"]
        assert not report["passed"], name
        assert check in {c["name"] for c in report["checks"] if not c["passed"]}, (name, report)
        refused = a.cli("approve", items[name]["id"], check=False)
        assert refused.returncode == 1, name
        forced = a.cli("approve", items[name]["id"], "--override", "--reason", "x", check=False)
        if check != "dp_parameters":
            assert forced.returncode == 1 and "cannot be overridden" in forced.stderr
        else:  # overriding DP is possible, but the runtime still refuses to spend infinite eps
            assert forced.returncode == 0
            out = sites.run_round(client, no_noise, asset, "")
            assert out["status"] == "refused" and "epsilon" in out["reason"]
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
    probe = make_job(MODEL, "cancer", "target", plan)
    p = privacy_plan(probe.plan, 455)
    one, two, three = (epsilon([p.mechanism] * k, 1e-5, "prv") for k in (1, 2, 3))
    assert 1.0 < one < 1.5  # each job spends about 1.2 on its own
    total = (two + three) / 2  # room for two composed jobs, not three
    a.cli("budget", "set", "--researcher", email, "--dataset", "cancer", "--epsilon", str(total))

    client = sites.connect(login)
    asset = sites.find_asset(client, "cancer")
    outcomes = []
    for _ in range(3):
        spec = make_job(MODEL, "cancer", "target", plan)
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
    p = privacy_plan(make_job(MODEL, "cancer", "target", plan).plan, 455)
    one = epsilon([p.mechanism], 1e-5, "prv")
    two = epsilon([p.mechanism] * 2, 1e-5, "prv")
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
    specs = [make_job(MODEL, "cancer", "target", plan) for _ in range(2)]
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
