"""A round's inputs checked and turned into a trainer task, and its reply shaped: the part the
runtime's dry run and the site job share (kept apart from both, so neither imports the other)."""

from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt
import pandas as pd

from policies import imbalance
from policies.compression import compress
from policies.errors import PlanError, Refused
from policies.labels import check_site as check_site_classes
from policies.labels import counts_to_job, site_to_job
from policies.layout import align_stats, check_site, features, width
from policies.plan import JobSpec, TrainingPlan, check_fits, class_count, n_outputs, select
from policies.privacy import PrivacyPlan
from policies.scaling import published_ranges, unpack
from policies.wire import (
    RoundReply,
    Weights,
    check_shapes,
    decode_weights,
    encode_weights,
    frozen_digest,
)


def table_arrays(
    frame: pd.DataFrame, target: str, layout: dict[str, Any] | None = None
) -> tuple[npt.NDArray[Any], npt.NDArray[Any]]:
    """Features (a float32 copy, ours to edit) and target of a table; categorical columns
    one-hot encoded to the job's federation-wide ``layout`` (``policies.layout.features``, the
    encoding the researcher's ``--test`` rows get too)."""
    try:
        return features(frame, target, layout), frame[target].to_numpy()
    except PlanError as exc:
        raise Refused(str(exc)) from exc


def site_scaling(spec: JobSpec, meta: dict[str, Any]) -> tuple[Any, ...] | None:
    """The standardisation a site applies: (mean, std, low, high) per input. The job's
    federation-wide one, else this dataset's published statistics, moved onto the job's layout;
    a job that carries no range is clamped to this dataset's published one (``policies.scaling``:
    with the range, no published statistic can blow an input up). Refused, from the published
    schema alone, when the layout does not cover this dataset's columns and categories."""
    if spec.layout is not None:
        try:
            check_site(spec.layout, meta)
        except PlanError as exc:
            raise Refused(str(exc)) from exc
        _check_encoded_size(spec.layout, meta)
    own = published_ranges(meta, spec.layout)
    if spec.scaling:
        mean, std, low, high = unpack(spec.scaling)
        if low is None and own is not None:
            low, high = own
        return (mean, std, low, high) if low is not None else (mean, std)
    if "feature_mean" not in meta:
        return None
    mean, std = (
        align_stats(meta, spec.layout)
        if spec.layout is not None
        else (
            meta["feature_mean"],
            meta["feature_std"],
        )
    )
    return (mean, std, *own) if own is not None else (mean, std)


# Encoding to the layout happens in the server process, before the trainer's memory limit
# applies (red team: a layout padded to 20,000 inputs would have needed 160 GB for 1M rows).
MAX_ENCODED_BYTES = 2 * 2**30
ENCODED_BYTES_PER_VALUE = 8  # float32, and one copy while it is built


def _check_encoded_size(layout: dict[str, Any], meta: dict[str, Any]) -> None:
    """Refuse a layout whose encoding of this dataset would not fit, from the published row
    count (never the private one) and the layout's width."""
    rows = meta.get("rows")
    need = int(rows or 0) * width(layout) * ENCODED_BYTES_PER_VALUE
    if need > MAX_ENCODED_BYTES:
        raise Refused(
            f"the job's layout is {width(layout)} inputs wide: encoding this dataset to it "
            f"would take {need / 2**30:.1f} GiB, past the site's {MAX_ENCODED_BYTES / 2**30:.0f}"
            " GiB; nothing ran"
        )


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
    personalize: bool = False,
    class_counts: list[float] | None = None,
    site_classes: list[str] | None = None,
) -> Any:
    """Check the table, the model and the incoming weights; the trainer's task, or Refused.

    ``personalize``: the job's fine-tuning pass after its last round, which trains only the
    plan's ``personalize_layers`` for ``personalize_epochs``. ``class_counts``: the dataset's
    published (DP) counts per class, from which a "balanced" weight is computed; never the
    private labels'. ``site_classes``: this dataset's published class list, the labels its
    stored codes stand for (``job_labels``).
    """
    from policies.engine.round_task import RoundTask

    x, y = table_arrays(frame, target, spec.layout)
    y, class_counts = job_labels(spec, y, site_classes, class_counts)
    outputs = n_outputs(spec.plan.loss, class_count(spec, n_classes))
    try:
        check_fits(spec, x.shape[1], outputs)
    except PlanError as exc:
        raise Refused(str(exc)) from exc
    # No check of the private labels here: a refusal that depends on them would answer a question
    # for free (red team). Whether the target holds class codes is published at upload (see
    # site_job); the trainer clamps labels into range, so no row can fail a round.
    if scaling is not None:
        scaling = tuple(list(v) for v in scaling)  # type: ignore[assignment]
        if any(len(v) != x.shape[1] for v in scaling):
            raise Refused("feature statistics do not match the table's columns")
    incoming = decode_weights(weights, spec.architecture.parameters) if weights else None
    _check_frozen(spec, incoming)
    try:
        plan = imbalance.resolve(spec.plan, class_counts).to_dict()
    except PlanError as exc:
        raise Refused(str(exc)) from exc
    frozen = tuple(spec.frozen_names)
    if personalize:
        tuned = set(
            select(list(spec.architecture.parameters), spec.plan.algorithm.personalize_layers)
        )
        frozen = tuple(n for n in spec.architecture.parameters if n not in tuned)
        plan["local_epochs"] = spec.plan.algorithm.personalize_epochs
    return RoundTask(
        spec.model,
        plan,
        x,
        y,
        split_seed,
        scaling,
        incoming,
        noise_multiplier,
        public_rows,
        frozen,
    )


