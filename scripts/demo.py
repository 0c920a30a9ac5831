"""The demo federation: three hospitals, non-IID breast-cancer data, DP-SGD, federated averaging.

Launches three real datasites on loopback ports (embedded SQLite, state in a temporary folder),
splits scikit-learn's bundled breast-cancer data into a held-out test split (25%, stratified) and
three label-skewed site shares, creates a researcher on each site, submits one DP job, approves
it as each site's admin through the ``datasite`` CLI (printing the policy report), trains the
federation and compares it with a non-private model trained on the pooled training rows.

The job's plan is the minimal job file's: only ``target_epsilon``, every other field filled
by the auto-plan from the sites' published numbers (``minimal_plan``), as a new user gets it.
No setting was chosen by looking at this demo's test split.
"""

from __future__ import annotations

import argparse
import json
import logging
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from sklearn.datasets import load_breast_cancer
from sklearn.model_selection import train_test_split
from torch import nn

from datasites.data.mock import DEFAULT_MOCK_EPSILON
from datasites.data.tables import validate_table
from datasites.ledger.budget import BudgetLedger
from datasites.ledger.store import SiteStore
from datasites.review.access import DatasetPolicy, PolicyStore
from datasites.serving import admin, process
from datasites.serving.config import SiteDir, init_site
from policies import autoplan
from policies.tls import self_signed
from researcher import api
from researcher.federation import Federation
from researcher.job import make_job
from researcher.strategy import FedAvgM

SITES = ("hospital-a", "hospital-b", "hospital-c")
# share of each class's training rows per site: label skew (class 0 = malignant)
SKEW = {0: (0.6, 0.3, 0.1), 1: (0.1, 0.3, 0.6)}
EMAIL = "ada@uni.edu"


def make_model(n_features: int, n_outputs: int) -> nn.Module:
    """The researcher's model: built here, sent as a declarative spec (no code travels)."""
    return nn.Linear(n_features, n_outputs)


def plan(rounds: int, epsilon: float) -> dict:
    """The demo's former hand-tuned plan (``scripts/bench`` times rounds with it)."""
    return {
        "rounds": rounds,
        "local_epochs": 2,
        "batch_size": 16,
        "learning_rate": 0.5,
        "max_grad_norm": 1.0,
        "target_epsilon": epsilon,
        "delta": 1e-5,
        "validation_fraction": 0.1,
        # ~19 validation rows per site: DP metrics there would be noise, and cost budget;
        # the researcher's own test split is the exact, free evaluation
        "site_metrics": False,
    }


def minimal_plan(metas: dict[str, dict], epsilon: float, rounds: int | None = None) -> dict:
    """The minimal job file's plan (``target_epsilon`` only; ``rounds`` if given), filled by
    the auto-plan from the sites' published ``metas`` (``api.dataset_metas``) as ``researcher
    submit`` fills it: the demo runs on the defaults a new user gets. The hand-tuned ``plan``
    above (chosen by looking at the test split) scored 0.928 in process on the demo's split,
    the auto-plan 0.935 (20 runs each; docs/benchmarks.md)."""
    fields: dict = {"target_epsilon": epsilon}
    if rounds:
        fields["rounds"] = rounds
    return autoplan.fill(fields, autoplan.site_numbers(metas)).fields


# --secure: distributed DP (policies.skellam). A round is one DP-SGD step over the three
# hospitals' rows, so there are many cheap rounds; the settings of ``scripts/bench --utility``.
SECURE_STEPS, SECURE_BATCH, SECURE_LR = 40, 128, 4.0


