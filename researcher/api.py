"""The researcher's Python API: look at mock data, dry-run a job, submit it, follow it.

from pathlib import Path
from researcher import Federation, prepare, dry_run, submit, status

fed = Federation.load(Path("federation.toml"))
job = prepare(fed, Path("job.py"))   # what `researcher try` and `researcher submit` build
print(dry_run(fed, job)["metrics"])
submit(fed, job)
print(status(fed, job.spec))

The CLI (``researcher.cli``) parses arguments and prints; every decision is made here, so a
Python user gets exactly what a CLI user gets.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from policies import autoplan, utility
from policies.autoplan import AutoPlan
from policies.errors import PlanError, PolicyError
from policies.labels import check_site as check_site_classes
from policies.labels import federation_classes, site_to_job
from policies.layout import align_stats, federation_layout, one_hot_mask, width
from policies.plan import CLASSIFIERS, JobSpec
from policies.plan import n_outputs as outputs_for
from policies.privacy import job_privacy
from policies.scaling import published_ranges, weak_inputs
from policies.utility import UtilityWarning
from policies.wire import Weights, encode_weights
from researcher import sites
from researcher.errors import AggregationError, JobError, SiteError
from researcher.evaluation import DEFAULT_PRECISION
from researcher.federation import Federation
from researcher.job import load_initial, load_job_file, read_job_file  # noqa: F401
from researcher.jobs import (  # noqa: F401  re-exported: the API's names for the job records
    JOBS_DIR,
    PROGRESS_SUFFIX,
    _after_approval,
    _load_progress,
    _missing,
    _save_progress,
    check_run_dir,
    jobs_dir,
    save_job,
    saved_job,
    saved_jobs,
)
from researcher.strategy import Strategy, strategy_config, strategy_from

if TYPE_CHECKING:
    from researcher.rounds import RoundRecord, RunResult

INITIAL_SUFFIX = ".init.npz"  # a job's initial weights (transfer learning), beside it
DEFAULT_STRATEGY = "fedavg"  # a job file without STRATEGY


@dataclass(frozen=True)
class PreparedJob:
    """A job file made ready for this federation by :func:`prepare`: what ``researcher try``
    runs on a mock and ``researcher submit`` sends, the same for Python.

    ``spec`` is the job the sites review. ``strategy`` is the job file's ``STRATEGY`` with
    every parameter spelled out (None: not said, ``train`` uses fedavg); it runs at the
    researcher, so ``submit`` keeps it beside the saved job and never sends it to a site.
    ``auto`` is the auto-plan that filled the plan (None: the file's PLAN as written),
    ``warnings`` why the job may not learn, ``metas`` the sites' published metadata it was
    built from (public), and ``initial`` the weights it starts from (transfer learning).
    """

    spec: JobSpec
    strategy: dict[str, Any] | None = None
    auto: AutoPlan | None = None
    warnings: tuple[UtilityWarning, ...] = ()
    initial: Weights | None = None
    metas: dict[str, dict[str, Any]] = field(default_factory=dict)


def prepare(
    fed: Federation,
    path: Path,
    target: str | None = None,
    initial: Weights | Path | None = None,
    auto_plan: bool = False,
) -> PreparedJob:
    """Everything ``try`` and ``submit`` need before a site is asked to run anything.

    The job file is read; its ``STRATEGY`` is checked before any site is contacted. From the
    sites' published metadata (fetched once): the label column, the federation's label space
    and one-hot layout, the model's sizes, the auto-plan for a minimal PLAN (every tuned field
    with ``auto_plan``), a secure job's peers, a distributed job's sample rate, the pooled
    feature scaling and the utility warnings. ``initial``: weights, or a ``.npz`` / run dir to
    read them from (:func:`load_initial`).
    """
    path = Path(path)
    weights = load_initial(initial) if isinstance(initial, str | Path) else initial
    constants = read_job_file(path)
    strategy = _job_strategy(path, constants)
    metas = _published(fed, constants["DATASET"])
    spec, auto = _planned(fed, path, constants, metas, target, weights, auto_plan)
    spec = pooled_for(spec, metas)
    _check_strategy_fits(path, spec, strategy)
    warned = tuple(warnings_for(spec, metas))
    return PreparedJob(spec, strategy, auto, warned, weights, metas)


def _job_strategy(path: Path, constants: dict[str, Any]) -> dict[str, Any]:
    """The job file's STRATEGY, every parameter spelled out; one JobError line if it is wrong."""
    try:
        return strategy_config(strategy_from(constants.get("STRATEGY", DEFAULT_STRATEGY)))
    except AggregationError as exc:
        raise JobError(f"{path}: STRATEGY: {exc}") from exc


