"""The site half of the runtime: approval, rounds, budget, audit around one training round.

A call's one string argument is decoded once, here, right after the approval check
(``policies.wire.decode_call``), and dispatched on its type: a training round, a replay, or a
phase of secure aggregation. A call that is not a well-formed message is refused before any
row is read or anything is charged.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, assert_never

import pandas as pd

from datasites.data.store import read_private
from datasites.errors import (
    Refused,
    RoundFailed,  # noqa: F401  re-exported
)
from datasites.ledger.audit import AuditLog
from datasites.ledger.budget import BudgetLedger
from datasites.ledger.store import SiteStore
from datasites.review.access import PolicyStore
from datasites.review.approvals import Approval, Approvals
from datasites.review.report import distributed_problems, untrusted_peers
from datasites.serving.config import SiteDir
from datasites.training.job_state import JobState
from datasites.training.sandbox import SandboxLimit, pool
from datasites.training.secure_agg import SecureSite
from policies.engine.distributed import SUM
from policies.engine.prepare import prepare_task, privacy_report, release, site_scaling
from policies.errors import PolicyError, RoundLimitReached, WireError
from policies.labels import site_classes
from policies.plan import JobSpec
from policies.privacy import job_privacy
from policies.wire import (
    ReplayLast,
    RoundCall,
    RoundReply,
    SecAggHello,
    SecAggMask,
    SecAggSign,
    SecAggUnmask,
    TrainRound,
    check_shapes,
    decode_call,
)

if TYPE_CHECKING:
    from datasites.training.runtime import CallerCode

log = logging.getLogger("datasites.training.runtime")
ACTOR = "runtime"
# One reply for every failure after the budget is reserved, whatever its cause: a message or an
# exception type that depends on the private rows would answer a question about them for free.
FAILED = (
    "the round failed at the datasite after training; its charge stays, because whether a "
    "round fails depends on the training; the datasite admin can read the cause in the audit log"
)

NOT_STARTED = (
    "the round could not start at the datasite; nothing ran on the data and this job is not "
    "charged for it (a job already released a round keeps its charge); call again later"
)


class NotStarted(Exception):
    """A call that failed before its trainer had the rows: refunded, and said so."""


def run_at_site(
    root: Path, caller: CallerCode, data: Any, weights: str, job: dict[str, Any]
) -> RoundReply:
    started = time.perf_counter()
    site = SiteDir(root)
    store = SiteStore(site.site_db)
    audit = AuditLog(store, site.root)
    approval = Approvals(store).get(caller.code_id)
    try:
        approval = _check_approval(approval, caller, job)
        call = _decode(weights, approval)
        match call:
            case TrainRound(weights=blob):
                return _run(site, store, audit, approval, caller, data, blob, started, None)
            case SecAggMask(weights=blob):
                return _run(site, store, audit, approval, caller, data, blob, started, call)
            case ReplayLast():
                return _replay(store, audit, approval, caller)
            case SecAggHello() | SecAggSign() | SecAggUnmask():
                return _secure_control(site, store, audit, approval, caller, call)
            case _:
                assert_never(call)
    except SandboxLimit as exc:
        audit.record(
            ACTOR,
            "stopped",
            approval.request_id if approval else None,
            caller.code_hash,
            reason=str(exc),
            code_id=caller.code_id,
        )
        raise Refused(str(exc)) from exc
    except (Refused, PolicyError) as exc:
        event = "withheld" if isinstance(exc, WireError) else "refused"
        audit.record(
            ACTOR,
            event,
            approval.request_id if approval else None,
            caller.code_hash,
            reason=str(exc),
            code_id=caller.code_id,
        )
        raise
    except Exception as exc:  # the admin sees the details; the researcher one fixed line
        wrapped = isinstance(exc, RoundFailed | NotStarted) and exc.__cause__
        cause = exc.__cause__ if wrapped else exc
        audit.record(
            ACTOR,
            "failed",
            approval.request_id if approval else None,
            caller.code_hash,
            error=f"{type(cause).__name__}: {cause}",
        )
        log.error("job %s failed: %s", caller.code_id, type(cause).__name__)
        return {
            "status": "failed",
            "reason": NOT_STARTED if isinstance(exc, NotStarted) else FAILED,
        }


def _decode(weights: object, approval: Approval) -> RoundCall:
    """The call's message, bounded by the approved model; anything else is refused unread."""
    try:
        return decode_call(weights, JobSpec.from_dict(approval.job).architecture.parameters)
    except WireError as exc:
        raise Refused(
            f"the call is not a round message this site reads: {exc}; nothing ran"
        ) from exc


