"""Tune and check ``policies.autoplan`` through the sites' own code path, in this process.

Each table is split into sites (IID or label-skewed, 60/30/10 rotated by class as
``scripts/bench --utility``); each site's published metadata is what an upload publishes today
(the DP mock's row count, class counts, and the mock's feature mean and std, ``datasites.data.mock``
and ``datasites.serving.admin._meta``), or, with ``--scaling off``, the plan does not standardise,
or, with ``--scaling exact`` (for tuning the optimizer apart from the statistics only: no real
federation can do it), the pooled private rows' exact mean and std.
The job is the minimal job file: ``{"target_epsilon": eps}`` and no model (the auto-plan's
default, a linear model), filled by ``policies.autoplan.fill`` from those public numbers. Rounds
run through ``prepare_task`` / ``run_task`` / ``release`` and ``researcher.rounds.run_federation``
(FedAvg), as ``scripts/bench_algorithms.py`` does. Centralized: scikit-learn's logistic
regression on the pooled, exactly standardised training rows (non-private), the same test split.

    PYTHONPATH=. python scripts/tune_autoplan.py --tables iris diabetes synthetic --seeds 3
    PYTHONPATH=. python scripts/tune_autoplan.py --set TARGET_STEPS=200 --set BASE_LR=1.0
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from sklearn import datasets
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import train_test_split

from datasites.data.mock import make_mock
from policies import autoplan
from policies.engine.prepare import prepare_task, release
from policies.engine.round_task import run_task
from policies.plan import JobSpec
from policies.privacy import privacy_plan
from researcher.job import make_job
from researcher.rounds import pooled_scaling, run_federation
from researcher.site import InProcessSite

SHARES = (0.6, 0.3, 0.1)
# table -> (loader, sites, label skew); the goal tables (wine, digits) are checked, not tuned on
TABLES: dict[str, tuple[str, int, bool]] = {
    "iris": ("iris", 2, False),
    "iris-skew": ("iris", 3, True),
    "diabetes": ("diabetes", 2, False),
    "synthetic": ("synthetic", 3, False),
    "synthetic-skew": ("synthetic", 3, True),
    "synthetic-small": ("synthetic-small", 2, False),
    "wine": ("wine", 2, False),
    "digits-skew": ("digits", 3, True),
}


def load(name: str) -> pd.DataFrame:
    if name == "diabetes":  # binarised at the median of the disease progression
        x, y = datasets.load_diabetes(return_X_y=True)
        y = (y > np.median(y)).astype(int)
    elif name == "synthetic":
        x, y = datasets.make_classification(
            1500, 20, n_informative=8, n_classes=4, n_clusters_per_class=1, random_state=7
        )
        x = x * np.array([1, 10, 100, 0.1] * 5) + np.array([0, 50, -300, 2] * 5)
    elif name == "synthetic-small":
        x, y = datasets.make_classification(
            160, 10, n_informative=5, n_classes=3, n_clusters_per_class=1, random_state=3
        )
        x = x * np.array([1, 10, 100, 0.1, 1000] * 2) + 5
    else:
        x, y = getattr(datasets, f"load_{name}")(return_X_y=True)
    frame = pd.DataFrame(x, columns=[f"x{i}" for i in range(x.shape[1])])
    frame["target"] = y.astype(int)
    return frame


def split(frame: pd.DataFrame, n_sites: int, skew: bool, seed: int) -> tuple[list, pd.DataFrame]:
    train, test = train_test_split(
        frame, test_size=0.25, stratify=frame["target"], random_state=seed
    )
    rng = np.random.default_rng(seed)
    parts: list[list[int]] = [[] for _ in range(n_sites)]
    for k in sorted(train["target"].unique()):
        rows = rng.permutation(np.flatnonzero(train["target"].to_numpy() == k))
        shares = np.roll(SHARES, int(k)) if skew else np.full(n_sites, 1.0 / n_sites)
        cut = np.cumsum([int(s * len(rows)) for s in shares])[:-1]
        for i, chunk in enumerate(np.split(rows, cut)):
            parts[i].extend(chunk.tolist())
    sites = [train.iloc[p].reset_index(drop=True) for p in parts]
    return sites, test.reset_index(drop=True)


def published(frame: pd.DataFrame, classes: list[int]) -> dict[str, Any]:
    """What an upload publishes today: noisy rows, mock class counts, mock mean and std."""
    release_ = make_mock(frame, "target")
    mock = release_.mock
    x = mock.drop(columns=["target"]).to_numpy(np.float64)
    shares = mock["target"].value_counts(normalize=True).reindex(classes, fill_value=0.0)
    return {
        "rows": release_.rows,
        "mock_rows": len(mock),
        "mock_epsilon": release_.epsilon,
        "n_classes": len(classes),
        "class_counts": [round(float(v) * release_.rows, 1) for v in shares],
        "feature_mean": x.mean(0).tolist(),
        "feature_std": [float(v) or 1.0 for v in x.std(0)],
    }


class Site:
    """One site answering round calls with the datasite's code path."""

    def __init__(self, frame: pd.DataFrame, spec: JobSpec, meta: dict, seed: int) -> None:
        self.frame, self.meta, self.seed = frame, meta, seed
        self.noise = privacy_plan(spec.plan, meta["rows"]).noise_multiplier
        self.calls = 0

    def __call__(self, spec: JobSpec, weights: str) -> dict[str, Any]:
        scaling = (spec.scaling["mean"], spec.scaling["std"]) if spec.scaling else None
        task = prepare_task(
            spec,
            self.frame,
            "target",
            weights,
            self.noise,
            self.meta["n_classes"],
            self.seed,
            scaling,
            self.meta["rows"],
            class_counts=self.meta["class_counts"],
        )
        self.calls += 1
        reply, _ = release(spec, run_task(task), self.calls, task.weights, None)
        return reply


