"""The site half of a round, in-process on a real site dir (no syft): what a failed round costs.

The trainer pool is swapped for one that fails, or that trains in-process with the real
``run_task``; everything around it (approval, policy, ledger, audit, replay store) is the
site's own code on a real SQLite file.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from datasites.ledger.audit import AuditLog
from datasites.ledger.budget import BudgetLedger
from datasites.ledger.store import SiteStore
from datasites.review.access import DatasetPolicy, PolicyStore
from datasites.review.approvals import Approval, Approvals
from datasites.serving.config import SiteDir, init_site
from datasites.training import site_job
from datasites.training.runtime import CallerCode
from policies.engine.round_task import run_task
from policies.errors import RoundLimitReached
from policies.wire import encode_weights
from researcher.job import make_job

WHO, DATASET = "ada@uni.edu", "d"
LAYERS = [{"type": "Linear", "in_features": 3, "out_features": 2}]


def _frame(n: int = 120) -> pd.DataFrame:
    rng = np.random.default_rng(3)
    x = rng.normal(size=(n, 3)).astype(np.float32)
    frame = pd.DataFrame(x, columns=["a", "b", "c"])
    frame["y"] = (x[:, 0] > 0).astype(int)
    return frame


class Pool:
    """Stands in for the sandboxed trainer pool: trains in-process, or fails on chosen calls."""

    def __init__(self, fail_on: set[int]) -> None:
        self.fail_on, self.calls = fail_on, 0

    def run(self, task, max_seconds: float, max_memory_mb: int):  # noqa: ANN001, ANN201
        self.calls += 1
        if self.calls in self.fail_on:
            raise RuntimeError("the trainer died")
        return run_task(task)


@pytest.fixture
def site(tmp_path: Path) -> tuple[SiteDir, CallerCode, dict]:
    init_site(tmp_path / "s", "s", port=1)
    site = SiteDir(tmp_path / "s")
    frame = _frame()
    site.save_dataset_meta(
        DATASET, {"dataset": DATASET, "target": "y", "rows": len(frame), "n_classes": 2}
    )
    PolicyStore(site.policies_path).set(
        DATASET, DatasetPolicy(allowed_researchers=[WHO], max_epsilon_per_job=40.0)
    )
    store = SiteStore(site.db_path)
    BudgetLedger(store).set_budget(WHO, DATASET, 50.0, 1e-5)
    plan = {"rounds": 3, "noise_multiplier": 1.0, "batch_size": 16, "site_metrics": False}
    job = make_job(LAYERS, DATASET, "y", plan, n_features=3).to_dict()
    caller = CallerCode("code-1", "hash-1")
    Approvals(store).record(Approval("code-1", "req-1", WHO, DATASET, "hash-1", job, 3, 0, None))
    return site, caller, job


def _round(site: SiteDir, caller: CallerCode, job: dict) -> dict:
    weights = encode_weights({"0.weight": np.zeros((2, 3)), "0.bias": np.zeros(2)})
    return site_job.run_at_site(site.root, caller, _frame(), weights, job)


def _ledger(site: SiteDir) -> BudgetLedger:
    return BudgetLedger(SiteStore(site.db_path))


def test_a_round_that_failed_in_the_trainer_keeps_its_charge(site, monkeypatch) -> None:
    """Red team: whether a round fails is an output of the training on the rows (a diverging
    plan overflowed on one table and not on another), so a failed round stays charged."""
    root, caller, job = site
    monkeypatch.setattr(site_job, "pool", lambda: Pool(fail_on={1}))
    reply = _round(root, caller, job)
    assert reply == {"status": "failed", "reason": site_job.FAILED}
    assert _ledger(root).budget(WHO, DATASET).epsilon_spent > 0
    events = [e["event"] for e in AuditLog(SiteStore(root.db_path)).entries()]
    assert events[-2:] == ["executed", "failed"] and "refunded" not in events


def test_a_call_that_failed_before_its_trainer_is_refunded(site, monkeypatch) -> None:
    """The trainer could not be had (nothing touched the rows): the reservation is withdrawn,
    and the call's round is still used up, so probing is bounded by the approval."""
    root, caller, job = site

    def unavailable():  # noqa: ANN202
        raise RuntimeError("the trainer pool is down")

    monkeypatch.setattr(site_job, "pool", unavailable)
    assert _round(root, caller, job) == {"status": "failed", "reason": site_job.NOT_STARTED}
    assert _ledger(root).releases(WHO, DATASET) == []
    assert _ledger(root).budget(WHO, DATASET).epsilon_spent == 0.0
    events = [e["event"] for e in AuditLog(SiteStore(root.db_path)).entries()]
    assert events[-2:] == ["refunded", "failed"]
    assert Approvals(SiteStore(root.db_path)).get("code-1").rounds_run == 1


