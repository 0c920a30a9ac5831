"""The automatic policy report an admin sees beside every submitted job."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from datasites.review.access import DatasetPolicy
from datasites.review.codecheck import parse_template
from policies.errors import PlanError
from policies.layout import check_site, width
from policies.plan import JobSpec, TrainingPlan, check_fits, n_outputs


@dataclass(frozen=True)
class Check:
    name: str
    passed: bool
    reason: str


@dataclass
class PolicyReport:
    checks: list[Check] = field(default_factory=list)
    job: JobSpec | None = None

    @property
    def passed(self) -> bool:
        return bool(self.checks) and all(c.passed for c in self.checks)

    def add(self, name: str, passed: bool, reason: str) -> None:
        self.checks.append(Check(name, passed, reason))

    def failures(self) -> list[Check]:
        return [c for c in self.checks if not c.passed]

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"passed": self.passed, "checks": [asdict(c) for c in self.checks]}
        if self.job is not None:
            out["architecture"] = self.job.architecture.table()
            out["parameters"] = self.job.architecture.n_parameters
        return out


@dataclass(frozen=True)
class Submission:
    """What the review knows about a request, gathered from the server by the caller."""

    raw_code: str
    researcher: str
    dataset: str | None
    rows: int
    input_names: tuple[str, ...]
    n_features: int | None = None  # from the dataset's published schema
    n_classes: int | None = None
    # what disagrees between raw_code and what syft will execute (names, parsed code, policies)
    executed_problems: tuple[str, ...] = ()
    site_fingerprint: str = ""  # this datasite's identity, to find it among a job's peers
    # the dataset's published metadata: a job's one-hot layout is checked against its schema
    published: dict[str, Any] | None = None


MAX_CODE_CHARS = 200_000  # the template with a 64-layer spec is far below this


def build_report(
    sub: Submission,
    policy: DatasetPolicy,
    used_job_ids: set[str],
    epsilon_of: Any = None,
) -> PolicyReport:
    """Run every check; later checks are skipped (and fail) when the template check fails.

    Nothing from the submission is built or run: the model's size and shapes come from the
    spec's arithmetic. ``epsilon_of(spec, rows)`` is injected by the datasite so this module
    stays free of torch; when absent that check is reported as not run.
    """
    report = PolicyReport()
    report.add(
        "researcher",
        policy.allows(sub.researcher),
        f"{sub.researcher} is allowed"
        if policy.allows(sub.researcher)
        else f"{sub.researcher} is not on this dataset's allowed researchers or domains",
    )
    report.add(
        "executed",
        not sub.executed_problems,
        "; ".join(sub.executed_problems)
        or "syft will run exactly this template (names, parsed code, inputs, policies)",
    )
    if len(sub.raw_code) > MAX_CODE_CHARS:
        report.add("template", False, f"the code is {len(sub.raw_code)} characters; not parsed")
        return report
    job_literal, findings = parse_template(sub.raw_code)
    if job_literal is None:
        report.add("template", False, "; ".join(str(f) for f in findings))
        return report
    try:
        spec = JobSpec.from_dict(job_literal)
    except PlanError as exc:
        report.add("template", False, f"job literal is not a valid job: {exc}")
        return report
    report.job = spec
    report.add("template", True, "the project's template calling the site runtime")
    _check_inputs(report, sub, spec, used_job_ids)
    _check_model(report, sub, spec)
    _note_ranges(report, sub.published)
    try:
        _check_dp(report, spec, policy, sub.rows, epsilon_of)
    except PlanError as exc:  # e.g. more DP-SGD steps than any plan may take
        report.add("dp_parameters", False, str(exc))
    report.add(
        "rounds",
        spec.plan.rounds <= policy.max_rounds,
        f"{spec.plan.rounds} round(s), limit {policy.max_rounds}",
    )
    _check_aggregation(report, sub, spec, policy)
    n = spec.architecture.n_parameters
    report.add(
        "model_size",
        n <= policy.max_parameters,
        f"{n} trainable parameters, limit {policy.max_parameters}",
    )
    return report


def _note_ranges(report: PolicyReport, published: dict[str, Any] | None) -> None:
    """The ranges every round clamps this dataset's inputs to, and where they came from: the
    owner's declared bounds (public schema) or the DP mock's release. Information, not a gate."""
    source = (published or {}).get("bounds_source") or {}
    if not source:
        return
    bounds = (published or {}).get("bounds") or {}
    declared = [c for c, s in source.items() if s == "declared"]
    weak = [c for c, s in source.items() if s == "weak"]
    shown = "; ".join(f"{c} [{bounds[c][0]:g}, {bounds[c][1]:g}]" for c in declared[:8])
    more = f" and {len(declared) - 8} more" if len(declared) > 8 else ""
    text = (
        f"inputs clamped to published ranges: {len(declared)} declared"
        + (f" ({shown}{more})" if declared else "")
        + f", {len(source) - len(declared)} found by the DP mock"
        + (f" ({len(weak)} weak: {', '.join(weak[:5])})" if weak else "")
    )
    report.add("ranges", True, text)


def _check_aggregation(
    report: PolicyReport, sub: Submission, spec: JobSpec, policy: DatasetPolicy
) -> None:
    """Plain or secure, as the policy demands; a secure job's peers, shown for the admin."""
    plan = spec.plan
    if not plan.secure:
        report.add(
            "aggregation",
            not policy.require_secure_aggregation,
            "plain: the researcher sees this site's update"
            + (
                "; this dataset requires secure aggregation"
                if policy.require_secure_aggregation
                else ""
            ),
        )
        return
    listed = ", ".join(
        f"{p[:12]} (this site)" if p == sub.site_fingerprint else p[:12] for p in plan.peers
    )
    problems = []
    if sub.site_fingerprint and sub.site_fingerprint not in plan.peers:
        problems.append("this site's fingerprint is not among the peers")
    if len(set(plan.peers)) < policy.min_aggregation_sites:
        problems.append(f"fewer peers than the policy's {policy.min_aggregation_sites}")
    problems += untrusted_peers(plan, policy)
    mode = "secure"
    if plan.distributed:
        problems += distributed_problems(plan, policy)
        mode = (
            f"secure with distributed DP (each site adds 1/{plan.honest_sites} of the noise; "
            f"survives {plan.colluding_sites} colluding site(s))"
        )
    report.add(
        "aggregation",
        not problems,
        "; ".join(problems)
        + (": " if problems else "")
        + f"{mode}, rounds of at least {policy.min_aggregation_sites} of the peers {listed}",
    )


