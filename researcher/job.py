"""Defining a training job, and rendering it as the function a datasite will run.

A JOB.py file is ordinary PyTorch with two constants::

    import torch.nn as nn

    DATASET = "cancer"
    PLAN = {"rounds": 5, "batch_size": 64, "learning_rate": 0.5, "target_epsilon": 3.0}

    def make_model(n_features: int, n_outputs: int) -> nn.Module:
        return nn.Sequential(nn.Linear(n_features, 32), nn.ReLU(), nn.Linear(32, n_outputs))

or, instead of ``make_model``, ``MODEL = [{"type": "Linear", "in_features": 30, ...}, ...]``.
An optional ``STRATEGY = {"name": "fedavgm", "server_lr": 0.5, "momentum": 0.5}`` (or just a
name) is how the researcher combines the sites' updates (``researcher.strategy``); it runs
here, so it is kept beside the submitted job and never sent to a site.
Without either, the job gets ``policies.autoplan.default_model`` (one linear layer). The
smallest job file is ``DATASET = "cancer"`` and ``PLAN = {"target_epsilon": 3.0}``: the
researcher package fills the rest of the plan from the sites' public numbers (``policies.autoplan``).

The file runs here, on the researcher's machine, and never travels: ``make_model``'s result is
converted to a declarative spec (``policies.torch_model.to_spec``), which refuses what a spec
cannot say (a custom ``forward``, a buffer, an unknown layer) and names the layer. Sites build
the model from the spec with their own code. The submitted function is always the same three
lines.
"""

from __future__ import annotations

import ast
import contextlib
import importlib.util
import runpy
import sys
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from policies import job_template
from policies.errors import PlanError, WireError
from policies.plan import JobSpec, TrainingPlan, select
from policies.wire import Weights, check_shapes, frozen_digest
from researcher.errors import JobError

# read from the file as data, never run: a strategy object there is refused, not ignored
LITERAL_ONLY = ("STRATEGY",)

ModelLike = Any  # a spec dict, a list of layer dicts, an nn.Module, or make_model source text


def model_spec(model: ModelLike, n_features: int | None, n_outputs: int | None) -> dict:
    """The declarative spec of ``model``; PlanError names a layer that cannot be expressed."""
    if isinstance(model, dict):
        return model
    if n_features is None:
        raise PlanError("the model's input width (n_features) is needed to describe it")
    if isinstance(model, list):
        return {"input": [n_features], "layers": model}
    if isinstance(model, str):  # the researcher's own make_model source, run here
        namespace: dict[str, Any] = {"__name__": "fedsite_job_model"}
        exec(compile(model, "<job model>", "exec"), namespace)  # noqa: S102  own code, own machine
        model = _factory(namespace, "<job model>")(n_features, n_outputs)
    from policies.torch_model import to_spec

    return to_spec(model, [n_features])


def _factory(namespace: dict[str, Any], where: str) -> Any:
    factory = namespace.get("make_model")
    if not callable(factory):
        raise JobError(f"{where} must define make_model(n_features, n_outputs) or MODEL")
    return factory


def make_job(
    model: ModelLike,
    dataset: str,
    target: str,
    plan: TrainingPlan | dict,
    name: str = "fedsite_job",
    n_features: int | None = None,
    n_outputs: int | None = None,
    initial: Weights | None = None,
) -> JobSpec:
    """Build a job from a model (spec, layer list, nn.Module or make_model source) and a plan.

    ``initial``: the weights the job starts from (transfer learning), checked against the
    model's shapes. A plan with ``frozen`` layers needs them: the job pins a digest of their
    frozen tensors, and every site refuses a round whose frozen layers differ from it.
    """
    try:
        if isinstance(plan, dict):
            plan = TrainingPlan.from_dict(plan)
        spec = model_spec(model, n_features, n_outputs)
        digest = _frozen_digest(spec, plan, initial)
        job_id = uuid.uuid4().hex
        # syft looks functions up by name, so each job's function name is unique
        return JobSpec(
            name=f"{name}_{job_id[:8]}",
            dataset=dataset,
            target=target,
            model=spec,
            plan=plan,
            job_id=job_id,
            frozen_digest=digest,
        )
    except (PlanError, WireError) as exc:
        raise JobError(str(exc)) from exc


def _frozen_digest(spec: dict, plan: TrainingPlan, initial: Weights | None) -> str | None:
    from policies.modelspec import parse

    parameters = parse(spec).parameters
    if initial is not None:
        check_shapes({k: np.asarray(v, np.float32) for k, v in initial.items()}, parameters)
    names = list(parameters)
    well_named = all(select(names, (layer,)) for layer in plan.algorithm.frozen)
    if (
        not plan.algorithm.frozen
        or not well_named
        or len(select(names, plan.algorithm.frozen)) == len(names)
    ):
        return None  # nothing frozen, or JobSpec names what is wrong with the layer list
    if initial is None:
        raise JobError(
            "frozen layers need the job's initial weights: pass --init-weights FILE.npz or a "
            "run dir (for example a model pre-trained on the mock twins)"
        )
    return frozen_digest(initial, select(names, plan.algorithm.frozen))


