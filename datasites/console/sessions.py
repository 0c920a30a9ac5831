"""Console logins: opaque random session ids held in this process, each with its CSRF token.

The cookie carries only a random id (``secrets.token_urlsafe``); nothing in it is trusted or
decoded. A session ends at logout, after ``IDLE_SECONDS`` unused, or when the console stops.
Failed logins are counted per process: after ``MAX_FAILURES`` the console refuses logins for
``LOCKOUT_SECONDS``, so the admin password cannot be guessed at HTTP speed.
"""

from __future__ import annotations

import hmac
import secrets
import threading
import time
from dataclasses import dataclass, field

IDLE_SECONDS = 30 * 60
MAX_FAILURES = 5
LOCKOUT_SECONDS = 60.0


@dataclass
class Session:
    csrf: str
    last_seen: float = field(default_factory=time.monotonic)


class Sessions:
    def __init__(self, password: str) -> None:
        self._password = password
        self._live: dict[str, Session] = {}
        self._lock = threading.Lock()
        self._failures = 0
        self._locked_until = 0.0

    def login(self, password: str) -> str | None:
        """A new session id for the right password, else None (counted toward the lockout)."""
        with self._lock:
            now = time.monotonic()
            if now < self._locked_until:
                return None
            if not hmac.compare_digest(password.encode(), self._password.encode()):
                self._failures += 1
                if self._failures >= MAX_FAILURES:
                    self._failures, self._locked_until = 0, now + LOCKOUT_SECONDS
                return None
            self._failures = 0
            sid = secrets.token_urlsafe(32)
            self._live[sid] = Session(secrets.token_urlsafe(32))
            return sid

    def locked(self) -> bool:
        return time.monotonic() < self._locked_until

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
