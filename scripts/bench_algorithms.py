"""scripts/bench --algorithms: every federated algorithm on the label-skewed demo federation.

The three hospitals of ``scripts/demo`` (breast cancer, label skew 60/30/10), each answered in
this process by the sites' own code path (``prepare_task``, the DP-SGD trainer ``run_task``,
``release`` with the top-k residual kept per site, and the personalization pass); the researcher
side is ``researcher.rounds.run_federation`` with each strategy. No syft and no HTTP: what is
compared is the algorithms, at the same epsilon per site. For each algorithm and seed:

* final accuracy of the global model on the held-out test split;
* rounds until the test accuracy first reaches 95% of that final accuracy;
* bytes per round: the update payloads all sites sent (base64 characters, as they travel).

For personalization: each site's model after the fine-tuning pass against the global model, on
the test split weighted to that site's own class mix (exact, here in the simulation; a real site
releases only the DP metric).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from demo import SITES, split_data

from policies.engine.prepare import prepare_task, release
from policies.engine.round_task import run_task
from policies.plan import JobSpec
from policies.privacy import privacy_plan
from policies.wire import ReplayLast, decode_call
from researcher import model as local_model
from researcher.job import make_job
from researcher.rounds import pooled_scaling, run_federation
from researcher.site import InProcessSite
from researcher.strategy import strategy_named

MODEL = [
    {"type": "Linear", "in_features": 30, "out_features": 32},
    {"type": "ReLU"},
    {"type": "Linear", "in_features": 32, "out_features": 2},
]
EPSILON = 3.0
ROUNDS = 10
# (name in the table, strategy, plan fields)
ALGORITHMS: list[tuple[str, str, dict[str, Any]]] = [
    ("fedavg", "fedavg", {}),
    ("fedavgm", "fedavgm", {}),
    ("fedadam", "fedadam", {}),
    ("fedyogi", "fedyogi", {}),
    ("fedprox mu=0.1", "fedavg", {"proximal_mu": 0.1}),
    ("int8", "fedavg", {"compression": "int8"}),
    ("top-k 10%", "fedavg", {"compression": "topk", "topk_fraction": 0.1}),
    ("median", "median", {}),
    ("trimmed-mean", "trimmed-mean", {}),
    ("norm-bounded", "norm-bounded", {}),
    ("personalized head", "fedavg", {"personalize_layers": ["2"], "personalize_epochs": 2}),
]


def base_plan() -> dict[str, Any]:
    return {
        "rounds": ROUNDS,
        "local_epochs": 2,
        "batch_size": 16,
        "learning_rate": 0.5,
        "target_epsilon": EPSILON,
        "validation_fraction": 0.1,
        "site_metrics": False,
    }


class SimulatedSite:
    """One hospital answering round calls with the datasite's code path, in this process."""

    def __init__(self, name: str, frame: pd.DataFrame, spec: JobSpec, seed: int) -> None:
        self.name, self.frame, self.spec = name, frame, spec
        self.noise = privacy_plan(spec.plan, len(frame)).noise_multiplier
        self.calls, self.residual, self.last = 0, None, None
        self.personal: dict[str, np.ndarray] | None = None
        self.bytes: list[int] = []
        self.seed = seed

    def __call__(self, spec: JobSpec, weights: str) -> dict[str, Any]:
        if isinstance(decode_call(weights, spec.architecture.parameters), ReplayLast):
            return self.last or {"status": "refused", "reason": "nothing released"}
        personalize = spec.plan.algorithm.personalizes and self.calls == spec.plan.rounds
        task = prepare_task(
            spec,
            self.frame,
            "target",
            weights,
            self.noise,
            2,
            self.seed,
            (spec.scaling["mean"], spec.scaling["std"]),
            len(self.frame),
            personalize=personalize,
        )
        self.calls += 1
        output = run_task(task)
        if personalize:
            self.personal = {**task.weights, **output.weights}
            self.last = {
                "status": "ok",
                "round": self.calls,
                "personalized": True,
                "n": output.n,
                "metrics": output.metrics,
            }
            return self.last
        self.last, self.residual = release(spec, output, self.calls, task.weights, self.residual)
        self.bytes.append(len(self.last.get("weights") or self.last["update"]))
        return self.last


def accuracy(
    spec: JobSpec, weights: dict, x: np.ndarray, y: np.ndarray, w: np.ndarray | None = None
) -> float:
    model = local_model.load(local_model.build(spec), weights)
    with torch.no_grad():
        pred = model.eval()(torch.as_tensor(x, dtype=torch.float32)).argmax(1).numpy()
    hits = (pred == y).astype(float)
    return float(np.average(hits, weights=w))


