"""TLS between institutions: a site's certificate, and how a client trusts exactly that site.

Both wings use this module. A site serves HTTPS with a certificate given at ``datasite init``
(``--tls-cert/--tls-key``) or made there (``--self-signed``, by :func:`self_signed`, with
``cryptography``). Its SHA-256 fingerprint (of the DER certificate) is printed at init and by
``status``. A client trusts a site either by a CA file or by that pinned fingerprint; syft's own
HTTP session would use the system CAs, so :func:`install` gives syft's connections an adapter
that verifies against what was pinned for their host and port, and refuses anything else.
"""

from __future__ import annotations

import datetime
import hashlib
import ipaddress
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from policies.errors import FedsiteError

VALID_DAYS = 825


class TLSError(FedsiteError):
    """A certificate that does not match, or TLS settings that cannot work."""


def self_signed(host: str) -> tuple[bytes, bytes]:
    """A new P-256 key and a self-signed certificate for ``host`` (and loopback), as PEM."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, host)])
    names: list[x509.GeneralName] = [
        x509.DNSName("localhost"),
        x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
    ]
    try:
        names.append(x509.IPAddress(ipaddress.ip_address(host)))
    except ValueError:
        names.append(x509.DNSName(host))
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=VALID_DAYS))
        .add_extension(x509.SubjectAlternativeName(list(dict.fromkeys(names))), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    return key_pem, cert.public_bytes(serialization.Encoding.PEM)


def fingerprint(cert_pem: bytes) -> str:
    """SHA-256 of the certificate's DER bytes, lowercase hex: what ``fingerprint =`` pins."""
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    try:
        cert = x509.load_pem_x509_certificate(cert_pem)
    except ValueError as exc:
        raise TLSError(f"not a PEM certificate: {exc}") from exc
    return hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).hexdigest()


def check_fingerprint(value: str) -> str:
    text = value.lower().replace(":", "")
    if len(text) != 64 or any(c not in "0123456789abcdef" for c in text):
        raise TLSError(f"fingerprint {value!r} is not a SHA-256 (64 hex characters, ':' allowed)")
    return text


@dataclass(frozen=True)
class Trust:
    """How to trust one site: a CA file, or a pinned certificate fingerprint."""

    ca_file: Path | None = None
    fingerprint: str | None = None


_PINS: dict[str, Trust] = {}
_LOCK = threading.Lock()


def pin(url: str, trust: Trust) -> None:
    """Trust ``url``'s host and port only as ``trust`` says, for syft's connections."""
    with _LOCK:
        _PINS[_key(url)] = trust


def _key(url: str) -> str:
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    return f"{parts.hostname}:{parts.port or (443 if parts.scheme == 'https' else 80)}"


def trust_for(url: str) -> Trust | None:
    with _LOCK:
        return _PINS.get(_key(url))


@dataclass(frozen=True)
class SyftClient:
    """The pieces of syft's client that :func:`install` patches, handed in by each wing
    (``policies`` is the syft-free contract and imports no syft itself)."""

    http_connection: Any  # syft.client.client.HTTPConnection
    server_url: Any  # syft.types.server_url.ServerURL
    serialize: Any  # syft.serde.serialize._serialize
    deserialize: Any  # syft.serde.deserialize._deserialize


def install(syft: SyftClient) -> None:
    """Give syft's HTTP session, in this process, an adapter that (1) does not retry a refused
    connection (this package retries, with backoff, where it means to) and (2) verifies each
    HTTPS site against what :func:`pin` holds for it."""
    import requests

    def session(self: Any) -> requests.Session:
        if self.session_cache is None:
            # the trust pinned for this URL when the connection first talks: a later pin for
            # the same host and port (another login) never changes an open connection's trust
            self.session_cache = _session(trust_for(str(self.url)))
        cached: requests.Session = self.session_cache
        return cached

    syft.http_connection.session = property(session)
    _keep_https_ports(syft.server_url)
    _api_calls_through_the_session(syft)