def _check_strategy_fits(path: Path, spec: JobSpec, strategy: dict[str, Any]) -> None:
    """A secure job shows only the sum of the updates: a strategy that needs each one is
    refused now, not after the sites approved the job."""
    if not spec.plan.aggregation.secure:
        return
    from researcher.secure import check_strategy

    try:
        check_strategy(strategy["name"])
    except SiteError as exc:
        raise JobError(f"{path}: STRATEGY: {exc}") from exc


def _spec_of(job: PreparedJob | JobSpec) -> JobSpec:
    return job.spec if isinstance(job, PreparedJob) else job


def _as_prepared(
    fed: Federation, job: PreparedJob | JobSpec | Path, initial: Weights | None
) -> PreparedJob:
    """A job as :func:`dry_run`, :func:`submit` and :func:`train` take it: a job file is
    prepared; a spec built by hand (``make_job``) is taken as it is, with no strategy."""
    if isinstance(job, str | Path):
        return prepare(fed, Path(job), initial=initial)
    if isinstance(job, JobSpec):
        return PreparedJob(job, initial=initial)
    return job if initial is None else replace(job, initial=initial)


def datasets(fed: Federation) -> dict[str, Any]:
    """Every site's datasets: schema, row count and a preview of the mock (never private rows).

    A site that cannot be reached gives ``{"error": ...}`` in its place; the others still list.
    """
    out: dict[str, Any] = {}
    for login in fed.sites:
        try:
            out[login.name] = sites.datasets(sites.connect(login))
        except SiteError as exc:
            out[login.name] = {"error": str(exc)}
    return out


def only_dataset(listed: dict[str, Any]) -> str:
    """The one dataset name the reachable sites publish (``listed``: :func:`datasets`'s
    answer); JobError if none or several."""
    names = sorted({d["name"] for rows in listed.values() if isinstance(rows, list) for d in rows})
    if len(names) != 1:
        found = ", ".join(names) or "none"
        raise JobError(f"name the dataset with --dataset (the sites publish: {found})")
    return str(names[0])


def dry_run(
    fed: Federation, job: PreparedJob | JobSpec | Path, initial: Weights | None = None
) -> dict[str, Any]:
    """One round of the sites' own round engine (``policies.engine``), here, on the first site's mock.

    Adds the epsilon the whole plan would spend at each site, from each site's row count, and
    the utility warnings (``policies.utility``): why the job may not learn, from public numbers.
    """
    ready = _as_prepared(fed, job, initial)
    spec = ready.spec
    result = _mock_round(fed, spec, ready.initial)
    metas = ready.metas or dataset_metas(fed, spec.dataset)
    result["epsilon_per_site"] = _epsilon_per_site(spec, metas)
    result["warnings"] = [w.to_dict() for w in warnings_for(spec, metas)]
    result["strategy"] = ready.strategy
    return result


def _mock_round(fed: Federation, spec: JobSpec, initial: Weights | None = None) -> dict[str, Any]:
    """One round of the site code path on the first mock twin found; JobError if it fails."""
    for login in fed.sites:
        client = sites.connect(login)
        try:
            asset = sites.find_asset(client, spec.dataset)
        except SiteError:
            continue
        with sites.quiet():
            mock = asset.mock
        mock = mock_in_job_codes(mock, sites.asset_meta(asset), spec)
        result = mock_round(mock, spec, initial, where=f"{login.name}'s mock")
        result["mock_site"] = login.name
        return result
    raise JobError(f"no site in the federation has dataset {spec.dataset!r}")


def mock_round(
    mock: Any, spec: JobSpec, initial: Weights | None = None, where: str = "the mock"
) -> dict[str, Any]:
    """One round of the sites' own round engine (``policies.engine``) on ``mock``, here; the
    refusal a site would give becomes a JobError. No site code runs and nothing is sent."""
    from policies.engine.mock_round import dry_run as engine_dry_run  # torch: only when used

    weights = encode_weights(initial) if initial is not None else ""
    try:
        result = dict(engine_dry_run(mock, weights, spec))
    except PolicyError as exc:
        raise JobError(f"dry run on {where}: {exc}") from exc
    if result.get("status") != "ok":
        raise JobError(f"dry run on {where}: {result.get('reason')}")
    return result


