"""Console logins: opaque random session ids held in this process, each with its CSRF token.

The cookie carries only a random id (``secrets.token_urlsafe``); nothing in it is trusted or
decoded. A session ends at logout, after ``IDLE_SECONDS`` unused, or when the console stops.

Failed logins slow down the client that makes them, and only that client (issue 24: a global
lockout let anyone keep the admin out by guessing once a minute). A client is its network
address, or, once it has logged in here, its *device*: an HMAC-signed cookie this process gave
it, so an admin whose browser has logged in before is never slowed by guesses made from the
same address. After ``FREE_FAILURES`` wrong passwords a client waits ``BASE_DELAY`` seconds,
doubling with each further failure up to ``MAX_DELAY``; while it waits, its attempts are refused
unchecked (the right password too), so the password cannot be guessed at HTTP speed.
"""

from __future__ import annotations

import hmac
import secrets
import threading
import time
from dataclasses import dataclass, field
from hashlib import sha256

IDLE_SECONDS = 30 * 60
FREE_FAILURES = 3
BASE_DELAY = 1.0
MAX_DELAY = 15 * 60.0
MAX_CLIENTS = 10_000  # clients remembered; the oldest is forgotten first


@dataclass
class Session:
    csrf: str
    last_seen: float = field(default_factory=time.monotonic)


@dataclass
class _Client:
    failures: int = 0
    wait_until: float = 0.0


@dataclass(frozen=True)
class Attempt:
    """The outcome of one login: a session id, or how long this client must wait."""

    sid: str | None = None
    retry_after: float = 0.0

    @property
    def throttled(self) -> bool:
        return self.retry_after > 0


def delay_after(failures: int, base: float = BASE_DELAY) -> float:
    """Seconds a client waits after its ``failures``-th wrong password in a row, the first
    wait being ``base`` seconds."""
    if failures <= FREE_FAILURES:
        return 0.0
    return min(MAX_DELAY, base * 2 ** (failures - FREE_FAILURES - 1))


def check_delay(seconds: float) -> float:
    """``seconds`` as a first login wait, or ValueError: at least ``BASE_DELAY`` (less lets a
    guesser try passwords at HTTP speed), at most ``MAX_DELAY``."""
    if not BASE_DELAY <= seconds <= MAX_DELAY:
        raise ValueError(
            f"the first login wait must be {BASE_DELAY:g}-{MAX_DELAY:g} s, not {seconds:g}: a"
            " shorter wait lets a guesser try passwords at HTTP speed"
        )
    return seconds


def clean_password(password: str) -> str:
    """The password as typed, less the line end that ``cat admin-password`` or a pasted line
    carries (issue 26); a generated password never ends in whitespace."""
    return password.rstrip("\r\n")


class Sessions:
    def __init__(self, password: str, base_delay: float = BASE_DELAY) -> None:
        """``base_delay``: the first wait, at least ``BASE_DELAY``; a site may ask for longer
        (``datasite console --login-delay``), never for guesses at HTTP speed."""
        self._password = password
        self._base_delay = check_delay(base_delay)
        self._live: dict[str, Session] = {}
        self._clients: dict[str, _Client] = {}
        self._lock = threading.Lock()
        self._device_key = secrets.token_bytes(32)

    def attempt(self, password: str, address: str, device: str | None = None) -> Attempt:
        """Check ``password`` for the client at ``address`` (or its signed ``device`` cookie)."""
        key = self.client_key(address, device)
        with self._lock:
            now = time.monotonic()
            client = self._clients.get(key)
            if client is not None and now < client.wait_until:
                return Attempt(retry_after=client.wait_until - now)
            if not hmac.compare_digest(clean_password(password).encode(), self._password.encode()):
                client = self._clients.pop(key, None) or _Client()
                client.failures += 1
                client.wait_until = now + delay_after(client.failures, self._base_delay)
                self._remember(key, client)
                return Attempt()
            self._clients.pop(key, None)
            sid = secrets.token_urlsafe(32)
            self._live[sid] = Session(secrets.token_urlsafe(32))
            return Attempt(sid=sid)

    def login(self, password: str, address: str = "", device: str | None = None) -> str | None:
        """A new session id for the right password, else None."""
        return self.attempt(password, address, device).sid

    def client_key(self, address: str, device: str | None) -> str:
        """The device, when its cookie is one this process signed; else the address."""
        if device and self._device_ok(device):
            return "device:" + device
        return "address:" + address

    def new_device(self) -> str:
        """A cookie value naming a device that has logged in: ``id.mac``."""
        ident = secrets.token_urlsafe(16)
        return f"{ident}.{self._mac(ident)}"

    def _device_ok(self, device: str) -> bool:
        ident, _, mac = device.partition(".")
        return bool(ident) and hmac.compare_digest(mac.encode(), self._mac(ident).encode())

    def _mac(self, ident: str) -> str:
        return hmac.new(self._device_key, ident.encode(), sha256).hexdigest()

    def _remember(self, key: str, client: _Client) -> None:
        self._clients[key] = client  # re-inserted last: dicts keep insertion order
        while len(self._clients) > MAX_CLIENTS:
            self._clients.pop(next(iter(self._clients)))

    def get(self, sid: str | None) -> Session | None:
        with self._lock:
            session = self._live.get(sid or "")
            if session is None:
                return None
            if time.monotonic() - session.last_seen > IDLE_SECONDS:
                del self._live[sid or ""]
                return None
            session.last_seen = time.monotonic()
            return session

    def logout(self, sid: str | None) -> None:
        with self._lock:
            self._live.pop(sid or "", None)

    @staticmethod
    def csrf_ok(session: Session, token: str | None) -> bool:
        return token is not None and hmac.compare_digest(session.csrf.encode(), token.encode())
