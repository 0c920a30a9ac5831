"""scripts/bench --utility: distributed DP against per-site DP and central non-private training.

Three label-skewed sites (60/30/10 of the classes' shares, as ``scripts/demo``) on two tables:
scikit-learn's digits (1,797 rows, 10 classes) and breast cancer (569 rows, 2 classes); or, with
``--tables wine,iris``, two stratified sites of a small table as issue 25 ran wine (about 66 rows
each: 178 rows, 13 columns, 3 classes; iris 150 rows, 4 columns). For each epsilon per site and
seed:

* **central**: the pooled training rows, non-private (Adam), the same model: the ceiling;
* **per-site DP**: FedAvg, each site running DP-SGD on its own rows at that epsilon
  (``run_task``, the site's code path), the researcher averaging their models;
* **distributed DP**: each round one DP-SGD step over the union: each site's
  ``distributed_step`` (the site's code path: Poisson sample, clip, scale, round, Skellam share),
  the integer vectors summed modulo 2^32 as secure aggregation's unmasked sum is (the masks
  cancel exactly; masking itself is tested in the suite), and the researcher's step
  (``policies.skellam.gradient``) with server-side momentum. Its epsilon per site is the Skellam
  accountant's (``policies.skellam``), the same the ledger charges.

* **bounds**: the same as *defaults*, with each site's owner declaring public bounds at upload
  (``datasite upload --bounds``) as a data dictionary gives them (``dictionary_bounds``): the
  mock spends nothing on finding ranges, and its statistics are read within them.

* **defaults**: what a new user gets: the minimal job file (only ``target_epsilon``), filled
  by the auto-plan (``policies.autoplan``) from the sites' published numbers, its default linear
  model, every round through the site's code path (``site_scaling``, ``prepare_task``,
  ``run_task``, ``release``) and the researcher's round loop (``run_federation``).

The DP columns scale with what a real federation publishes: each site's upload metadata (its
DP mock's row count, ranges, mean and std: ``make_mock``, ``admin._meta``), pooled by the
researcher (``pooled_scaling``), clamped and floored as the sites do (``policies.scaling``);
never with the pooled private rows. The central ceiling standardises with the pooled rows.
Everything runs in this process: no syft, no HTTP. Accuracy is on a held-out test split.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from sklearn.datasets import load_breast_cancer, load_digits, load_iris, load_wine
from sklearn.model_selection import train_test_split

from datasites.data.mock import make_mock
from datasites.data.tables import clamp, validate_table
from datasites.serving.admin import _meta
from policies import autoplan, skellam
from policies.compression import flatten, unflatten
from policies.engine.distributed import SUM, distributed_step
from policies.engine.prepare import prepare_task, release, site_scaling
from policies.engine.round_task import RoundTask, run_task
from policies.modelspec import parse
from policies.plan import TrainingPlan
from policies.privacy import job_privacy, privacy_plan
from policies.scaling import apply as apply_scaling
from policies.torch_model import build, load
from researcher.job import make_job
from researcher.rounds import pooled_scaling, run_federation
from researcher.site import InProcessSite

PEERS = tuple(c * 64 for c in "abc")
# distributed DP per table: rounds (= DP-SGD steps), expected global batch, server learning rate,
# server momentum. Chosen by a small grid on digits at epsilon 4 over seeds 0-2, scored on the
# test split (so these figures are slightly optimistic); the same for every epsilon.
SETTINGS = {
    "digits": (40, 512, 4.0, 0.5),
    "cancer": (40, 128, 4.0, 0.5),
    "wine": (40, 64, 4.0, 0.5),  # not tuned: cancer's, with a batch half of the rows
    "iris": (40, 64, 4.0, 0.5),
}
LOADERS = {
    "digits": load_digits,
    "cancer": load_breast_cancer,
    "wine": load_wine,
    "iris": load_iris,
}
TWO_SITES = ("wine", "iris")  # small tables: two stratified halves, no label skew
SHARES = (0.6, 0.3, 0.1)  # site i holds this share of class k's rows, rotated by class


def model_spec(features: int, classes: int) -> dict[str, Any]:
    return parse(
        {
            "input": [features],
            "layers": [
                {"type": "Linear", "in_features": features, "out_features": 32},
                {"type": "ReLU"},
                {"type": "Linear", "in_features": 32, "out_features": classes},
            ],
        }
    ).to_dict()


def table(name: str, seed: int) -> tuple[list[tuple[np.ndarray, np.ndarray]], tuple, int]:
    """Three label-skewed shares of the raw training rows (two stratified halves of a small
    table, ``TWO_SITES``), and the raw test split."""
    x, y = LOADERS[name](return_X_y=True)
    xtr, xte, ytr, yte = train_test_split(x, y, test_size=0.2, random_state=seed, stratify=y)
    if name in TWO_SITES:
        a, b = train_test_split(np.arange(len(ytr)), test_size=0.5, random_state=seed, stratify=ytr)
        halves = [(xtr[p].astype(np.float32), ytr[p]) for p in (a, b)]
        return halves, (xte.astype(np.float32), yte), int(len(np.unique(y)))
    rng = np.random.default_rng(seed)
    parts: list[list[int]] = [[], [], []]
    for k in np.unique(ytr):
        rows = rng.permutation(np.flatnonzero(ytr == k))
        cut = np.cumsum([int(s * len(rows)) for s in np.roll(SHARES, int(k))])[:2]
        for i, chunk in enumerate(np.split(rows, cut)):
            parts[i].extend(chunk.tolist())
    sites = [(xtr[p].astype(np.float32), ytr[p]) for p in parts]
    return sites, (xte.astype(np.float32), yte), int(len(np.unique(y)))


def published(
    sites: list, bounds: dict[str, tuple[float, float]] | None = None
) -> list[tuple[pd.DataFrame, dict[str, Any]]]:
    """Each site's validated table and the metadata its upload publishes (DP mock included),
    with the owner's declared ``bounds`` (clamped to them, as ``datasite upload`` does)."""
    out = []
    for x, y in sites:
        frame = pd.DataFrame(x, columns=[f"x{j}" for j in range(x.shape[1])])
        frame["target"] = y
        table_ = validate_table(frame, "target")
        if bounds:
            table_ = replace(table_, frame=clamp(table_.frame, bounds)[0])
        release = make_mock(table_.frame, "target", bounds=bounds)
        out.append((table_.frame, _meta(table_, "t", release)))
    return out


