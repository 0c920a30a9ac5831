"""Free epsilon (issue 24), against a real datasite: a second syft request on approved code, and
a distributed-DP "peer" whose key the researcher holds. Each attack ends with the ledger showing
every spend and nothing released past what was charged."""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import pytest

from datasites.ledger.store import SiteStore
from datasites.serving.config import SiteDir
from datasites.training.job_state import JobState
from datasites.training.secure_agg import SecureSite
from policies import secagg
from policies.wire import Participant, SecAggHello, SecAggMask, encode_weights
from researcher import sites
from tests.adversarial.conftest import EVE, assert_nothing_private, assert_serving, job
from tests.conftest import queued

pytestmark = pytest.mark.integration


def _request_again(client, code) -> str:  # noqa: ANN001
    """A second syft request for already-approved user code, as any logged-in user can file it
    (syft's ``request.submit``), bypassing ``request_code_execution``'s one-request check."""
    from syft.service.code.user_code import UserCodeStatus
    from syft.service.request.request import SubmitRequest, UserCodeStatusChange
    from syft.store.linked_obj import LinkedObject

    change = UserCodeStatusChange(
        value=UserCodeStatus.APPROVED,
        linked_obj=code.status_link,
        linked_user_code=LinkedObject.from_obj(code, server_uid=client.id),
    )
    request = client.api.services.request.submit(request=SubmitRequest(changes=[change]))
    return str(getattr(request, "message", None) or request.id.no_dash)  # a refusal, or the id


def test_a_second_request_on_approved_code_gets_no_round(arena) -> None:
    spec = job("once_only", {"rounds": 1, "noise_multiplier": 3.0, "batch_size": 64})
    client = arena.client(EVE)
    asset = arena.asset(client)
    sites.submit(client, spec, asset)
    queue = arena.queue()
    first = arena.item(spec.name)
    queue.approve(first.request_id)
    reply = sites.run_round(client, spec, asset, "")
    assert reply["status"] == "ok"
    spent = arena.spent(EVE)
    code = next(c for c in client.code.get_all() if c.service_func_name == spec.name)
    # syft's request.submit is closed to researchers (red team, round 2: a request could carry
    # a second change that rewrote the code); were it open, the review refuses a second
    # approval of this code (tests/unit/test_site_job.py, test_review_changes.py)
    try:
        refused = str(_request_again(client, code))
    except Exception as exc:
        refused = str(exc)
    assert "not open to researchers" in refused, refused
    # the requests on this code (its function name): one, the first; no report of another
    # job is built (each runs the accountant over eve's whole history)
    mine = [i.request_id for i in queued(queue, spec.name) if i.job_name == spec.name]
    assert mine == [first.request_id]
    again = sites.run_round(client, spec, asset, "")
    assert again["status"] == "refused" and "all have run" in again["reason"], again
    assert arena.spent(EVE) == pytest.approx(spent)
    assert len([r for r in queue.approvals.job_ids() if r == spec.job_id]) == 1
    assert_nothing_private(arena, [reply, again])
    assert_serving(arena)


