"""Aggregation strategies: small classes with paired configure/aggregate hooks (as in Flower).

DP lives in the datasites' runtime; no strategy here holds DP code.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from policies.wire import Weights
from researcher.errors import AggregationError


@dataclass(frozen=True)
class Update:
    """One site's validated reply for one round."""

    site: str
    weights: Weights
    n: int
    metrics: dict[str, float] = field(default_factory=dict)
    privacy: dict[str, Any] = field(default_factory=dict)
    site_round: int = 0  # the site's own count of this job's rounds, for resuming


class Strategy(Protocol):
    def configure(self, round_no: int, weights: Weights) -> Weights:
        """The weights sent to every site for ``round_no``."""
        ...

    def aggregate(self, round_no: int, updates: list[Update], current: Weights) -> Weights:
        """The next global weights from this round's updates."""
        ...


class FedAvg:
    """Federated averaging weighted by the number of training rows (McMahan et al. 2017)."""

    def configure(self, round_no: int, weights: Weights) -> Weights:
        return weights

    def aggregate(self, round_no: int, updates: list[Update], current: Weights) -> Weights:
        if not updates:
            raise AggregationError(f"round {round_no}: no updates to aggregate")
        keys = set(current)
        for u in updates:
            if set(u.weights) != keys:
                raise AggregationError(
                    f"round {round_no}: {u.site} sent tensors "
                    f"{sorted(u.weights)}, expected {sorted(keys)}"
                )
            for k in keys:
                if u.weights[k].shape != current[k].shape:
                    raise AggregationError(
                        f"round {round_no}: {u.site} sent {k} of shape "
                        f"{u.weights[k].shape}, expected {current[k].shape}"
                    )
        total = sum(u.n for u in updates)
        if total <= 0:
            raise AggregationError(f"round {round_no}: updates cover no rows")
        counts = np.array([u.n for u in updates], dtype=np.float64)
        return {
            k: np.average(np.stack([u.weights[k] for u in updates]), axis=0, weights=counts).astype(
                np.float32
            )
            for k in current
        }