def mock_in_job_codes(mock: Any, meta: dict[str, Any], spec: JobSpec) -> Any:
    """The mock with its target in the job's label space: its codes are its site's own, and
    the site maps its private rows the same way (``policies.labels.site_to_job``)."""
    if spec.classes is None or spec.target not in getattr(mock, "columns", ()):
        return mock
    try:
        own = check_site_classes(spec.classes, meta)
    except PlanError as exc:
        raise JobError(f"dry run: {exc}") from exc
    mapped = mock.copy()
    mapped[spec.target] = site_to_job(mapped[spec.target].to_numpy(), own, spec.classes)
    return mapped


def dataset_metas(fed: Federation, dataset: str) -> dict[str, dict[str, Any]]:
    """Each reachable site's published metadata for ``dataset`` (no mock is downloaded)."""
    out = {}
    for login in fed.sites:
        try:
            out[login.name] = sites.asset_meta(sites.find_asset(sites.connect(login), dataset))
        except SiteError:
            continue
    return out


def load_job(
    fed: Federation,
    path: Path,
    target: str | None = None,
    initial: Weights | None = None,
    auto_plan: bool = False,
) -> JobSpec:
    """JOB.py as a job for this federation: :func:`prepare`'s spec, as ``researcher submit``
    sends it (the strategy, auto-plan and warnings are on :func:`prepare`'s result).

    The model is built and converted here, on the researcher's machine; a layer the sites
    cannot build is refused now, with its name, before anything is submitted.
    """
    return prepare(fed, path, target, initial, auto_plan).spec


def load_planned(
    fed: Federation,
    path: Path,
    target: str | None = None,
    initial: Weights | None = None,
    auto_plan: bool = False,
) -> tuple[JobSpec, AutoPlan | None]:
    """The job file's spec before the pooled scaling, and the auto-plan that filled its plan
    (None when the file's PLAN is used as written). :func:`prepare` does this and the rest."""
    constants = read_job_file(path)
    metas = _published(fed, constants["DATASET"])
    return _planned(fed, Path(path), constants, metas, target, initial, auto_plan)


def _published(fed: Federation, dataset: str) -> dict[str, dict[str, Any]]:
    metas = dataset_metas(fed, dataset)
    if not metas:
        raise JobError(f"no site in the federation has dataset {dataset!r}")
    return metas


def _planned(  # noqa: PLR0913
    fed: Federation,
    path: Path,
    constants: dict[str, Any],
    metas: dict[str, dict[str, Any]],
    target: str | None,
    initial: Weights | None,
    auto_plan: bool,
) -> tuple[JobSpec, AutoPlan | None]:
    """Sizes, target, label space, layout and plan from the sites' published ``metas``. A
    minimal PLAN (``target_epsilon`` and none of the hand-tuned fields) is filled by the
    auto-plan from the sites' public numbers; ``auto_plan`` takes every tuned field from it."""
    from researcher.model import n_features, n_outputs

    published = _agreed(metas, "target", lambda m: m.get("target"))
    if target is not None and target != published:
        raise JobError(f"the sites publish {published!r} as the label column, not {target!r}")
    layout = federation_layout_of(metas)
    widths = width(layout) if layout else _agreed(metas, "feature count", n_features)
    meta = next(iter(metas.values()))
    plan_fields = dict(constants["PLAN"]) if isinstance(constants["PLAN"], dict) else None
    loss = (plan_fields or {}).get("loss", "cross_entropy")
    # a measured target (mse) keeps its values: a label space is for class codes
    classes = federation_classes_of(metas) if loss in CLASSIFIERS else None
    outputs = outputs_for(loss, len(classes)) if classes else n_outputs(meta, loss)
    auto = _auto_fill(plan_fields, metas, auto_plan)
    spec = load_job_file(
        path,
        published,
        widths,
        outputs,
        initial=initial,
        plan=auto.fields if auto else None,
    )
    if layout is not None or classes is not None:
        try:
            spec = replace(spec, layout=layout, classes=classes)
        except PlanError as exc:
            raise JobError(f"{path}: {exc}") from exc
    spec = (
        with_peers(fed, spec)
        if spec.plan.aggregation.secure and not spec.plan.aggregation.peers
        else spec
    )
    return with_sample_rate(spec, metas), auto