def test_a_researcher_held_peer_is_a_colluder_by_default(arena) -> None:
    """The researcher names the site and a key of its own as the peers of a distributed-DP
    job, so that unmasking leaves the site's own noised sum with half the plan's noise."""
    site_fp = SiteDir(arena.site.dir).fingerprint()  # its identity key, not its TLS pin
    eve_seed = "5e" * 32
    eve_fp = secagg.fingerprint(secagg.public_bytes(secagg.identity_of(eve_seed).public_key()))
    plan = {
        "rounds": 3,
        "noise_multiplier": 2.0,
        "batch_size": 64,
        "learning_rate": 0.5,
        "site_metrics": False,
        "aggregation": "secure",
        "dp": "distributed",
        "sample_rate": 0.2,
        "peers": [site_fp, eve_fp],
    }
    spec = job("two_peers", plan)
    client = arena.client(EVE)
    asset = arena.asset(client)
    sites.submit(client, spec, asset)
    item = arena.item(spec.name)
    aggregation = next(c for c in item.report.checks if c.name == "aggregation")
    assert not aggregation.passed
    assert "count as colluders" in aggregation.reason and "trust" in aggregation.reason
    assert "not among the peers" not in aggregation.reason  # that is the only problem
    # an admin who overrides the report anyway: the runtime still refuses
    arena.queue().approve(item.request_id, override=True, reason="the peers look fine")
    before = arena.spent(EVE)
    hello = sites.run_round(client, spec, asset, SecAggHello().encode())
    assert hello["status"] == "ok"
    store = SiteStore(Path(tempfile.mkdtemp()) / "eve.db")
    eve_entry = SecureSite(JobState(store), "eve", spec, eve_seed).hello()["secagg"]
    start = {k: np.zeros(s, np.float32) for k, s in spec.trainable.items()}
    mask = SecAggMask(
        "r1-eve",
        encode_weights(start),
        (Participant.from_dict(hello["secagg"]), Participant.from_dict(eve_entry)),
    ).encode()
    reply = sites.run_round(client, spec, asset, mask)
    assert reply["status"] == "refused", reply
    assert "count as colluders" in reply["reason"]
    assert "masked" not in reply and "weights" not in reply
    assert arena.spent(EVE) == pytest.approx(before)
    assert_nothing_private(arena, [hello, reply])
    assert_serving(arena)


def _approved_round(arena, client, spec, asset) -> None:  # noqa: ANN001
    """Submit ``spec`` from the plain client, approve it as the admin, run one round: it must
    train and release nothing private."""
    sites.submit(client, spec, asset)
    item = next(iter(queued(arena.queue(), spec.name)))
    arena.queue().approve(item.request_id)
    reply = sites.run_round(client, spec, asset, "")
    assert reply["status"] == "ok", reply
    assert_nothing_private(arena, reply)


def test_reruns_of_one_plan_are_charged_as_opacus_composes_every_release_unmerged(arena) -> None:
    """The ledger composes a history with each kind of mechanism once, its steps summed
    (``policies.accounting.merged``). A researcher reruns one plan three times from a plain
    syft client, each approved and run: her recorded spend may not fall below what Opacus' PRV
    accountant gives composing every release on its own, so the merge hands out no epsilon."""
    from opacus.accountants import PRVAccountant

    from datasites.ledger.budget import BudgetLedger
    from policies.accounting import Mechanism, merged
    from researcher.federation import SiteLogin
    from tests.adversarial.conftest import DATASET
    from tests.conftest import last_json

    who = "mallory@uni.edu"  # a history of her own: eve's holds Skellam runs PRV cannot take
    site = arena.site
    creds = last_json(site.cli("users", "add", "--email", who, "--name", who, "--json"))
    password = Path(tempfile.mkdtemp()) / "mallory.pw"
    password.write_text(creds["password"])
    site.cli("budget", "set", "--researcher", who, "--dataset", DATASET, "--epsilon", "20")
    login = SiteLogin(site.name, site.url, who, password, fingerprint=site.fingerprint)
    client = sites.connect(login)
    asset = sites.find_asset(client, DATASET)
    for i in range(3):
        spec = job(f"rerun_{i}")
        _approved_round(arena, client, spec, asset)

    ledger = BudgetLedger(SiteStore(SiteDir(site.dir).db_path))
    budget = ledger.budget(who, DATASET)
    history = [Mechanism.from_listing(r["mechanism"]) for r in budget.releases]
    own = [r for r in budget.releases if not r["public"]]
    assert len({r["job"] for r in own}) == 3  # three jobs: training and metrics releases each
    assert len(merged(history)) < len(history)  # the reruns merged
    unmerged = PRVAccountant()
    unmerged.history = [(m.noise_multiplier, m.sample_rate, m.steps) for m in history]
    assert budget.epsilon_spent >= float(unmerged.get_epsilon(delta=budget.delta)) * (1 - 1e-6)
    assert_serving(arena)