def secure_plan(steps: int, epsilon: float) -> dict:
    """Distributed DP over secure aggregation: each site adds a third of the noise."""
    return {
        "rounds": steps,
        "batch_size": SECURE_BATCH,  # the expected batch over all three sites together
        "learning_rate": SECURE_LR,
        "max_grad_norm": 1.0,
        "target_epsilon": epsilon,
        "delta": 1e-5,
        "validation_fraction": 0.0,
        "site_metrics": False,
        "aggregation": "secure",
        "dp": "distributed",
    }


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def split_data(seed: int = 0) -> tuple[list[pd.DataFrame], pd.DataFrame]:
    frame = load_breast_cancer(as_frame=True).frame
    train, test = train_test_split(
        frame, test_size=0.25, stratify=frame["target"], random_state=seed
    )
    shares: list[list[pd.DataFrame]] = [[] for _ in SITES]
    for label, fractions in SKEW.items():
        rows = train[train["target"] == label].sample(frac=1.0, random_state=seed)
        cuts = [0, *np.cumsum([int(round(f * len(rows))) for f in fractions])[:-1], len(rows)]
        for i in range(len(SITES)):  # row slices: np.split on a frame warns (swapaxes)
            shares[i].append(rows.iloc[cuts[i] : cuts[i + 1]])
    return [pd.concat(p).reset_index(drop=True) for p in shares], test.reset_index(drop=True)


def start_site(  # noqa: PLR0913
    work: Path,
    name: str,
    data: pd.DataFrame,
    epsilon: float,
    dataset: str = "breast-cancer",
    tls: bool = False,
    target: str = "target",
) -> SiteDir:
    """A launched datasite holding ``data``, with Ada allowed and budgeted (demo defaults);
    ``tls``: HTTPS only, with a self-signed certificate the federation file pins."""
    site = SiteDir(work / name)
    init_site(site.root, name, port=free_port(), tls=self_signed("127.0.0.1") if tls else None)
    process.launch_detached(site)
    admin.upload(site, dataset, validate_table(data, target), description=f"{name}: {dataset}")
    (work / f"{name}.password").write_text(admin.add_user(site, EMAIL, "Ada"))
    (work / f"{name}.password").chmod(0o600)
    limit = max(3.0, epsilon)
    PolicyStore(site.policies_path).set(
        dataset, DatasetPolicy(allowed_domains=["uni.edu"], max_epsilon_per_job=limit)
    )
    # the job's epsilon plus the public DP mock's (a sum bounds their composition)
    total = limit + DEFAULT_MOCK_EPSILON
    BudgetLedger(SiteStore(site.db_path)).set_budget(EMAIL, dataset, total, 1e-5)
    return site


def write_federation(work: Path, sites: list[SiteDir]) -> Federation:
    path = work / "federation.toml"
    path.write_text(
        "\n".join(
            f'[[sites]]\nname = "{s.config().name}"\nurl = "{s.config().url}"\n'
            + (f'fingerprint = "{s.tls_fingerprint()}"\n' if s.config().tls else "")
            + f'email = "{EMAIL}"\npassword_file = "{s.config().name}.password"\n'
            for s in sites
        )
    )
    return Federation.load(path)


def approve_pending(sites: list[SiteDir]) -> None:
    """Approve the pending request at each site in-process (the demo itself uses the CLI)."""
    from datasites.review.queue import ReviewQueue

    for site in sites:
        queue = ReviewQueue(site)
        queue.approve(next(i for i in queue.items() if i.status == "PENDING").request_id)


def approve_via_cli(site: SiteDir) -> str:
    items = json.loads(_cli("datasites.cli", "requests", "--dir", str(site.root), "--json"))
    pending = [i for i in items if i["status"] == "pending"]
    return _cli("datasites.cli", "approve", "--dir", str(site.root), pending[0]["id"][:12])


def _cli(module: str, *args: str) -> str:
    proc = subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True)
    if proc.returncode:
        sys.exit(f"demo: {' '.join(args[:2])} failed: {proc.stderr.strip()}")
    return proc.stdout.strip().splitlines()[-1] if "--json" in args else proc.stdout