def one_run(name: str, strategy: str, fields: dict, seed: int) -> dict[str, Any]:
    shares, test = split_data(seed)
    torch.manual_seed(seed)
    metas = [
        {
            "rows": len(s),
            "feature_mean": s.drop(columns=["target"]).mean().tolist(),
            "feature_std": s.drop(columns=["target"]).std(ddof=0).tolist(),
        }
        for s in shares
    ]
    spec = make_job(MODEL, "cancer", "target", {**base_plan(), **fields}, n_features=30)
    from dataclasses import replace

    spec = replace(spec, scaling=pooled_scaling(metas))
    sims = [
        SimulatedSite(n, s, spec, seed * 10 + i)
        for i, (n, s) in enumerate(zip(SITES, shares, strict=True))
    ]
    x = test.drop(columns=["target"]).to_numpy(np.float32)
    y = test["target"].to_numpy()
    with tempfile.TemporaryDirectory() as tmp:
        result = run_federation(
            None,
            spec,
            Path(tmp),
            sites=[InProcessSite(s.name, m, s) for s, m in zip(sims, metas, strict=True)],
            strategy=strategy_named(strategy),
            test=(x, y),
        )
    curve = [r["test_accuracy"] for r in result.rounds]
    final = curve[-1]
    reach = next(i + 1 for i, a in enumerate(curve) if a >= 0.95 * final)
    out = {
        "algorithm": name,
        "seed": seed,
        "accuracy": final,
        "rounds_to_95": reach,
        "bytes_per_round": sum(sum(s.bytes) for s in sims) / len(curve),
    }
    if spec.plan.algorithm.personalizes:
        xs = (x - np.asarray(spec.scaling["mean"])) / np.asarray(spec.scaling["std"])
        gains = []
        for sim, share in zip(sims, shares, strict=True):
            mix = share["target"].value_counts(normalize=True)
            w = np.array([mix.get(label, 0.0) / max((y == label).mean(), 1e-9) for label in y])
            gains.append(
                (accuracy(spec, result.weights, xs, y, w), accuracy(spec, sim.personal, xs, y, w))
            )
        out["global_on_own_mix"] = [g for g, _ in gains]
        out["personalized_on_own_mix"] = [p for _, p in gains]
    return out


def summarise(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    rows = []
    for name, _, _ in ALGORITHMS:
        mine = [r for r in runs if r["algorithm"] == name]
        if not mine:
            continue
        acc = [r["accuracy"] for r in mine]
        row = {
            "algorithm": name,
            "seeds": len(mine),
            "accuracy_mean": statistics.mean(acc),
            "accuracy_min": min(acc),
            "accuracy_max": max(acc),
            "rounds_to_95_mean": statistics.mean(r["rounds_to_95"] for r in mine),
            "bytes_per_round": statistics.mean(r["bytes_per_round"] for r in mine),
        }
        if "personalized_on_own_mix" in mine[0]:
            row["global_on_own_mix"] = statistics.mean(
                v for r in mine for v in r["global_on_own_mix"]
            )
            row["personalized_on_own_mix"] = statistics.mean(
                v for r in mine for v in r["personalized_on_own_mix"]
            )
        rows.append(row)
    return rows


def main(argv: list[str] | None = None, say: Callable[[str], None] = print) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--only", default="", help="comma-separated algorithm names")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    wanted = {a.strip() for a in args.only.split(",") if a.strip()}
    runs = []
    for name, strategy, fields in ALGORITHMS:
        if wanted and name not in wanted:
            continue
        for seed in range(args.seeds):
            runs.append(one_run(name, strategy, fields, seed))
            say(json.dumps(runs[-1]))
    rows = summarise(runs)
    if not args.json:
        from policies.console import table

        table(
            f"algorithms: label-skewed demo federation, epsilon {EPSILON} per site, {ROUNDS} rounds, "
            f"{args.seeds} seeds",
            ["algorithm", "accuracy mean (min-max)", "rounds to 95%", "bytes/round"],
            [
                [
                    r["algorithm"],
                    f"{r['accuracy_mean']:.3f} ({r['accuracy_min']:.3f}-{r['accuracy_max']:.3f})",
                    f"{r['rounds_to_95_mean']:.1f}",
                    f"{r['bytes_per_round']:.0f}",
                ]
                for r in rows
            ],
        )
    print(json.dumps(rows))
    return rows


if __name__ == "__main__":
    main()
