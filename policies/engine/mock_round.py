"""One round on the table given, as a datasite runs it, with no ledger: the researcher's dry run.

A site's round (``datasites.training.site_job``) and this one share every step that touches the
table and the model: ``prepare_task``, ``run_task`` (or ``distributed_step``) and ``release``.
What a site adds around them, the approval, the budget charge and the sandbox, needs the site's
database and is not here. The researcher imports this module directly; it never runs the
submitted job function, whose body only means something inside a datasite.
"""

from __future__ import annotations

import secrets
from dataclasses import replace
from typing import Any

import numpy as np
import pandas as pd

from policies.compression import flatten, unflatten
from policies.engine.distributed import SUM, distributed_step
from policies.engine.prepare import prepare_task, privacy_report, release, table_arrays
from policies.engine.round_task import RoundOutput, RoundTask, run_task
from policies.errors import Refused
from policies.plan import JobSpec
from policies.privacy import PrivacyPlan, job_privacy
from policies.scaling import unpack
from policies.skellam import gradient
from policies.torch_model import build
from policies.wire import RoundReply


def dry_run(data: Any, weights: str, spec: JobSpec, n_classes: int | None = None) -> RoundReply:
    """Run one round exactly as a site would, on the table given (the mock); Refused (a
    ``PolicyError``) says why a site would refuse it."""
    frame = pd.DataFrame(data)
    if spec.target not in frame.columns:
        raise Refused(f"target column {spec.target!r} is not in the data")
    privacy = job_privacy(spec, len(frame))
    scaling: tuple[Any, ...]
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
        scaling,  # (mean, std) or (mean, std, low, high), as at a site
        class_counts=_mock_class_counts(frame[spec.target], n_classes or 2),
        # the mock's labels arrive as the job's codes (researcher.api maps them with the
        # mock's site's published class list, as that site maps its rows)
        site_classes=spec.classes,
    )
    if spec.plan.dp.distributed:
        task, output = _distributed_dry_run(spec, task, privacy)
    else:
        output = run_task(task)
    result, _ = release(spec, output, 1, task.weights)
    result["mode"] = "dry-run"
    result["privacy"] = privacy_report(spec.plan, privacy)
    result["shapes"] = {k: list(v) for k, v in spec.architecture.parameters.items()}
    return result


def _distributed_dry_run(
    spec: JobSpec, task: RoundTask, privacy: PrivacyPlan
) -> tuple[RoundTask, RoundOutput]:
    """A distributed step on the mock alone: its noised sum, taken as the whole federation's,
    applied to the starting weights as the researcher would (``policies.skellam.gradient``)."""
    if task.weights is None:
        model = build(spec.architecture)
        start = {k: v.detach().numpy().copy() for k, v in model.named_parameters()}
        task = replace(task, weights=start)
    assert task.weights is not None
    output = distributed_step(task)
    rows = len(task.features) * float(spec.plan.dp.sample_rate or 0.0)
    step = gradient(output.weights[SUM], privacy.scale, rows) * spec.plan.learning_rate
    trained = unflatten(flatten(task.weights, spec.trainable) - step, spec.trainable)
    weights = {k: np.asarray(v, np.float32) for k, v in trained.items()}
    return task, RoundOutput(weights, output.n, {}, output.timing)


def _mock_class_counts(target: pd.Series[Any], n_classes: int) -> list[float]:
    """Label counts of the table a dry run is given, the public mock: what "balanced" reads
    there (a site reads its published DP counts instead)."""
    codes = pd.to_numeric(target, errors="coerce")
    return [float((codes == k).sum()) for k in range(n_classes)]