def job_labels(
    spec: JobSpec,
    y: npt.NDArray[Any],
    site_classes: list[str] | None,
    class_counts: list[float] | None,
) -> tuple[npt.NDArray[Any], list[float] | None]:
    """The target and the published class counts in the job's label space.

    A job that carries a class list (``policies.labels``) has every site's codes mapped into
    it, and the counts moved with them; Refused, from the published schema alone, when the list
    lacks one of this dataset's classes. A job without one trains this dataset's own codes, as
    before the label space existed.
    """
    if spec.classes is None:
        return y, class_counts
    if site_classes is None:
        raise Refused(
            "the job names classes but this dataset publishes no class list for its target; "
            "nothing ran"
        )
    try:
        own = check_site_classes(spec.classes, {"classes": site_classes})
        return site_to_job(y, own, spec.classes), counts_to_job(class_counts, own, spec.classes)
    except PlanError as exc:
        raise Refused(str(exc)) from exc


def _check_frozen(spec: JobSpec, incoming: Weights | None) -> None:
    """Frozen layers must arrive as the job's initial weights had them, every round."""
    if not spec.plan.algorithm.frozen:
        return
    if incoming is None:
        raise Refused("a job with frozen layers must send its weights; nothing ran")
    if frozen_digest(incoming, spec.frozen_names) != spec.frozen_digest:
        raise Refused(
            "the frozen layers differ from the job's approved initial weights; nothing ran"
        )


def release(
    spec: JobSpec,
    output: Any,
    round_no: int,
    incoming: Weights | None = None,
    residual: npt.NDArray[Any] | None = None,
) -> tuple[RoundReply, npt.NDArray[Any] | None]:
    """The reply, and the top-k residual to keep for the job's next round (or None).

    The reply holds the spec's trainable tensors (checked again; frozen ones never leave) as
    float32 weights, or, under the plan's ``compression``, the update from ``incoming``
    compressed (``policies.compression``: post-processing of the DP release), with the row
    count and the metrics.
    """
    trainable = spec.trainable
    check_shapes(output.weights, trainable)
    reply: RoundReply = {"status": "ok", "round": round_no, "n": output.n}
    left = None
    if spec.plan.aggregation.compression == "none":
        reply["weights"] = encode_weights(output.weights)
    else:
        base = incoming or {n: np.zeros(s, np.float32) for n, s in trainable.items()}
        delta = {n: output.weights[n] - base[n] for n in trainable}
        reply["update"], left = compress(
            delta,
            trainable,
            spec.plan.aggregation.compression,
            spec.plan.aggregation.topk_fraction,
            residual,
        )
        reply["compression"] = spec.plan.aggregation.compression.value
    reply["metrics"] = output.metrics
    return reply, left


def privacy_report(plan: TrainingPlan, privacy: PrivacyPlan) -> dict[str, Any]:
    # a Skellam run is accounted in RDP whatever the plan names (policies.accounting)
    distributed = {"mechanism": "skellam", "l2": privacy.l2, "l1": privacy.l1}
    return {
        "accountant": "rdp" if plan.dp.distributed else plan.dp.accountant.value,
        **(distributed if plan.dp.distributed else {}),
        "noise_multiplier": privacy.noise_multiplier,
        "sample_rate": privacy.sample_rate,
        "steps": privacy.mechanism.steps,
        "steps_per_round": privacy.steps_per_round,
        "delta": plan.dp.delta,
        "epsilon_job": privacy.epsilon_job,
        "metric_noise_multiplier": privacy.metric_noise_multiplier
        if privacy.metric_releases
        else None,
        "metric_releases": privacy.metric_releases,
        "score_releases": privacy.score_releases,
    }