def _replay(
    store: SiteStore, audit: AuditLog, approval: Approval, caller: CallerCode
) -> RoundReply:
    """The last reply this job was released, again: nothing trains, nothing is charged."""
    reply = Approvals(store).last_release(caller.code_id)
    if reply is None:
        raise Refused("nothing was released to this job yet; nothing to replay")
    audit.record(ACTOR, "replayed", approval.request_id, caller.code_hash, round=reply.get("round"))
    return {**reply, "replayed": True}


def split_seed(site: SiteDir, job_id: str) -> int:
    """The validation split's seed: keyed by the site's secret, so only the site knows it."""
    digest = hmac.new(site.split_key(), job_id.encode(), hashlib.sha256).digest()
    return int.from_bytes(digest[:8], "little")


def _check_approval(approval: Approval | None, caller: CallerCode, job: dict[str, Any]) -> Approval:
    if approval is None:
        raise Refused(
            "this code was not approved through the datasite's review "
            "('datasite approve'); nothing ran"
        )
    if approval.code_hash != caller.code_hash:
        raise Refused("the calling code differs from the approved code; nothing ran")
    if job.get("job_id") != approval.job.get("job_id"):
        raise Refused("the job literal differs from the approved one; nothing ran")
    return approval


def _run(
    site: SiteDir,
    store: SiteStore,
    audit: AuditLog,
    approval: Approval,
    caller: CallerCode,
    data: Any,
    weights: str,
    started: float,
    envelope: SecAggMask | None = None,
) -> RoundReply:
    spec = JobSpec.from_dict(approval.job)
    if approval.rounds_run >= approval.rounds_allowed:  # before any row is read or charged
        raise RoundLimitReached(
            f"this approval covers {approval.rounds_allowed} round(s) and all have run; "
            "submit a new job"
        )
    meta = site.datasets_meta().get(approval.dataset)
    if meta is None:
        raise Refused(f"dataset {approval.dataset!r} has no metadata on this datasite")
    if spec.plan.loss == "cross_entropy" and meta.get("class_codes") is False:
        raise Refused(
            f"dataset {approval.dataset!r} does not publish class codes 0..k-1 as its target; "
            "cross_entropy needs them (use mse, or bce_with_logits for 0/1)"
        )
    policy = PolicyStore(site.policies_path).get(approval.dataset)
    if not policy.allows(approval.researcher):  # access revoked after the approval
        raise Refused(
            f"{approval.researcher} may no longer use {approval.dataset!r} on this datasite "
            "(access revoked); nothing ran"
        )
    # the pass after the last round fine-tunes and keeps the model here (plan.personalize_*)
    personalize = spec.plan.algorithm.personalizes and approval.rounds_run == spec.plan.rounds
    # the message must be the one this job's aggregation takes, before any row is read
    secure, seeds = _secure_round(
        site, store, approval, caller, spec, policy, envelope, personalize
    )
    frame = read_private(site.root, data)  # the site's Parquet file behind the asset's stub
    # the published (DP) row count, never len(frame): rate, steps and every released count follow
    rows = public_rows(meta, frame)
    privacy = job_privacy(spec, rows, min_noise=policy.min_noise_multiplier)
    if privacy.epsilon_job > policy.max_epsilon_per_job:
        raise Refused(
            f"the whole plan would spend epsilon {privacy.epsilon_job:.3f}, more than "
            f"the {policy.max_epsilon_per_job} one job may spend on this dataset"
        )
    scaling = site_scaling(spec, meta)  # and the job's one-hot layout checked against the schema
    # table, model and incoming weights are checked before anything is charged
    task = prepare_task(
        spec,
        frame,
        meta["target"],
        weights,
        privacy.noise_multiplier,
        meta.get("n_classes"),
        split_seed(site, spec.job_id),
        scaling,
        rows,
        personalize=personalize,
        class_counts=meta.get("class_counts"),  # published (DP): for "balanced" weights
        site_classes=site_classes(meta),  # published: the labels its codes stand for
    )
    ledger = BudgetLedger(store)
    releases = (approval.researcher, approval.dataset, spec.job_id, privacy.releases)
    charge = ledger.reserve(*releases, spec.plan.dp.accountant.value)
    try:  # until the trainer has the rows, a failure is refunded: nothing touched the data
        round_no = Approvals(store).take_round(caller.code_id)
        if personalize != (spec.plan.algorithm.personalizes and round_no == spec.plan.calls):
            raise Refused("another call of this job ran at the same time; nothing ran, call again")
        trainer = pool()
    except (Refused, PolicyError):
        _refund_if_nothing_released(store, audit, approval, caller, ledger, charge.id)
        raise
    except Exception as exc:
        _refund_if_nothing_released(store, audit, approval, caller, ledger, charge.id)
        raise NotStarted() from exc
    audit.record(
        ACTOR,
        "executed",
        approval.request_id,
        caller.code_hash,
        round=round_no,
        epsilon_job=privacy.epsilon_job,
        noise_multiplier=privacy.noise_multiplier,
    )
    state = JobState(store)
    # From here on the charge stays, whatever happens: whether a round fails is a function of
    # the noisy training on the rows (red team: a diverging plan fails on some tables and not
    # on others), covered by DP only while it is charged.
    try:
        output = trainer.run(task, policy.max_seconds_per_round, policy.max_memory_mb)
        if personalize:
            result = _keep_personalized(state, caller, task, output, round_no)
        elif secure is not None:
            assert envelope is not None  # _secure_round gave a SecureSite for an envelope only
            if spec.plan.dp.distributed:
                masked = secure.masked_integers(envelope, seeds, output.weights[SUM])
            else:
                check_shapes(output.weights, spec.trainable)
                masked = secure.masked_reply(envelope, seeds, output.weights, task.weights)
            result = {"status": "ok", "round": round_no, "n": output.n, **masked}
            result["metrics"] = output.metrics
        else:
            result, residual = release(
                spec, output, round_no, task.weights, state.residual(caller.code_id)
            )
            if residual is not None:
                state.put_residual(caller.code_id, residual)
    except SandboxLimit:
        raise  # the policy's own limits: a fixed message, which the researcher must see
    except Exception as exc:
        raise RoundFailed() from exc
    # Another call of this job may have failed before its trainer and withdrawn the job's
    # reservation while this one trained (red team): nothing leaves uncharged.
    charge = ledger.reserve(*releases, spec.plan.dp.accountant.value)
    if round_no == spec.plan.calls:
        ledger.commit(charge.id)
    budget = ledger.budget(approval.researcher, approval.dataset)
    result["privacy"] = {
        **privacy_report(spec.plan, privacy),
        "epsilon_spent": budget.epsilon_spent,
        "epsilon_total": budget.epsilon_total,
        "budget_delta": budget.delta,
        "rounds_allowed": approval.rounds_allowed,
    }
    Approvals(store).record_release(caller.code_id, round_no, result)
    audit.record(
        ACTOR,
        "released",
        approval.request_id,
        caller.code_hash,
        round=round_no,
        n=result["n"],
        metrics=result["metrics"],
        epsilon_spent=budget.epsilon_spent,
        # time inside the site runtime and in training: for the admin and scripts/bench only,
        # because a duration measured on private rows is not accounted
        timing={**output.timing, "runtime_seconds": time.perf_counter() - started},
    )
    return result


