"""The one root of every error this project raises on purpose, and the policy layer's tree.

FedsiteError                 caught by both CLIs: one line on stderr, exit 1
 ├── PolicyError             (below) the job contract, shared by both wings
 ├── datasites.errors.DatasiteError     the datasite wing's tree
 └── researcher.errors.ResearcherError  the researcher wing's tree

PolicyError
 ├── PlanError          a training plan or job spec is malformed or out of range
 ├── BudgetExceeded     a charge would pass the privacy budget (never partially applied)
 ├── RoundLimitReached  an approval was asked for more rounds than it covers
 ├── WireError          weights on the wire could not be decoded or do not match the model
 └── Refused            a round will not run on this table, these weights or this plan (the
                        reply says why, nothing charged); ``datasites.errors`` names it too
"""

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any


class FedsiteError(Exception):
    """Base of every error raised on purpose, in any package: its message is for the user."""


class PolicyError(FedsiteError):
    """Base of every error the policies package raises."""


class PlanError(PolicyError):
    """A job spec or plan is malformed; the message names the field."""


class BudgetExceeded(PolicyError):
    """A job would spend more privacy than the ledger allows."""


class RoundLimitReached(PolicyError):
    """An approved job was called more times than its approval covers."""


class WireError(PolicyError):
    """Encoded weights are not what the declared model expects."""


class Refused(PolicyError):
    """A round that will not run (``policies.engine``, or the site's own checks around it); the
    message is safe to show the researcher."""


def is_connection_error(exc: BaseException) -> bool:
    """True for a failure to reach a server: requests' ConnectionError family or any OSError.

    Both packages talk to datasites over syft's HTTP client and turn these into their own
    "no datasite answers" errors; this is the one place that decides what counts.
    """
    return "Connection" in type(exc).__name__ or isinstance(exc, OSError)


def _is_syft_error(exc: BaseException) -> bool:
    return type(exc).__module__.startswith("syft.") and hasattr(exc, "public_message")


def syft_message(exc: BaseException) -> str:
    """What syft says to a user about ``exc``: its public message, never its server trace."""
    return str(getattr(exc, "public_message", exc)).strip()


@contextmanager
def map_syft_errors(
    what: str,
    failed: Callable[[str], FedsiteError],
    unreachable: Callable[[str], FedsiteError],
) -> Iterator[None]:
    """Translate syft's failures inside the block into one wing's errors (httpx's
    ``map_exceptions`` style): a SyftException or a returned-and-raised SyftError becomes
    ``failed("WHAT: message")``, a refused or dropped connection ``unreachable(...)``. Each
    wing's syft boundary uses this one function; policies itself never imports syft.
    """
    try:
        yield
    except FedsiteError:
        raise
    except Exception as exc:
        if _is_syft_error(exc):
            raise failed(f"{what}: {syft_message(exc)}") from exc
        from policies.tls import is_tls_error

        if is_tls_error(exc):
            raise failed(
                f"{what}: the site's TLS certificate is not the one trusted for it (the pinned "
                "fingerprint or CA file); refused"
            ) from exc
        if is_connection_error(exc):
            raise unreachable(f"{what}: no datasite answers ({type(exc).__name__})") from exc
        raise


def check_reply(value: Any, what: str, failed: Callable[[str], FedsiteError]) -> Any:
    """``value``, unless syft returned a SyftError instead of raising it."""
    if type(value).__name__ == "SyftError" and hasattr(value, "message"):
        raise failed(f"{what}: {value.message}")
    return value
