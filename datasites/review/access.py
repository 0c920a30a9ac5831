"""Per-dataset access rules that a datasite admin sets and every review applies."""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from policies.errors import PlanError


@dataclass(frozen=True)
class DatasetPolicy:
    """Who may train on a dataset, and under which DP requirements.

    Defaults are conservative: nobody is allowed until the admin names researchers or domains.
    ``delta`` is capped at 1/n by the review on top of ``max_delta``.
    """

    allowed_researchers: list[str] = field(default_factory=list)
    allowed_domains: list[str] = field(default_factory=list)
    max_epsilon_per_job: float = 3.0
    max_delta: float = 1e-5
    min_noise_multiplier: float = 0.5
    max_grad_norm: float = 5.0
    max_rounds: int = 50
    max_parameters: int = 1_000_000
    max_seconds_per_round: float = 300.0  # a round past it is stopped by the sandbox
    max_memory_mb: int = 4096  # address space a round may add to the trainer process
    # secure aggregation (policies.secagg): refuse plain jobs, and rounds with fewer sites
    require_secure_aggregation: bool = False
    min_aggregation_sites: int = 2
    # distributed DP (policies.skellam): the noise must survive this many sites pooling theirs
    colluding_sites: int = 0
    # secure aggregation: the datasites (identity fingerprints) this dataset may aggregate
    # with; empty: any peer list the admin approves (red team: a researcher-run "peer" is an
    # uncounted colluder)
    trusted_peers: list[str] = field(default_factory=list)

    def allows(self, email: str) -> bool:
        email = email.lower()
        domain = email.rsplit("@", 1)[-1]
        return email in {e.lower() for e in self.allowed_researchers} or domain in {
            d.lower().lstrip("@") for d in self.allowed_domains
        }

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> DatasetPolicy:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise PlanError(f"unknown policy fields: {', '.join(unknown)}")
        policy = cls(**data)
        policy.validate()
        return policy

    def validate(self) -> None:
        for name in ("max_epsilon_per_job", "max_delta", "max_grad_norm"):
            value = getattr(self, name)
            if not (isinstance(value, int | float) and math.isfinite(value) and value > 0):
                raise PlanError(f"policy {name} must be a positive number, got {value!r}")
        if self.min_noise_multiplier < 0:
            raise PlanError("policy min_noise_multiplier must be >= 0")
        if self.max_rounds < 1 or self.max_parameters < 1:
            raise PlanError("policy max_rounds and max_parameters must be >= 1")
        if not isinstance(self.require_secure_aggregation, bool):
            raise PlanError("policy require_secure_aggregation must be true or false")
        if not 2 <= self.min_aggregation_sites <= 64:
            raise PlanError("policy min_aggregation_sites must be in [2, 64]")
        if not 0 <= self.colluding_sites < 64:
            raise PlanError("policy colluding_sites must be in [0, 63]")
        hexdigits = set("0123456789abcdef")
        if not all(len(p) == 64 and set(p) <= hexdigits for p in self.trusted_peers):
            raise PlanError("policy trusted_peers must be 64-character lowercase hex fingerprints")
        if not (0 < self.max_seconds_per_round <= 86_400 and self.max_memory_mb >= 64):
            raise PlanError(
                "policy max_seconds_per_round must be in (0, 86400], max_memory_mb >= 64"
            )


class PolicyStore:
    """Policies of one datasite, one JSON file, replaced atomically on every change."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def all(self) -> dict[str, DatasetPolicy]:
        if not self.path.exists():
            return {}
        raw = json.loads(self.path.read_text())
        return {name: DatasetPolicy.from_dict(p) for name, p in raw.items()}

    def get(self, dataset: str) -> DatasetPolicy:
        """The dataset's policy, or the conservative default when none was set."""
        return self.all().get(dataset, DatasetPolicy())

    def set(self, dataset: str, policy: DatasetPolicy) -> None:
        policy.validate()
        data = {name: p.to_dict() for name, p in self.all().items()}
        data[dataset] = policy.to_dict()
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(data, indent=2, sort_keys=True))
        os.replace(tmp, self.path)
