"""Errors of the datasite side. The CLI prints ``str(error)`` as one line and exits non-zero.

DatasiteError
 ├── ConfigError        DIR not initialised, or its config is broken
 ├── TableError         an uploaded table is unreadable or invalid
 ├── ServerError        the server cannot start, stop, or be reached (port in use, not running)
 ├── AuthError          a login was refused (wrong password)
 ├── ReviewError        unknown request, refused approval, missing reason
 │    └── AlreadyApproved  a code or job id that was approved before (approved once, ever)
 ├── RoundFailed        a round failed after its charge (one fixed reply; cause in the audit log)
 └── SandboxLimit       a round passed the site's time or memory limit and was stopped

Refused (a round that will not run; the reply says why, nothing charged) is
``policies.errors.Refused``, named here too: the round engine both wings run raises it.
"""

from policies.errors import FedsiteError
from policies.errors import Refused as Refused  # raised by the round engine too (policies.engine)


class DatasiteError(FedsiteError):
    """Base of every error the datasites package raises on purpose."""


class ConfigError(DatasiteError):
    pass


class TableError(DatasiteError):
    pass


class ServerError(DatasiteError):
    pass


class AuthError(DatasiteError):
    pass


class ReviewError(DatasiteError):
    pass


class AlreadyApproved(ReviewError):
    """A second approval of a code id or job id: one approval, one budget, per job, ever."""


class RoundFailed(DatasiteError):
    """Anything that went wrong after the charge (its cause is chained, for the audit log)."""


class SandboxLimit(DatasiteError):
    """A round passed the site's time or memory limit and was stopped."""
