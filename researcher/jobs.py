"""The researcher's own records of submitted jobs, beside the federation file: syft-free.

``researcher status`` resolves the job it was asked about (or refuses an unknown name) from
these files before it imports syft (seconds) or contacts any site.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from policies.errors import PlanError
from policies.plan import JobSpec
from researcher.errors import JobError
from researcher.federation import Federation

JOBS_DIR = ".fedsite-jobs"
PROGRESS_SUFFIX = ".progress.json"  # beside the saved jobs, and not one of them


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
    fed: Federation,
    spec: JobSpec,
    requests: dict[str, str],
    missing: list[str] | None = None,
    strategy: dict[str, Any] | None = None,
) -> Path:
    """The job and its request ids; ``missing``: sites a part-way submit did not reach;
    ``strategy``: the job file's, which ``train`` uses (it stays here, no site sees it)."""
    folder = jobs_dir(fed)
    folder.mkdir(exist_ok=True)
    path = folder / f"{spec.name}.json"
    tmp = path.with_suffix(".tmp")
    record: dict[str, Any] = {"job": spec.to_dict(), "requests": requests}
    if missing:
        record["missing"] = missing
    if strategy is not None:
        record["strategy"] = strategy
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


def check_run_dir(run_dir: Path, resume: bool) -> None:
    """JobError unless ``run_dir`` suits the run: a resume needs a checkpointed run there, a
    new run needs a folder that holds none (its checkpoint would be overwritten). Nothing is
    created here."""
    held = (Path(run_dir) / "state.json").exists()
    if resume and not held:
        raise JobError(f"{run_dir} holds no run to resume (no state.json); use --run-dir to start")
    if not resume and held:
        raise JobError(f"{run_dir} already holds a run; continue it with --resume {run_dir}")
