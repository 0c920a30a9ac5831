"""TLS between institutions: a site's certificate, and how a client trusts exactly that site.

Both wings use this module. A site serves HTTPS with a certificate given at ``datasite init``
(``--tls-cert/--tls-key``) or made there (``--self-signed``, by :func:`self_signed`, with
``cryptography``). Its SHA-256 fingerprint (of the DER certificate) is printed at init and by
``status``. A client trusts a site either by a CA file or by that pinned fingerprint: :func:`pin`
records it per host and port, and :func:`pinned_session` and :func:`post_once` are HTTP sessions
that verify against it and refuse anything else. Plain ``requests``: each wing's adapter of its
HTTP client (``researcher.syft_adapter``, ``datasites.serving.syft_patches``) routes the client's
connections through them.
"""

from __future__ import annotations

import datetime
import functools
import hashlib
import ipaddress
import ssl
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
    """Trust ``url``'s host and port only as ``trust`` says, in every pinned session."""
    with _LOCK:
        _PINS[_key(url)] = trust


def _key(url: str) -> str:
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    return f"{parts.hostname}:{parts.port or (443 if parts.scheme == 'https' else 80)}"


def trust_for(url: str) -> Trust | None:
    with _LOCK:
        return _PINS.get(_key(url))


def explicit_port(url: str) -> int | None:
    """The port an ``https://`` URL names, if it names one (a client that resolves every
    ``https://`` URL to 443 keeps this one instead)."""
    from urllib.parse import urlsplit

    return urlsplit(url).port if url.startswith("https://") else None


def post_once(url: str, body: bytes, headers: dict[str, str], trust: Trust | None) -> bytes:
    """One POST through a fresh session that verifies ``url`` as ``trust`` says.

    Fresh: a kept-alive connection that the server closed while idle fails the next POST, and a
    POST (a training round) must not be retried blindly. A reply other than 200 is a
    ``requests.ConnectionError``, as a client that cannot get an answer sees it."""
    import requests

    with pinned_session(trust) as once:
        response = once.post(url=url, data=body, headers=headers)
    if response.status_code != 200:
        raise requests.ConnectionError(
            f"Failed to fetch metadata. Response returned with code {response.status_code}"
        )
    content: bytes = response.content
    return content


def pinned_session(trust: Trust | None) -> Any:
    """A ``requests.Session`` whose HTTP and HTTPS connections go through :class:`PinnedAdapter`."""
    import requests

    new = requests.Session()
    adapter = PinnedAdapter(trust)
    new.mount("http://", adapter)
    new.mount("https://", adapter)
    return new


@functools.cache
def _fingerprint_context() -> ssl.SSLContext:
    """The TLS context of every fingerprint-pinned connection, made once per process.

    Why: without a context of its own, urllib3 made one per connection and loaded the system's
    CA bundle into it (``load_default_certs``, about 30 ms here), for a check that pinning
    switches off: the certificate is accepted only by its exact fingerprint, which urllib3
    compares after the handshake whatever the context. ``post_once`` opens a connection per
    training round, and the test process spent 14 of its 93 busy seconds there."""
    from urllib3.util.ssl_ import create_urllib3_context

    context = create_urllib3_context(cert_reqs=ssl.CERT_NONE)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


def _is_refusal(error: BaseException | None) -> bool:
    """A certificate that is not the trusted one: the fingerprint differs or it fails the CA."""
    from urllib3.exceptions import SSLError

    if not isinstance(error, SSLError):  # a server's own words cannot make a failure final
        return False
    cause = error.args[0] if error.args else None
    return "Fingerprints did not match" in str(error) or isinstance(
        cause, ssl.SSLCertVerificationError
    )


@functools.cache
def _retry() -> Any:
    """urllib3's Retry, except that a refused certificate is final at once.

    Why: a certificate that is not the pinned one stays so, and the three retries with backoff
    only made the one-line refusal wait 3 s. Other TLS failures are retried as before: under
    load a handshake can end early (an EOF), and not retrying it cost a round its site."""
    from urllib3.exceptions import MaxRetryError
    from urllib3.util.retry import Retry

    class _Retry(Retry):
        def increment(  # type: ignore[override]
            self, method: str | None = None, url: str | None = None, **kwargs: Any
        ) -> Retry:
            error = kwargs.get("error")
            if _is_refusal(error):
                pool = kwargs.get("_pool")  # urllib3 always passes its pool
                raise MaxRetryError(pool, url or "", error) from error  # type: ignore[arg-type]
            return super().increment(method, url, **kwargs)

    return _Retry


def _adapter_base() -> Any:
    from requests.adapters import HTTPAdapter

    return HTTPAdapter


class PinnedAdapter(_adapter_base()):  # type: ignore[misc]
    """requests' adapter with three read retries but no connect retry (the callers retry a
    round, with backoff, where they mean to), no retry of a refused certificate
    (:class:`_Retry`), and pinned trust.

    A client that passes ``verify=True`` with every request would mean the system CAs; here the
    site's own trust replaces it: its CA file, or no CA check but an exact certificate
    fingerprint (urllib3's ``assert_fingerprint``).
    """

    def __init__(self, trust: Trust | None = None) -> None:
        super().__init__(max_retries=_retry()(total=3, connect=0, backoff_factor=0.5))
        self.trust = trust

    def _trust(self, request: Any) -> Trust | None:
        return self.trust if str(request.url).startswith("https://") else None

    def send(self, request: Any, **kwargs: Any) -> Any:
        trust = self._trust(request)
        if trust is not None and trust.fingerprint:
            kwargs["verify"] = False  # the fingerprint is the check (the pool's arguments)
        elif trust is not None and trust.ca_file:
            kwargs["verify"] = str(trust.ca_file)
        return super().send(request, **kwargs)

    def build_connection_pool_key_attributes(
        self, request: Any, verify: Any, cert: Any = None
    ) -> tuple[dict[str, Any], dict[str, Any]]:
        """The pin goes into the arguments of whichever pool requests picks, the direct one or
        an HTTPS proxy's tunnel. It used to be set on the direct pool manager only, so with
        ``HTTPS_PROXY`` in the environment a pinned session accepted any certificate (red
        team, session 14; ``verify`` is off for a pin, the fingerprint being the check)."""
        host, pool = super().build_connection_pool_key_attributes(request, verify, cert)
        trust = self._trust(request)
        if trust is not None and trust.fingerprint:
            pool["assert_fingerprint"] = trust.fingerprint
            pool["ssl_context"] = _fingerprint_context()
        return host, pool