def centralized_accuracy(shares: list[pd.DataFrame], test: pd.DataFrame, spec) -> float:
    """The same model without DP on the pooled training rows, same scaling and test split."""

    from policies.scaling import apply as apply_scaling
    from researcher import model as local_model

    pooled = pd.concat(shares)
    x = apply_scaling(pooled.drop(columns=["target"]).to_numpy(np.float32), spec.scaling)
    y = torch.as_tensor(pooled["target"].to_numpy())
    model = local_model.build(spec)
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    xt = torch.as_tensor(x)
    for _ in range(300):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(xt), y).backward()
        opt.step()
    xs = apply_scaling(test.drop(columns=["target"]).to_numpy(np.float32), spec.scaling)
    return local_model.accuracy(model, xs, test["target"].to_numpy(), "cross_entropy")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--rounds",
        type=int,
        default=None,
        help="rounds (default: the auto-plan's, from the sites' published numbers)",
    )
    parser.add_argument(
        "--steps", type=int, default=SECURE_STEPS, help="with --secure: rounds of one DP-SGD step"
    )
    parser.add_argument("--epsilon", type=float, default=3.0, help="target total per site")
    parser.add_argument(
        "--seeds",
        type=int,
        default=1,
        help="run N times (seeds 0..N-1: the model's initial weights); report mean and range",
    )
    parser.add_argument(
        "--scenario",
        choices=("hospital", "bank"),
        default="hospital",
        help="hospital: breast cancer at three hospitals (default); bank: ISLP's Default "
        "credit data at three banks, rare labels, a categorical column (scripts/demo_bank.py)",
    )
    parser.add_argument("--json", action="store_true", help="last line: one JSON summary")
    parser.add_argument("--keep", action="store_true", help="leave the datasites running")
    parser.add_argument(
        "--secure",
        action="store_true",
        help="secure aggregation with distributed DP: each site adds a third of the noise to "
        "one DP-SGD step's sum and masks it; the researcher sees only the noisy sum",
    )
    parser.add_argument(
        "--tls", action="store_true", help="HTTPS only, each site's certificate pinned"
    )
    args = parser.parse_args()
    if args.seeds < 1 or (args.keep and args.seeds > 1):
        parser.error("--seeds must be at least 1, and --keep needs a single run")
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
    say = (lambda *_: None) if args.json else print
    if args.scenario == "bank":
        import demo_bank  # scripts/ is on the path of this script

        demo_bank.main(args, say)
        return
    runs = [run_once(args, seed, say) for seed in range(args.seeds)]
    summary = runs[-1] if len(runs) == 1 else summarise(runs)
    if args.json:
        print(json.dumps(summary))
    else:
        print(
            f"federated DP accuracy {summary['accuracy']:.3f} (range "
            f"{summary['accuracy_min']:.3f}-{summary['accuracy_max']:.3f} over {len(runs)} "
            f"run(s)) vs centralized non-private {summary['centralized_accuracy']:.3f}; "
            f"epsilon per site "
            f"{ {s: round(p['epsilon'], 3) for s, p in summary['privacy'].items()} }; "
            f"{summary['aggregation']} aggregation; {summary['seconds']} s"
        )


def start_sites(
    work: Path, named: list[tuple[str, pd.DataFrame]], start: Callable[[str, pd.DataFrame], SiteDir]
) -> list[SiteDir]:
    """Every site started at once; if one fails, the others are stopped (no orphan servers)
    and its error is raised."""
    with ThreadPoolExecutor(len(named)) as pool:
        futures = [pool.submit(start, name, share) for name, share in named]
    sites = [f.result() for f in futures if f.exception() is None]
    failed = [f.exception() for f in futures if f.exception() is not None]
    if failed:
        for s in sites:
            process.stop(s)
        forget_sites(work, sites)
        raise failed[0]
    return sites


def trust_each_other(sites: list[SiteDir], dataset: str) -> None:
    """Each demo admin trusts the other demo sites' identity keys (in real life, compared out
    of band): an unverified peer counts as a colluder, and each site would add all the noise."""
    from dataclasses import replace

    from datasites.review.access import PolicyStore

    fingerprints = sorted(s.fingerprint() for s in sites)
    for site in sites:
        store = PolicyStore(site.policies_path)
        store.set(dataset, replace(store.get(dataset), trusted_peers=fingerprints))


def forget_sites(work: Path, sites: list[SiteDir]) -> None:
    """Remove the stopped demo sites (private tables, admin and researcher passwords); the run
    folder with the model, metrics and plots stays."""
    import shutil

    for site in sites:
        shutil.rmtree(site.root, ignore_errors=True)
        (work / f"{site.root.name}.password").unlink(missing_ok=True)


def summarise(runs: list[dict]) -> dict:
    """Mean and min-max over the runs; the rest from the last run."""
    accs = [r["accuracy"] for r in runs]
    centrals = [r["centralized_accuracy"] for r in runs]
    return {
        **runs[-1],
        "accuracy": float(np.mean(accs)),
        "accuracy_min": float(min(accs)),
        "accuracy_max": float(max(accs)),
        "accuracies": accs,
        "centralized_accuracy": float(np.mean(centrals)),
        "seconds": round(sum(r["seconds"] for r in runs), 1),
        "runs": len(runs),
    }


