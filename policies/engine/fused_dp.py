"""DP-SGD's clipped gradient sum for Linear and Conv2d models, without per-sample hooks' cost.

Opacus' GradSampleModule stores a full per-sample gradient for every parameter through module
backward hooks, then clips and sums them in the optimizer: 2.5-3.5x the time of a plain SGD step
on the small models sites train (measured in ``scripts/bench``). For the two layer types that
hold almost every parameter of such models the same numbers come from each layer's input ``a``
and output gradient ``g`` directly:

* Linear on (B, in) rows: the per-sample gradient is the outer product ``g_i a_i^T``, so its
  squared norm is ``|g_i|^2 |a_i|^2`` and the clipped sum is one matmul ``(c * g)^T a``
  ("ghost" norms, Goodfellow 2015; Li et al. 2022), never materialising B x out x in numbers.
* Linear on sequences and Conv2d (via ``unfold``): per-sample gradients ``g_i^T a_i`` are
  materialised with one batched matmul, as Opacus does, minus its hook and bookkeeping overhead.

Clipping (flat, across all parameters), the clip factor ``C / (|g_i| + 1e-6)`` capped at 1, the
Gaussian noise of std ``sigma * C`` and the division by the expected batch size are Opacus'
exactly, so sampling and accounting do not change; ``tests/unit/test_fused_dp.py`` checks the
result against Opacus' DPOptimizer step for step. Models with any other parametrised layer use
Opacus unchanged.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import cast

import torch
from torch import nn
from torch.nn import functional as F

try:  # the engine call behind torch.autograd.grad (see _grad)
    from torch.autograd.graph import _engine_run_backward
except ImportError:  # pragma: no cover - other torch versions
    _engine_run_backward = None  # type: ignore[assignment]  # the optional-import fallback

NoiseFn = Callable[[float, torch.Size], torch.Tensor]


def supports(model: nn.Module) -> bool:
    """True when every trainable parameter sits in a plain Linear or a groups=1 Conv2d."""
    trainable = False
    for module in model.modules():
        own = [p for p in module._parameters.values() if p is not None]
        if not any(p.requires_grad for p in own):
            continue
        trainable = True
        kind = type(module)
        plain = kind is nn.Linear or (type(module) is nn.Conv2d and _plain_conv(module))
        if not plain or not all(p.requires_grad for p in own):
            return False
    return trainable


def _plain_conv(conv: nn.Conv2d) -> bool:
    return conv.groups == 1 and conv.padding_mode == "zeros" and not isinstance(conv.padding, str)


class FusedClipper:
    """Captures each layer's input and output, and turns one backward pass into clipped sums.

    Only the gradients with respect to the captured layer outputs are asked of autograd, so the
    (unclipped) parameter gradients a plain backward would compute are never computed.
    """

    def __init__(self, model: nn.Module, example: torch.Tensor) -> None:
        if not supports(model):
            raise ValueError("model has layers the fused clipper does not handle; use Opacus")
        kinds = (nn.Linear, nn.Conv2d)
        self.layers = [m for m in model.modules() if type(m) in kinds and _trainable(m)]
        self._own = [list(m.parameters()) for m in self.layers]
        self.params = [p for own in self._own for p in own]
        self.copy_outputs = False
        self._calls: list[tuple[nn.Module, torch.Tensor, torch.Tensor, int]] = []
        for m in self.layers:
            self._wrap(m)
        self.copy_outputs = self._modifies_outputs_in_place(model, example)

    def _wrap(self, module: nn.Module) -> None:
        """Capture (input, output) in the layer's own forward: a forward hook would cost more.

        An instance attribute shadows the class' ``forward``; ``remove`` deletes it again.
        """
        original = module.forward
        calls = self._calls

        def forward(x: torch.Tensor) -> torch.Tensor:
            out = cast(torch.Tensor, original(x))
            if not torch.is_grad_enabled():
                return out
            calls.append((module, x.detach(), out, out._version))
            return out.clone() if self.copy_outputs else out

        module.forward = forward

    def _modifies_outputs_in_place(self, model: nn.Module, example: torch.Tensor) -> bool:
        """One probe forward pass: does anything (say ReLU(inplace=True)) overwrite an output?

        If so every captured output is handed on as a copy, so its gradient stays its own.
        """
        with torch.enable_grad():
            model(example)
        modified = any(out._version != version for _, _, out, version in self._calls)
        self._calls.clear()
        return modified

    def remove(self) -> None:
        for m in self.layers:
            del m.forward

    def noisy_grads(
        self,
        per_sample_loss_sum: torch.Tensor,
        max_norm: float,
        scale: float,
        noise: list[torch.Tensor],
    ) -> list[torch.Tensor]:
        """``scale * (sum of per-sample gradients clipped to max_norm) + noise``, per parameter.

        ``noise`` holds one tensor per parameter, already multiplied by ``scale``; the clipped
        sums are added onto it in the same kernels (addmm/addmv).
        """
        calls = list(self._calls)
        self._calls.clear()
        if any(out._version != version for _, _, out, version in calls):
            raise RuntimeError("a layer output was modified in place after the probe pass")
        outputs = [out for _, _, out, _ in calls]
        grads = _grad(per_sample_loss_sum, outputs)
        uses: dict[nn.Module, list[tuple[torch.Tensor, torch.Tensor]]] = {}
        for (module, a, _, _), g in zip(calls, grads, strict=True):
            if g is not None:  # None: this call is not on the loss' path
                uses.setdefault(module, []).append((a, g))
        parts = [_layer(m, uses[m]) if m in uses else None for m in self.layers]
        norms2 = [part[0] for part in parts if part]
        factor, bad = _clip_factor(norms2, max_norm, scale, noise[0])
        out: list[torch.Tensor] = []
        slices = iter(noise)
        for params, part in zip(self._own, parts, strict=True):
            own = [next(slices) for _ in params]
            out.extend(part[1](factor, own, bad) if part else own)
        return out


def _grad(loss: torch.Tensor, outputs: list[torch.Tensor]) -> tuple[torch.Tensor | None, ...]:
    """``torch.autograd.grad(loss, outputs, allow_unused=True)`` minus its argument checking.

    The public wrapper's normalisation costs ~17 us, a quarter of the backward pass for the demo
    model; this calls the engine entry it ends in (torch is pinned exactly), falling back to the
    public function on any other torch.
    """
    if _engine_run_backward is None or loss.dim() != 0:
        return torch.autograd.grad(loss, outputs, allow_unused=True)
    seed = torch.ones((), dtype=loss.dtype, device=loss.device)
    return _engine_run_backward(
        (loss,), (seed,), False, False, tuple(outputs), True, accumulate_grad=False
    )


def _trainable(m: nn.Module) -> bool:
    return any(p.requires_grad for p in m.parameters())


def _clip_factor(
    norms2: list[torch.Tensor], max_norm: float, scale: float, like: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Opacus' ``min(1, C / (|g_i| + 1e-6))`` times ``scale``, from per-layer squared norms.

    Also the rows whose gradient is not finite (NaN or inf anywhere in it), or None when there
    are none. Those rows contribute zero: otherwise one row's NaN turns the whole update NaN,
    and whether the release fails becomes a free yes/no question about a private row. Zero is
    within every row's sensitivity bound, so the guarantee is unchanged.
    """
    if not norms2:
        return like.new_zeros(0), None
    total = norms2[0]  # fresh from this step's kernels: safe to update in place
    for extra in norms2[1:]:
        total.add_(extra)
    bad = ~torch.isfinite(total)
    factor = total.sqrt_().add_(1e-6).reciprocal_().mul_(max_norm * scale).clamp_(max=scale)
    factor = factor.to(like.dtype)  # norms are float64 (see _linear_rows); the sums are not
    if not bool(bad.any()):
        return factor, None
    return factor.masked_fill_(bad, 0.0), bad