def load_initial(path: Path) -> Weights:
    """Initial weights for transfer learning: an ``.npz`` of named arrays, or a run dir (its
    ``global.npz``, the last global model of an earlier run)."""
    path = Path(path)
    file = path / "global.npz" if path.is_dir() else path
    try:
        with np.load(file, allow_pickle=False) as npz:
            return {k: np.asarray(npz[k], np.float32) for k in npz.files}
    except (OSError, ValueError) as exc:
        raise JobError(f"cannot read initial weights from {path}: {exc}") from exc


def read_job_file(path: Path) -> dict[str, Any]:
    """DATASET and PLAN (and MODEL and STRATEGY if given) from JOB.py's literals, without
    running it."""
    path = Path(path)
    try:
        source = path.read_text()
    except OSError as exc:
        raise JobError(f"cannot read job file {path}: {exc.strerror}") from exc
    constants = _constants(source, path)
    for key in ("DATASET", "PLAN"):
        if key not in constants:
            raise JobError(f"{path} must define {key} as a literal")
    return constants


def load_job_file(
    path: Path,
    target: str,
    n_features: int,
    n_outputs: int,
    name: str | None = None,
    initial: Weights | None = None,
    plan: dict[str, Any] | None = None,
) -> JobSpec:
    """The job JOB.py describes, for a table of ``n_features`` and a model of ``n_outputs``.

    ``researcher.api.load_job`` fills the sizes in from the federation's published schema, and
    ``plan`` (the file's PLAN with the auto-plan's fields filled in) when it has one.
    """
    path = Path(path)
    constants = read_job_file(path)
    model = constants.get("MODEL")
    if model is None:
        try:
            namespace = runpy.run_path(str(path), run_name="fedsite_job_file")
        except Exception as exc:  # the researcher's own file: report, do not crash
            raise JobError(f"{path} failed to run: {type(exc).__name__}: {exc}") from exc
        if "make_model" not in namespace:
            from policies.autoplan import default_model

            namespace["make_model"] = default_model
        try:
            model = _factory(namespace, str(path))(n_features, n_outputs)
        except JobError:
            raise
        except Exception as exc:
            raise JobError(f"{path}: make_model failed: {type(exc).__name__}: {exc}") from exc
    try:
        return make_job(
            model,
            constants["DATASET"],
            target,
            constants["PLAN"] if plan is None else plan,
            name=name or _name_from(path),
            n_features=n_features,
            n_outputs=n_outputs,
            initial=initial,
        )
    except JobError as exc:
        raise JobError(f"{path}: {exc}") from exc


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
            name = node.targets[0].id
            try:
                out[name] = ast.literal_eval(node.value)
            except ValueError:
                if name in LITERAL_ONLY:  # skipped, it would leave the default in its place
                    raise JobError(
                        f"{path}:{node.lineno}: {name} must be a literal, such as "
                        '{"name": "fedavgm", "server_lr": 0.5, "momentum": 0.5}'
                    ) from None
                continue
    return out


def render(spec: JobSpec) -> str:
    """The exact source of the function submitted for ``spec`` (``policies.job_template``, the
    text a site's review requires)."""
    return job_template.render(spec.name, spec.job_id, spec.to_dict())


@contextlib.contextmanager
def as_function(spec: JobSpec) -> Iterator[Any]:
    """Materialise the rendered source as a real function, for as long as the ``with`` lasts.

    syft reads a function's source with ``inspect`` when ``sy.syft_function`` wraps it, so the
    file must exist then, and not after: every submission left a folder in the temp dir."""
    with tempfile.TemporaryDirectory(prefix="fedsite-job-") as folder:
        module_path = Path(folder) / f"{spec.name}_{spec.job_id[:8]}.py"
        module_path.write_text(render(spec))
        module_name = module_path.stem
        loader_spec = importlib.util.spec_from_file_location(module_name, module_path)
        assert loader_spec and loader_spec.loader
        module = importlib.util.module_from_spec(loader_spec)
        sys.modules[module_name] = module
        try:
            loader_spec.loader.exec_module(module)
            yield getattr(module, spec.name)
        finally:
            sys.modules.pop(module_name, None)


def _name_from(path: Path) -> str:
    """``job.py`` -> ``job``, ``cancer-mlp.py`` -> ``job_cancer_mlp`` (never ``job_job``)."""
    stem = path.stem.replace("-", "_")
    return stem if stem.startswith("job") else f"job_{stem}"
