"""Logged-in syft clients of this process, by (url, email, password digest).

A syft login fetches the whole API (about 1.5 s here); one process that runs several admin
commands (a test, a script) reuses them. Kept apart from ``admin`` so that ``process`` can
forget a site's sessions when it starts or stops that site, without importing syft.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from typing import Any

_SESSIONS: dict[tuple[str, str, str], Any] = {}


def session(url: str, email: str, password: str, login: Callable[[], Any]) -> Any:
    """The cached client for these credentials, or ``login()``'s, cached."""
    key = (url, email, hashlib.sha256(password.encode()).hexdigest())
    if key not in _SESSIONS:
        _SESSIONS[key] = login()
    return _SESSIONS[key]


def forget(url: str) -> None:
    """Drop this process's clients of ``url`` (its server started or stopped)."""
    for key in [k for k in _SESSIONS if k[0] == url]:
        _SESSIONS.pop(key, None)
