"""Errors of the researcher side; the CLI prints each as one line and exits non-zero.

ResearcherError
 ├── FederationError   the federation file is missing, malformed, or a password is unavailable
 ├── JobError          JOB.py is missing or does not define what a job needs
 ├── SiteError         a datasite refused, failed, or could not be reached
 │    └── Unreachable  the site did not answer; retrying later may work
 └── AggregationError  updates cannot be combined (no replies, mismatched shapes)
"""

from policies.errors import FedsiteError


class ResearcherError(FedsiteError):
    pass


class FederationError(ResearcherError):
    pass


class JobError(ResearcherError):
    pass


class SiteError(ResearcherError):
    pass


class AggregationError(ResearcherError):
    pass


class Unreachable(SiteError):
    """The site did not answer; retrying later may work."""