def untrusted_peers(plan: TrainingPlan, policy: DatasetPolicy) -> list[str]:
    """Peers outside the policy's ``trusted_peers`` (none when the policy names no list)."""
    if not policy.trusted_peers:
        return []
    outside = [p for p in plan.peers if p not in set(policy.trusted_peers)]
    if not outside:
        return []
    listed = ", ".join(p[:12] for p in outside)
    return [f"peer(s) {listed} are not among this dataset's trusted peers"]


def distributed_problems(plan: TrainingPlan, policy: DatasetPolicy) -> list[str]:
    """Why a distributed-DP plan falls short of this dataset's policy (empty: it does not).

    The site's noise share assumes that ``plan.honest_sites`` shares reach the target; the
    policy's collusion threshold and fewest sites must be covered by the plan's.
    """
    problems = []
    if plan.colluding_sites < policy.colluding_sites:
        problems.append(
            f"the plan's noise survives {plan.colluding_sites} colluding site(s); "
            f"the policy requires {policy.colluding_sites}"
        )
    if plan.survivors_needed < policy.min_aggregation_sites:
        problems.append(
            f"the plan unmasks with {plan.survivors_needed} site(s), fewer than the policy's "
            f"{policy.min_aggregation_sites}"
        )
    return problems


def _check_model(report: PolicyReport, sub: Submission, spec: JobSpec) -> None:
    """The declarative model against the table's published shape (arithmetic only)."""
    arch = spec.architecture
    n_features, layout_note = sub.n_features, ""
    if n_features is None:
        report.add("model", False, "the dataset publishes no schema to check the model against")
        return
    try:
        if spec.layout is not None:  # categorical columns: the federation-wide one-hot layout
            check_site(spec.layout, sub.published or {})
            n_features = width(spec.layout)
            categorical = [name for name, cats in spec.layout["columns"] if cats is not None]
            layout_note = (
                f"; one-hot layout of {', '.join(categorical)} from the sites' published "
                f"categories ({n_features} inputs)"
            )
        check_fits(spec, n_features, n_outputs(spec.plan.loss, sub.n_classes))
    except PlanError as exc:
        report.add("model", False, str(exc))
        return
    report.add(
        "model",
        True,
        f"{len(arch.rows)} allowlisted layers, {list(arch.input)} -> {list(arch.output)}"
        + layout_note,
    )


def _check_inputs(report: PolicyReport, sub: Submission, spec: JobSpec, used: set[str]) -> None:
    if sub.dataset is None:
        report.add("dataset", False, "the request is not bound to a dataset of this datasite")
    elif sub.dataset != spec.dataset:
        report.add(
            "dataset", False, f"job names dataset {spec.dataset!r} but its input is {sub.dataset!r}"
        )
    else:
        report.add("dataset", True, f"bound to {sub.dataset!r}")
    if sorted(sub.input_names) != ["data", "weights"]:
        report.add("inputs", False, f"inputs must be data and weights, got {sub.input_names}")
    if spec.job_id in used:
        report.add("job_id", False, f"job id {spec.job_id} was already approved once")


def _check_dp(
    report: PolicyReport, spec: JobSpec, policy: DatasetPolicy, rows: int, epsilon_of: Any
) -> None:
    plan = spec.plan
    max_delta = min(policy.max_delta, 1.0 / max(rows, 1))
    problems = []
    if plan.noise_multiplier is not None and plan.noise_multiplier < policy.min_noise_multiplier:
        problems.append(
            f"noise multiplier {plan.noise_multiplier} is below the policy's "
            f"{policy.min_noise_multiplier}"
        )
    if plan.max_grad_norm > policy.max_grad_norm:
        problems.append(f"max_grad_norm {plan.max_grad_norm} exceeds {policy.max_grad_norm}")
    if plan.delta > max_delta:
        problems.append(f"delta {plan.delta} exceeds {max_delta:.3g} (policy and 1/n)")
    if plan.target_epsilon is not None and plan.target_epsilon > policy.max_epsilon_per_job:
        problems.append(
            f"target epsilon {plan.target_epsilon} exceeds the per-job limit "
            f"{policy.max_epsilon_per_job}"
        )
    if epsilon_of is not None and not problems:
        eps = float(epsilon_of(spec, rows))
        if eps > policy.max_epsilon_per_job:
            problems.append(
                f"the plan spends epsilon {eps:.3f}, more than the per-job limit "
                f"{policy.max_epsilon_per_job}"
            )
        else:
            report.add(
                "dp_parameters",
                True,
                f"epsilon {eps:.3f} at delta {plan.delta} "
                f"within {policy.max_epsilon_per_job}; clipping {plan.max_grad_norm}",
            )
            return
    report.add("dp_parameters", not problems, "; ".join(problems) or "within policy")
