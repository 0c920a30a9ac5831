"""The site runtime: what a submitted job calls, running inside the datasite's server.

A submission is a thin function ``return run_job(data=data, weights=weights, job={...})``; all
that matters for privacy happens in code the datasite installed: the approval and round check,
the budget reservation, the incoming-weights check here, and DP-SGD in a sandboxed trainer
process (``datasites.training.sandbox``) that builds the model from the job's declarative spec with the
site's own builder. No researcher code is executed anywhere in this package.

Refusals are returned as ``{"status": "refused", "reason": ...}`` rather than raised, because
syft 0.9.5 replaces any exception in user code by a generic message, and the researcher needs
to know *why* (out of budget, rounds used up...).

Outside a datasite (``FEDSITE_DIR`` unset) the same function is a dry run on whatever table it is
given, which is how ``researcher try`` runs the exact site code path on the mock.
"""

from __future__ import annotations

import os
import secrets
import sys
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any

import numpy as np
import pandas as pd

from datasites.errors import Refused
from datasites.training.prepare import prepare_task, privacy_report, release, table_arrays
from policies.errors import PolicyError, WireError
from policies.plan import JobSpec
from policies.privacy import job_privacy
from policies.scaling import unpack
from policies.wire import RoundReply, TrainRound, decode_call

SITE_DIR_ENV = "FEDSITE_DIR"


@dataclass(frozen=True)
class CallerCode:
    """The syft UserCode that is calling us, read from syft's own stack frame."""

    code_id: str
    code_hash: str
    mock: bool = False


def run_job(data: Any, weights: str, job: dict[str, Any]) -> RoundReply:
    """Entry point of every submitted job; returns a dict of plain values only.

    ``weights`` is syft's one string argument: an encoded ``policies.wire.RoundCall`` (a
    training round's weights, a replay, or a secure-aggregation phase), decoded once by the
    half that runs (``dry_run`` here, ``site_job.run_at_site`` at a site)."""
    site_dir = os.environ.get(SITE_DIR_ENV)
    try:
        if not site_dir:
            return dry_run(data, weights, JobSpec.from_dict(job))
        caller = caller_code()
        if caller.mock:
            return {"status": "mock", "reason": "syft's pass over the mock twin: nothing ran"}
        from datasites.training.site_job import run_at_site  # the site half: its database

        return run_at_site(Path(site_dir), caller, data, weights, job)
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


def dry_run(data: Any, weights: str, spec: JobSpec, n_classes: int | None = None) -> RoundReply:
    """Run one round exactly as a site would, on the table given (the mock), with no ledger."""
    from datasites.training.round_task import run_task

    try:
        call = decode_call(weights, spec.architecture.parameters)
    except WireError as exc:
        raise Refused(f"the call is not a round message: {exc}") from exc
    match call:
        case TrainRound(weights=blob):
            weights = blob
        case _:  # a replay or a secure phase needs a site's store and keys
            raise Refused("a dry run trains one plain round; nothing else is run on a mock")
    frame = pd.DataFrame(data)
    if spec.target not in frame.columns:
        raise Refused(f"target column {spec.target!r} is not in the data")
    privacy = job_privacy(spec, len(frame))
    if spec.scaling:  # the federation's, range included: the inputs every site trains on
        scaling = tuple(v for v in unpack(spec.scaling) if v is not None)
    else:
        features, _ = table_arrays(frame, spec.target, spec.layout)  # one-hot, as a site does
        scaling = (features.mean(axis=0).tolist(), features.std(axis=0).tolist())
    if n_classes is None and spec.plan.loss == "cross_entropy":
        # the model's own width: a mock may lack a rare class (its noisy count fell to zero);
        # at a site the published class count decides
        n_classes = int(spec.architecture.output[-1])
    task = prepare_task(
        spec,
        frame,
        spec.target,
        weights,
        privacy.noise_multiplier,
        n_classes,
        secrets.randbits(63),
        scaling,
        class_counts=_mock_class_counts(frame[spec.target], n_classes or 2),
        # the mock's labels arrive as the job's codes (researcher.api maps them with the
        # mock's site's published class list, as that site maps its rows)
        site_classes=spec.classes,
    )
    if spec.plan.distributed:
        task, output = _distributed_dry_run(spec, task, privacy)
    else:
        output = run_task(task)
    result, _ = release(spec, output, 1, task.weights)
    result["mode"] = "dry-run"
    result["privacy"] = privacy_report(spec.plan, privacy)
    result["shapes"] = {k: list(v) for k, v in spec.architecture.parameters.items()}
    return result


def _distributed_dry_run(spec: JobSpec, task: Any, privacy: Any) -> tuple[Any, Any]:
    """A distributed step on the mock alone: its noised sum, taken as the whole federation's,
    applied to the starting weights as the researcher would (``policies.skellam.gradient``)."""
    from dataclasses import replace

    from datasites.training.distributed import SUM, distributed_step
    from datasites.training.round_task import RoundOutput
    from policies.compression import flatten, unflatten
    from policies.skellam import gradient
    from policies.torch_model import build

    if task.weights is None:
        model = build(spec.architecture)
        start = {k: v.detach().numpy().copy() for k, v in model.named_parameters()}
        task = replace(task, weights=start)
    output = distributed_step(task)
    rows = len(task.features) * float(spec.plan.sample_rate or 0.0)
    step = gradient(output.weights[SUM], privacy.scale, rows) * spec.plan.learning_rate
    trained = unflatten(flatten(task.weights, spec.trainable) - step, spec.trainable)
    weights = {k: np.asarray(v, np.float32) for k, v in trained.items()}
    return task, RoundOutput(weights, output.n, {}, output.timing)


def _mock_class_counts(target: pd.Series, n_classes: int) -> list[float]:
    """Label counts of the table a dry run is given, the public mock: what "balanced" reads
    there (a site reads its published DP counts instead)."""
    codes = pd.to_numeric(target, errors="coerce")
    return [float((codes == k).sum()) for k in range(n_classes)]