def test_once_a_round_was_released_a_later_failure_keeps_the_charge(site, monkeypatch) -> None:
    root, caller, job = site
    pool = Pool(fail_on={2})
    monkeypatch.setattr(site_job, "pool", lambda: pool)
    first = _round(root, caller, job)
    assert first["status"] == "ok", first
    spent = _ledger(root).budget(WHO, DATASET).epsilon_spent
    assert spent > 0
    assert _round(root, caller, job)["status"] == "failed"
    assert _ledger(root).budget(WHO, DATASET).epsilon_spent == pytest.approx(spent)


def test_a_call_in_flight_when_another_is_refunded_is_charged_before_it_releases(
    site, monkeypatch
) -> None:
    """Red team: call A reserved and waited for the trainer; call B of the same job failed
    before its trainer and withdrew the job's reservation; A then released uncharged."""
    import threading

    root, caller, job = site
    a_in_pool, b_done = threading.Event(), threading.Event()

    class Gate:
        def run(self, task, max_seconds, max_memory_mb):  # noqa: ANN001, ANN201
            a_in_pool.set()
            b_done.wait(10)
            return run_task(task)

    def pool_for_the_caller():  # noqa: ANN202
        if threading.current_thread().name == "A":
            return Gate()
        raise RuntimeError("B found no trainer")

    monkeypatch.setattr(site_job, "pool", pool_for_the_caller)
    replies = {}
    a = threading.Thread(
        name="A", target=lambda: replies.setdefault("A", _round(root, caller, job))
    )
    a.start()
    assert a_in_pool.wait(10)
    b = _round(root, caller, job)  # B: refunded, the job's reservation withdrawn
    assert b["reason"] == site_job.NOT_STARTED
    b_done.set()
    a.join(20)
    assert replies["A"]["status"] == "ok" and "weights" in replies["A"]
    assert _ledger(root).budget(WHO, DATASET).epsilon_spent > 0


def _approve(root: SiteDir, plan: dict, code: str = "code-2", **kw) -> tuple[CallerCode, dict]:
    spec = make_job(
        LAYERS, DATASET, "y", {"batch_size": 16, "site_metrics": True, **plan}, n_features=3, **kw
    )
    store = SiteStore(root.db_path)
    Approvals(store).record(
        Approval(
            code,
            f"req-{code}",
            WHO,
            DATASET,
            f"hash-{code}",
            spec.to_dict(),
            spec.plan.calls,
            0,
            None,
        )
    )
    return CallerCode(code, f"hash-{code}"), spec.to_dict()


def test_the_personalization_pass_keeps_its_model_and_releases_metrics_only(
    site, monkeypatch
) -> None:
    from datasites.training.job_state import JobState
    from tests.conftest import last_json, run_cli

    root, _, _ = site
    monkeypatch.setattr(site_job, "pool", lambda: Pool(fail_on=set()))
    plan = {
        "rounds": 1,
        "noise_multiplier": 1.0,
        "personalize_layers": ["0"],
        "personalize_epochs": 2,
    }
    caller, job = _approve(root, plan)
    first = _round(root, caller, job)
    assert first["status"] == "ok" and "weights" in first
    ledger = _ledger(root)
    assert {r["status"] for r in ledger.releases(WHO, DATASET)} == {"reserved"}
    tuned = _round(root, caller, job)
    assert tuned["status"] == "ok" and tuned["personalized"] is True
    assert "weights" not in tuned and "update" not in tuned  # the model stays here
    assert set(tuned["metrics"]) == {"steps", "val_rows", "val_loss", "val_accuracy"}
    # the job is complete after rounds + 1 calls: its charge is committed, a further call refused
    assert {r["status"] for r in ledger.releases(WHO, DATASET)} == {"committed"}
    with pytest.raises(RoundLimitReached, match="all have run"):
        _round(root, caller, job)
    kept = JobState(SiteStore(root.db_path)).model(caller.code_id)
    assert set(kept) == {"0.weight", "0.bias"} and np.abs(kept["0.weight"]).sum() > 0
    listed = last_json(run_cli("datasite", "models", "--dir", str(root.root), "--json"))
    assert [m["researcher"] for m in listed] == [WHO] and listed[0]["metrics"] == tuned["metrics"]


def test_top_k_error_feedback_is_kept_at_the_site_between_rounds(site, monkeypatch) -> None:
    from datasites.training.job_state import JobState
    from policies.compression import decompress

    root, _, _ = site
    monkeypatch.setattr(site_job, "pool", lambda: Pool(fail_on=set()))
    caller, job = _approve(
        root, {"rounds": 2, "noise_multiplier": 1.0, "compression": "topk", "topk_fraction": 0.25}
    )
    state = JobState(SiteStore(root.db_path))
    reply = _round(root, caller, job)
    assert reply["compression"] == "topk" and "weights" not in reply
    shapes = {"0.weight": (2, 3), "0.bias": (2,)}
    sent = decompress(reply["update"], shapes, "topk", 0.25)
    assert sum(int(np.count_nonzero(v)) for v in sent.values()) <= 2  # ceil(0.25 * 8)
    residual = state.residual(caller.code_id)
    assert residual is not None and residual.shape == (8,) and np.count_nonzero(residual) >= 6
    _round(root, caller, job)
    assert not np.array_equal(state.residual(caller.code_id), residual)


