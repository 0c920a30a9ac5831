"""Local DP-SGD training: the loop the datasite runs on private rows.

This module is the site's, never the researcher's: clipping, noise and accounting happen here
with parameters taken from the approved plan. Two rules hold for every call:

* Noise and Poisson sampling come from the OS CSPRNG (``policies.engine.secure_noise``). Nothing a
  researcher knows (job id, round, plan) seeds them. ``_test_seed`` exists for unit tests only:
  no job, plan or site config reaches it.
* What is released is the starting weights plus the sum of the steps the site's own optimizer
  took (``ReleaseTracker``), never the model's tensors read back after training: a tensor changed
  in any other way (a forward that writes to a parameter) cannot leave.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, cast

import numpy as np
import numpy.typing as npt
import torch
from opacus import GradSampleModule
from opacus.optimizers import DPOptimizer
from torch import nn

from policies import imbalance
from policies.engine import fused_dp
from policies.engine.secure_noise import make_secure, secure_gaussian
from policies.plan import TrainingPlan, step_plan
from policies.wire import Weights


@dataclass(frozen=True)
class TrainResult:
    weights: Weights
    train_loss: float
    steps: int


def device() -> torch.device:
    """CUDA when the site has it, else CPU; the project never needs a GPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def seed_torch(seed: int) -> None:
    """Seed torch's CPU (and CUDA) generators; ``torch.manual_seed`` also records a stack trace
    for lazy CUDA seeding on every call, which cost ~0.8 ms of a ~10 ms demo epoch."""
    torch.default_generator.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)