def _secure_round(  # noqa: PLR0913
    site: SiteDir,
    store: SiteStore,
    approval: Approval,
    caller: CallerCode,
    spec: JobSpec,
    policy: Any,
    envelope: SecAggMask | None,
    personalize: bool,
) -> tuple[SecureSite | None, dict[str, bytes]]:
    """The policy's aggregation rules for a training round, checked before any charge."""
    if policy.require_secure_aggregation and not spec.plan.aggregation.secure:
        raise Refused(
            f"dataset {approval.dataset!r} requires secure aggregation; this job is plain"
        )
    if not spec.plan.aggregation.secure or personalize:  # the fine-tuning pass releases no update
        if envelope is not None and not personalize:
            raise Refused("a plain job's round carries no secure-aggregation envelope")
        return None, {}
    if envelope is None:
        raise Refused(
            "this job aggregates securely: a round must relay its signed participant list "
            "('researcher train' does); nothing ran"
        )
    outside = untrusted_peers(spec.plan, policy)
    if outside:
        raise Refused(f"{outside[0]}; nothing ran")
    if spec.plan.dp.distributed:
        problems = distributed_problems(spec.plan, policy, site.fingerprint())
        if problems:
            raise Refused(f"distributed DP: {'; '.join(problems)}; nothing ran")
    secure = SecureSite(JobState(store), caller.code_id, spec, site.signing_key())
    return secure, secure.check_round(envelope, fewest_sites(spec, policy))