def test_approved_code_is_never_approved_again_and_its_rounds_never_reset(
    site, monkeypatch
) -> None:
    """Red team (issue 24): a second syft request on approved code was approved, which reset
    ``rounds_run`` while the ledger reused the job's one charge: fresh rounds for no epsilon."""
    from datasites.errors import AlreadyApproved

    root, caller, job = site
    monkeypatch.setattr(site_job, "pool", lambda: Pool(fail_on=set()))
    for _ in range(3):
        assert _round(root, caller, job)["status"] == "ok"
    ledger = _ledger(root)
    spent = ledger.budget(WHO, DATASET).epsilon_spent
    approvals = Approvals(SiteStore(root.db_path))
    again = Approval("code-1", "req-2", WHO, DATASET, "hash-1", job, 3, 0, None)
    with pytest.raises(AlreadyApproved, match="approved once"):
        approvals.record(again)  # the same code id, through another request
    other = Approval("code-9", "req-3", WHO, DATASET, "hash-9", job, 3, 0, None)
    with pytest.raises(AlreadyApproved, match="approved once"):
        approvals.record(other)  # the same job id under another code id
    assert approvals.get("code-1").rounds_run == 3
    assert approvals.get("code-9") is None
    with pytest.raises(RoundLimitReached, match="all have run"):
        _round(root, caller, job)
    assert ledger.budget(WHO, DATASET).epsilon_spent == pytest.approx(spent)


def test_rounds_are_counted_per_job_id_across_code_ids(site) -> None:
    """An old database may hold two approvals of one job id: their rounds count together."""
    root, _, job = site
    store = SiteStore(root.db_path)
    with store.immediate() as conn:  # as a database written before the one-approval rule
        conn.execute(
            "INSERT INTO approvals VALUES ('code-7', 'req-7', ?, ?, 'hash-7', ?, 3, 0, NULL, 'x')",
            (WHO, DATASET, __import__("json").dumps(job)),
        )
    approvals = Approvals(store)
    assert [approvals.take_round("code-1") for _ in range(2)] == [1, 2]
    assert approvals.take_round("code-7") == 3
    with pytest.raises(RoundLimitReached):
        approvals.take_round("code-7")


def test_a_call_that_is_no_round_message_is_refused_before_any_row_or_charge(
    site, monkeypatch
) -> None:
    """Red team: any string at all reaches ``run_job`` from a plain syft client. Garbage, an
    unknown tag, a malformed or oversized envelope, or a secure-aggregation message to a plain
    job is refused where the call enters: no row read, no trainer, no round, no epsilon."""
    from datasites.errors import Refused
    from datasites.training import runtime
    from policies.wire import SecAggHello, SecAggMask, TrainRound
    from tests.unit.test_round_calls import BLOB, GARBAGE, SHAPES, A, B

    root, caller, job = site
    assert SHAPES == {"0.weight": (2, 3), "0.bias": (2,)}  # the fixture's model
    touched: list[str] = []
    read_private = site_job.read_private
    monkeypatch.setattr(site_job, "read_private", lambda *a: touched.append("rows"))
    monkeypatch.setattr(site_job, "pool", lambda: touched.append("trainer"))
    wrong_protocol = {
        "hello to a plain job": SecAggHello().encode(),
        "mask to a plain job": SecAggMask("r1", BLOB, (A, B)).encode(),
    }
    for name, call in {**GARBAGE, **wrong_protocol}.items():
        with pytest.raises(Refused):
            site_job.run_at_site(root.root, caller, _frame(), call, job)
        # and through the entry point every job calls, as syft runs it at the site
        monkeypatch.setattr(runtime, "_SITE", [Path(root.root)])
        monkeypatch.setattr(runtime, "caller_code", lambda: caller)
        reply = runtime.run_job(_frame(), call, job)
        assert reply["status"] == "refused", (name, reply)
        assert set(reply) == {"status", "reason"}, name
    assert touched == []
    ledger = _ledger(root)
    assert ledger.releases(WHO, DATASET) == []
    assert ledger.budget(WHO, DATASET).epsilon_spent == 0.0
    assert Approvals(SiteStore(root.db_path)).get("code-1").rounds_run == 0
    events = [e["event"] for e in AuditLog(SiteStore(root.db_path)).entries()]
    assert events.count("refused") == 2 * len({**GARBAGE, **wrong_protocol})
    # the same site then trains a well-formed round as usual
    monkeypatch.setattr(site_job, "read_private", read_private)
    monkeypatch.setattr(site_job, "pool", lambda: Pool(fail_on=set()))
    reply = site_job.run_at_site(root.root, caller, _frame(), TrainRound(BLOB).encode(), job)
    assert reply["status"] == "ok" and ledger.budget(WHO, DATASET).epsilon_spent > 0
