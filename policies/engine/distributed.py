"""A site's share of one distributed DP-SGD step (plan ``dp = "distributed"``).

The round's task is the global model. The site Poisson-samples its rows at the plan's rate q,
computes each sampled row's gradient at the global weights, clips it to L2 norm C, scales it by
gamma and rounds it to integers (``policies.skellam``: each row rounded on its own, so one row's
contribution stays within the integer sensitivities), sums them, and adds Skellam noise whose
variance is 1/``honest_sites`` of the plan's total. The integer sum never leaves unmasked: the
runtime masks it (``secure_agg.SecureSite.masked_integers``) before it is released.

Randomness: the row sample and the rounding come from ``os.urandom`` (``secure_uniform``); the
Skellam draws from a numpy generator seeded with 256 fresh bits of ``os.urandom``. Nothing the
researcher knows seeds either. ``_test_seed`` is for unit tests only.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from typing import Any, cast

import numpy as np
import numpy.typing as npt
import torch
from torch.func import functional_call, grad, vmap

from policies import scaling, skellam
from policies.engine.dp_sgd import loss_fn, targets
from policies.engine.round_task import RoundOutput, RoundTask, class_codes
from policies.engine.secure_noise import secure_uniform
from policies.modelspec import parse
from policies.plan import TrainingPlan
from policies.torch_model import build, load

SUM = "__noised_sum__"  # the one entry of a distributed round's output
CHUNK = 256  # rows whose per-sample gradients are held at once


def distributed_step(task: RoundTask, _test_seed: int | None = None) -> RoundOutput:
    """The noised integer sum of this site's clipped, rounded per-row gradients."""
    started = time.perf_counter()
    plan = TrainingPlan.from_dict(task.plan)
    spec = parse(task.model)
    x = scaling.apply(task.features, task.scaling if plan.standardize else None)
    y = class_codes(task.target, spec.output[-1]) if plan.loss == "cross_entropy" else task.target
    model = build(spec).eval()  # eval: no buffer (BatchNorm statistic) moves in a round
    if task.weights is not None:
        load(model, task.weights)
    names = [n for n, _ in model.named_parameters() if n not in task.frozen]
    dimension = sum(int(dict(model.named_parameters())[n].numel()) for n in names)
    gamma = skellam.scale(plan.dp.max_grad_norm, dimension, plan.batch_size)
    rng = np.random.default_rng(_test_seed if _test_seed is not None else _fresh_seed())
    uniform: Callable[[int], npt.NDArray[Any]] = (
        (lambda n: rng.random(n)) if _test_seed is not None else secure_uniform
    )
    sampled = np.flatnonzero(uniform(len(x)) < float(plan.dp.sample_rate or 0.0))
    total = np.zeros(dimension, np.int64)
    for start in range(0, len(sampled), CHUNK):
        rows = sampled[start : start + CHUNK]
        grads = _per_row_gradients(model, names, x[rows], y[rows], plan.loss)
        total += _clip_scale_round(grads, plan.dp.max_grad_norm, gamma, uniform).sum(axis=0)
    l2, _ = skellam.sensitivities(plan.dp.max_grad_norm, dimension, gamma)
    variance = (task.noise_multiplier * l2) ** 2
    mu = skellam.share(variance, plan.honest_sites)
    if mu > skellam.MAX_POISSON_MEAN:  # the runtime refuses such plans before any charge
        raise ValueError("Skellam share past the exact range of the sampler")
    total += skellam.sample_skellam(mu, dimension, rng)
    return RoundOutput(
        {SUM: total},
        int(task.public_rows or len(x)),
        {},
        {"train_seconds": time.perf_counter() - started},
    )


def _fresh_seed() -> int:
    return int.from_bytes(os.urandom(32), "little")


def _per_row_gradients(
    model: torch.nn.Module, names: list[str], x: npt.NDArray[Any], y: npt.NDArray[Any], loss: str
) -> npt.NDArray[Any]:
    """One flattened gradient per row, over the trainable parameters (torch.func)."""
    params = {n: p.detach() for n, p in model.named_parameters() if n in names}
    fixed = {n: p.detach() for n, p in model.named_parameters() if n not in names}
    buffers = dict(model.named_buffers())
    criterion = loss_fn(loss)

    def row_loss(p: dict[str, torch.Tensor], xb: torch.Tensor, yb: torch.Tensor) -> torch.Tensor:
        out = functional_call(model, ({**p, **fixed}, buffers), (xb.unsqueeze(0),))
        if loss != "cross_entropy":
            out = out.reshape(-1)
        return cast(torch.Tensor, criterion(out, yb.unsqueeze(0)))

    xt = torch.as_tensor(np.asarray(x, np.float32))
    yt = targets(np.asarray(y), loss)
    per_row = vmap(grad(row_loss), in_dims=(None, 0, 0))(params, xt, yt)
    flat = torch.cat([per_row[n].reshape(len(xt), -1) for n in names], dim=1)
    rows: npt.NDArray[Any] = np.nan_to_num(flat.double().numpy(), nan=0.0, posinf=0.0, neginf=0.0)
    return rows


def _clip_scale_round(
    grads: npt.NDArray[Any],
    clip: float,
    gamma: float,
    uniform: Callable[[int], npt.NDArray[Any]],
) -> npt.NDArray[Any]:
    """Clip each row to L2 norm ``clip``, scale by gamma, round each coordinate down or up at
    random (unbiased): integer rows within ``policies.skellam.sensitivities``."""
    norms = np.linalg.norm(grads, axis=1, keepdims=True)
    clipped = grads * np.minimum(1.0, clip / np.maximum(norms, 1e-12))
    scaled = clipped * gamma
    low = np.floor(scaled)
    up = uniform(scaled.size).reshape(scaled.shape) < (scaled - low)
    rounded: npt.NDArray[Any] = (low + up).astype(np.int64)
    return rounded