def _auto_fill(
    plan_fields: dict[str, Any] | None, metas: dict[str, dict[str, Any]], forced: bool
) -> AutoPlan | None:
    """The auto-plan for a minimal PLAN, or for any with ``forced`` (``--auto-plan``)."""
    if plan_fields is None or not (forced or autoplan.is_minimal(plan_fields)):
        return None
    try:
        return autoplan.fill(plan_fields, autoplan.site_numbers(metas), override=forced)
    except PlanError as exc:
        raise JobError(f"auto-plan: {exc}") from exc


def plan_for(
    fed: Federation, dataset: str, target_epsilon: float, given: dict[str, Any] | None = None
) -> tuple[AutoPlan, list[UtilityWarning]]:
    """``researcher plan``: a DP plan for ``dataset`` from the sites' public numbers (free),
    and the utility warnings that remain at it (a statistic too noisy to scale with, say)."""
    metas = dataset_metas(fed, dataset)
    if not metas:
        raise JobError(f"no site in the federation has dataset {dataset!r}")
    try:
        auto = autoplan.suggest(autoplan.site_numbers(metas), target_epsilon, given)
    except PlanError as exc:
        raise JobError(f"auto-plan: {exc}") from exc
    return auto, utility.utility_warnings(auto.plan(), metas, auto.noise_multiplier)


def utility_warnings(fed: Federation, spec: JobSpec) -> list[UtilityWarning]:
    """Why the job may not learn, from the sites' public numbers only (no epsilon spent)."""
    metas = dataset_metas(fed, spec.dataset)
    return warnings_for(spec, metas)


def warnings_for(spec: JobSpec, metas: dict[str, dict[str, Any]]) -> list[UtilityWarning]:
    noise = {}
    for site, meta in metas.items():
        if meta.get("rows"):
            try:
                noise[site] = job_privacy(spec, int(meta["rows"])).noise_multiplier
            except PlanError:
                continue
    return utility.utility_warnings(spec.plan, metas, noise)


def with_sample_rate(spec: JobSpec, metas: dict[str, dict[str, Any]]) -> JobSpec:
    """A distributed-DP job's rate q: the plan's batch_size over the federation's published
    rows, the same at every site, so the sum is a step over the pooled rows."""
    if not spec.plan.dp.distributed or spec.plan.dp.sample_rate is not None:
        return spec
    rows = sum(int(m["rows"]) for m in metas.values() if m.get("rows"))
    if rows < 1:
        raise JobError("no site publishes a row count; give the plan a sample_rate")
    rate = min(1.0, spec.plan.batch_size / rows)
    return replace(spec, plan=spec.plan.with_fields(sample_rate=rate))


def federation_layout_of(metas: dict[str, dict[str, Any]]) -> dict[str, Any] | None:
    """The one-hot layout every site encodes to, from each site's published schema: each
    categorical column's categories, united over the sites (a category one site lacks is an
    all-zero input there). None for an all-numeric dataset."""
    try:
        return federation_layout(metas)
    except PlanError as exc:
        raise JobError(str(exc)) from exc


def federation_classes_of(metas: dict[str, dict[str, Any]]) -> list[str] | None:
    """The label space every site maps its codes into: the union of each site's published
    classes (a class one site lacks is simply never its label there). None for a measured
    target."""
    try:
        return federation_classes(metas)
    except PlanError as exc:
        raise JobError(str(exc)) from exc


def with_peers(fed: Federation, spec: JobSpec) -> JobSpec:
    """A secure job's peers: every site of the federation, by identity-key fingerprint. Each
    site's admin sees the list in the review, and its runtime refuses any other participant."""
    peers = tuple(sites.fingerprint(sites.connect(login)) for login in fed.sites)
    return replace(spec, plan=spec.plan.with_fields(peers=peers))


def _agreed(metas: dict[str, dict[str, Any]], what: str, read: Any) -> Any:
    """The one value every site publishes for ``what``; JobError naming them if they differ."""
    values = {site: read(meta) for site, meta in metas.items()}
    if len(set(map(str, values.values()))) > 1:
        listed = ", ".join(f"{site}: {value!r}" for site, value in values.items())
        raise JobError(f"the sites disagree on the dataset's {what} ({listed})")
    return next(iter(values.values()))


