"""A job's plan spelled out for the reviewer: what ``datasite review`` prints beside the code.

Plain Python over ``policies.plan``: the server builds these rows, the CLI only prints them.
"""

from __future__ import annotations

from policies.plan import JobSpec


def plan_rows(job: JobSpec) -> list[list[str]]:
    """The plan's fields, with the algorithms spelled out for the reviewer."""
    plan = job.plan
    algorithm, weights = plan.algorithm, plan.imbalance
    rows = [[k, str(v)] for k, v in plan.to_dict().items()]
    notes = []
    if algorithm.proximal_mu:
        notes.append(
            f"FedProx: pull of {algorithm.proximal_mu:g} toward the global weights, after noise"
        )
    if algorithm.frozen:
        notes.append(
            f"frozen, pinned by digest {str(job.frozen_digest)[:12]}: {', '.join(job.frozen_names)}"
        )
    if plan.aggregation.compression != "none":
        notes.append(
            f"updates leave compressed ({plan.aggregation.compression}); post-processing, "
            "no epsilon"
        )
    if weights.class_weight is not None or weights.pos_weight is not None:
        kind = "class_weight" if weights.class_weight is not None else "pos_weight"
        value = weights.class_weight if weights.class_weight is not None else weights.pos_weight
        source = (
            "from this dataset's published DP class counts"
            if value == "balanced"
            else "numbers the researcher chose"
        )
        notes.append(
            f"{kind} {value} ({source}): scales each row's loss before clipping; no epsilon"
        )
    if plan.metrics.binary:
        notes.append(
            "each round a noised score histogram per class (validation rows) -> recall, "
            "precision, ROC-AUC, PR-AUC; charged as 'scores' at the metric noise"
        )
    if algorithm.personalizes:
        notes.append(
            f"after round {plan.rounds}: {algorithm.personalize_epochs} epoch(s) fine-tuning "
            f"{', '.join(algorithm.personalize_layers)}; the model stays here, its DP metrics "
            "leave"
        )
    return rows + [["algorithm", n] for n in notes]