class ReleaseTracker:
    """Starting weights plus the sum of the optimizer's own steps: the only thing that leaves.

    Around every ``optimizer.step()`` the tracker subtracts the parameters just before and adds
    them just after, so anything that moved a parameter between steps is not in the sum. When
    nothing did, the result equals the parameters bit for bit (x - x + y == y in floating point).
    Two fused ``_foreach`` calls per step; no allocation.
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        named = [(n.removeprefix("_module."), p) for n, p in model.named_parameters()]
        self.names = [n for n, _ in named]
        self.params = [p for _, p in named]
        self.shadow = [p.detach().clone() for p in self.params]
        self._handles = [
            optimizer.register_step_pre_hook(self._before),
            optimizer.register_step_post_hook(self._after),
        ]

    def _before(self, *_: object) -> None:
        torch._foreach_sub_(self.shadow, [p.detach() for p in self.params])

    def _after(self, *_: object) -> None:
        torch._foreach_add_(self.shadow, [p.detach() for p in self.params])

    def released(self) -> Weights:
        for handle in self._handles:
            handle.remove()
        return {
            n: s.cpu().numpy().astype(np.float32)
            for n, s in zip(self.names, self.shadow, strict=True)
        }


def loss_fn(name: str, reduction: str = "mean") -> nn.Module:
    losses: dict[str, type[nn.Module]] = {
        "cross_entropy": nn.CrossEntropyLoss,
        "mse": nn.MSELoss,
        "bce_with_logits": nn.BCEWithLogitsLoss,
    }
    return losses[name](reduction=reduction)


class _ClassWeighted(nn.Module):
    """A per-row loss times its row's class weight (for BCE, whose own ``weight`` is per
    element, not per class). A label out of 0..k-1 takes the nearest class's weight."""

    def __init__(self, base: nn.Module, weights: torch.Tensor) -> None:
        super().__init__()
        self.base, self.weights = base, weights

    def forward(self, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        index = y.round().long().clamp(0, len(self.weights) - 1)
        return cast(torch.Tensor, self.base(out, y)) * self.weights[index]


def criterion(plan: TrainingPlan, dev: torch.device) -> nn.Module:
    """The per-row training loss of a plan, with its class or positive weight.

    The plan's weights are numbers here: a site resolves "balanced" from its published DP
    counts before the task reaches the trainer (``policies.imbalance.resolve``). A weight
    scales the row's loss before its gradient is clipped: sensitivity and noise are unchanged.
    """
    weight, pos = plan.imbalance.class_weight, plan.imbalance.pos_weight
    if isinstance(weight, str) or isinstance(pos, str):
        raise ValueError('a "balanced" weight must be resolved before training')
    if plan.loss == "bce_with_logits" and pos is not None:
        pos_t = torch.tensor([float(pos)], dtype=torch.float32, device=dev)
        return nn.BCEWithLogitsLoss(reduction="none", pos_weight=pos_t)
    if weight is None:
        return loss_fn(plan.loss, reduction="none")
    weights = torch.tensor(weight, dtype=torch.float32, device=dev)
    if plan.loss == "cross_entropy":
        return nn.CrossEntropyLoss(weight=weights, reduction="none")
    return _ClassWeighted(loss_fn(plan.loss, reduction="none"), weights)


def targets(y: npt.NDArray[Any], loss: str) -> torch.Tensor:
    return torch.as_tensor(y, dtype=torch.long if loss == "cross_entropy" else torch.float32)


def forward(model: nn.Module, x: torch.Tensor, loss: str) -> torch.Tensor:
    out = cast(torch.Tensor, model(x))
    return out if loss == "cross_entropy" else out.reshape(-1)


def poisson_schedule(
    n: int, steps: int, rng: np.random.Generator
) -> Iterator[tuple[npt.NDArray[Any], list[int]]]:
    """Poisson sampling, a chunk of consecutive steps at a time: (their rows, batch sizes).

    Every row is in each step's batch independently with q = 1/steps, as in Opacus, so the
    accounting (sample rate q, ``steps`` steps) is unchanged. Two exact ways to draw it:

    * small tables: a Bernoulli(q) mask per step, many steps per numpy call;
    * large tables: a Binomial(n, q) batch size, then that many distinct rows uniformly: the same
      distribution at O(batch) per step instead of an O(n) mask (Opacus' sampler made an epoch
      grow with n^2/B: 1M rows took 15x the time of 100k).

    Handing whole chunks over lets the training loop gather a chunk's rows with one index
    operation and slice the batches out as views.
    """
    q = 1.0 / steps
    if n <= _MASK_ROWS:
        per_chunk = max(1, _CHUNK_ELEMENTS // max(n, 1))
        for start in range(0, steps, per_chunk):
            mask = rng.random((min(per_chunk, steps - start), n)) < q
            yield np.nonzero(mask)[1], mask.sum(1).tolist()
        return
    for start in range(0, steps, _LARGE_CHUNK_STEPS):
        sizes = rng.binomial(n, q, size=min(_LARGE_CHUNK_STEPS, steps - start)).tolist()
        rows = [np.sort(rng.choice(n, size=k, replace=False)) for k in sizes]
        yield np.concatenate(rows) if rows else np.empty(0, np.int64), sizes


_MASK_ROWS = 4096
_CHUNK_ELEMENTS = 1 << 20
_LARGE_CHUNK_STEPS = 64


Step = Callable[[torch.Tensor, torch.Tensor], "torch.Tensor | None"]
Close = Callable[[], None]


def train_dp(
    model: nn.Module,
    x: npt.NDArray[Any],
    y: npt.NDArray[Any],
    plan: TrainingPlan,
    noise_multiplier: float,
    engine: str = "auto",
    public_rows: int | None = None,
    _test_seed: int | None = None,
) -> TrainResult:
    """Run ``plan.local_epochs`` of DP-SGD with Poisson sampling and per-sample clipping.

    ``engine="auto"`` gives Linear/Conv2d models the fused clipper (``policies.engine.fused_dp``) and
    any other model Opacus' GradSampleModule + DPOptimizer; ``"opacus"`` forces the latter.
    Both clip, noise and scale identically (tests/unit/test_fused_dp.py). ``_test_seed`` makes
    noise and sampling repeatable for unit tests; sites never pass it. ``public_rows``: the
    published training-row count; the sampling rate and the expected batch size (the average's
    divisor) come from it, so that neither depends on the exact private count.
    """
    secure_mode = _test_seed is None
    seed = _test_seed if _test_seed is not None else int.from_bytes(os.urandom(8), "little")
    seed_torch(seed)  # dropout masks; noise and sampling below use the CSPRNG at sites
    dev = device()
    if any(p.device != dev for p in model.parameters()):
        model = model.to(dev)
    xt = torch.as_tensor(x, dtype=torch.float32, device=dev)
    yt = targets(y, plan.loss).to(dev)
    n = len(xt)
    public = n if public_rows is None else max(1, int(public_rows))
    sampling = step_plan(public, plan)  # the arithmetic the accounting charged
    expected = sampling.batch_divisor
    model.train()  # Opacus refuses a module in eval mode (say, fresh from ``evaluate``)
    fused = engine == "auto" and fused_dp.supports(model)
    make = _fused_step if fused else _opacus_step
    step, close, tracker = make(model, plan, noise_multiplier, expected, secure_mode, xt[:2])
    rng = np.random.default_rng(seed if not secure_mode else _csprng_seed())
    steps, losses, count = 0, [], 0
    try:
        for _ in range(plan.local_epochs):
            for rows, sizes in poisson_schedule(n, sampling.steps_per_epoch, rng):
                index = torch.from_numpy(rows).to(dev)
                batches = zip(
                    torch.split(xt[index], sizes), torch.split(yt[index], sizes), strict=True
                )
                for xb, yb in batches:
                    loss_sum = step(xb, yb)
                    if loss_sum is not None:
                        losses.append(loss_sum)
                        count += len(xb)
                    steps += 1
    finally:
        close()  # the model leaves without our capture wrappers or Opacus' hooks
    total = float(torch.stack(losses).sum()) if losses else 0.0
    return TrainResult(tracker.released(), total / max(count, 1), steps)


def _csprng_seed() -> int:
    """256 bits from the OS for the Poisson sampler's PCG64 stream, fresh every call."""
    return int.from_bytes(os.urandom(32), "little")


def _noise(secure_mode: bool, dev: torch.device) -> fused_dp.NoiseFn:
    if secure_mode:
        return lambda std, shape: secure_gaussian(std, shape.numel()).view(shape).to(dev)
    return lambda std, shape: torch.normal(0.0, std, shape, device=dev)


def _fused_step(
    model: nn.Module,
    plan: TrainingPlan,
    sigma: float,
    expected: int,
    secure_mode: bool,
    example: torch.Tensor,
) -> tuple[Step, Close, ReleaseTracker]:
    dev = next(model.parameters()).device
    optimizer = _optimizer(model, plan)
    tracker = ReleaseTracker(model, optimizer)
    dp = fused_dp.FusedDPSGD(
        model,
        optimizer,
        sigma,
        plan.dp.max_grad_norm,
        expected,
        _noise(secure_mode, dev),
        example,
    )
    per_row_loss = criterion(plan, dev)

    def step(xb: torch.Tensor, yb: torch.Tensor) -> torch.Tensor | None:
        if not len(xb):
            dp.empty_step()
            return None
        per_row = per_row_loss(forward(model, xb, plan.loss), yb)
        loss_sum = per_row.sum()
        dp.step(loss_sum)
        return loss_sum.detach() if torch.isfinite(loss_sum) else finite_sum(per_row)

    return step, dp.clipper.remove, tracker


def _opacus_step(
    model: nn.Module,
    plan: TrainingPlan,
    sigma: float,
    expected: int,
    secure_mode: bool,
    example: torch.Tensor,
) -> tuple[Step, Close, ReleaseTracker]:
    private_model = GradSampleModule(model, batch_first=True, loss_reduction="mean")
    inner = _optimizer(private_model, plan)
    tracker = ReleaseTracker(private_model, inner)
    optimizer = DPOptimizer(
        inner,
        noise_multiplier=sigma,
        max_grad_norm=plan.dp.max_grad_norm,
        expected_batch_size=expected,
        loss_reduction="mean",
    )
    if secure_mode:
        make_secure(optimizer)
    per_row_loss = criterion(plan, next(model.parameters()).device)

    def step(xb: torch.Tensor, yb: torch.Tensor) -> torch.Tensor | None:
        optimizer.zero_grad(set_to_none=True)
        per_row = per_row_loss(forward(private_model, xb, plan.loss), yb)
        per_row.mean().backward()  # an empty batch gives (empty) per-sample grads: noise only
        zero_non_finite_rows(optimizer)
        optimizer.step()
        return finite_sum(per_row) if len(xb) else None

    return step, private_model.remove_hooks, tracker


def finite_sum(per_row: torch.Tensor) -> torch.Tensor:
    """The batch's loss over its finite rows: one row's NaN must not turn the sum NaN."""
    per_row = per_row.detach()
    return torch.where(torch.isfinite(per_row), per_row, 0.0).sum()


def zero_non_finite_rows(optimizer: DPOptimizer) -> None:
    """Set every per-sample gradient row holding a NaN or inf to zero, in every parameter.

    Opacus would clip such a row to NaN and the whole update with it; the fused engine does the
    same as this (``fused_dp._clip_factor``). A zero row is within the sensitivity bound.
    """
    params = [p for p in optimizer.params if getattr(p, "grad_sample", None) is not None]
    samples = [optimizer._get_flat_grad_sample(p) for p in params]
    if not samples or not len(samples[0]):
        return
    finite = torch.stack([torch.isfinite(g.reshape(len(g), -1)).all(1) for g in samples]).all(0)
    if bool(finite.all()):
        return
    for p, g in zip(params, samples, strict=True):
        p.grad_sample = g.masked_fill(~finite.view(-1, *([1] * (g.dim() - 1))), 0.0)


def _optimizer(model: nn.Module, plan: TrainingPlan) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]  # frozen layers never step
    if plan.optimizer == "adam":
        optimizer: torch.optim.Optimizer = torch.optim.Adam(params, lr=plan.learning_rate)
    else:
        optimizer = torch.optim.SGD(params, lr=plan.learning_rate, momentum=plan.momentum)
    if plan.algorithm.proximal_mu > 0:
        add_proximal_term(optimizer, params, plan.algorithm.proximal_mu)
    return optimizer


def add_proximal_term(
    optimizer: torch.optim.Optimizer, params: Sequence[torch.Tensor], mu: float
) -> None:
    """FedProx: every step's gradient gets mu * (w - w_global), w_global the round's start.

    The hook runs inside ``optimizer.step()``, after Opacus' or the fused engine's clipping and
    noise have written the private gradient to ``p.grad``. The proximal gradient is a function
    of the current weights (themselves post-processing of earlier noisy steps) and of the
    global weights the researcher sent; it reads no row. So it changes neither the sensitivity
    nor the noise of any step, and the accounting of plain DP-SGD holds unchanged (adaptive
    composition with a post-processed update). Adding it before clipping instead would clip it
    with the data gradient and scale it down by the clip factor: a weaker, row-dependent pull.
    """
    anchors = [p.detach().clone() for p in params]

    def pull(*_: object) -> None:
        for p, anchor in zip(params, anchors, strict=True):
            if p.grad is not None:
                p.grad.add_(p.detach() - anchor, alpha=mu)

    optimizer.register_step_pre_hook(pull)


@torch.no_grad()
def private_metrics(
    model: nn.Module,
    x: npt.NDArray[Any],
    y: npt.NDArray[Any],
    plan: TrainingPlan,
    gaussian: Callable[[float], float],
    public_rows: int | None = None,
) -> dict[str, float]:
    """Validation loss and accuracy as a site releases them: noised sums over the rows.

    Each row's loss is clipped to [0, ``metric_loss_clip``] (a non-finite loss counts as the
    clip), so the loss sum has that sensitivity; the count of correct predictions has
    sensitivity 1. Each sum gets Gaussian noise of ``metric_noise_multiplier`` times its
    sensitivity (``policies.privacy`` charges them) before it is divided by the public number
    of validation rows (``public_rows``, from the published table size) and clamped to its range.
    Nothing exact leaves.
    """
    n = len(x) if public_rows is None else int(public_rows)
    if not plan.metrics.enabled or n == 0:
        return {}
    model = model.to(device()).eval()
    xt = torch.as_tensor(x, dtype=torch.float32, device=device())
    yt = targets(y, plan.loss).to(device())
    out = forward(model, xt, plan.loss)
    clip = plan.metrics.loss_clip
    per_row = loss_fn(plan.loss, reduction="none")(out, yt)
    per_row = torch.where(torch.isfinite(per_row), per_row, clip).clamp(0.0, clip)
    z = plan.metrics.noise_multiplier
    loss_sum = float(per_row.double().sum()) + gaussian(z * clip)
    released = {"val_loss": min(max(loss_sum / n, 0.0), clip)}
    if plan.loss.classifier:
        correct = float(_correct(out, yt, plan.loss).sum()) + gaussian(z)
        released["val_accuracy"] = min(max(correct / n, 0.0), 1.0)
    if plan.metrics.binary:
        released.update(_binary_release(out, y, plan, gaussian))
    return released


def _binary_release(
    out: torch.Tensor, y: npt.NDArray[Any], plan: TrainingPlan, gaussian: Callable[[float], float]
) -> dict[str, float]:
    """Recall, precision, ROC-AUC, PR-AUC, balanced accuracy from one noised histogram pair.

    The validation rows' log-odds are counted in fixed bins per class
    (``policies.imbalance``); a swapped row changes two counts by one, so the L2 sensitivity
    is sqrt 2 and every bin gets noise of ``metric_noise_multiplier * sqrt 2``: one Gaussian
    release at that noise multiplier (``policies.privacy`` charges it as ``scores``). The
    metrics are computed from the noisy counts alone.
    """
    score = out[:, 1] - out[:, 0] if plan.loss == "cross_entropy" else out.reshape(-1)
    exact = imbalance.histograms(score.double().cpu().numpy(), np.asarray(y))
    std = plan.metrics.noise_multiplier * math.sqrt(2.0)
    noisy = exact + np.array([gaussian(std) for _ in range(exact.size)]).reshape(exact.shape)
    return {f"val_{k}": v for k, v in imbalance.binary_metrics(noisy).items()}


def _correct(out: torch.Tensor, yt: torch.Tensor, loss: str) -> torch.Tensor:
    if loss == "cross_entropy":
        return out.argmax(1) == yt
    return (out > 0).float() == yt


def secure_scalar_gaussian(std: float) -> float:
    """One Gaussian draw of ``std`` from the OS CSPRNG (``policies.engine.secure_noise``)."""
    return float(secure_gaussian(std, 1)[0])
