"""A round's inputs checked and turned into a trainer task, and its reply shaped: the part the
runtime's dry run and the site job share (kept apart from both, so neither imports the other)."""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

from datasites.errors import Refused
from policies.errors import PlanError
from policies.plan import JobSpec, TrainingPlan, check_fits, n_outputs
from policies.privacy import PrivacyPlan
from policies.wire import check_shapes, decode_weights, encode_weights


def table_arrays(frame: pd.DataFrame, target: str) -> tuple[np.ndarray, np.ndarray]:
    """Features (a float32 copy, ours to edit) and target of a table."""
    if target not in frame.columns:
        raise Refused(f"target column {target!r} is not in the data")
    x = frame.drop(columns=[target]).to_numpy(dtype=np.float32, copy=True)
    return x, frame[target].to_numpy()


def prepare_task(
    spec: JobSpec,
    frame: pd.DataFrame,
    target: str,
    weights: str,
    noise_multiplier: float,
    n_classes: int | None,
    split_seed: int,
    scaling: tuple[Any, Any] | None,
    public_rows: int | None = None,
) -> Any:
    """Check the table, the model and the incoming weights; the trainer's task, or Refused."""
    from datasites.training.round_task import RoundTask

    x, y = table_arrays(frame, target)
    outputs = n_outputs(spec.plan.loss, n_classes)
    try:
        check_fits(spec, x.shape[1], outputs)
    except PlanError as exc:
        raise Refused(str(exc)) from exc
    # No check of the private labels here: a refusal that depends on them would answer a question
    # for free (red team). Whether the target holds class codes is published at upload (see
    # site_job); the trainer clamps labels into range, so no row can fail a round.
    if scaling is not None:
        scaling = (list(scaling[0]), list(scaling[1]))
        if len(scaling[0]) != x.shape[1] or len(scaling[1]) != x.shape[1]:
            raise Refused("feature statistics do not match the table's columns")
    incoming = decode_weights(weights, spec.architecture.parameters) if weights else None
    return RoundTask(
        spec.model,
        spec.plan.to_dict(),
        x,
        y,
        split_seed,
        scaling,
        incoming,
        noise_multiplier,
        public_rows,
    )


def release(spec: JobSpec, output: Any, round_no: int) -> dict[str, Any]:
    """The reply: the spec's trainable tensors (checked again), the row count, metrics."""
    check_shapes(output.weights, spec.architecture.parameters)
    return {
        "status": "ok",
        "round": round_no,
        "weights": encode_weights(output.weights),
        "n": output.n,
        "metrics": output.metrics,
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
        "metric_noise_multiplier": privacy.metric_noise_multiplier
        if privacy.metric_releases
        else None,
        "metric_releases": privacy.metric_releases,
    }
