"""Red team, round 2 (after issue 24's fixes), against one real datasite.

Each test is an attack by a logged-in researcher (a plain syft client, or the researcher
package) and asserts what should hold: the attack fails. Where it still succeeds the test is
``xfail(strict=True)`` with the finding as its reason, so it turns red once the hole is closed
and the marker must go.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import pytest
import syft as sy

from datasites.errors import ReviewError
from datasites.ledger.budget import BudgetLedger
from datasites.ledger.store import SiteStore
from datasites.serving.config import SiteDir
from researcher import sites
from researcher.federation import SiteLogin
from researcher.job import as_function
from tests.adversarial.conftest import (
    ADA,
    DATASET,
    EVE,
    assert_nothing_private,
    assert_serving,
    job,
)
from tests.conftest import last_json

pytestmark = pytest.mark.integration

MAL = "mal@uni.edu"  # a researcher of this module alone: her e-mail address is changed
ONE_ROUND = {"rounds": 1, "noise_multiplier": 3.0, "batch_size": 64}


def _spent(arena, who: str) -> float:
    ledger = BudgetLedger(SiteStore(SiteDir(arena.site.dir).db_path))
    return ledger.budget(who, DATASET).epsilon_spent


def _code_of(client: Any, name: str) -> Any:
    return next(c for c in client.code.get_all() if c.service_func_name == name)


@pytest.fixture(scope="module")
def mal(arena, tmp_path_factory) -> Any:
    """A logged-in client of a third researcher, mal@uni.edu, with a small budget (0.5)."""
    site = arena.site
    creds = last_json(site.cli("users", "add", "--email", MAL, "--name", "mal", "--json"))
    path = tmp_path_factory.mktemp("mal") / "mal.pw"
    path.write_text(creds["password"])
    site.cli("budget", "set", "--researcher", MAL, "--dataset", DATASET, "--epsilon", "0.5")
    login = SiteLogin("hospital-a", site.url, MAL, path, fingerprint=site.fingerprint)
    return sites.connect(login, fresh=True)


def _refused_at_the_gate(call: Any) -> bool:
    """True when the datasite refused this syft call as not open to researchers."""
    try:
        result = call()
    except Exception as exc:
        return "not open to researchers" in str(exc)
    return "not open to researchers" in str(getattr(result, "message", ""))


def _set_email(client: Any, email: str) -> Any:
    """syft's ``user.update`` on one's own account, as ``client.account.update`` sends it."""
    me = client.api.services.user.get_current_user()
    return client.api.services.user.update(uid=me.id, email=email)


# 1. A request that carries, beside the job's status change, a second syft Change: the review
#    reads only the code, the admin's approve applies every change of the request.
def test_a_rider_change_cannot_rewrite_the_code_after_review(arena) -> None:
    from syft.service.code.user_code import UserCodeStatus
    from syft.service.policy.policy import OutputPolicyExecuteCount
    from syft.service.request.request import ObjectMutation, SubmitRequest, UserCodeStatusChange
    from syft.store.linked_obj import LinkedObject

    spec = job("rider", ONE_ROUND)
    client = arena.client(EVE)
    asset = arena.asset(client)
    policy = sy.MixedInputPolicy(data=asset, weights=str, client=client)
    fn = sy.syft_function(input_policy=policy, output_policy=OutputPolicyExecuteCount(limit=4))
    with as_function(spec) as function:
        wrapped = fn(function)
    submitted = _refused_at_the_gate(lambda: client.api.services.code.submit(wrapped))
    assert submitted, "code.submit is open to researchers"
    sites.submit(client, spec, asset)  # the honest route: a request with one change
    code = _code_of(client, spec.name)
    evil = (
        f"def {code.unique_func_name}(data, weights):\n"
        "    import os, pathlib, pandas\n"
        "    root = pathlib.Path(os.environ['FEDSITE_DIR'])\n"
        "    table = next((root / 'tables').glob('*.parquet'))\n"
        "    rows = pandas.read_parquet(table).drop(columns=['target']).head(3)\n"
        "    keys = ('admin-password', 'identity.key', 'split.key', 'audit.key')\n"
        "    return {'rows': rows.to_numpy().tolist(),\n"
        "            'secrets': [(root / k).read_text().strip() for k in keys]}\n"
    )
    link = LinkedObject.from_obj(code, server_uid=client.id)
    changes = [
        UserCodeStatusChange(
            value=UserCodeStatus.APPROVED, linked_obj=code.status_link, linked_user_code=link
        ),
        ObjectMutation(linked_obj=link, attr_name="parsed_code", value=evil, match_type=False),
    ]
    assert _refused_at_the_gate(
        lambda: client.api.services.request.submit(request=SubmitRequest(changes=changes))
    ), "request.submit is open to researchers"
    item = arena.item(spec.name)
    assert next(c for c in item.report.checks if c.name == "changes").passed
    try:
        arena.queue().approve(item.request_id)  # the report is the template's: it passes
    except ReviewError:
        return  # the review saw the rider: safe
    got: Any
    try:
        got = getattr(client.code, spec.name)(data=asset, weights="").get()
    except Exception as exc:
        got = str(exc)
    assert_nothing_private(arena, got)
    assert_serving(arena)


# 2. The researcher's identity at the site is the e-mail address a syft request carries, and
#    syft lets any user change their own address (user.update, GUEST role). A fresh address is a
#    fresh default budget (1.0), but the public mock's default charge (1.0) fills all of it: held
#    here only because the two defaults are equal (a cheaper mock leaves the rest to each rename).
def test_a_new_email_address_is_not_a_new_budget(arena, mal) -> None:
    spec = job("new_address", ONE_ROUND)  # epsilon ~0.57: more than mal's 0.5
    fresh = "mal.two@uni.edu"
    before = _spent(arena, MAL)
    try:
        _set_email(mal, fresh)
    except Exception:
        return  # syft refused the change: safe
    try:
        sites.submit(mal, spec, arena.asset(mal))
        item = arena.item(spec.name)
        try:
            arena.queue().approve(item.request_id)
        except ReviewError:
            return  # the report failed on mal's own budget: safe
        reply = sites.run_round(mal, spec, arena.asset(mal), "")
        if reply["status"] != "ok":
            return
        assert _spent(arena, MAL) > before, (
            f"released at epsilon {reply['privacy']['epsilon_job']:.3f}, charged to "
            f"{item.researcher}, nothing to {MAL}"
        )
    finally:
        _set_email(mal, MAL)


def test_another_researchers_address_in_other_case_spends_nothing_of_theirs(arena, mal) -> None:
    spec = job("borrowed", ONE_ROUND)
    before = _spent(arena, ADA)
    try:
        _set_email(mal, ADA.upper().replace("UNI.EDU", "uni.edu"))
    except Exception:
        return  # refused: safe
    try:
        sites.submit(mal, spec, arena.asset(mal))
        try:
            arena.queue().approve(arena.item(spec.name).request_id)
        except ReviewError:
            return
        reply = sites.run_round(mal, spec, arena.asset(mal), "")
        assert reply["status"] != "ok" or _spent(arena, ADA) == pytest.approx(before)
    finally:
        _set_email(mal, MAL)


# 3. Syft endpoints open to a researcher: none gives a secret, a row, another researcher's
#    objects, or a role.
def test_syft_endpoints_a_researcher_reaches(arena) -> None:
    from syft.service.user.user_roles import ServiceRole

    ada = arena.client(ADA)
    ada_job = job("adas_secret_job", ONE_ROUND)
    sites.submit(ada, ada_job, arena.asset(ada))
    client = arena.client(EVE)
    api = client.api.services
    seen: list[str] = []

    def attempt(label: str, thunk) -> None:  # noqa: ANN001
        try:
            seen.append(f"{label}: {thunk()!r}")
        except Exception as exc:
            seen.append(f"{label}: {type(exc).__name__}: {exc}")

    me = api.user.get_current_user()
    attempt("role", lambda: api.user.update(uid=me.id, role=ServiceRole.ADMIN))
    for label, thunk in (
        ("metadata", lambda: api.metadata.get_metadata()),
        ("env", lambda: api.metadata.get_env()),
        ("code", lambda: api.code.get_all()),
        ("requests", lambda: api.request.get_all()),
        ("outputs", lambda: api.output.get_all()),
        ("jobs", lambda: api.job.get_all()),
        ("logs", lambda: api.log.get_all()),
        ("notifications", lambda: api.notifications.get_all()),
        ("workers", lambda: api.worker.get_all()),
        ("projects", lambda: api.project.get_all()),
        ("peers", lambda: api.network.get_all_peers()),
        ("users", lambda: api.user.get_all()),
    ):
        attempt(label, thunk)
    assert api.user.get_current_user().role.name == "DATA_SCIENTIST"
    text = "\n".join(seen)
    assert ada_job.name not in text and ada_job.job_id not in text, text[-3000:]
    assert_nothing_private(arena, text)
    assert_serving(arena)


# 4. Concurrent calls of one job (more than its rounds), and the refunds of those refused before
#    training, racing the rounds that train: every released round is charged, once.
def test_concurrent_calls_release_no_uncharged_round(arena) -> None:
    spec = job("crowd", {"rounds": 2, "noise_multiplier": 3.0, "batch_size": 64})
    client = arena.client(EVE)
    asset = arena.asset(client)
    sites.submit(client, spec, asset)
    arena.queue().approve(arena.item(spec.name).request_id)
    before = _spent(arena, EVE)
    replies: list[Any] = []

    def call() -> None:
        try:
            replies.append(sites.run_round(client, spec, asset, ""))
        except Exception as exc:
            replies.append({"status": "error", "reason": str(exc)})

    threads = [threading.Thread(target=call) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    ok = [r for r in replies if r["status"] == "ok"]
    assert len(ok) <= 2, replies
    assert {r["round"] for r in ok} <= {1, 2}
    ledger = BudgetLedger(SiteStore(SiteDir(arena.site.dir).db_path))
    charges = [r for r in ledger.releases(EVE, DATASET) if r["job"] == spec.job_id]
    if ok:
        assert charges and _spent(arena, EVE) > before, (replies, charges)
    assert_nothing_private(arena, replies)


# 5. Disk: syft stores every code submission (code.submit, GUEST role) whole; the per-user quota
#    covers action.set only. Kept last: the queue reads every stored code afterwards.
def test_code_submissions_cannot_fill_the_disk(arena) -> None:
    from datasites.serving.limits import effective
    from tests.adversarial.conftest import plain_submit

    site = SiteDir(arena.site.dir)
    quota = effective(site).quota_bytes

    def size() -> int:
        return sum(p.stat().st_size for p in Path(arena.site.dir).rglob("*") if p.is_file())

    client = arena.client(EVE)
    asset = arena.asset(client)
    padding = "x" * (3 * 2**20)
    before = size()
    for i in range(6):
        name = f"filler_{i}"
        source = f'def {name}(data, weights):\n    """{padding}"""\n    return 0\n'
        try:
            plain_submit(client, asset, name, source)
        except Exception:
            break
    grown = size() - before
    assert grown < quota, f"the site grew {grown / 2**20:.0f} MB; a user's quota is " + (
        f"{quota / 2**20:.0f} MB"
    )
    assert_serving(arena)