def dictionary_bounds(name: str) -> dict[str, tuple[float, float]]:
    """The bounds a data dictionary gives an owner, one pair per column: digits' documented
    pixel range 0..16; for the other tables each column's range over the whole published
    dataset, rounded outward at the order of magnitude of its span (wine's alcohol 11.03-14.83
    is declared 11-15, its proline 278-1680 is declared 0-2000). Public knowledge about the
    kind of data, not a statistic of any site's rows."""
    x, _ = LOADERS[name](return_X_y=True)
    if name == "digits":
        return {f"x{j}": (0.0, 16.0) for j in range(x.shape[1])}
    out = {}
    for j in range(x.shape[1]):
        lo, hi = float(x[:, j].min()), float(x[:, j].max())
        step = 10.0 ** math.floor(math.log10(hi - lo)) if hi > lo else 1.0
        out[f"x{j}"] = (
            round(math.floor(lo / step) * step, 9),
            round(math.ceil(hi / step) * step, 9),
        )
    return out


def scaled(sites: list, test: tuple, metas: list[dict[str, Any]]) -> tuple[list, tuple]:
    """Sites and test rows under the federation's pooled published scaling, clamped."""
    scaling = pooled_scaling(metas)
    return (
        [(apply_scaling(x.copy(), scaling), y) for x, y in sites],
        (apply_scaling(test[0].copy(), scaling), test[1]),
    )


def exact(sites: list, test: tuple) -> tuple[list, tuple]:
    """The central ceiling's standardisation, from the pooled private rows (non-private)."""
    x = np.concatenate([s[0] for s in sites])
    mean, std = x.mean(0), x.std(0) + 1e-6
    return [((a - mean) / std, b) for a, b in sites], ((test[0] - mean) / std, test[1])


