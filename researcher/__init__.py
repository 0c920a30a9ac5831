"""What runs at the researcher: federation, jobs, submission, status (see README).

The public names below are imported on first use (PEP 562), not at package import: ``api``
pulls in syft (~6 s), and ``researcher --help`` or a JOB.py check must not pay for it.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

_EXPORTS = {
    "Federation": "researcher.federation",
    "PreparedJob": "researcher.api",
    "ResearcherError": "researcher.errors",
    "datasets": "researcher.api",
    "dry_run": "researcher.api",
    "load_job": "researcher.api",
    "load_job_file": "researcher.job",
    "make_job": "researcher.job",
    "prepare": "researcher.api",
    "status": "researcher.api",
    "submit": "researcher.api",
    "train": "researcher.api",
}

__all__ = [  # noqa: RUF022  the same names as _EXPORTS, spelled out for tools
    "Federation",
    "PreparedJob",
    "ResearcherError",
    "datasets",
    "dry_run",
    "load_job",
    "load_job_file",
    "make_job",
    "prepare",
    "status",
    "submit",
    "train",
]

if TYPE_CHECKING:
    from researcher.api import (
        PreparedJob,
        datasets,
        dry_run,
        load_job,
        prepare,
        status,
        submit,
        train,
    )
    from researcher.errors import ResearcherError
    from researcher.federation import Federation
    from researcher.job import load_job_file, make_job


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'researcher' has no attribute {name!r}")
    value = getattr(import_module(_EXPORTS[name]), name)
    globals()[name] = value
    return value
