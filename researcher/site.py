"""One datasite as the round loop sees it: a protocol, and the in-process implementation.

The loop (``researcher.rounds``) needs three things of a site: its published metadata, one call
of the approved job, and a way to forget a broken connection. ``researcher.sites.SyftSite`` does
them over syft's HTTP client. ``InProcessSite`` answers with a function in this process, as
httpx's ``MockTransport`` answers requests: quorum, retry, resume and strategies are then tested
in milliseconds, and a simulation needs no server. Neither holds any DP code.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

from policies.plan import JobSpec
from policies.wire import RoundCall, RoundReply

# what a site is handed: the call as it travels (policies.wire.decode_call reads it back)
Handler = Callable[[JobSpec, str], RoundReply]


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
