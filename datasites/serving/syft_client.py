"""The datasite admin's adapter of syft's client: pinned TLS, and syft's failures as this wing's errors.

syft 0.9.5's HTTP client trusts the system CAs, calls every ``https://`` URL on port 443 and
retries refused connections. :func:`install` routes its connections through ``policies.tls``
(the trust pinned for each host and port, no connect retry). ``admin.login`` installs it before
each login: importing this module changes nothing. (The server's own fixes to syft are
``syft_patches``.) The researcher wing keeps the same adapter (``researcher.syft_adapter``); a
test holds the two equal, since neither wing may import the other and ``policies`` names no
syft.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Any

from policies import tls
from policies.errors import FedsiteError, map_errors


def install() -> None:
    """Give syft's HTTP client, in this process, the pinned sessions; a second call is a no-op."""
    from syft.client.client import HTTPConnection
    from syft.serde.deserialize import _deserialize
    from syft.serde.serialize import _serialize
    from syft.types.server_url import ServerURL

    HTTPConnection.session = property(_pinned_session)
    _keep_https_ports(ServerURL)
    _api_calls_through_the_session(HTTPConnection, _serialize, _deserialize)


def _pinned_session(connection: Any) -> Any:
    """syft's ``HTTPConnection.session``: the trust pinned for this URL when the connection first
    talks; a later pin for the same host and port (another login) never changes an open one."""
    if connection.session_cache is None:
        connection.session_cache = tls.pinned_session(tls.trust_for(str(connection.url)))
    return connection.session_cache


def _keep_https_ports(server_url: Any) -> None:
    """syft 0.9.5's ``ServerURL.from_url`` sets the port of every ``https://`` URL to 443, and
    ``with_path`` (each request) goes through it, so a site on https://host:8443 was called on
    443. The explicit port is kept; a URL without one still gets 443."""
    original = server_url.from_url.__func__
    if getattr(original, "_fedsite_keeps_port", False):
        return

    def from_url(cls: Any, url: Any) -> Any:
        parsed = original(cls, url)
        port = tls.explicit_port(url) if isinstance(url, str) else None
        if port:
            parsed.set_port(port)
        return parsed

    from_url._fedsite_keeps_port = True  # type: ignore[attr-defined]
    server_url.from_url = classmethod(from_url)


def _api_calls_through_the_session(connection: Any, serialize: Any, deserialize: Any) -> None:
    """syft 0.9.5 sends every API call with a bare ``requests.post``, which trusts the system
    CAs whatever was pinned. The call now goes through ``tls.post_once`` with the connection's
    pinned trust; syft's proxy path (``rtunnel_token``) and the rest are syft's."""
    original = connection.make_call
    if getattr(original, "_fedsite_session", False):
        return

    def make_call(self: Any, signed_call: Any) -> Any:
        if self.rtunnel_token:
            return original(self, signed_call)
        body = serialize(obj=signed_call, to_bytes=True)
        trust = self.session.get_adapter("https://").trust
        reply = tls.post_once(str(self.api_url), body, self.headers, trust)
        return deserialize(reply, from_bytes=True)

    make_call._fedsite_session = True  # type: ignore[attr-defined]
    connection.make_call = make_call


def public_message(exc: BaseException) -> str | None:
    """What syft says to a user about ``exc`` (its public message, never its server trace), or
    None when ``exc`` is not one of syft's own errors."""
    if type(exc).__module__.startswith("syft.") and hasattr(exc, "public_message"):
        return str(exc.public_message).strip()
    return None


def syft_errors(
    what: str, failed: Callable[[str], FedsiteError], unreachable: Callable[[str], FedsiteError]
) -> AbstractContextManager[None]:
    """syft's failures inside the block as this wing's errors (``policies.errors.map_errors``)."""
    return map_errors(what, failed, unreachable, public_message)


def check_reply(value: Any, what: str, failed: Callable[[str], FedsiteError]) -> Any:
    """``value``, unless syft returned a SyftError instead of raising it."""
    if type(value).__name__ == "SyftError" and hasattr(value, "message"):
        raise failed(f"{what}: {value.message}")
    return value
