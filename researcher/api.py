"""The researcher's Python API: look at mock data, dry-run a job, submit it, follow it.

from pathlib import Path
from researcher import Federation, load_job_file, dry_run, submit, status

fed = Federation.load(Path("federation.toml"))
job = load_job(fed, Path("job.py"))
print(dry_run(fed, job)["metrics"])
submit(fed, job)
print(status(fed, job))
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

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
from researcher.errors import JobError, SiteError
from researcher.federation import Federation
from researcher.job import load_job_file, read_job_file

JOBS_DIR = ".fedsite-jobs"
PROGRESS_SUFFIX = ".progress.json"  # beside the saved jobs, and not one of them
INITIAL_SUFFIX = ".init.npz"  # a job's initial weights (transfer learning), beside it


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


def dry_run(fed: Federation, spec: JobSpec, initial: Weights | None = None) -> dict[str, Any]:
    """One round of the sites' own round engine (``policies.engine``), here, on the first site's mock.

    Adds the epsilon the whole plan would spend at each site, from each site's row count, and
    the utility warnings (``policies.utility``): why the job may not learn, from public numbers.
    """
    result = _mock_round(fed, spec, initial)
    metas = dataset_metas(fed, spec.dataset)
    result["epsilon_per_site"] = _epsilon_per_site(spec, metas)
    result["warnings"] = [w.to_dict() for w in warnings_for(spec, metas)]
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


def load_initial(path: Path) -> Weights:
    """Initial weights for transfer learning: an ``.npz`` of named arrays, or a run dir (its
    ``global.npz``, the last global model of an earlier run)."""
    path = Path(path)
    file = path / "global.npz" if path.is_dir() else path
    try:
        with np.load(file, allow_pickle=False) as npz:
            return {k: np.asarray(npz[k], np.float32) for k in npz.files}
    except (OSError, ValueError) as exc:
        raise JobError(f"cannot read initial weights from {path}: {exc}") from exc


def load_job(
    fed: Federation,
    path: Path,
    target: str | None = None,
    initial: Weights | None = None,
    auto_plan: bool = False,
) -> JobSpec:
    """JOB.py as a job for this federation: sizes and target from the sites' published schema.

    The model is built and converted here, on the researcher's machine; a layer the sites
    cannot build is refused now, with its name, before anything is submitted. A minimal PLAN
    (``target_epsilon`` and none of the hand-tuned fields) is filled by the auto-plan from the
    sites' public numbers; ``auto_plan`` takes every tuned field from it (see :func:`load_planned`).
    """
    return load_planned(fed, path, target, initial, auto_plan)[0]


def load_planned(
    fed: Federation,
    path: Path,
    target: str | None = None,
    initial: Weights | None = None,
    auto_plan: bool = False,
) -> tuple[JobSpec, AutoPlan | None]:
    """:func:`load_job`, and the auto-plan that filled its plan (None when the file's PLAN is
    used as written), to show the researcher what was chosen and why."""
    constants = read_job_file(path)
    metas = dataset_metas(fed, constants["DATASET"])
    if not metas:
        raise JobError(f"no site in the federation has dataset {constants['DATASET']!r}")
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
        from dataclasses import replace

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
    sites_ = [autoplan.SiteNumbers.from_meta(name, m) for name, m in metas.items()]
    try:
        return autoplan.fill(plan_fields, sites_, override=forced)
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
    sites_ = [autoplan.SiteNumbers.from_meta(name, m) for name, m in metas.items()]
    try:
        auto = autoplan.suggest(sites_, target_epsilon, given)
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
    from dataclasses import replace

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
    from dataclasses import replace

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
    spec: JobSpec,
    only: list[str] | None = None,
    dry: bool = True,
    initial: Weights | None = None,
) -> dict[str, str]:
    """One code request per site, all or nothing; records the job next to the federation file.

    Every site is checked first (up, logged in, holding the dataset), then, as ``try`` does,
    the job runs once on a mock twin with the sites' own code path: a job that cannot run is
    refused before any site reviews it. Only then is it submitted. A site that fails after
    that leaves the job recorded as partly submitted (``status`` shows where it is missing),
    and the same submit again sends it only there, under the same job id.
    ``initial`` weights are kept beside the saved job, and ``train`` starts from them.
    """
    if spec.plan.algorithm.frozen and initial is None:
        raise JobError("a job with frozen layers is submitted with its initial weights")
    record = _partial_record(fed, spec)
    if record is not None:
        spec = JobSpec.from_dict(record["job"])  # the retry keeps the job id the sites hold
    targets = [login for login in fed.sites if not only or login.name in only]
    ready = _reach_all(targets, spec)
    if dry:  # the round alone: the per-site epsilon would log into every site once more
        _mock_round(fed, spec, initial)
    requests: dict[str, str] = dict(record["requests"]) if record else {}
    for name, (client, asset) in ready.items():
        if name in requests:
            continue
        try:
            requests[name] = sites.submit(client, spec, asset)
        except SiteError as exc:
            missing = [n for n in ready if n not in requests]
            save_job(fed, spec, requests, missing=missing)
            held = ", ".join(requests) or "no site"
            raise JobError(
                f"{exc}; job {spec.name} is now pending at {held} and missing at "
                f"{', '.join(missing)}: run the same submit again to send it there"
            ) from exc
    save_job(fed, spec, requests)
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


def status(fed: Federation, spec: JobSpec) -> dict[str, dict[str, Any]]:
    """Per site: pending, approved, denied (with the admin's reason), running, done, failed.

    The site says pending/approved/denied; what happened after approval is what this
    researcher's own ``train`` recorded (rounds done, the last refusal or failure).
    """
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


def _missing(fed: Federation, spec: JobSpec) -> list[str]:
    path = jobs_dir(fed) / f"{spec.name}.json"
    return list(json.loads(path.read_text()).get("missing", [])) if path.exists() else []


def _after_approval(mine: dict[str, Any], running: bool, rounds: int) -> dict[str, Any]:
    if mine["last"] in ("refused", "failed"):
        return {
            "status": "failed",
            "reason": f"{mine['last']}: {mine.get('reason')}",
            "rounds_done": mine["rounds_done"],
        }
    if mine["rounds_done"] >= rounds:
        return {"status": "done", "reason": None, "rounds_done": mine["rounds_done"]}
    return {
        "status": "running" if running else "approved",
        "reason": None,
        "rounds_done": mine["rounds_done"],
    }


def _progress_path(fed: Federation, spec: JobSpec) -> Path:
    return jobs_dir(fed) / f"{spec.name}{PROGRESS_SUFFIX}"


def _load_progress(fed: Federation, spec: JobSpec) -> dict[str, Any]:
    path = _progress_path(fed, spec)
    return json.loads(path.read_text()) if path.exists() else {}


def _save_progress(fed: Federation, spec: JobSpec, progress: dict[str, Any]) -> None:
    path = _progress_path(fed, spec)
    path.parent.mkdir(exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(progress, indent=2))
    os.replace(tmp, path)


def jobs_dir(fed: Federation) -> Path:
    return fed.path.parent / JOBS_DIR


def save_job(
    fed: Federation, spec: JobSpec, requests: dict[str, str], missing: list[str] | None = None
) -> Path:
    """The job and its request ids; ``missing``: sites a part-way submit did not reach."""
    folder = jobs_dir(fed)
    folder.mkdir(exist_ok=True)
    path = folder / f"{spec.name}.json"
    tmp = path.with_suffix(".tmp")
    record: dict[str, Any] = {"job": spec.to_dict(), "requests": requests}
    if missing:
        record["missing"] = missing
    tmp.write_text(json.dumps(record, indent=2))
    os.replace(tmp, path)
    return path


def saved_jobs(fed: Federation) -> list[JobSpec]:
    folder = jobs_dir(fed)
    if not folder.is_dir():
        return []
    paths = [p for p in folder.glob("*.json") if not p.name.endswith(PROGRESS_SUFFIX)]
    jobs = []
    for path in sorted(paths, key=lambda p: p.stat().st_mtime):
        try:
            jobs.append(JobSpec.from_dict(json.loads(path.read_text())["job"]))
        except (OSError, ValueError, KeyError, TypeError, PlanError) as exc:
            raise JobError(f"{path} is not a saved job ({type(exc).__name__}: {exc})") from exc
    return jobs


def saved_job(fed: Federation, name: str | None) -> JobSpec:
    """The named saved job, or the latest one."""
    jobs = saved_jobs(fed)
    if not jobs:
        raise JobError(f"no submitted jobs recorded in {jobs_dir(fed)}")
    if name is None:
        return jobs[-1]
    for job in jobs:
        if job.name == name or job.name.startswith(name):
            return job
    raise JobError(f"no submitted job named {name!r}")


def with_pooled_scaling(fed: Federation, spec: JobSpec) -> JobSpec:
    """The job with federation-wide standardisation from the sites' published statistics."""
    from dataclasses import replace

    from researcher.rounds import pooled_scaling

    metas = list(dataset_metas(fed, spec.dataset).values())
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

    ckpt = Checkpoint(Path(run_dir))
    if not ckpt.exists():
        return 0
    spec, done, _, _ = ckpt.load()
    return done if done >= spec.plan.rounds else 0


def train(fed: Federation, spec: JobSpec, run_dir: Path, **options: Any) -> Any:
    """Run the federated rounds (see ``researcher.rounds.run_federation``) and plot them."""
    from researcher.plots import plot_run
    from researcher.rounds import run_federation

    _check_approved_somewhere(fed, spec)  # before the run folder exists
    progress = _load_progress(fed, spec) or {"sites": {}}
    progress["running"] = True
    _save_progress(fed, spec, progress)
    user_hook = options.pop("on_round", None)

    def on_round(rec: Any) -> None:
        for u in rec.updates:
            progress["sites"][u.site] = {"rounds_done": rec.round, "last": "ok", "reason": None}
        for site, why in rec.skipped.items():
            done = progress["sites"].get(site, {}).get("rounds_done", 0)
            kind = "refused" if why.startswith("refused") else "failed"
            progress["sites"][site] = {"rounds_done": done, "last": kind, "reason": why}
        _save_progress(fed, spec, progress)
        if user_hook:
            user_hook(rec)

    options.setdefault("initial", saved_initial(fed, spec))
    try:
        result = run_federation(fed, spec, run_dir, on_round=on_round, **options)
    finally:
        progress["running"] = False
        _save_progress(fed, spec, progress)
    plot_run(result.rounds, run_dir)
    return result
