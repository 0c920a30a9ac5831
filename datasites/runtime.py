"""The site runtime: what a submitted job calls, running inside the datasite's server.

A submission is a thin function ``return run_job(data=data, weights=weights, job={...})``; all
that matters for privacy happens here, in code the datasite installed: the approval and round
check, the budget reservation, DP-SGD with Opacus, and validation of what leaves.

Refusals are returned as ``{"status": "refused", "reason": ...}`` rather than raised, because
syft 0.9.5 replaces any exception in user code by a generic message, and the researcher needs
to know *why* (out of budget, rounds used up...).

Outside a datasite (``FEDSITE_DIR`` unset) the same function is a dry run on whatever table it is
given, which is how ``researcher try`` runs the exact site code path on the mock.
"""

from __future__ import annotations

import hashlib
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from torch import nn

from policies.codecheck import check_model_source
from policies.errors import PolicyError
from policies.plan import JobSpec, TrainingPlan, training_rows, validation_rows
from policies.privacy import PrivacyPlan, privacy_plan
from policies.wire import check_shapes, decode_weights, encode_weights

SITE_DIR_ENV = "FEDSITE_DIR"


class Refused(Exception):
    """A call the runtime will not run; the message is safe to show the researcher."""


@dataclass(frozen=True)
class CallerCode:
    """The syft UserCode that is calling us, read from syft's own stack frame."""

    code_id: str
    code_hash: str
    mock: bool = False


def run_job(data: Any, weights: str, job: dict[str, Any]) -> dict[str, Any]:
    """Entry point of every submitted job; returns a dict of plain values only."""
    site_dir = os.environ.get(SITE_DIR_ENV)
    try:
        if not site_dir:
            return dry_run(data, weights, JobSpec.from_dict(job))
        caller = caller_code()
        if caller.mock:
            return {"status": "mock", "reason": "syft's pass over the mock twin: nothing ran"}
        from datasites.site_job import run_at_site  # the site half needs the site's database

        return run_at_site(Path(site_dir), caller, data, weights, job)
    except (Refused, PolicyError) as exc:
        return {"status": "refused", "reason": str(exc)}


def caller_code() -> CallerCode:
    """Find the approved-code identity in syft's ``execute_byte_code`` frame, or refuse.

    syft 0.9.5 runs approved code twice per call when an input is a twin: on the private data,
    then on the mock (``ActionService._user_code_execute``). The mock pass is recognised by
    its kwargs being that frame's ``mock_kwargs``, and must neither train nor count a round.
    """
    frame = sys._getframe(1)
    while frame is not None:
        if frame.f_code.co_name == "execute_byte_code" and "code_item" in frame.f_locals:
            item = frame.f_locals["code_item"]
            parent = frame.f_back
            mock_kwargs = parent.f_locals.get("mock_kwargs") if parent is not None else None
            is_mock = mock_kwargs is not None and mock_kwargs is frame.f_locals.get("kwargs")
            return CallerCode(str(item.id), str(item.code_hash), is_mock)
        frame = frame.f_back
    raise Refused("run_job was not called by syft's code execution; refused")


def build_model(spec: JobSpec, n_features: int, n_outputs: int) -> nn.Module:
    """Execute the model source (already statically checked) and call its factory."""
    findings = check_model_source(spec.model_source)
    if findings:
        raise Refused(f"model code refused: {findings[0]}")
    namespace: dict[str, Any] = {"__name__": "fedsite_model"}
    exec(compile(spec.model_source, "<model>", "exec"), namespace)  # noqa: S102
    factory = namespace.get(spec.model_factory)
    if not callable(factory):
        raise Refused(f"model code defines no function {spec.model_factory!r}")
    model = factory(n_features, n_outputs)
    if not isinstance(model, nn.Module):
        raise Refused(f"{spec.model_factory} did not return a torch nn.Module")
    return model


def n_outputs(y: np.ndarray, loss: str) -> int:
    return int(y.max()) + 1 if loss == "cross_entropy" and len(y) else 1


Scaling = tuple[np.ndarray, np.ndarray] | None