def _epsilon_per_site(spec: JobSpec, metas: dict[str, dict[str, Any]]) -> dict[str, float]:
    return {
        site: job_privacy(spec, int(meta["rows"])).epsilon_job
        for site, meta in metas.items()
        if meta.get("rows")
    }


def submit(
    fed: Federation,
    job: PreparedJob | JobSpec | Path,
    only: list[str] | None = None,
    dry: bool = True,
    initial: Weights | None = None,
) -> dict[str, str]:
    """One code request per site, all or nothing; records the job next to the federation file.

    ``job``: a :func:`prepare`\ d job (a job file's path is prepared here), or a spec built by
    hand, sent as it is. The prepared job's strategy is saved with the job, for ``train``.

    Every site is checked first (up, logged in, holding the dataset), then, as ``try`` does,
    the job runs once on a mock twin with the sites' own code path: a job that cannot run is
    refused before any site reviews it. Only then is it submitted. A site that fails after
    that leaves the job recorded as partly submitted (``status`` shows where it is missing),
    and the same submit again sends it only there, under the same job id.
    ``initial`` weights are kept beside the saved job, and ``train`` starts from them.
    """
    ready = _as_prepared(fed, job, initial)
    spec, initial, strategy = ready.spec, ready.initial, ready.strategy
    if spec.plan.algorithm.frozen and initial is None:
        raise JobError("a job with frozen layers is submitted with its initial weights")
    record = _partial_record(fed, spec)
    if record is not None:
        spec = JobSpec.from_dict(record["job"])  # the retry keeps the job id the sites hold
    targets = [login for login in fed.sites if not only or login.name in only]
    reached = _reach_all(targets, spec)
    if dry:  # the round alone: the per-site epsilon would log into every site once more
        _mock_round(fed, spec, initial)
    requests: dict[str, str] = dict(record["requests"]) if record else {}
    for name, (client, asset) in reached.items():
        if name in requests:
            continue
        try:
            requests[name] = sites.submit(client, spec, asset)
        except SiteError as exc:
            missing = [n for n in reached if n not in requests]
            save_job(fed, spec, requests, missing=missing, strategy=strategy)
            held = ", ".join(requests) or "no site"
            raise JobError(
                f"{exc}; job {spec.name} is now pending at {held} and missing at "
                f"{', '.join(missing)}: run the same submit again to send it there"
            ) from exc
    save_job(fed, spec, requests, strategy=strategy)
    if initial is not None:
        path = initial_path(fed, spec)
        with open(path.with_suffix(".tmp"), "wb") as fh:
            np.savez(fh, **initial)
        os.replace(path.with_suffix(".tmp"), path)
    return requests


def _reach_all(targets: list[Any], spec: JobSpec) -> dict[str, tuple[Any, Any]]:
    """A logged-in client and the job's asset at every target site, or JobError naming each
    site that failed: nothing is submitted anywhere unless every site answers."""
    ready, problems = {}, []
    for login in targets:
        try:
            client = sites.connect(login)
            ready[login.name] = (client, sites.find_asset(client, spec.dataset))
        except SiteError as exc:
            problems.append(str(exc))
    if problems:
        raise JobError(f"nothing was submitted: {'; '.join(problems)}")
    return ready


def _partial_record(fed: Federation, spec: JobSpec) -> dict[str, Any] | None:
    """The saved record of this same job when an earlier submit stopped part-way, else None.

    The same job: the same model, plan, dataset and scaling. Its name and job id are drawn
    anew each time a job file is loaded, so they are not compared; the record's are kept.
    """
    folder = jobs_dir(fed)
    if not folder.is_dir():
        return None
    wanted = _sans_identity(spec.to_dict())
    for path in sorted(folder.glob("*.json")):
        try:
            record = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if (
            isinstance(record, dict)
            and record.get("missing")
            and isinstance(record.get("job"), dict)
        ) and _sans_identity(record["job"]) == wanted:
            return record
    return None


def _sans_identity(job: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in job.items() if k not in ("job_id", "name")}


