"""The admin channel without a server: typed decoding, the token check, the socket's mode, and
the report cache that keeps ``datasite requests`` from rebuilding every report."""

from __future__ import annotations

import json
import socket
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from datasites.serving import channel
from datasites.serving.channel import ChannelError, decode
from datasites.serving.config import SiteDir, init_site


@pytest.fixture
def site(tmp_path: Path) -> SiteDir:
    # a deep path: longer than a Unix socket address may be, as pytest's often are
    deep = tmp_path / ("d" * 60) / ("e" * 60)
    init_site(deep, "s", port=1)
    return SiteDir(deep)


def test_a_call_decodes_only_with_exactly_its_fields_and_types() -> None:
    assert decode(channel.Approve, {"request_id": "ab"}) == channel.Approve("ab", False, "")
    assert decode(channel.BudgetSet, {"researcher": "a", "dataset": "d", "epsilon": 2,
                                      "delta": 1e-5}).epsilon == 2  # fmt: skip
    bad = [
        (channel.Approve, {}),  # missing
        (channel.Approve, {"request_id": "ab", "as_user": "root"}),  # extra
        (channel.Approve, {"request_id": 5}),
        (channel.Approve, {"request_id": "ab", "override": "yes"}),
        (channel.BudgetSet, {"researcher": "a", "dataset": "d", "epsilon": True, "delta": 0.1}),
        (channel.Upload, ["not", "an", "object"]),
    ]
    for cls, data in bad:
        with pytest.raises(ChannelError):
            decode(cls, data)


def test_the_channel_refuses_without_its_token_and_its_socket_is_0600(site: SiteDir) -> None:
    from datasites.serving.channel_server import AdminChannel

    called = []
    opened = AdminChannel(site, lambda: called.append(1))
    try:
        sock = channel.socket_path(site.root)
        assert len(str(sock)) > 108  # bound through /proc/self/fd
        assert sock.is_socket() and (sock.stat().st_mode & 0o777) == 0o600
        assert (channel.token_path(site.root).stat().st_mode & 0o777) == 0o600
        token = channel.token_path(site.root).read_text().strip()
        for raw in (
            b"",
            b"{}",
            json.dumps({"op": "users_list", "args": {}}).encode(),
            json.dumps({"op": "users_list", "token": token[:-1], "args": {}}).encode(),
            json.dumps({"op": "users_list", "token": token + "x", "args": {}}).encode(),
            json.dumps({"op": "__init__", "token": token, "args": {}}).encode(),
            json.dumps({"op": "users_list", "token": token, "args": {"x": 1}}).encode(),
        ):
            reply = opened.handle(raw)
            assert reply["ok"] is False and "result" not in reply, raw
        assert called == []  # no handler ran: nothing reached syft
    finally:
        opened.close()
    assert not channel.socket_path(site.root).exists()
    assert not channel.token_path(site.root).exists()


def test_a_stopped_site_is_one_line_at_once(site: SiteDir) -> None:
    with pytest.raises(channel.SiteDown, match="no datasite answers at"):
        channel.call(site.root, channel.Requests())
    # a stale token and socket (the server was killed): the same line
    channel.token_path(site.root).write_text("t\n")
    stale = socket.socket(socket.AF_UNIX)
    with channel.unix_address(channel.socket_path(site.root)) as address:
        stale.bind(address)
    stale.close()
    with pytest.raises(channel.SiteDown, match="no datasite answers at"):
        channel.call(site.root, channel.Requests())


@dataclass
class _Request:
    id: Any
    code: Any
    status: Any
    deny_reason: str | None = None
    requesting_user_email: str = "ada@uni.edu"
    changes: list = field(default_factory=list)


def _request(n: int) -> _Request:
    return _Request(
        SimpleNamespace(no_dash=f"{n:032x}"),
        SimpleNamespace(code_hash=f"h{n}", service_func_name=f"job{n}"),
        SimpleNamespace(name="PENDING"),
    )


def test_listing_the_queue_builds_each_report_once_until_the_policy_changes(
    site: SiteDir, monkeypatch: pytest.MonkeyPatch
) -> None:
    """20 requests listed three times: 20 reports, not 60; a policy change rebuilds them."""
    from datasites.review import queue as queue_module
    from datasites.review.access import DatasetPolicy, PolicyStore
    from datasites.review.report import PolicyReport
    from datasites.serving import channel_server

    requests = [_request(n) for n in range(20)]
    built: list[str] = []

    def read_item(self: Any, request: Any, assets: Any, used: Any) -> Any:
        built.append(request.id.no_dash)
        return queue_module.ReviewItem(
            request, request.id.no_dash, "c", request.code.code_hash, "ada@uni.edu",
            request.status.name, "def f(): ...", None, PolicyReport(),
        )  # fmt: skip

    monkeypatch.setattr(queue_module, "admin_client", lambda s: SimpleNamespace(requests=requests))
    monkeypatch.setattr(queue_module.ReviewQueue, "_read_item", read_item)
    monkeypatch.setattr(queue_module.ReviewQueue, "_prefetch_code", lambda self, r: None)
    monkeypatch.setattr(queue_module.ReviewQueue, "_asset_datasets", lambda self: {})
    monkeypatch.setattr(queue_module.ReviewQueue, "_audit_new", lambda self, items: None)
    reports: dict = {}
    for _ in range(3):
        items = channel_server._cached_queue(site, reports).items()
    assert len(items) == 20 and len(built) == 20
    # a status read fresh on a cached report
    requests[0].status = SimpleNamespace(name="REJECTED")
    requests[0].deny_reason = "no"
    first = channel_server._cached_queue(site, reports).items()[0]
    assert (first.state, first.deny_reason, len(built)) == ("denied", "no", 20)
    PolicyStore(site.policies_path).set("d", DatasetPolicy(max_rounds=3))
    channel_server._cached_queue(site, reports).items()
    assert len(built) == 40