def fewest_sites(spec: JobSpec, policy: Any) -> int:
    """Fewest sites a round is masked, signed and unmasked with: the policy's k, and for
    distributed DP also the plan's, on which every site's noise share relies."""
    k = policy.min_aggregation_sites
    return max(k, spec.plan.survivors_needed) if spec.plan.dp.distributed else k


def _secure_control(
    site: SiteDir,
    store: SiteStore,
    audit: AuditLog,
    approval: Approval,
    caller: CallerCode,
    call: SecAggHello | SecAggSign | SecAggUnmask,
) -> RoundReply:
    """hello, sign, unmask: no row is read, nothing is charged, no round is taken."""
    spec = JobSpec.from_dict(approval.job)
    if not spec.plan.aggregation.secure:
        raise Refused("this job does not aggregate securely")
    policy = PolicyStore(site.policies_path).get(approval.dataset)
    secure = SecureSite(JobState(store), caller.code_id, spec, site.signing_key())
    label: str | None = None
    survivors: list[str] | None = None
    match call:
        case SecAggHello():
            reply = secure.hello()
        case SecAggSign(label=label):
            survivors = list(call.survivors)
            reply = secure.sign(call, fewest_sites(spec, policy))
        case SecAggUnmask(label=label):
            survivors = list(call.survivors)
            reply = secure.unmask(call, fewest_sites(spec, policy))
        case _:
            assert_never(call)
    audit.record(
        ACTOR,
        f"secagg-{call.phase}",
        approval.request_id,
        caller.code_hash,
        label=label,
        survivors=survivors,
    )
    return reply


def _keep_personalized(
    state: JobState, caller: CallerCode, task: Any, output: Any, round_no: int
) -> RoundReply:
    """Store the fine-tuned model at the site; the reply holds its DP metrics and nothing else."""
    weights = {**(task.weights or {}), **output.weights}
    state.put_model(caller.code_id, weights, {"round": round_no, "metrics": output.metrics})
    return {
        "status": "ok",
        "round": round_no,
        "personalized": True,
        "n": output.n,
        "metrics": output.metrics,
    }


def _refund_if_nothing_released(  # noqa: PLR0913
    store: SiteStore,
    audit: AuditLog,
    approval: Approval,
    caller: CallerCode,
    ledger: BudgetLedger,
    charge_id: int,
) -> None:
    """Withdraw the job's reservation when a call failed before its trainer had the rows and
    the job was never released a round.

    DP spends on what is released, and such a failure depends on no row. A failure after the
    trainer started is not refunded: its yes/no is an output of the training (see ``_run``).
    A call that trained meanwhile re-reserves before it releases.
    """
    if Approvals(store).last_release(caller.code_id) is not None:
        return
    if ledger.withdraw(charge_id):
        audit.record(
            ACTOR, "refunded", approval.request_id, caller.code_hash, code_id=caller.code_id
        )


def public_rows(meta: dict[str, Any], frame: pd.DataFrame) -> int:
    """The row count the dataset publishes; a table uploaded before DP counts published len."""
    published = meta.get("rows")
    return max(1, int(published)) if isinstance(published, int | float) else len(frame)