def split(
    frame: pd.DataFrame, target: str, fraction: float, seed: str, scaling: Scaling = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """A deterministic train/validation split (same job -> same split every round).

    With ``scaling`` = (mean, std) per feature, features are standardised first.
    """
    if target not in frame.columns:
        raise Refused(f"target column {target!r} is not in the data")
    x = frame.drop(columns=[target]).to_numpy(dtype=np.float32, copy=True)  # ours to edit
    if scaling is not None:
        mean, std = (np.asarray(v, dtype=np.float32) for v in scaling)
        if mean.shape != (x.shape[1],) or std.shape != (x.shape[1],):
            raise Refused("feature statistics do not match the table's columns")
        x -= mean
        x /= np.where(std > 0, std, np.float32(1.0))
    y = frame[target].to_numpy()
    rng = np.random.default_rng(int(hashlib.sha256(seed.encode()).hexdigest()[:15], 16))
    val = rng.permutation(len(frame))[: validation_rows(len(frame), fraction)]
    if len(val) == 0:  # no copy of a large table for an empty validation split
        return x, y, x[:0], y[:0]
    train = np.ones(len(frame), dtype=bool)
    train[val] = False
    # training rows stay in table order: Poisson sampling draws them uniformly either way
    return x[train], y[train], x[val], y[val]


def train_round(
    spec: JobSpec,
    frame: pd.DataFrame,
    target: str,
    weights: str,
    privacy: PrivacyPlan,
    round_no: int,
    scaling: Scaling = None,
    secure_mode: bool = False,
) -> dict[str, Any]:
    """One round of DP-SGD from the given global weights; returns the validated update."""
    from datasites.training import evaluate, load_numpy, state_to_numpy, train_dp

    plan = spec.plan
    scaling = scaling if plan.standardize else None
    x, y, xv, yv = split(frame, target, plan.validation_fraction, spec.job_id, scaling)
    model = build_model(spec, x.shape[1], n_outputs(np.concatenate([y, yv]), plan.loss))
    expected = {k: v.shape for k, v in state_to_numpy(model).items()}
    before: dict[str, float] = {}
    if weights:
        incoming = decode_weights(weights)
        check_shapes(incoming, expected)
        load_numpy(model, incoming)
        before = evaluate(model, xv, yv, plan.loss)  # the global model, on this site's val split
    seed = int(hashlib.sha256(f"{spec.job_id}:{round_no}".encode()).hexdigest()[:8], 16)
    started = time.perf_counter()
    result = train_dp(model, x, y, plan, privacy.noise_multiplier, seed, secure_mode)
    train_seconds = time.perf_counter() - started
    check_shapes(result.weights, expected)  # only the declared model's tensors may leave
    load_numpy(model, result.weights)
    metrics = {
        "train_loss": result.train_loss,
        "steps": float(result.steps),
        "train_seconds": train_seconds,
    }
    metrics.update({f"val_{k}": v for k, v in evaluate(model, xv, yv, plan.loss).items()})
    metrics.update({f"global_val_{k}": v for k, v in before.items()})
    return {
        "status": "ok",
        "round": round_no,
        "weights": encode_weights(result.weights),
        "n": int(len(x)),
        "metrics": metrics,
    }


def privacy_report(plan: TrainingPlan, privacy: PrivacyPlan) -> dict[str, Any]:
    return {
        "accountant": plan.accountant,
        "noise_multiplier": privacy.noise_multiplier,
        "sample_rate": privacy.sample_rate,
        "steps": privacy.steps_per_round * privacy.rounds,
        "steps_per_round": privacy.steps_per_round,
        "delta": plan.delta,
        "epsilon_job": privacy.epsilon_job,
    }


def dry_run(data: Any, weights: str, spec: JobSpec) -> dict[str, Any]:
    """Run one round exactly as a site would, on the table given (the mock), with no ledger."""
    frame = pd.DataFrame(data)
    if spec.target not in frame.columns:
        raise Refused(f"target column {spec.target!r} is not in the data")
    privacy = privacy_plan(spec.plan, training_rows(len(frame), spec.plan))
    if spec.scaling:
        scaling = (spec.scaling["mean"], spec.scaling["std"])
    else:
        features = frame.drop(columns=[spec.target])
        scaling = (features.mean().to_numpy(), features.std(ddof=0).to_numpy())
    result = train_round(spec, frame, spec.target, weights, privacy, 1, scaling)
    result["mode"] = "dry-run"
    result["privacy"] = privacy_report(spec.plan, privacy)
    shapes = {k: list(v.shape) for k, v in decode_weights(result["weights"]).items()}
    result["shapes"] = shapes
    return result
