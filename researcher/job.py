"""Defining a training job, and rendering it as the function a datasite will run.

A JOB.py file is plain model code with two constants::

    import torch.nn as nn

    DATASET = "cancer"
    PLAN = {"rounds": 5, "batch_size": 64, "learning_rate": 0.5, "target_epsilon": 3.0}

    def make_model(n_features: int, n_outputs: int) -> nn.Module:
        return nn.Sequential(nn.Linear(n_features, 32), nn.ReLU(), nn.Linear(32, n_outputs))

The whole file travels as the model source, so it may import only what the datasites allow
(torch, math, numpy...). The submitted function itself is always the same three lines.
"""

from __future__ import annotations

import ast
import importlib.util
import sys
import tempfile
import uuid
from pathlib import Path
from typing import Any

from policies.errors import PlanError
from policies.plan import JobSpec, TrainingPlan
from researcher.errors import JobError

TEMPLATE = '''def {name}(data, weights):
    """Federated Datasites job {job_id}: DP-SGD in the datasite's own runtime."""
    from datasites.runtime import run_job
    return run_job(data=data, weights=weights, job={job!r})
'''


def make_job(
    model_source: str,
    dataset: str,
    target: str,
    plan: TrainingPlan | dict,
    name: str = "fedsite_job",
    model_factory: str = "make_model",
) -> JobSpec:
    """Build a job from model source text and a plan (a TrainingPlan or its dict)."""
    try:
        if isinstance(plan, dict):
            plan = TrainingPlan.from_dict(plan)
        job_id = uuid.uuid4().hex
        # syft looks functions up by name, so each job's function name is unique
        return JobSpec(
            name=f"{name}_{job_id[:8]}",
            dataset=dataset,
            target=target,
            model_source=model_source,
            plan=plan,
            model_factory=model_factory,
            job_id=job_id,
        )
    except PlanError as exc:
        raise JobError(str(exc)) from exc


def load_job_file(path: Path, target: str, name: str | None = None) -> JobSpec:
    """Read DATASET and PLAN from JOB.py without running it, and use the file as model source."""
    path = Path(path)
    try:
        source = path.read_text()
    except OSError as exc:
        raise JobError(f"cannot read job file {path}: {exc.strerror}") from exc
    constants = _constants(source, path)
    for key in ("DATASET", "PLAN"):
        if key not in constants:
            raise JobError(f"{path} must define {key} as a literal")
    return make_job(
        source,
        constants["DATASET"],
        target,
        constants["PLAN"],
        name=name or f"job_{path.stem}".replace("-", "_"),
    )


def _constants(source: str, path: Path) -> dict[str, Any]:
    try:
        tree = ast.parse(source)
    except SyntaxError as exc:
        raise JobError(f"{path}:{exc.lineno}: syntax error: {exc.msg}") from exc
    out = {}
    for node in tree.body:
        if (
            isinstance(node, ast.Assign)
            and len(node.targets) == 1
            and isinstance(node.targets[0], ast.Name)
        ):
            try:
                out[node.targets[0].id] = ast.literal_eval(node.value)
            except ValueError:
                continue
    return out


def render(spec: JobSpec) -> str:
    """The exact source of the function submitted for ``spec``."""
    return TEMPLATE.format(name=spec.name, job_id=spec.job_id, job=spec.to_dict())


def as_function(spec: JobSpec) -> Any:
    """Materialise the rendered source as a real function (syft reads its source with inspect)."""
    folder = Path(tempfile.mkdtemp(prefix="fedsite-job-"))
    module_path = folder / f"{spec.name}_{spec.job_id[:8]}.py"
    module_path.write_text(render(spec))
    module_name = module_path.stem
    loader_spec = importlib.util.spec_from_file_location(module_name, module_path)
    assert loader_spec and loader_spec.loader
    module = importlib.util.module_from_spec(loader_spec)
    sys.modules[module_name] = module
    loader_spec.loader.exec_module(module)
    return getattr(module, spec.name)