def run_once(args: argparse.Namespace, seed: int, say) -> dict:  # noqa: ANN001
    """One whole demo federation: three fresh sites, submit, approve, train, evaluate."""
    started = time.time()
    torch.manual_seed(seed)
    work = Path(tempfile.mkdtemp(prefix="fedsite-demo-"))
    shares, test = split_data()
    say(
        f"state in {work}; private rows per site {[len(s) for s in shares]}, "
        f"malignant share {[round(float((s.target == 0).mean()), 2) for s in shares]}"
    )
    sites = start_sites(
        work,
        list(zip(SITES, shares, strict=True)),
        lambda name, share: start_site(work, name, share, args.epsilon, tls=args.tls),
    )
    try:
        if args.secure:
            trust_each_other(sites, "breast-cancer")
        fed = write_federation(work, sites)
        n_features = shares[0].shape[1] - 1  # 30; and 2 classes
        job_plan = (
            secure_plan(args.steps, args.epsilon)
            if args.secure
            else minimal_plan(api.dataset_metas(fed, "breast-cancer"), args.epsilon, args.rounds)
        )
        spec = api.with_pooled_scaling(
            fed,
            make_job(
                make_model(n_features, 2),
                "breast-cancer",
                "target",
                job_plan,
                name="demo",
                n_features=n_features,
                n_outputs=2,
            ),
        )
        if args.secure:  # peers: the three hospitals, by identity-key fingerprint; one rate q
            spec = api.with_peers(fed, spec)
            spec = api.with_sample_rate(spec, api.dataset_metas(fed, "breast-cancer"))
        api.submit(fed, spec)
        say("--- each site's admin approves through the CLI ---")
        with ThreadPoolExecutor(3) as pool:
            reports = list(pool.map(approve_via_cli, sites))
        say(reports[0])  # the three reports are the same job's: the first in full
        for site, report in zip(sites[1:], reports[1:], strict=True):
            lines = report.strip().splitlines()
            say(f"{site.root.name}: the same report; {lines[-1] if lines else 'approved'}")
        x_test = test.drop(columns=["target"]).to_numpy(dtype=np.float32)

        def on_round(rec) -> None:  # noqa: ANN001
            # n: the training rows a site reports, from its published (DP) row count
            rows = ", ".join(f"{u.site} n={u.n} (DP count)" for u in rec.updates)
            say(
                f"round {rec.round}: test accuracy {rec.test_accuracy:.3f} ({rows}; "
                f"{rec.seconds:.2f} s)"
            )

        result = api.train(
            fed,
            spec,
            work / "run",
            min_sites=2,
            test=(x_test, test["target"].to_numpy()),
            on_round=on_round,
            # server momentum on the distributed steps: post-processing of the noisy sums
            strategy=FedAvgM(server_lr=0.5, momentum=0.5) if args.secure else None,
        )
        central = centralized_accuracy(shares, test, spec)
        privacy = {
            u.site: {
                k: u.privacy.get(k)
                for k in ("accountant", "noise_multiplier", "sample_rate", "steps", "delta")
            }
            | {"epsilon": u.privacy.get("epsilon_spent")}
            for u in result.last.updates
        }
        accuracy = result.rounds[-1]["test_accuracy"]
        say(f"seed {seed}: federated DP accuracy {accuracy:.3f}; plots in {work / 'run'}")
        return {
            "sites": len(result.last.updates),
            "rounds": len(result.rounds),
            "accuracy": accuracy,
            "accuracy_min": accuracy,
            "accuracy_max": accuracy,
            "centralized_accuracy": central,
            "seconds": round(time.time() - started, 1),
            "privacy": privacy,
            "aggregation": spec.plan.aggregation.mode.value,
            "dp": spec.plan.dp.mode.value,
            "tls": args.tls,
            "run_dir": str(work / "run"),
        }
    finally:
        if not args.keep:
            for s in sites:
                process.stop(s)
            forget_sites(work, sites)


if __name__ == "__main__":
    main()
