"""Cryptographically secure Gaussian noise for DP-SGD, without torchcsprng.

Opacus' ``secure_mode`` needs ``torchcsprng``, which has no build for torch 2.13. This module
gives the same two protections another way:

1. randomness from the operating system's CSPRNG (``os.urandom``), turned into normals by the
   Box-Muller transform in float64, so the noise cannot be predicted from earlier outputs the way
   a Mersenne-Twister or Philox stream seeded once can;
2. Opacus' defence against floating-point attacks (Holohan et al., arXiv:2107.10138, n=2): the
   sum of four Gaussians of the same std divided by 2, which has the same std.

It costs roughly 2-4x the noise generation time of plain ``torch.normal``; noise is a small part
of a DP-SGD step for small models (measured in ``scripts/bench``).
"""

from __future__ import annotations

import os
import types
from typing import Any

import numpy as np
import numpy.typing as npt
import torch
from opacus.optimizers.optimizer import DPOptimizer, _check_processed_flag, _mark_as_processed

_TWO_53 = float(1 << 53)


def secure_uniform(n: int) -> npt.NDArray[Any]:
    """n floats in (0, 1) with 53 random bits each, from os.urandom."""
    raw = np.frombuffer(os.urandom(8 * n), dtype=np.uint64) >> np.uint64(11)
    uniform: npt.NDArray[Any] = (raw.astype(np.float64) + 0.5) / _TWO_53
    return uniform


def secure_normal(n: int) -> npt.NDArray[Any]:
    """n standard normal samples (Box-Muller over secure uniforms)."""
    m = (n + 1) // 2
    u1, u2 = secure_uniform(m), secure_uniform(m)
    radius = np.sqrt(-2.0 * np.log(u1))
    z = np.concatenate([radius * np.cos(2 * np.pi * u2), radius * np.sin(2 * np.pi * u2)])
    normal: npt.NDArray[Any] = z[:n]
    return normal


def secure_gaussian(std: float, n: int) -> torch.Tensor:
    """n float32 noise values of ``std``: four secure draws summed, halved."""
    if std == 0:
        return torch.zeros(n)
    total = secure_normal(4 * n).reshape(4, n).sum(0) / 2.0  # two urandom reads, not sixteen
    return torch.from_numpy((total * std).astype(np.float32))


def secure_gaussian_like(std: float, reference: torch.Tensor) -> torch.Tensor:
    """Noise of ``std`` shaped like ``reference`` (see ``secure_gaussian``)."""
    noise = secure_gaussian(std, reference.numel()).reshape(reference.shape)
    return noise.to(device=reference.device, dtype=reference.dtype)


def _secure_add_noise(self: DPOptimizer) -> None:
    for p in self.params:
        _check_processed_flag(p.summed_grad)
        noise = secure_gaussian_like(self.noise_multiplier * self.max_grad_norm, p.summed_grad)
        p.grad = (p.summed_grad + noise).view_as(p)
        _mark_as_processed(p.summed_grad)


def make_secure(optimizer: DPOptimizer) -> DPOptimizer:
    """Make this DP optimizer draw its noise from the OS CSPRNG."""
    optimizer.add_noise = types.MethodType(_secure_add_noise, optimizer)
    optimizer.secure_mode = True
    return optimizer
