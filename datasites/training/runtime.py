"""The site runtime: what a submitted job calls, running inside the datasite's server.

A submission is a thin function ``return run_job(data=data, weights=weights, job={...})``; all
that matters for privacy happens in code the datasite installed: the approval and round check,
the budget reservation, the incoming-weights check here, and DP-SGD in a sandboxed trainer
process (``datasites.training.sandbox``) that builds the model from the job's declarative spec with the
site's own builder. No researcher code is executed anywhere in this package.

Refusals are returned as ``{"status": "refused", "reason": ...}`` rather than raised, because
syft 0.9.5 replaces any exception in user code by a generic message, and the researcher needs
to know *why* (out of budget, rounds used up...).

The function runs only inside a datasite's server, which names its directory once at start
(:func:`serve_site`, from ``datasites.serving.serve``); anywhere else it refuses. A researcher's
dry run does not call it: it runs the same round engine (``policies.engine.mock_round``) directly.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any

from datasites.errors import Refused
from policies.errors import PolicyError
from policies.wire import RoundReply

_SITE: list[Path] = []  # the serving datasite's directory, named once by serve_site


def serve_site(root: Path) -> None:
    """Name the datasite this server process serves: what every job call trains and charges at.

    Called once by the server (``datasites.serving.serve``) before it accepts a connection."""
    _SITE[:] = [Path(root)]


@dataclass(frozen=True)
class CallerCode:
    """The syft UserCode that is calling us, read from syft's own stack frame."""

    code_id: str
    code_hash: str
    mock: bool = False


def run_job(data: Any, weights: str, job: dict[str, Any]) -> RoundReply:
    """Entry point of every submitted job; returns a dict of plain values only."""
    try:
        if not _SITE:
            raise Refused("run_job runs inside a datasite's server only; nothing ran")
        caller = caller_code()
        if caller.mock:
            return {"status": "mock", "reason": "syft's pass over the mock twin: nothing ran"}
        from datasites.training.site_job import run_at_site  # the site half: its database

        return run_at_site(_SITE[0], caller, data, weights, job)
    except (Refused, PolicyError) as exc:
        return {"status": "refused", "reason": str(exc)}


def caller_code() -> CallerCode:
    """Find the approved-code identity in syft's ``execute_byte_code`` frame, or refuse.

    syft 0.9.5 runs approved code twice per call when an input is a twin: on the private data,
    then on the mock (``ActionService._user_code_execute``). The mock pass is recognised by
    its kwargs being that frame's ``mock_kwargs``, and must neither train nor count a round.
    """
    frame: FrameType | None = sys._getframe(1)
    while frame is not None:
        if frame.f_code.co_name == "execute_byte_code" and "code_item" in frame.f_locals:
            item = frame.f_locals["code_item"]
            parent = frame.f_back
            mock_kwargs = parent.f_locals.get("mock_kwargs") if parent is not None else None
            is_mock = mock_kwargs is not None and mock_kwargs is frame.f_locals.get("kwargs")
            return CallerCode(str(item.id), str(item.code_hash), is_mock)
        frame = frame.f_back
    raise Refused("run_job was not called by syft's code execution; refused")
