"""The automatic policy report an admin sees beside every submitted job."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from datasites.review.access import DatasetPolicy
from datasites.review.codecheck import parse_template
from policies.errors import PlanError
from policies.labels import check_site as check_site_classes
from policies.labels import site_classes
from policies.layout import check_site, width
from policies.plan import JobSpec, TrainingPlan, check_fits, class_count, n_outputs


@dataclass(frozen=True)
class Check:
    name: str
    passed: bool
    reason: str


@dataclass
class PolicyReport:
    checks: list[Check] = field(default_factory=list)
    job: JobSpec | None = None
    # "utility": why the job may not learn (policies.utility), from public numbers. Advice for
    # the admin and the researcher, never a reason the report fails: approval stays possible.
    warnings: list[Check] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return bool(self.checks) and all(c.passed for c in self.checks)

    def add(self, name: str, passed: bool, reason: str) -> None:
        self.checks.append(Check(name, passed, reason))

    def failures(self) -> list[Check]:
        return [c for c in self.checks if not c.passed]

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"passed": self.passed, "checks": [asdict(c) for c in self.checks]}
        out["warnings"] = [asdict(w) for w in self.warnings]
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
    noise_of: Any = None,
    budget_of: Any = None,
) -> PolicyReport:
    """Run every check; later checks are skipped (and fail) when the template check fails.

    Nothing from the submission is built or run: the model's size and shapes come from the
    spec's arithmetic. ``epsilon_of(spec, rows)`` and ``noise_of(spec, rows)`` (the plan's
    noise multiplier here, for the utility warnings) are injected by the datasite so this module
    stays free of torch; when absent, those checks are reported as not run. ``budget_of(spec,
    researcher, rows)`` answers with the ledger's ``Fit`` (``BudgetLedger.would_fit`` on the
    releases the runtime would charge); when absent the budget check is left out.
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
    _check_labels(report, sub, spec)
    _note_ranges(report, sub.published)
    try:
        _check_dp(report, spec, policy, sub.rows, epsilon_of)
    except PlanError as exc:  # e.g. more DP-SGD steps than any plan may take
        report.add("dp_parameters", False, str(exc))
    if budget_of is not None:
        _check_budget(report, sub, spec, budget_of)
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
    _warn_utility(report, sub, spec, noise_of)
    return report


def _warn_utility(report: PolicyReport, sub: Submission, spec: JobSpec, noise_of: Any) -> None:
    """Non-blocking: why this job may not learn, from this site's published numbers."""
    if noise_of is None or not sub.published or sub.rows < 1:
        return
    from policies.utility import utility_warnings

    try:
        noise = {"this site": float(noise_of(spec, sub.rows))}
    except PlanError:  # the dp_parameters check already says why
        return
    meta = {**sub.published, "rows": sub.rows}
    for w in utility_warnings(spec.plan, {"this site": meta}, noise):
        report.warnings.append(Check(f"utility ({w.kind})", True, w.text))


def _check_budget(report: PolicyReport, sub: Submission, spec: JobSpec, budget_of: Any) -> None:
    """The job beside what is left of the researcher's budget (the public mock's spend in it)
    and of the dataset's cap, composed with the history as the ledger charges it. A job that
    cannot fit fails here, not at its first round. Overridable, because a budget or cap raised
    before the job runs lets it fit; the reason says so."""
    if sub.dataset != spec.dataset or sub.rows < 1:
        report.add("budget", False, "not computed: the job is not bound to a dataset with rows")
        return
    try:
        fit = budget_of(spec, sub.researcher, sub.rows)
    except PlanError as exc:
        report.add("budget", False, f"not computed: {exc}")
        return
    refusal = fit.refusal()
    if refusal is None:
        report.add("budget", True, fit.summary())
        return
    report.add(
        "budget",
        False,
        f"epsilon {fit.epsilon_job:.3f} for this job: {refusal}. The site would refuse its "
        "first round, charging nothing; override only if the budget or cap is raised first",
    )


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
    if not plan.aggregation.secure:
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
        f"{p[:12]} (this site)" if p == sub.site_fingerprint else p[:12]
        for p in plan.aggregation.peers
    )
    problems = []
    if sub.site_fingerprint and sub.site_fingerprint not in plan.aggregation.peers:
        problems.append("this site's fingerprint is not among the peers")
    if len(set(plan.aggregation.peers)) < policy.min_aggregation_sites:
        problems.append(f"fewer peers than the policy's {policy.min_aggregation_sites}")
    problems += untrusted_peers(plan, policy)
    mode = "secure"
    if plan.dp.distributed:
        problems += distributed_problems(plan, policy, sub.site_fingerprint)
        mode = (
            f"secure with distributed DP (each site adds 1/{plan.honest_sites} of the noise; "
            f"survives {plan.dp.colluding_sites} colluding site(s))"
        ) + trust_savings(plan, policy, sub.site_fingerprint)
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
    outside = [p for p in plan.aggregation.peers if p not in set(policy.trusted_peers)]
    if not outside:
        return []
    listed = ", ".join(p[:12] for p in outside)
    return [f"peer(s) {listed} are not among this dataset's trusted peers"]


