"""Errors raised by the policy layer.

PolicyError
 ├── PlanError          a training plan or job spec is malformed or out of range
 ├── BudgetExceeded     a charge would pass the privacy budget (never partially applied)
 ├── RoundLimitReached  an approval was asked for more rounds than it covers
 └── WireError          weights on the wire could not be decoded or do not match the model
"""


class PolicyError(Exception):
    """Base of every error the policies package raises."""


class PlanError(PolicyError):
    """A job spec or plan is malformed; the message names the field."""


class BudgetExceeded(PolicyError):
    """A job would spend more privacy than the ledger allows."""


class RoundLimitReached(PolicyError):
    """An approved job was called more times than its approval covers."""


class WireError(PolicyError):
    """Encoded weights are not what the declared model expects."""


def is_connection_error(exc: BaseException) -> bool:
    """True for a failure to reach a server: requests' ConnectionError family or any OSError.

    Both packages talk to datasites over syft's HTTP client and turn these into their own
    "no datasite answers" errors; this is the one place that decides what counts.
    """
    return "Connection" in type(exc).__name__ or isinstance(exc, OSError)