def test_what_the_server_kept_in_its_accounting_cache_is_what_a_cold_accountant_charges(
    arena, monkeypatch
) -> None:  # noqa: ANN001
    """The site's budget checks read the accountant's persistent cache
    (``policies.accounting_cache``). A researcher on a plain syft client runs two plans whose
    noise differs in the last bit only, hoping one answer is taken for the other; her history
    is then charged again with the cache switched off: every release's epsilon and her total
    must be the same, to the bit, and the two plans two mechanisms, each with its own kept
    Renyi curve, the one Opacus computes."""
    from datasites.ledger.budget import BudgetLedger
    from policies import accounting, accounting_cache
    from policies.accounting import Mechanism
    from researcher.federation import SiteLogin
    from tests.adversarial.conftest import DATASET
    from tests.conftest import last_json

    who = "trudy@uni.edu"
    site = arena.site
    creds = last_json(site.cli("users", "add", "--email", who, "--name", who, "--json"))
    password = Path(tempfile.mkdtemp()) / "trudy.pw"
    password.write_text(creds["password"])
    site.cli("budget", "set", "--researcher", who, "--dataset", DATASET, "--epsilon", "20")
    client = sites.connect(
        SiteLogin(site.name, site.url, who, password, fingerprint=site.fingerprint)
    )
    asset = sites.find_asset(client, DATASET)
    for name, noise in (("ulp_a", 1.1), ("ulp_b", float(np.nextafter(1.1, 2.0)))):
        spec = job(name, {"rounds": 1, "noise_multiplier": noise, "batch_size": 64})
        _approved_round(arena, client, spec, asset)

    ledger = BudgetLedger(SiteStore(SiteDir(site.dir).db_path))
    warm = ledger.budget(who, DATASET)  # composed here, through the cache the server filled
    assert accounting_cache.default_path() is not None
    history = [Mechanism.from_listing(r["mechanism"]) for r in warm.releases]
    assert {m.noise_multiplier for m in history} >= {1.1, float(np.nextafter(1.1, 2.0))}
    for m in history:  # the kept Renyi curves too: each Opacus' own to the bit, one per noise.
        # Any may be absent: the cache is best effort (a write meeting a busy file is dropped,
        # as in a clean clone's run; a release answered whole never needed its curve).
        args = (m.noise_multiplier, m.sample_rate, accounting._DEFAULT_ORDERS)
        kept = accounting_cache._store.get_floats(accounting_cache._key("one_step_rdp", args, {}))
        assert kept in (None, accounting._one_step_rdp_computed(*args)), m
    monkeypatch.setenv(accounting_cache.ENV, "off")
    accounting._epsilon.cache_clear()
    accounting._one_step_rdp.cache_clear()  # cold: no curve from the cache either
    cold = ledger.budget(who, DATASET)
    assert cold.epsilon_spent == warm.epsilon_spent
    for release, mechanism in zip(warm.releases, history, strict=True):
        # each release's epsilon alone, as the server computed it at the charge
        assert release["epsilon"] == accounting.epsilon(
            [mechanism], warm.delta, release["accountant"]
        ), release
    assert_serving(arena)


def test_the_first_round_calls_the_approved_code_without_fetching_the_api_again(
    arena, monkeypatch
) -> None:
    """A client that logged in before its job was submitted has no function for the job; syft's
    answer to the missing name was to fetch the whole API again, a login's worth of work at
    every site's first round. The function built from the job's code item instead must call
    the very code that syft's refreshed API would: same code id, a round that trains, and the
    charge on the ledger."""
    client = arena.client(EVE, fresh=True)
    asset = arena.asset(client)
    spec = job("no_refetch")
    sites.submit(client, spec, asset)
    arena.queue().approve(next(iter(queued(arena.queue(), spec.name))).request_id)
    fetches: list[int] = []
    fetch = client._fetch_api
    monkeypatch.setattr(client, "_fetch_api", lambda creds: fetches.append(1) or fetch(creds))
    spent = arena.spent(EVE)
    reply = sites.run_round(client, spec, asset, "")
    assert reply["status"] == "ok", reply
    assert arena.spent(EVE) > spent
    assert fetches == []
    assert_nothing_private(arena, reply)
    refreshed = fetch(client.credentials).services.code  # what syft's refresh would call
    ours = sites._job_function(client, spec)
    assert ours.user_code_id == getattr(refreshed, spec.name).user_code_id
