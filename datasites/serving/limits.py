"""Request and storage limits of the datasite's syft server (issue 24, items 3 and 4).

syft 0.9.5 reads a whole request body into memory and deserialises it before any check of ours
can run, and uvicorn starts with no body limit: one 150 MB ``weights`` string cost the server
~900 MB. So the server's app is syft's, wrapped in :class:`BodyCap`: a body over the cap is
refused with 413 before syft sees a byte of it, by its ``Content-Length`` or, for a chunked
body, as soon as the chunks received pass the cap.

The cap is sized from the largest model the site's policies allow (a weights message is a
base64 ``.npz``: ~16/3 bytes a parameter), never below :data:`FLOOR_BYTES` (the admin's own
upload of a dataset's mock twin goes through syft), and the admin may set it:
``datasite limits set --max-request-mb N``. It is read again when ``site.toml`` or
``policies.json`` changes, so a new limit holds without a restart.
"""

from __future__ import annotations

import json
import os
import tomllib
from collections.abc import Awaitable, Callable, MutableMapping
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import tomli_w

from datasites.errors import ConfigError
from datasites.serving.config import SiteDir

MiB = 2**20
FLOOR_BYTES = 16 * MiB  # the mock twin of --mock-rows 1000 over 300 columns still fits
MARGIN_BYTES = 1 * MiB  # syft's envelope of a call, per-tensor npz headers, a secure-agg wrapper
DEFAULT_QUOTA_OBJECTS = 8
LIMITS_TABLE = "limits"
SITE_DIR_ENV = "FEDSITE_DIR"  # set by serve (its SITE_DIR_ENV) before uvicorn calls the factory


@dataclass(frozen=True)
class Limits:
    """What the admin set; 0 means "derived from the policies"."""

    max_request_mb: float = 0.0
    quota_mb: float = 0.0  # bytes a researcher's uploads may hold at once
    quota_objects: int = DEFAULT_QUOTA_OBJECTS  # uploads a researcher may hold at once

    def validate(self) -> None:
        if not (0 <= self.max_request_mb <= 4096 and 0 <= self.quota_mb <= 65536):
            raise ConfigError("max_request_mb must be in [0, 4096], quota_mb in [0, 65536]")
        if not 1 <= self.quota_objects <= 10_000:
            raise ConfigError("quota_objects must be in [1, 10000]")


def read_limits(site: SiteDir) -> Limits:
    try:
        data = tomllib.loads(site.config_path.read_text()).get(LIMITS_TABLE, {})
        limits = Limits(**{f.name: data[f.name] for f in fields(Limits) if f.name in data})
    except (OSError, tomllib.TOMLDecodeError, TypeError) as exc:
        raise ConfigError(f"{site.config_path}: cannot read its [limits]: {exc}") from exc
    limits.validate()
    return limits


def write_limits(site: SiteDir, limits: Limits) -> None:
    """Replace site.toml's ``[limits]`` table atomically; the rest is kept as it is."""
    limits.validate()
    data = tomllib.loads(site.config_path.read_text())
    data[LIMITS_TABLE] = asdict(limits)
    tmp = site.config_path.with_name(site.config_path.name + ".tmp")
    tmp.write_text(tomli_w.dumps(data))
    os.replace(tmp, site.config_path)


def largest_model(site: SiteDir) -> int:
    """Parameters of the largest model any dataset's policy (or the default policy) allows."""
    from datasites.review.access import DatasetPolicy

    biggest = DatasetPolicy().max_parameters
    if site.policies_path.exists():
        raw = json.loads(site.policies_path.read_text())
        for policy in raw.values():
            biggest = max(biggest, int(policy.get("max_parameters", biggest)))
    return biggest


def weights_message_bytes(parameters: int) -> int:
    """The longest honest weights message for a model of ``parameters``, with syft's envelope."""
    from policies.wire import max_encoded_length

    return max_encoded_length({"w": (parameters,)}) + MARGIN_BYTES


@dataclass(frozen=True)
class Effective:
    request_bytes: int
    quota_bytes: int
    quota_objects: int
    derived_from: int  # parameters of the largest model allowed

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def effective(site: SiteDir) -> Effective:
    """The limits in force: the admin's, else derived from the policies."""
    limits = read_limits(site)
    params = largest_model(site)
    message = weights_message_bytes(params)
    request = int(limits.max_request_mb * MiB) or max(FLOOR_BYTES, message)
    quota = int(limits.quota_mb * MiB) or 2 * message
    return Effective(request, quota, limits.quota_objects, params)


class _Cached:
    """``effective(site)``, read again only when site.toml or policies.json changes."""

    def __init__(self, site: SiteDir) -> None:
        self._site = site
        self._stamp: tuple[float, ...] | None = None
        self._value: Effective | None = None

    def __call__(self) -> Effective:
        stamp = tuple(
            p.stat().st_mtime_ns if p.exists() else 0
            for p in (self._site.config_path, self._site.policies_path)
        )
        if stamp != self._stamp or self._value is None:
            self._value, self._stamp = effective(self._site), stamp
        return self._value


Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]


class _TooLarge(Exception):
    pass


class BodyCap:
    """ASGI middleware: a request body over ``cap()`` bytes is answered 413, unread."""

    def __init__(self, app: Any, cap: Callable[[], int]) -> None:
        self.app = app
        self.cap = cap

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.cap()
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > limit):
            await _refuse(send, limit, int(declared) if declared.isdigit() else None)
            return
        seen = 0
        over = False
        started = False

        async def counted() -> Message:
            nonlocal seen, over
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    over = True
                    raise _TooLarge
            return message

        async def guarded(message: Message) -> None:
            nonlocal started
            if over:  # syft's error handler answering our own exception: ours answers
                return
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counted, guarded)
        except _TooLarge:
            pass
        except Exception:
            if not over:
                raise
        if over and not started:
            await _refuse(send, limit, None)


async def _refuse(send: Send, limit: int, size: int | None) -> None:
    what = f"{size} bytes" if size is not None else "over the limit"
    body = (
        f"request body {what}: this datasite accepts at most {limit} bytes a request "
        "(its admin sets it: datasite limits set --max-request-mb)"
    ).encode()
    await send(
        {
            "type": "http.response.start",
            "status": 413,
            "headers": [
                (b"content-type", b"text/plain; charset=utf-8"),
                (b"content-length", str(len(body)).encode()),
                (b"connection", b"close"),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


def cached(site: SiteDir) -> Callable[[], Effective]:
    return _Cached(site)


def app_factory() -> Any:
    """syft's FastAPI app behind the body cap; uvicorn's factory in ``serve``."""
    from syft.server.uvicorn import app_factory as syft_app

    site = SiteDir(Path(os.environ[SITE_DIR_ENV]))
    current = _Cached(site)
    return BodyCap(syft_app(), lambda: current().request_bytes)
