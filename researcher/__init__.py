"""What runs at the researcher: federation, jobs, submission, status (see README)."""

from researcher.api import datasets, dry_run, load_job, status, submit
from researcher.errors import ResearcherError
from researcher.federation import Federation
from researcher.job import load_job_file, make_job

__all__ = [
    "Federation",
    "ResearcherError",
    "datasets",
    "dry_run",
    "load_job",
    "load_job_file",
    "make_job",
    "status",
    "submit",
]