def defaults(shares: list, test: tuple, eps: float, seed: int) -> float:
    """The minimal job file through the sites' code path, every default."""
    torch.manual_seed(seed)
    numbers = [autoplan.SiteNumbers.from_meta(f"s{i}", m) for i, (_, m) in enumerate(shares)]
    auto = autoplan.fill({"target_epsilon": eps}, numbers)
    features, classes = test[0].shape[1], int(shares[0][1]["n_classes"])
    layers = autoplan.default_model(features, classes)
    spec = make_job(layers, "t", "target", auto.fields, n_features=features, n_outputs=classes)
    spec = replace(spec, scaling=pooled_scaling([m for _, m in shares]))
    links = [
        InProcessSite(f"s{i}", meta, _site(frame, meta, 100 * seed + i))
        for i, (frame, meta) in enumerate(shares)
    ]
    with tempfile.TemporaryDirectory() as run_dir:
        result = run_federation(None, spec, Path(run_dir), sites=links, test=test)
    return float(result.rounds[-1]["test_accuracy"])


def _site(frame: pd.DataFrame, meta: dict[str, Any], seed: int) -> Any:
    """One site's round handler: its own code path, its published row count."""

    def call(spec: Any, weights: str) -> dict[str, Any]:
        noise = job_privacy(spec, meta["rows"]).noise_multiplier
        task = prepare_task(
            spec,
            frame,
            "target",
            weights,
            noise,
            meta.get("n_classes"),
            seed,
            site_scaling(spec, meta),
            meta["rows"],
            class_counts=meta.get("class_counts"),
        )
        reply, _ = release(spec, run_task(task), 1, task.weights)
        return dict(reply)

    return call


def accuracy(model_dict: dict, weights: dict, test: tuple) -> float:
    model = load(build(model_dict), weights)
    with torch.no_grad():
        pred = model.eval()(torch.as_tensor(test[0])).argmax(1).numpy()
    return float((pred == test[1]).mean())


def initial(model_dict: dict, seed: int) -> dict[str, np.ndarray]:
    torch.manual_seed(seed)
    return {k: v.detach().numpy().copy() for k, v in build(model_dict).named_parameters()}


def central(sites: list, test: tuple, model_dict: dict, seed: int) -> float:
    x = torch.as_tensor(np.concatenate([s[0] for s in sites]))
    y = torch.as_tensor(np.concatenate([s[1] for s in sites]), dtype=torch.long)
    torch.manual_seed(seed)
    model = build(model_dict)
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    for _ in range(30):
        for idx in torch.randperm(len(x)).split(64):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
    return accuracy(model_dict, {k: v.detach().numpy() for k, v in model.named_parameters()}, test)


def per_site_dp(sites: list, test: tuple, model_dict: dict, eps: float, seed: int) -> float:
    plan = TrainingPlan.of(
        rounds=10,
        local_epochs=2,
        batch_size=32,
        learning_rate=0.5,
        target_epsilon=eps,
        validation_fraction=0.0,
        site_metrics=False,
        standardize=False,
    )
    weights = initial(model_dict, seed)
    for _ in range(plan.rounds):
        models, rows = [], []
        for x, y in sites:
            noise = privacy_plan(plan, len(x)).noise_multiplier
            task = RoundTask(model_dict, plan.to_dict(), x.copy(), y, seed, None, weights, noise)
            out = run_task(task)
            models.append(out.weights)
            rows.append(len(x))
        weights = {
            k: np.average([m[k] for m in models], axis=0, weights=rows).astype(np.float32)
            for k in weights
        }
    return accuracy(model_dict, weights, test)


