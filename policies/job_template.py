"""The one function every job is submitted as: the researcher renders it, a site accepts nothing else.

Why one text for both wings: ``researcher.job.render`` fills it in, and a site's review
(``datasites.review.codecheck``) compares each submission, and syft's parsed code of it, node for
node with this same text, its name, docstring and job literal left out. Two copies could drift
apart, and a drift refuses every job (or, worse, lets a changed shape through on one side).

The text names the site's runtime module as a string and is never run on the researcher's
machine (its dry run calls ``policies.engine`` directly).
"""

from __future__ import annotations

from typing import Any

RUNTIME_MODULE = "datasites.training.runtime"
RUNTIME_FUNCTION = "run_job"
ARGS = ("data", "weights")

TEMPLATE = f'''def {{name}}({", ".join(ARGS)}):
    """Federated Datasites job {{job_id}}: DP-SGD in the datasite's own runtime."""
    from {RUNTIME_MODULE} import {RUNTIME_FUNCTION}
    return {RUNTIME_FUNCTION}(data=data, weights=weights, job={{job!r}})
'''


def render(name: str, job_id: Any, job: dict[str, Any]) -> str:
    """The exact source of the function named ``name`` that submits ``job``."""
    return TEMPLATE.format(name=name, job_id=job_id, job=job)
