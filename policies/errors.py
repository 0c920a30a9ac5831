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

    Both wings talk to datasites over HTTP and turn these into their own "no datasite answers"
    errors; this is the one place that decides what counts.
    """
    return "Connection" in type(exc).__name__ or isinstance(exc, OSError)


def is_tls_error(exc: BaseException) -> bool:
    """True when a connection failed on the certificate (not on reachability)."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        name = type(current).__name__
        if "SSL" in name or "Certificate" in name or "fingerprint" in str(current).lower():
            return True
        current = current.__cause__ or current.__context__
    return False


@contextmanager
def map_errors(
    what: str,
    failed: Callable[[str], FedsiteError],
    unreachable: Callable[[str], FedsiteError],
    public_message: Callable[[BaseException], str | None],
) -> Iterator[None]:
    """Translate a client library's failures inside the block into one wing's errors (httpx's
    ``map_exceptions`` style): an error the library meant for its user (``public_message``
    gives its text, None for any other) becomes ``failed("WHAT: message")``, a certificate that
    is not the trusted one ``failed(...)``, a refused or dropped connection ``unreachable(...)``.
    Anything else is a bug and passes through. Each wing's adapter names its library's errors.
    """
    try:
        yield
    except FedsiteError:
        raise
    except Exception as exc:
        message = public_message(exc)
        if message is not None:
            raise failed(f"{what}: {message}") from exc
        if is_tls_error(exc):
            raise failed(
                f"{what}: the site's TLS certificate is not the one trusted for it (the pinned "
                "fingerprint or CA file); refused"
            ) from exc
        if is_connection_error(exc):
            raise unreachable(f"{what}: no datasite answers ({type(exc).__name__})") from exc
        raise