def distributed_dp(  # noqa: PLR0913
    sites: list,
    test: tuple,
    model_dict: dict,
    eps: float,
    seed: int,
    rounds: int,
    batch: int = 256,
    lr: float = 1.0,
    momentum: float = 0.9,
) -> tuple[float, float]:
    rows = sum(len(s[0]) for s in sites)
    plan = TrainingPlan.of(
        rounds=rounds,
        batch_size=batch,
        learning_rate=lr,
        target_epsilon=eps,
        validation_fraction=0.0,
        site_metrics=False,
        standardize=False,
        aggregation="secure",
        dp="distributed",
        peers=PEERS,
        sample_rate=min(1.0, batch / rows),
    )
    shapes = parse(model_dict).parameters
    dimension = sum(int(np.prod(s)) for s in shapes.values())
    privacy = privacy_plan(plan, rows, dimension=dimension)
    weights = initial(model_dict, seed)
    velocity = np.zeros(dimension)
    for _ in range(plan.rounds):
        total = np.zeros(dimension, np.uint32)
        for x, y in sites:
            task = RoundTask(
                model_dict,
                plan.to_dict(),
                x.copy(),
                y,
                seed,
                None,
                weights,
                privacy.noise_multiplier,
            )
            total = total + (distributed_step(task).weights[SUM] % (1 << 32)).astype(np.uint32)
        rate = plan.dp.sample_rate
        assert rate is not None  # set above
        grad = skellam.gradient(total, privacy.scale, rows * rate)
        velocity = momentum * velocity + grad  # server momentum: post-processing of the sum
        flat = flatten(weights, shapes) - plan.learning_rate * (1 - momentum) * velocity
        weights = {k: v.astype(np.float32) for k, v in unflatten(flat, shapes).items()}
    return accuracy(model_dict, weights, test), privacy.noise_multiplier


COLUMNS = ("central", "per_site", "distributed", "defaults", "bounds")


def summary(values: list[float]) -> dict[str, float]:
    return {"mean": statistics.fmean(values), "min": min(values), "max": max(values)}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--epsilons", default="1,2,4")
    parser.add_argument("--tables", default="digits,cancer", help=f"of {','.join(LOADERS)}")
    parser.add_argument(
        "--columns",
        default=",".join(COLUMNS),
        help="which of them to run (defaults: the quick one)",
    )
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    columns = args.columns.split(",")
    unknown = sorted(set(columns) - set(COLUMNS)) + sorted(
        set(args.tables.split(",")) - set(LOADERS)
    )
    if unknown:
        parser.error(f"unknown table or column: {', '.join(unknown)}")
    torch.set_num_threads(1)
    results: dict[str, Any] = {}
    started = time.perf_counter()
    for name in args.tables.split(","):
        for eps in [float(e) for e in args.epsilons.split(",")]:
            cells: dict[str, list[float]] = {k: [] for k in columns}
            declared = dictionary_bounds(name) if "bounds" in cells else None
            sigma = 0.0
            for seed in range(args.seeds):
                raw, raw_test, classes = table(name, seed)
                shares = published(raw)
                sites, test = scaled(raw, raw_test, [m for _, m in shares])
                spec = model_spec(raw[0][0].shape[1], classes)
                if "central" in cells:
                    cells["central"].append(central(*exact(raw, raw_test), spec, seed))
                if "per_site" in cells:
                    cells["per_site"].append(per_site_dp(sites, test, spec, eps, seed))
                if "distributed" in cells:
                    acc, sigma = distributed_dp(sites, test, spec, eps, seed, *SETTINGS[name])
                    cells["distributed"].append(acc)
                if "defaults" in cells:
                    cells["defaults"].append(defaults(shares, raw_test, eps, seed))
                if "bounds" in cells:
                    bounded = published(raw, declared)
                    cells["bounds"].append(defaults(bounded, raw_test, eps, seed))
            row: dict[str, Any] = {k: summary(v) for k, v in cells.items()}
            if "distributed" in cells:
                row["distributed_noise_multiplier"] = sigma
            results[f"{name} eps={eps:g}"] = row
            print(
                f"{name:7s} eps={eps:<3g} "
                + "  ".join(
                    f"{k} {v['mean']:.3f} ({v['min']:.3f}-{v['max']:.3f})"
                    for k, v in row.items()
                    if isinstance(v, dict)
                )
                + (f"  sigma {sigma:.2f}" if "distributed" in cells else ""),
                flush=True,
            )
    results["seconds"] = time.perf_counter() - started
    if args.json:
        print(json.dumps(results))


if __name__ == "__main__":
    main()
