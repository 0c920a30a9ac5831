"""The request cap, the upload registry and the console's per-client delays, without a server."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from datasites.console.sessions import FREE_FAILURES, Sessions, clean_password, delay_after
from datasites.errors import ConfigError
from datasites.review.access import DatasetPolicy, PolicyStore
from datasites.serving.config import SiteDir, init_site
from datasites.serving.limits import (
    FLOOR_BYTES,
    BodyCap,
    Limits,
    MiB,
    effective,
    weights_message_bytes,
    write_limits,
)
from datasites.serving.quota import Uploads


def _run(app, headers: list, chunks: list[bytes]) -> tuple[int, bytes, int]:
    """One request through ``app``; (status, body, bytes the app read)."""
    sent: list[dict] = []
    queue = [
        {"type": "http.request", "body": c, "more_body": i < len(chunks) - 1}
        for i, c in enumerate(chunks)
    ]

    async def receive() -> dict:
        return queue.pop(0) if queue else {"type": "http.disconnect"}

    async def send(message: dict) -> None:
        sent.append(message)

    scope = {"type": "http", "headers": headers}
    asyncio.run(app(scope, receive, send))
    start = next(m for m in sent if m["type"] == "http.response.start")
    body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    return start["status"], body, getattr(app.app, "read", 0)


class _Reader:
    """An app that reads the whole body (as syft does), then answers 200; a failure answers
    500 the way Starlette's error middleware does."""

    read = 0

    async def __call__(self, scope, receive, send) -> None:
        try:
            while True:
                message = await receive()
                self.read += len(message.get("body", b""))
                if not message.get("more_body"):
                    break
        except Exception:
            await send({"type": "http.response.start", "status": 500, "headers": []})
            await send({"type": "http.response.body", "body": b"error"})
            raise
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})


def test_a_declared_length_over_the_cap_is_refused_unread() -> None:
    app = BodyCap(_Reader(), lambda: 100)
    status, body, read = _run(app, [(b"content-length", b"101")], [b"x" * 101])
    assert (status, read) == (413, 0) and b"at most 100 bytes" in body
    assert (
        _run(BodyCap(_Reader(), lambda: 100), [(b"content-length", b"100")], [b"x" * 100])[0] == 200
    )


def test_a_chunked_body_is_cut_at_the_cap() -> None:
    app = BodyCap(_Reader(), lambda: 100)
    status, body, read = _run(app, [], [b"x" * 60] * 10)
    assert status == 413 and read <= 120 and b"at most 100" in body
    assert _run(BodyCap(_Reader(), lambda: 100), [], [b"x" * 50, b"x" * 50])[0] == 200


def test_the_cap_follows_the_largest_model_and_the_admin(tmp_path: Path) -> None:
    site = SiteDir(tmp_path / "s")
    init_site(site.root, "s", 8999)
    assert effective(site).request_bytes == max(FLOOR_BYTES, weights_message_bytes(1_000_000))
    PolicyStore(site.policies_path).set("d", DatasetPolicy(max_parameters=20_000_000))
    big = effective(site)
    assert big.request_bytes == weights_message_bytes(20_000_000) > 20_000_000 * 16 // 3
    assert big.derived_from == 20_000_000
    write_limits(site, Limits(max_request_mb=2, quota_mb=3, quota_objects=5))
    now = effective(site)
    assert (now.request_bytes, now.quota_bytes, now.quota_objects) == (2 * MiB, 3 * MiB, 5)
    assert "name" in site.config_path.read_text()  # the site's own table is kept
    with pytest.raises(ConfigError):
        write_limits(site, Limits(quota_objects=0))


def test_the_upload_registry_holds_a_quota_per_user(tmp_path: Path) -> None:
    uploads = Uploads(tmp_path / "u.db")
    assert uploads.reserve("a", "eve", 60, (2, 100)) is None
    assert "at most 2 objects and 100 bytes" in uploads.reserve("b", "eve", 60, (2, 100))
    assert uploads.reserve("c", "ada", 60, (2, 100)) is None  # another user's own quota
    assert uploads.release(["a", "c"], "eve") == ["a"]  # not ada's upload
    assert uploads.usage("eve") == (0, 0) and uploads.usage("ada") == (1, 60)
    assert uploads.stale(time.time() + 1) == ["c"]
    assert Uploads(tmp_path / "u.db").usage("ada") == (1, 60)  # kept across a restart


def test_delays_grow_per_client_and_the_right_client_gets_in() -> None:
    assert [delay_after(n) for n in range(FREE_FAILURES + 4)][FREE_FAILURES:] == [0, 1, 2, 4]
    assert [delay_after(n, 5.0) for n in range(FREE_FAILURES + 3)][FREE_FAILURES:] == [0, 5, 10]
    with pytest.raises(ValueError, match="first login wait"):
        Sessions("secret", base_delay=0.1)  # guesses at HTTP speed: refused
    sessions = Sessions("secret")
    for _ in range(FREE_FAILURES + 1):
        assert sessions.attempt("guess", "10.0.0.1").sid is None
    assert sessions.attempt("secret", "10.0.0.1").throttled
    assert sessions.attempt("secret\n", "10.0.0.2").sid  # elsewhere; the file's newline too
    device = sessions.new_device()
    assert sessions.attempt("secret", "10.0.0.1", device).sid  # a known device is its own
    assert sessions.attempt("secret", "10.0.0.1", "forged.00").throttled
    assert clean_password("pw\r\n") == "pw" and clean_password(" pw ") == " pw "