def unverified_peers(plan: TrainingPlan, policy: DatasetPolicy, site: str) -> list[str]:
    """The peers other than this site that its admin has not verified (trusted_peers).

    A peer nobody verified may be a key the researcher holds: the researcher then removes its
    masks and reads this site's own noised sum, so it counts as a colluder.
    """
    trusted = set(policy.trusted_peers)
    return [p for p in plan.aggregation.peers if p != site and p not in trusted]


def colluders_assumed(plan: TrainingPlan, policy: DatasetPolicy, site: str) -> int:
    """How many colluders a round's sum can hold, counting every unverified peer as one."""
    return max(
        policy.colluding_sites,
        min(len(unverified_peers(plan, policy, site)), plan.survivors_needed - 1),
    )


def distributed_problems(plan: TrainingPlan, policy: DatasetPolicy, site: str) -> list[str]:
    """Why a distributed-DP plan falls short of this dataset's policy (empty: it does not).

    The site's noise share assumes that ``plan.honest_sites`` shares reach the target. Any
    unmasked sum holds at least ``survivors_needed`` sites, of which every unverified peer may
    be the researcher's; so the plan must survive that many colluders (or the admin trusts the
    peers). ``site`` is this datasite's fingerprint.
    """
    problems = []
    assumed = colluders_assumed(plan, policy, site)
    if plan.dp.colluding_sites < assumed:
        unverified = len(unverified_peers(plan, policy, site))
        honest = plan.survivors_needed - assumed
        problems.append(
            f"the plan's noise survives {plan.dp.colluding_sites} colluding site(s); "
            + (
                f"the policy requires {policy.colluding_sites}"
                if assumed == policy.colluding_sites
                else f"{unverified} peer(s) are not on this dataset's trusted peers and count "
                f"as colluders, so it needs colluding_sites {assumed} (each site adds "
                f"1/{honest} of the noise); trusting them (datasite policy set --trust-peer) "
                f"would let each site add 1/{plan.honest_sites}"
            )
        )
    if plan.survivors_needed < policy.min_aggregation_sites:
        problems.append(
            f"the plan unmasks with {plan.survivors_needed} site(s), fewer than the policy's "
            f"{policy.min_aggregation_sites}"
        )
    return problems


def trust_savings(plan: TrainingPlan, policy: DatasetPolicy, site: str) -> str:
    """What trusting the peers would save, for the admin: a reason to set the list."""
    unverified = unverified_peers(plan, policy, site)
    if not unverified or not plan.dp.distributed:
        return ""
    alone = plan.survivors_needed - colluders_assumed(plan, policy, site)
    trusted = plan.survivors_needed - policy.colluding_sites
    if trusted <= alone:
        return ""
    return (
        f"; trusting the {len(unverified)} unverified peer(s) would cut this site's noise "
        f"share from 1/{alone} to 1/{trusted} of the variance (its std by "
        f"{1 - (alone / trusted) ** 0.5:.0%})"
    )


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
        outputs = n_outputs(spec.plan.loss, class_count(spec, sub.n_classes))
        check_fits(spec, n_features, outputs)
    except PlanError as exc:
        report.add("model", False, str(exc))
        return
    report.add(
        "model",
        True,
        f"{len(arch.rows)} allowlisted layers, {list(arch.input)} -> {list(arch.output)}"
        + layout_note,
    )


def _check_labels(report: PolicyReport, sub: Submission, spec: JobSpec) -> None:
    """The job's class list against this dataset's published one (schema only): every label
    this site holds must have a code in it, or its rows would train as another class."""
    published = sub.published or {}
    own = site_classes(published)
    if spec.classes is None:
        if own is not None and own != [str(i) for i in range(len(own))]:
            report.add(
                "labels",
                True,
                f"the job carries no class list: this site's own codes 0..{len(own) - 1} "
                f"stand for its labels {', '.join(own)} (a job built by researcher load_job "
                "carries the federation's)",
            )
        return
    try:
        own = check_site_classes(spec.classes, published)
    except PlanError as exc:
        report.add("labels", False, str(exc))
        return
    report.add(
        "labels",
        True,
        f"the job's {len(spec.classes)} classes ({_short(spec.classes)}) cover this "
        f"dataset's {len(own)} ({_short(own)})",
    )


def _short(labels: list[str], most: int = 12) -> str:
    shown = ", ".join(labels[:most])
    return shown + (f", ... ({len(labels) - most} more)" if len(labels) > most else "")


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
    if (
        plan.dp.noise_multiplier is not None
        and plan.dp.noise_multiplier < policy.min_noise_multiplier
    ):
        problems.append(
            f"noise multiplier {plan.dp.noise_multiplier} is below the policy's "
            f"{policy.min_noise_multiplier}"
        )
    if plan.dp.max_grad_norm > policy.max_grad_norm:
        problems.append(f"max_grad_norm {plan.dp.max_grad_norm} exceeds {policy.max_grad_norm}")
    if plan.dp.delta > max_delta:
        problems.append(f"delta {plan.dp.delta} exceeds {max_delta:.3g} (policy and 1/n)")
    if plan.dp.target_epsilon is not None and plan.dp.target_epsilon > policy.max_epsilon_per_job:
        problems.append(
            f"target epsilon {plan.dp.target_epsilon} exceeds the per-job limit "
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
                f"epsilon {eps:.3f} at delta {plan.dp.delta} "
                f"within {policy.max_epsilon_per_job}; clipping {plan.dp.max_grad_norm}",
            )
            return
    report.add("dp_parameters", not problems, "; ".join(problems) or "within policy")
