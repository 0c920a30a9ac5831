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
