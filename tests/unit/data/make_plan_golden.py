"""Write ``plan_golden.json``: the flat plan dicts of a reference commit, for test_plan_sections.

Run it in a checkout of the commit whose wire format is the reference (it was main at the commit
the file names, before the plan had sections): ``PYTHONPATH=. python
tests/unit/data/make_plan_golden.py``. The inputs are the examples' ``PLAN`` literals and a set
that sets every field; the outputs are whatever that commit's ``TrainingPlan.to_dict`` returns.
"""

from __future__ import annotations

import ast
import json
import subprocess
from pathlib import Path
from typing import Any

from policies.plan import TrainingPlan

PEERS = [f"{i:064x}" for i in (1, 2, 3)]
PLANS: dict[str, dict[str, Any]] = {
    "defaults-noise": {"noise_multiplier": 1.0},
    "rdp-adam-mse": {
        "noise_multiplier": 0.8,
        "optimizer": "adam",
        "loss": "mse",
        "accountant": "rdp",
        "standardize": False,
        "momentum": 0.0,
    },
    "sgd-momentum": {
        "target_epsilon": 2.5,
        "momentum": 0.9,
        "delta": 1e-6,
        "max_grad_norm": 0.5,
        "validation_fraction": 0.1,
    },
    "no-metrics": {
        "noise_multiplier": 1.2,
        "site_metrics": False,
        "metric_noise_multiplier": 5.0,
        "metric_loss_clip": 2.0,
    },
    "class-weight-list": {"noise_multiplier": 1.0, "class_weight": [1.0, 3.0, 0.5]},
    "class-weight-balanced-binary": {
        "target_epsilon": 4.0,
        "class_weight": "balanced",
        "binary_metrics": True,
    },
    "pos-weight": {
        "noise_multiplier": 1.0,
        "loss": "bce_with_logits",
        "pos_weight": 4.0,
        "binary_metrics": True,
    },
    "pos-weight-balanced": {
        "noise_multiplier": 1.0,
        "loss": "bce_with_logits",
        "pos_weight": "balanced",
    },
    "secure-peers": {
        "noise_multiplier": 1.0,
        "aggregation": "secure",
        "peers": PEERS[:2],
        "update_norm_bound": 5.0,
    },
    "distributed-full": {
        "target_epsilon": 3.0,
        "aggregation": "secure",
        "dp": "distributed",
        "peers": PEERS,
        "sample_rate": 0.01,
        "min_sites": 3,
        "colluding_sites": 1,
        "site_metrics": False,
        "validation_fraction": 0.0,
    },
    "frozen-personal-prox": {
        "noise_multiplier": 1.0,
        "frozen": ["0.weight"],
        "personalize_layers": ["2"],
        "personalize_epochs": 3,
        "proximal_mu": 0.5,
        "learning_rate": 0.2,
    },
    "topk-int-values": {
        "noise_multiplier": 2,
        "compression": "topk",
        "topk_fraction": 1,
        "learning_rate": 1,
        "rounds": 1000,
        "batch_size": 65536,
    },
}


def example_plans(root: Path) -> dict[str, dict[str, Any]]:
    plans = {}
    for path in sorted((root / "examples").glob("*.py")):
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, ast.Assign) and getattr(node.targets[0], "id", "") == "PLAN":
                plans[f"examples/{path.name}"] = ast.literal_eval(node.value)
    return plans


def main() -> None:
    root = Path.cwd()
    commit = subprocess.run(
        ["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True
    ).stdout.strip()
    rows = []
    for name, fields in {**example_plans(root), **PLANS}.items():
        flat = TrainingPlan.from_dict(fields).to_dict()
        rows.append({"name": name, "input": fields, "to_dict": flat, "repr": repr(flat)})
    out = {"made_from_commit": commit, "plans": rows}
    (root / "tests/unit/data/plan_golden.json").write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
