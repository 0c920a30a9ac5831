"""The review queue: requests with their automatic policy report, approve and deny.

Approval writes the site's own approval record (what the runtime trusts) before it tells syft;
every step lands in the audit log.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from syft.types.uid import UID

from datasites.errors import ReviewError
from datasites.ledger.audit import AuditLog
from datasites.ledger.budget import BudgetLedger, Fit
from datasites.ledger.store import SiteStore
from datasites.review.access import DatasetPolicy, PolicyStore
from datasites.review.approvals import Approval, Approvals
from datasites.review.executed import executed_problems
from datasites.review.report import PolicyReport, Submission, build_report
from datasites.serving.admin import admin_client, quiet
from datasites.serving.config import SiteDir
from policies.plan import JobSpec
from policies.privacy import PrivacyPlan, job_privacy

ADMIN_ACTOR = "admin"
UNOVERRIDABLE = {"template", "executed", "model", "dataset", "inputs", "job_id", "changes"}


STATES = {"PENDING": "pending", "APPROVED": "approved", "REJECTED": "denied"}


@dataclass
class ReviewItem:
    request: Any
    request_id: str
    code_id: str
    code_hash: str
    researcher: str
    status: str
    raw_code: str
    deny_reason: str | None
    report: PolicyReport

    @property
    def state(self) -> str:
        """The words both sides use: pending, approved, denied (syft says REJECTED)."""
        return STATES.get(self.status, self.status.lower())

    @property
    def job_name(self) -> str:
        """The researcher's name for the job (syft's function name), as `researcher status`."""
        return self.report.job.name if self.report.job else ""

    @property
    def submitted(self) -> str:
        """When the researcher submitted it, UTC ``YYYY-MM-DD HH:MM:SS`` ('' if syft lost it)."""
        stamp = getattr(getattr(self.request, "request_time", None), "utc_timestamp", None)
        if stamp is None:
            return ""
        return datetime.fromtimestamp(stamp, tz=UTC).strftime("%Y-%m-%d %H:%M:%S")

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.request_id,
            "job": self.job_name,
            "submitted": self.submitted,
            "researcher": self.researcher,
            "status": self.state,
            "code_hash": self.code_hash,
            "function": self.request.code.service_func_name,
            "dataset": self.report.job.dataset if self.report.job else None,
            "deny_reason": self.deny_reason,
            "plan": self.report.job.plan.to_dict() if self.report.job else None,
            "report": self.report.to_dict(),
        }


class ReviewQueue:
    def __init__(self, site: SiteDir) -> None:
        self.site = site
        self.store = SiteStore(site.site_db)
        self.audit = AuditLog(self.store, site.root)
        self.approvals = Approvals(self.store)
        self.policies = PolicyStore(site.policies_path)
        self.client = admin_client(site)

    def items(self, where: Callable[[Any], bool] | None = None) -> list[ReviewItem]:
        """The requests with their reports; ``where`` (on syft's request, its code fetched)
        keeps some before any report is built. A report runs the budget's accountant (seconds,
        once a researcher has a history), so finding one request must not build them all."""
        with quiet():
            requests = list(self.client.requests)
        self._prefetch_code(requests)
        if where is not None:
            requests = [r for r in requests if _picked(where, r)]
        assets = self._asset_datasets()
        used = self.approvals.job_ids()
        items = [self._item(r, assets, used) for r in requests]
        self._audit_new(items)
        return items

    def find(self, request_id: str) -> ReviewItem:
        prefix = request_id.lower()
        matches = self.items(where=lambda r: _request_id(r).startswith(prefix))
        if len(matches) != 1:
            raise ReviewError(
                f"no request with id {request_id!r}"
                if not matches
                else f"id {request_id!r} is ambiguous; give more characters"
            )
        return matches[0]

    def approve(self, request_id: str, override: bool = False, reason: str = "") -> ReviewItem:
        item = self.find(request_id)
        if item.status != "PENDING":
            raise ReviewError(
                f"request {item.request_id[:8]} is {item.status.lower()}, not pending"
            )
        failed = {c.name for c in item.report.failures()}
        if failed & UNOVERRIDABLE:
            raise ReviewError(
                f"cannot approve: {', '.join(sorted(failed & UNOVERRIDABLE))} "
                "failed, and those checks cannot be overridden"
            )
        if failed and not override:
            raise ReviewError(
                f"the policy report fails ({', '.join(sorted(failed))}); "
                "use --override --reason TEXT to approve anyway"
            )
        if failed and not reason.strip():
            raise ReviewError("--override needs --reason TEXT, which is recorded")
        job = item.report.job
        assert job is not None  # the template check passed
        self.approvals.record(
            Approval(
                item.code_id,
                item.request_id,
                item.researcher,
                job.dataset,
                item.code_hash,
                job.to_dict(),
                job.plan.calls,
                0,
                reason if failed else None,
            )
        )
        with quiet():
            item.request.approve(disable_warnings=True)
        event = "overridden" if failed else "approved"
        self.audit.record(
            ADMIN_ACTOR,
            event,
            item.request_id,
            item.code_hash,
            researcher=item.researcher,
            failed_checks=sorted(failed),
            reason=reason or None,
            rounds=job.plan.rounds,
        )
        return item

    def deny(self, request_id: str, reason: str) -> ReviewItem:
        if not reason.strip():
            raise ReviewError("deny needs --reason TEXT; the researcher sees it")
        item = self.find(request_id)
        with quiet():
            item.request.deny(reason=reason)
        self.audit.record(
            ADMIN_ACTOR,
            "denied",
            item.request_id,
            item.code_hash,
            researcher=item.researcher,
            reason=reason,
        )
        return item

    def _prefetch_code(self, requests: list[Any]) -> None:
        """All submitted code in one call, placed where ``request.code`` looks first.

        ``request.code`` otherwise resolves each request's code with its own HTTP call, so a
        listing was one call per request, and a site with many requests slowed every command.
        """
        from syft.service.request.request import UserCodeStatusChange

        with quiet():
            codes = {str(c.id): c for c in self.client.code.get_all()}
        for request in requests:
            for change in getattr(request, "changes", []):
                if isinstance(change, UserCodeStatusChange):
                    code = codes.get(str(change.linked_user_code.object_uid))
                    if code is not None:
                        change.linked_user_code._resolve_cache = code

    def _asset_datasets(self) -> dict[str, str]:
        with quiet():
            return {
                str(a.action_id): d.name for d in self.client.datasets.get_all() for a in d.assets
            }

    def _item(self, request: Any, assets: dict[str, str], used: set[str]) -> ReviewItem:
        """One request with its report; a request that cannot be read shows as malformed."""
        try:
            return self._read_item(request, assets, used)
        except Exception as exc:  # whatever was submitted, the queue keeps answering
            report = PolicyReport()
            report.add("template", False, f"malformed request ({type(exc).__name__})")
            return ReviewItem(
                request,
                _request_id(request),
                "",
                "",
                str(getattr(request, "requesting_user_email", "?")),
                str(getattr(getattr(request, "status", None), "name", "UNKNOWN")),
                "",
                None,
                report,
            )

    def _read_item(self, request: Any, assets: dict[str, str], used: set[str]) -> ReviewItem:
        code = request.code
        bound = {
            kw: assets.get(str(_uid(v)))
            for vals in (code.input_policy_init_kwargs or {}).values()
            for kw, v in vals.items()
            if _uid(v) is not None
        }
        dataset = bound.get("data") if list(bound) == ["data"] else None
        meta = self.site.datasets_meta().get(dataset or "", {})
        policy = self.policies.get(dataset) if dataset else DatasetPolicy()
        approved_before = self.approvals.get(str(code.id))
        schema = meta.get("schema")
        sub = Submission(
            code.raw_code,
            request.requesting_user_email,
            dataset,
            int(meta.get("rows", 0)),
            tuple(code.input_kwargs),
            len(schema) - 1 if schema else None,
            meta.get("n_classes"),
            tuple(executed_problems(code)),
            self.site.fingerprint(),
            meta,
        )
        privacy = _privacy_of(policy)  # one plan for the report's three checks
        # this very request's own approval is not a second one; any other is
        own = approved_before is not None and approved_before.request_id == str(request.id.no_dash)
        mine = {approved_before.job.get("job_id", "")} if own and approved_before else set()
        report = build_report(
            sub,
            policy,
            used - mine,
            _epsilon_of(privacy),
            noise_of=_noise_of(privacy),
            budget_of=_budget_of(self.store, privacy),
        )
        changes = _changes_problem(request, code)
        report.add(
            "changes",
            changes is None,
            changes or "one change: this code's status, nothing else is applied on approval",
        )
        if approved_before is not None and not own:
            # a second syft request on approved code: it would run again on the one charge
            report.add(
                "job_id",
                False,
                f"this code was already approved through request "
                f"{approved_before.request_id[:8]}; code is approved once, ever",
            )
        status = request.status.name
        reason = request.deny_reason if status == "REJECTED" else None
        return ReviewItem(
            request,
            str(request.id.no_dash),
            str(code.id),
            str(code.code_hash),
            request.requesting_user_email,
            status,
            code.raw_code,
            reason if isinstance(reason, str) else None,
            report,
        )

    def _audit_new(self, items: list[ReviewItem]) -> None:
        seen = {e["request_id"] for e in self.audit.entries() if e["event"] == "reported"}
        for item in items:
            if item.request_id not in seen:
                self.audit.record(
                    item.researcher,
                    "submitted",
                    item.request_id,
                    item.code_hash,
                    function=item.request.code.service_func_name,
                )
                self.audit.record(
                    "review", "reported", item.request_id, item.code_hash, **item.report.to_dict()
                )


def _request_id(request: Any) -> str:
    return str(getattr(request.id, "no_dash", request.id))


def _picked(where: Callable[[Any], bool], request: Any) -> bool:
    """Whether ``where`` keeps the request; one it cannot read is not the one looked for."""
    try:
        return bool(where(request))
    except Exception:
        return False


def _changes_problem(request: Any, code: Any) -> str | None:
    """Why a request carries more than its own code's status change (None: it does not).

    syft applies every change of a request with the approver's rights. Red team: a request
    filed with ``request.submit`` carried, beside the status change, an ``ObjectMutation`` that
    rewrote the approved code's ``parsed_code``; the report read only ``request.code``.
    """
    from syft.service.request.request import UserCodeStatusChange

    changes = list(getattr(request, "changes", []) or [])
    kinds = ", ".join(type(c).__name__ for c in changes) or "none"
    if len(changes) != 1 or type(changes[0]) is not UserCodeStatusChange:
        return f"the request carries changes [{kinds}]; only one code status change is allowed"
    linked = getattr(changes[0].linked_user_code, "object_uid", None)
    if str(linked) != str(code.id):
        return "the request's status change points at other code than it shows"
    return None


def _uid(rule: Any) -> UID | None:
    """The asset id an input rule binds (a bare UID, or a syft ``Matches`` rule's value)."""
    value = rule if isinstance(rule, UID) else getattr(rule, "val", None)
    return value if isinstance(value, UID) else None


def _privacy_of(policy: DatasetPolicy) -> Callable[[JobSpec, int], PrivacyPlan]:
    """The job's privacy plan at this site, computed once per report: the epsilon, noise and
    budget checks each need it, and each computation runs a noise search and an accountant."""
    memo: dict[tuple[str, int], PrivacyPlan] = {}

    def privacy_of(spec: JobSpec, rows: int) -> PrivacyPlan:
        key = (spec.job_id, rows)
        if key not in memo:
            memo[key] = job_privacy(spec, rows, policy.min_noise_multiplier)
        return memo[key]

    return privacy_of


def _epsilon_of(privacy: Callable[[JobSpec, int], PrivacyPlan]) -> Any:
    def epsilon_of(spec: JobSpec, rows: int) -> float:
        return privacy(spec, rows).epsilon_job

    return epsilon_of


def _noise_of(privacy: Callable[[JobSpec, int], PrivacyPlan]) -> Any:
    """The noise multiplier this site would train the job at (for the utility warnings)."""

    def noise_of(spec: JobSpec, rows: int) -> float:
        return privacy(spec, rows).noise_multiplier

    return noise_of


def _budget_of(store: SiteStore, privacy: Callable[[JobSpec, int], PrivacyPlan]) -> Any:
    """The ledger's own would-it-fit, on the releases the runtime would charge (site_job)."""
    ledger = BudgetLedger(store)

    def budget_of(spec: JobSpec, researcher: str, rows: int) -> Fit:
        return ledger.would_fit(
            researcher,
            spec.dataset,
            privacy(spec, rows).releases,
            spec.plan.dp.accountant,
            spec.job_id,
        )

    return budget_of


__all__ = ["ReviewItem", "ReviewQueue"]