def central(sites: list[pd.DataFrame], test: pd.DataFrame) -> float:
    train = pd.concat(sites)
    x, y = train.drop(columns=["target"]).to_numpy(), train["target"].to_numpy()
    mean, std = x.mean(0), x.std(0) + 1e-9
    model = LogisticRegression(max_iter=5000).fit((x - mean) / std, y)
    xt = (test.drop(columns=["target"]).to_numpy() - mean) / std
    return float(model.score(xt, test["target"].to_numpy()))


def one_run(table: str, eps: float, seed: int, scaling: str) -> dict[str, Any]:
    source, n_sites, skew = TABLES[table]
    frame = load(source)
    classes = sorted(frame["target"].unique().tolist())
    sites, test = split(frame, n_sites, skew, seed)
    metas = [published(s, classes) for s in sites]
    numbers = [autoplan.SiteNumbers.from_meta(f"s{i}", m) for i, m in enumerate(metas)]
    plan_fields: dict[str, Any] = {"target_epsilon": eps}
    if scaling == "off":
        plan_fields["standardize"] = False
    auto = autoplan.fill(plan_fields, numbers)
    n_features = frame.shape[1] - 1
    model = autoplan.default_model(n_features, len(classes))
    spec = make_job(model, "t", "target", auto.fields, n_features=n_features)
    if scaling == "published":
        spec = replace(spec, scaling=pooled_scaling(metas))
    elif scaling == "exact":  # tuning only: no federation can scale with its private rows
        x = pd.concat(sites).drop(columns=["target"]).to_numpy(np.float64)
        std = np.where(x.std(0) > 1e-6, x.std(0), 1.0)
        spec = replace(spec, scaling={"mean": x.mean(0).tolist(), "std": std.tolist()})
    torch.manual_seed(seed)
    handlers = [
        Site(s, spec, m, seed * 10 + i) for i, (s, m) in enumerate(zip(sites, metas, strict=True))
    ]
    x = test.drop(columns=["target"]).to_numpy(np.float32)
    y = test["target"].to_numpy()
    with tempfile.TemporaryDirectory() as tmp:
        result = run_federation(
            None,
            spec,
            Path(tmp),
            sites=[
                InProcessSite(f"s{i}", m, h)
                for i, (h, m) in enumerate(zip(handlers, metas, strict=True))
            ],
            test=(x, y),
        )
    return {
        "table": table,
        "seed": seed,
        "scaling": scaling,
        "accuracy": result.rounds[-1]["test_accuracy"],
        "central": central(sites, test),
        "plan": {k: auto.fields[k] for k in autoplan.TUNED if k in auto.fields},
        "noise_to_signal": max(auto.noise_to_signal.values()),
    }


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tables", nargs="+", default=["iris", "diabetes", "synthetic"])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--epsilon", type=float, default=3.0)
    parser.add_argument("--scaling", nargs="+", default=["published", "off"])
    parser.add_argument("--set", action="append", default=[], help="autoplan CONSTANT=value")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    for item in args.set:
        key, value = item.split("=")
        setattr(autoplan, key, type(getattr(autoplan, key))(float(value)))
    runs = []
    for table in args.tables:
        for scaling in args.scaling:
            mine = [one_run(table, args.epsilon, s, scaling) for s in range(args.seeds)]
            runs += mine
            acc = [r["accuracy"] for r in mine]
            cen = statistics.mean(r["central"] for r in mine)
            print(
                f"{table:16s} {scaling:9s} eps {args.epsilon:g}: auto {statistics.mean(acc):.3f} "
                f"({min(acc):.3f}-{max(acc):.3f}) central {cen:.3f}  plan {mine[0]['plan']} "
                f"nts {mine[0]['noise_to_signal']:.3f}",
                flush=True,
            )
    if args.json:
        args.json.write_text(json.dumps(runs, indent=2))
    return runs


if __name__ == "__main__":
    main()
