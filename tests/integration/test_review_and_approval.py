"""Two real datasites: submit, approve on one and deny on the other, run, restart; what a plain
syft client submits is flagged and refused."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import pytest
import syft as sy
from torch import nn

from datasites.errors import ReviewError
from datasites.review.queue import ReviewQueue
from datasites.serving.config import SiteDir
from policies.accounting import epsilon
from policies.job_template import TEMPLATE
from policies.plan import training_rows
from policies.privacy import privacy_plan
from researcher import api, sites
from researcher.errors import JobError
from researcher.job import make_job
from tests.conftest import last_json
from tests.integration.conftest import events, job, request_id

pytestmark = pytest.mark.integration
SHARED_SITES = True  # the worker's running sites (tests/integration/conftest.py)
EMAIL = "ada.review@uni.edu"  # this module's researcher there: what it lists is hers


def _mine(site) -> list[dict]:  # noqa: ANN001
    """The site's requests from this module's researcher (other modules share the site)."""
    return [i for i in last_json(site.cli("requests", "--json")) if i["researcher"] == EMAIL]


def test_submit_approve_deny_run_and_audit_survives_restart(federation) -> None:
    fed, (a, b) = federation
    seen_a, seen_b = len(events(a)), len(events(b))  # what the audit held before this test
    a.cli("budget", "set", "--researcher", EMAIL, "--dataset", "cancer", "--epsilon", "10")
    spec = job({"rounds": 2, "noise_multiplier": 1.5, "batch_size": 64})
    before = datetime.now(UTC).replace(microsecond=0)
    api.submit(fed, spec)
    assert {s["status"] for s in api.status(fed, spec).values()} == {"pending"}

    listed = _mine(a)[0]
    assert {"id", "researcher", "status", "report"} <= set(listed)
    assert listed["report"]["passed"] and listed["researcher"] == EMAIL
    # the admin sees the researcher's job name, and the same status words
    assert listed["job"] == spec.name and listed["status"] == "pending"
    # and when it came: a resubmission is told apart from the first by its time
    submitted = datetime.strptime(listed["submitted"], "%Y-%m-%d %H:%M:%S").replace(tzinfo=UTC)
    assert before <= submitted <= datetime.now(UTC)
    assert listed["submitted"] in a.cli("requests").stdout
    a.cli("approve", request_id(a, spec.name))
    denied = b.cli("deny", request_id(b, spec.name), "--reason", "not this quarter")
    assert denied.returncode == 0
    assert [i["status"] for i in _mine(b)] == ["denied"]
    assert [i["status"] for i in _mine(a)] == ["approved"]
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

    # access revoked after the approval: the next round is refused before any charge
    spent = result["privacy"]["epsilon_spent"]
    a.cli("policy", "set", "--dataset", "cancer", "--revoke-domain", "uni.edu")
    client = sites.connect(fed.site("hospital-a"))
    revoked = sites.run_round(client, spec, sites.find_asset(client, "cancer"), "")
    assert revoked["status"] == "refused" and "access revoked" in revoked["reason"]
    [ada] = [r for r in last_json(a.cli("budget", "--json")) if r["researcher"] == EMAIL]
    assert ada["epsilon_spent"] == pytest.approx(spent)
    a.cli("policy", "set", "--dataset", "cancer", "--allow-domain", "uni.edu")

    a.cli("stop")
    a.relaunch()
    for needed in ("submitted", "reported", "approved", "executed", "released"):
        assert needed in events(a)[seen_a:], needed
    assert "denied" in events(b)[seen_b:]


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
    seen = len(events(a))
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

    items = {i["function"]: i for i in _mine(a)}
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
    assert "overridden" in events(a)[seen:]