def _zero_rows(t: torch.Tensor, bad: torch.Tensor | None) -> torch.Tensor:
    """``t`` with the rows (first dimension) marked in ``bad`` set to zero."""
    if bad is None:
        return t
    return t.masked_fill(bad.view(-1, *([1] * (t.dim() - 1))), 0.0)


Summer = Callable[[torch.Tensor, list[torch.Tensor], "torch.Tensor | None"], list[torch.Tensor]]


def _layer(
    m: nn.Module, uses: list[tuple[torch.Tensor, torch.Tensor]]
) -> tuple[torch.Tensor, Summer]:
    """(per-sample squared norms, clipped-sum-onto-noise function) of one layer's parameters."""
    bias = m.bias is not None
    if len(uses) == 1 and type(m) is nn.Linear and uses[0][0].dim() == 2:
        return _linear_rows(*uses[0], bias)
    weight, bias_sum = None, None
    for a, g in uses:  # a layer applied several times: its per-sample gradients add up
        w, b = _per_sample(m, a, g)
        weight = w if weight is None else weight + w
        bias_sum = b if bias_sum is None else bias_sum + b
    assert weight is not None  # uses holds at least one call of the layer
    return _materialised(weight, bias_sum if bias else None)


def _per_sample(
    m: nn.Module, a: torch.Tensor, g: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample weight gradients (B, out, fan_in) and bias gradients (B, out)."""
    if type(m) is nn.Linear:
        a = a.reshape(a.shape[0], -1, a.shape[-1])
        g = g.reshape(g.shape[0], -1, g.shape[-1])
        return torch.bmm(g.transpose(1, 2), a), g.sum(1)
    g = g.reshape(g.shape[0], g.shape[1], -1)  # (B, out, L)
    return torch.bmm(g, _patches(cast(nn.Conv2d, m), a)), g.sum(2)  # (B, out, C*k*k)


def _patches(m: nn.Conv2d, a: torch.Tensor) -> torch.Tensor:
    """The conv's input patches as (B, L, C*kh*kw), in the weight's (C, kh, kw) order.

    Without dilation: zero padding plus two strided ``Tensor.unfold`` views and one copy, about
    40% faster than ``F.unfold`` (im2col) at the sizes sites train, which cost more than the
    convolution itself.
    """
    padding = cast(tuple[int, int], m.padding)  # _plain_conv refused 'same' and 'valid'
    if m.dilation != (1, 1):
        return F.unfold(a, m.kernel_size, m.dilation, padding, m.stride).transpose(1, 2)
    (kh, kw), (sh, sw), (ph, pw) = m.kernel_size, m.stride, padding
    if ph or pw:
        a = F.pad(a, (pw, pw, ph, ph))
    views = a.unfold(2, kh, sh).unfold(3, kw, sw)  # (B, C, Ho, Wo, kh, kw)
    b, c, ho, wo = views.shape[:4]
    return views.permute(0, 2, 3, 1, 4, 5).reshape(b, ho * wo, c * kh * kw)


def _linear_rows(a: torch.Tensor, g: torch.Tensor, bias: bool) -> tuple[torch.Tensor, Summer]:
    """Ghost norms: |g_i a_i^T|^2 = |g_i|^2 |a_i|^2, and the bias adds |g_i|^2.

    In float64: in float32, |g_i|^2 underflows to 0 for |g_i| < 4e-23 while |g_i| |a_i| need not
    be small (inputs near 1e18 under crafted scaling), and a row read as norm 0 would escape
    clipping. Squares of float32 values neither underflow nor overflow in float64.
    """
    g64, a64 = g.double(), a.double()
    g2 = torch.linalg.vecdot(g64, g64)
    a2 = torch.linalg.vecdot(a64, a64)
    norms2 = torch.addcmul(g2, g2, a2) if bias else g2 * a2

    def summed(
        factor: torch.Tensor, noise: list[torch.Tensor], bad: torch.Tensor | None
    ) -> list[torch.Tensor]:
        gt = _zero_rows(g, bad).t()
        weight = torch.addmm(noise[0], gt, _zero_rows(a, bad) * factor.unsqueeze(1))
        return [weight, torch.addmv(noise[1], gt, factor)] if bias else [weight]

    return norms2, summed


def _materialised(
    per_sample: torch.Tensor, bias: torch.Tensor | None
) -> tuple[torch.Tensor, Summer]:
    flat = per_sample.flatten(1)
    flat64 = flat.double()  # as in _linear_rows: no square may underflow to a zero norm
    norms2 = torch.linalg.vecdot(flat64, flat64)
    if bias is not None:
        bias64 = bias.double()
        norms2 = norms2 + torch.linalg.vecdot(bias64, bias64)

    def summed(
        factor: torch.Tensor, noise: list[torch.Tensor], bad: torch.Tensor | None
    ) -> list[torch.Tensor]:
        rows = _zero_rows(flat, bad).t()
        weight = torch.addmv(noise[0].reshape(-1), rows, factor).view_as(noise[0])
        if bias is None:
            return [weight]
        return [weight, torch.addmv(noise[1], _zero_rows(bias, bad).t(), factor)]

    return norms2, summed


class FusedDPSGD:
    """One DP-SGD step: clipped sum + Gaussian noise, / expected batch size, then ``optimizer``.

    ``noise(std, shape)`` draws one parameter's noise (on its device), so secure noise and
    torch's generator plug in the same way.
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        noise_multiplier: float,
        max_grad_norm: float,
        expected_batch_size: int,
        noise: NoiseFn,
        example: torch.Tensor,
    ) -> None:
        self.clipper = FusedClipper(model, example)
        self.optimizer = optimizer
        self.max_grad_norm = max_grad_norm
        self.scale = 1.0 / expected_batch_size
        self.std = noise_multiplier * max_grad_norm * self.scale
        self.noise = noise
        self.shapes = [p.shape for p in self.clipper.params]
        self.numels = [shape.numel() for shape in self.shapes]

    def _draw(self) -> list[torch.Tensor]:
        """This step's noise for every parameter, from one draw (one CSPRNG read at a site)."""
        flat = self.noise(self.std, torch.Size([sum(self.numels)]))
        return [t.view(s) for t, s in zip(torch.split(flat, self.numels), self.shapes, strict=True)]

    def step(self, per_sample_loss_sum: torch.Tensor) -> None:
        noise = self._draw()
        grads = self.clipper.noisy_grads(per_sample_loss_sum, self.max_grad_norm, self.scale, noise)
        for p, grad in zip(self.clipper.params, grads, strict=True):
            p.grad = grad
        self.optimizer.step()

    def empty_step(self) -> None:
        """A Poisson batch with no rows: noise only, as Opacus does."""
        for p, noise in zip(self.clipper.params, self._draw(), strict=True):
            p.grad = noise
        self.optimizer.step()