def _keep_https_ports(server_url: Any) -> None:
    """syft 0.9.5's ``ServerURL.from_url`` sets the port of every ``https://`` URL to 443, and
    ``with_path`` (each request) goes through it, so a site on https://host:8443 was called on
    443. The explicit port is kept; a URL without one still gets 443."""
    from urllib.parse import urlsplit

    original = server_url.from_url.__func__
    if getattr(original, "_fedsite_keeps_port", False):
        return

    def from_url(cls: Any, url: Any) -> Any:
        parsed = original(cls, url)
        if isinstance(url, str) and url.startswith("https://"):
            port = urlsplit(url).port
            if port:
                parsed.set_port(port)
        return parsed

    from_url._fedsite_keeps_port = True  # type: ignore[attr-defined]
    server_url.from_url = classmethod(from_url)


def _api_calls_through_the_session(syft: SyftClient) -> None:
    """syft 0.9.5 sends every API call with a bare ``requests.post``, which trusts the system
    CAs whatever was pinned. The call now goes through a fresh session with the pinned adapter.

    Fresh, as syft's was: a kept-alive connection that the server closed while idle fails the
    next POST, and a POST (a training round) must not be retried blindly. The rest is syft's.
    """
    import requests

    original = syft.http_connection.make_call
    if getattr(original, "_fedsite_session", False):
        return

    def make_call(self: Any, signed_call: Any) -> Any:
        if self.rtunnel_token:  # syft's proxy path, untouched
            return original(self, signed_call)
        body = syft.serialize(obj=signed_call, to_bytes=True)
        with _session(self.session.get_adapter("https://").trust) as once:
            response = once.post(url=str(self.api_url), data=body, headers=self.headers)
        if response.status_code != 200:
            raise requests.ConnectionError(
                f"Failed to fetch metadata. Response returned with code {response.status_code}"
            )
        return syft.deserialize(response.content, from_bytes=True)

    make_call._fedsite_session = True  # type: ignore[attr-defined]
    syft.http_connection.make_call = make_call


def _session(trust: Trust | None) -> Any:
    import requests

    new = requests.Session()
    adapter = PinnedAdapter(trust)
    new.mount("http://", adapter)
    new.mount("https://", adapter)
    return new


def _adapter_base() -> Any:
    from requests.adapters import HTTPAdapter

    return HTTPAdapter


class PinnedAdapter(_adapter_base()):  # type: ignore[misc]
    """requests' adapter with syft's retries minus connect retries, and pinned trust.

    syft passes ``verify=True`` with every request (its ``verify_tls()``), which would mean the
    system CAs; here the site's own trust replaces it: its CA file, or no CA check but an exact
    certificate fingerprint (urllib3's ``assert_fingerprint``).
    """

    def __init__(self, trust: Trust | None = None) -> None:
        from urllib3.util.retry import Retry

        super().__init__(max_retries=Retry(total=3, connect=0, backoff_factor=0.5))
        self.trust = trust

    def send(self, request: Any, **kwargs: Any) -> Any:
        trust = self.trust if str(request.url).startswith("https://") else None
        if trust is not None and trust.fingerprint:
            kwargs["verify"] = False
            self.poolmanager.connection_pool_kw["assert_fingerprint"] = trust.fingerprint
        else:
            self.poolmanager.connection_pool_kw.pop("assert_fingerprint", None)
            if trust is not None and trust.ca_file:
                kwargs["verify"] = str(trust.ca_file)
        return super().send(request, **kwargs)


def is_tls_error(exc: BaseException) -> bool:
    """True when a connection failed on the certificate (not on reachability)."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        name = type(exc).__name__
        if "SSL" in name or "Certificate" in name or "fingerprint" in str(exc).lower():
            return True
        exc = exc.__cause__ or exc.__context__  # type: ignore[assignment]
    return False
