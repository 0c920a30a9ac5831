"""One datasite as the round loop sees it: a protocol, and the in-process implementation.

The loop (``researcher.rounds``) needs three things of a site: its published metadata, one call
of the approved job, and a way to forget a broken connection. ``researcher.sites.SyftSite`` does
them over syft's HTTP client. ``InProcessSite`` answers with a function in this process, as
httpx's ``MockTransport`` answers requests: quorum, retry, resume and strategies are then tested
in milliseconds, and a simulation needs no server. Neither holds any DP code.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor, wait
from typing import Any, Protocol, TypeVar

from policies.plan import JobSpec
from policies.wire import RoundCall, RoundReply
from researcher.errors import SiteError

# what a site is handed: the call as it travels (policies.wire.decode_call reads it back)
Handler = Callable[[JobSpec, str], RoundReply]
R = TypeVar("R")


class Site(Protocol):
    """What the round loop calls; errors are ``SiteError`` (skip) or ``Unreachable`` (retry)."""

    @property
    def name(self) -> str: ...

    def meta(self, dataset: str) -> dict[str, Any]:
        """The dataset's published metadata at this site."""
        ...

    def call(self, spec: JobSpec, call: RoundCall) -> RoundReply:
        """One call of the approved job: the site's reply (ok, refused, failed)."""
        ...

    def drop(self) -> None:
        """Forget the connection (after a timeout or a dropped call); the next call reopens it."""
        ...


class InProcessSite:
    """A site whose replies come from ``handler(spec, encoded call)`` in this process."""

    def __init__(self, name: str, meta: dict[str, Any], handler: Handler) -> None:
        self._name, self._meta, self.handler = name, dict(meta), handler
        self.drops = 0

    @property
    def name(self) -> str:
        return self._name

    def meta(self, dataset: str) -> dict[str, Any]:
        return self._meta

    def call(self, spec: JobSpec, call: RoundCall) -> RoundReply:
        return self.handler(spec, call.encode())

    def drop(self) -> None:
        self.drops += 1


def fan_out(
    pool: ThreadPoolExecutor,
    links: Sequence[Site],
    work: Callable[[Site], R],
    timeout_s: float | None,
) -> tuple[dict[str, R], dict[str, str]]:
    """``work(site)`` at every site at once: the replies, and for each site without one the
    line saying why (its ``SiteError``, or a timeout), both in the sites' order.

    The one fan-out of the round loop, personalization and secure aggregation, so a timeout
    or an error means the same in each. Retrying is ``work``'s (``rounds.call_with_retry``).
    A site still busy after ``timeout_s`` (None: wait for all) is skipped and its connection
    dropped: the call may still land, and the next one opens a fresh connection.
    """
    futures = {link.name: (link, pool.submit(work, link)) for link in links}
    done, _ = wait([future for _, future in futures.values()], timeout=timeout_s)
    replies: dict[str, R] = {}
    failed: dict[str, str] = {}
    for name, (link, future) in futures.items():
        if future not in done:
            failed[name] = f"timed out after {timeout_s:.0f}s"
            link.drop()
            continue
        try:
            replies[name] = future.result()
        except SiteError as exc:
            failed[name] = str(exc)
    return replies, failed