def initial_path(fed: Federation, spec: JobSpec) -> Path:
    return jobs_dir(fed) / f"{spec.name}{INITIAL_SUFFIX}"


def saved_initial(fed: Federation, spec: JobSpec) -> Weights | None:
    path = initial_path(fed, spec)
    return load_initial(path) if path.exists() else None


def status(fed: Federation, job: PreparedJob | JobSpec) -> dict[str, dict[str, Any]]:
    """Per site: pending, approved, denied (with the admin's reason), running, done, failed.

    The site says pending/approved/denied; what happened after approval is what this
    researcher's own ``train`` recorded (rounds done, the last refusal or failure).
    """
    spec = _spec_of(job)
    progress = _load_progress(fed, spec)
    out = {}
    for login in fed.sites:
        try:
            state = sites.status(sites.connect(login), spec)
        except SiteError as exc:
            state = {"status": "unreachable", "reason": str(exc)}
        mine = progress.get("sites", {}).get(login.name)
        if state["status"] == "not submitted" and login.name in _missing(fed, spec):
            state["reason"] = "a submit stopped before this site; run the same submit again"
        if state["status"] == "approved" and mine:
            state = _after_approval(mine, progress.get("running", False), spec.plan.rounds)
        out[login.name] = state
    return out


def with_pooled_scaling(fed: Federation, spec: JobSpec) -> JobSpec:
    """The job with federation-wide standardisation from the sites' published statistics
    (:func:`prepare` does this; for a spec built by hand)."""
    return pooled_for(spec, dataset_metas(fed, spec.dataset))


def pooled_for(spec: JobSpec, published: dict[str, dict[str, Any]]) -> JobSpec:
    """The job with federation-wide standardisation from ``published`` site metadata."""
    from researcher.rounds import pooled_scaling

    metas = list(published.values())
    if spec.layout is None:
        return replace(spec, scaling=pooled_scaling(metas))
    # each site's statistics over its own categories, moved onto the job's layout: a category
    # a site lacks has mean 0 and std 0 there (no such rows), which the pool weighs in
    aligned = []
    for meta in metas:
        if meta.get("feature_mean") and meta.get("rows"):
            mean, std = align_stats(meta, spec.layout, missing_std=0.0)
            ranges = published_ranges(meta, spec.layout)
            low, high = ranges if ranges is not None else (None, None)
            weak = weak_inputs(meta, spec.layout)
            aligned.append(
                {
                    **meta,
                    "feature_mean": mean,
                    "feature_std": std,
                    "feature_low": low,
                    "feature_high": high,
                    "feature_weak": weak,
                }
            )
    return replace(spec, scaling=pooled_scaling(aligned, one_hot_mask(spec.layout)))


def _check_approved_somewhere(fed: Federation, spec: JobSpec) -> None:
    """JobError naming each site's state when no site has approved the job yet."""
    states = {}
    for login in fed.sites:
        try:
            states[login.name] = sites.status(sites.connect(login), spec)["status"]
        except SiteError:
            states[login.name] = "unreachable"
    if not any(state == "approved" for state in states.values()):
        by_state: dict[str, list[str]] = {}
        for site, state in states.items():
            by_state.setdefault(state, []).append(site)
        listed = "; ".join(f"{state} at {', '.join(names)}" for state, names in by_state.items())
        raise JobError(f"job {spec.name} is approved nowhere yet ({listed}); nothing ran")


def run_finished(run_dir: Path) -> int:
    """The number of rounds of the run in ``run_dir`` when it already ran them all, else 0."""
    from researcher.rounds import Checkpoint

    if not (Path(run_dir) / "state.json").exists():
        return 0
    spec, done, _, _ = Checkpoint(Path(run_dir)).load()
    return done if done >= spec.plan.rounds else 0


def saved_strategy(fed: Federation, spec: JobSpec) -> dict[str, Any] | None:
    """The strategy the job file named when ``spec`` was submitted (None: it named none)."""
    path = jobs_dir(fed) / f"{spec.name}.json"
    if not path.exists():
        return None
    try:
        found = json.loads(path.read_text()).get("strategy")
    except (OSError, ValueError, AttributeError) as exc:
        raise JobError(f"{path} is not a saved job ({type(exc).__name__}: {exc})") from exc
    return dict(found) if isinstance(found, dict) else None


