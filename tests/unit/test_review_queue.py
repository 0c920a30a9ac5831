"""Finding one request builds one report.

A report runs the budget's accountant over the researcher's history (seconds once there is
one): ``approve``, ``deny`` and ``review`` used to build every pending request's report to find
one, so each took as long as listing the whole queue (issue 26: 26-56 s for ``approve`` of a
nonexistent id), and the red-team suite's queue lookups grew quadratically.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest

from datasites.errors import ReviewError
from datasites.review.queue import ReviewQueue


class _Queue(ReviewQueue):
    """The queue's own lookup over requests that are only ids; each built report is counted."""

    def __init__(self, ids: list[str]) -> None:  # no site, no syft login
        requests = [SimpleNamespace(id=SimpleNamespace(no_dash=i), changes=[]) for i in ids]
        nothing = SimpleNamespace(get_all=lambda: [])
        self.client = SimpleNamespace(requests=requests, code=nothing, datasets=nothing)
        self.approvals = SimpleNamespace(job_ids=lambda: set())
        self.built: list[str] = []

    def _item(self, request: Any, assets: dict[str, str], used: set[str]) -> Any:
        self.built.append(request.id.no_dash)
        return SimpleNamespace(request_id=request.id.no_dash)

    def _audit_new(self, items: list[Any]) -> None:
        pass


def test_find_builds_the_report_of_the_matching_request_only() -> None:
    queue = _Queue(["aaaa1111", "bbbb2222", "aaab3333"])
    assert queue.find("BBBB").request_id == "bbbb2222"
    assert queue.built == ["bbbb2222"]
    with pytest.raises(ReviewError, match="no request with id 'cccc'"):
        queue.find("cccc")
    assert queue.built == ["bbbb2222"]  # a wrong id costs no report at all
    with pytest.raises(ReviewError, match="ambiguous"):
        queue.find("aaa")
    queue.built.clear()
    assert [i.request_id for i in queue.items()] == ["aaaa1111", "bbbb2222", "aaab3333"]
    assert queue.built == ["aaaa1111", "bbbb2222", "aaab3333"]


def test_a_filter_that_cannot_read_a_request_skips_it() -> None:
    queue = _Queue(["aaaa1111", "bbbb2222"])

    def only_b(request: Any) -> bool:
        if request.id.no_dash.startswith("a"):
            raise AttributeError("code")  # a malformed request: not the one looked for
        return True

    assert [i.request_id for i in queue.items(where=only_b)] == ["bbbb2222"]
    assert queue.built == ["bbbb2222"]