def strategy_for(
    fed: Federation,
    job: PreparedJob | JobSpec,
    run_dir: Path,
    resume: bool = False,
    override: Strategy | None = None,
) -> Strategy:
    """The strategy a run aggregates with: ``override`` (``--strategy``); else, on a resume,
    the one the run was trained with; else the job file's ``STRATEGY`` (as prepared, or as
    saved at submit); else fedavg. A fresh object each time: its state is the run's."""
    from researcher.rounds import Checkpoint

    if override is not None:
        return override
    ran = Checkpoint.strategy_in(Path(run_dir)) if resume else None
    named = job.strategy if isinstance(job, PreparedJob) else None
    spec = _spec_of(job)
    config = ran or named or saved_strategy(fed, spec) or DEFAULT_STRATEGY
    try:
        return strategy_from(config)
    except AggregationError as exc:
        raise JobError(f"job {spec.name}: {exc}") from exc


def read_test_rows(
    path: Path, target: str, layout: dict[str, Any] | None = None, classes: list[str] | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """``researcher train --test``: the researcher's own rows as (x, y), features encoded as the
    sites encode theirs (one function, ``policies.layout.features``) and labels coded in the
    job's ``classes`` (labels {1, 2} or Yes/No scored against codes 0, 1: their places in the
    class list)."""
    import pandas as pd

    from policies.labels import labels_to_codes
    from policies.layout import features

    try:
        frame = pd.read_csv(path)
    except (OSError, ValueError) as exc:
        raise JobError(f"cannot read test file {path}: {exc}") from exc
    if target not in frame.columns:
        raise JobError(f"test file {path} has no column {target!r}")
    raw = frame[target].to_numpy()
    try:
        y = raw if classes is None else labels_to_codes(raw, classes)
        return features(frame, target, layout), y
    except PlanError as exc:
        raise JobError(f"test file {path}: {exc}") from exc


def train(  # noqa: PLR0913
    fed: Federation,
    job: PreparedJob | JobSpec,
    run_dir: Path,
    *,
    resume: bool = False,
    strategy: Strategy | None = None,
    min_sites: int | None = None,
    timeout_s: float = 300.0,
    retry_backoff: float = 0.5,
    test: tuple[np.ndarray, np.ndarray] | None = None,
    test_precision: float = DEFAULT_PRECISION,
    on_round: Callable[[RoundRecord], None] | None = None,
    initial: Weights | None = None,
) -> RunResult:
    """Run the federated rounds (see ``researcher.rounds.run_federation``) and plot them.

    ``run_dir`` must hold no run, or with ``resume`` the run to continue (:func:`check_run_dir`).
    ``strategy``: overrides the job file's ``STRATEGY`` (see :func:`strategy_for`).
    ``initial``: the starting weights; by default those saved at submit, else a fresh model.
    """
    from researcher.plots import plot_run
    from researcher.rounds import run_federation

    run_dir = Path(run_dir)
    check_run_dir(run_dir, resume)
    spec = _spec_of(job)
    aggregator = strategy_for(fed, job, run_dir, resume, strategy)
    _check_approved_somewhere(fed, spec)  # before the run folder exists
    progress = _load_progress(fed, spec) or {"sites": {}}
    progress["running"] = True
    _save_progress(fed, spec, progress)

    def record(rec: RoundRecord) -> None:
        for u in rec.updates:
            progress["sites"][u.site] = {"rounds_done": rec.round, "last": "ok", "reason": None}
        for site, why in rec.skipped.items():
            done = progress["sites"].get(site, {}).get("rounds_done", 0)
            kind = "refused" if why.startswith("refused") else "failed"
            progress["sites"][site] = {"rounds_done": done, "last": kind, "reason": why}
        _save_progress(fed, spec, progress)
        if on_round:
            on_round(rec)

    if initial is None:
        initial = job.initial if isinstance(job, PreparedJob) else None
    try:
        result = run_federation(
            fed,
            spec,
            run_dir,
            resume=resume,
            strategy=aggregator,
            min_sites=min_sites,
            timeout_s=timeout_s,
            retry_backoff=retry_backoff,
            test=test,
            test_precision=test_precision,
            on_round=record,
            initial=initial if initial is not None else saved_initial(fed, spec),
        )
    finally:
        progress["running"] = False
        _save_progress(fed, spec, progress)
    plot_run(result.rounds, run_dir)
    return result
