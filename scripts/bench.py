"""scripts/bench: what private training costs, and what the platform adds around it.

Each figure is a ratio or a difference measured within this one run, on this machine:
1. dp_overhead_ratio: one epoch of DP-SGD through the site's own ``train_dp`` / one epoch of plain
   SGD, same model, data, batch size and batch handling (one gather, batches as views); for the
   demo's model on breast-cancer and a small CNN on the bundled 8x8 digits (the key holds the
   larger). ``*_opacus_ratio`` is the same with Opacus' hooks instead of the fused clipper.
2. round_overhead_seconds: a federated round's wall time over three real HTTP datasites minus the
   slowest site's training time measured inside the runtime (median over R rounds after one
   warm-up round). Where the time goes: training, the rest of the site runtime, syft + HTTP;
   CPU seconds of the servers and of this client, and ``round_cpu_floor_s``, the CPU a round
   uses divided by the machine's cores: no round can be faster than that here.
3. parallel_ratio: a three-site round's wall time / the slowest site's round wall time alone.
   distributed_round_s: a distributed-DP round (mask, sign, unmask at three real sites, one
   DP-SGD step; median after the first) and its rate; ``--round-rate`` measures it alone.
4. scale: upload and one DP epoch on generated 100k (and 1M unless --quick) x 30 tables: seconds,
   the whole job call (first and second), and peak RSS of the datasite server process (overall,
   and during the calls alone).
5. ``--algorithms [--seeds N] [--only a,b]``: every federated algorithm on the label-skewed demo
   federation (``bench_algorithms.py``): accuracy, rounds to 95% of it, bytes per round.
6. ``--upload-scale [--rows N] [--runs R]``: ``datasite upload`` of a 1M x 30 bank table with
   categoricals, its phases, the mock, one round, and the refusal of a too-large table
   (``bench_upload.py``).
7. ``--utility [--seeds N] [--epsilons 1,2,4] [--tables digits,cancer,wine,iris] [--columns
   central,defaults]``: distributed DP against per-site DP, the defaults and central
   non-private training (``bench_utility.py``).
8. ``--commands [--runs 5] [--code DIR] [--only researcher]``: every admin command's wall time
   as a fresh process, and the researcher's datasets and status, median and range, with 20
   pending requests (``bench_commands.py``).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import threading
import time
import warnings
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pandas as pd
import psutil
import torch
from demo import approve_pending, make_model, split_data, start_site, write_federation
from demo import plan as demo_plan
from sklearn.datasets import load_breast_cancer, load_digits
from torch import nn

from datasites.data.tables import validate_table
from datasites.ledger.audit import AuditLog
from datasites.ledger.budget import BudgetLedger
from datasites.ledger.store import SiteStore
from datasites.review.access import DatasetPolicy, PolicyStore
from datasites.serving import admin, process
from datasites.serving.config import SiteDir
from policies.engine.dp_sgd import train_dp
from policies.plan import TrainingPlan
from policies.wire import TrainRound
from researcher import api
from researcher.job import make_job
from researcher.rounds import call_with_retry, initial_weights
from researcher.sites import SyftSite

warnings.filterwarnings("ignore")


def _cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(8 * 16, 10),
    )


def _plain_epoch(model: nn.Module, x: np.ndarray, y: np.ndarray, batch: int) -> float:
    """Plain SGD, the same batch handling as the DP loop: one gather per epoch, batches as views."""
    xt, yt = torch.as_tensor(x), torch.as_tensor(y)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    started = time.perf_counter()
    order = torch.randperm(len(xt))
    for xb, yb in zip(xt[order].split(batch), yt[order].split(batch), strict=True):
        opt.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(model(xb), yb).backward()
        opt.step()
    return time.perf_counter() - started


def _dp_epoch(model: nn.Module, x: np.ndarray, y: np.ndarray, batch: int, engine: str) -> float:
    plan = TrainingPlan.of(noise_multiplier=1.0, batch_size=batch, learning_rate=0.1)
    started = time.perf_counter()
    train_dp(model, x, y, plan, 1.0, engine=engine)  # secure noise, as at a site
    return time.perf_counter() - started


def dp_overhead(reps: int) -> dict[str, float]:
    """DP epoch / plain epoch with the site's engine (fused clipping), and with plain Opacus."""
    bc = load_breast_cancer()
    xb = ((bc.data - bc.data.mean(0)) / bc.data.std(0)).astype(np.float32)
    dg = load_digits()
    xd = (dg.images[:, None] / 16).astype(np.float32)
    cases = {
        "demo_linear": (lambda: nn.Linear(30, 2), xb, bc.target, 16),
        "digits_cnn": (_cnn, xd, dg.target, 64),
    }
    out = {}
    for name, (make, x, y, batch) in cases.items():
        times: dict[str, list[float]] = {"plain": [], "auto": [], "opacus": []}
        for _ in range(reps):  # interleaved, so a noisy neighbour slows all three alike
            times["plain"].append(_plain_epoch(make(), x, y, batch))
            times["auto"].append(_dp_epoch(make(), x, y, batch, "auto"))
            times["opacus"].append(_dp_epoch(make(), x, y, batch, "opacus"))
        plain, dp, opacus = (float(np.median(times[k])) for k in ("plain", "auto", "opacus"))
        out[f"{name}_plain_s"] = plain
        out[f"{name}_dp_s"] = dp
        out[f"{name}_ratio"] = dp / plain
        out[f"{name}_opacus_ratio"] = opacus / plain
    return out


@contextmanager
def _demo_sites(work: Path) -> Iterator[list[SiteDir]]:
    """The demo's three hospitals as real datasites, started at once, stopped afterwards."""
    shares, _ = split_data()
    with ThreadPoolExecutor(3) as pool:
        site_dirs = list(
            pool.map(
                lambda a: start_site(work, a[0], a[1], 50.0),
                [(f"site-{i}", s) for i, s in enumerate(shares)],
            )
        )
    try:
        yield site_dirs
    finally:
        for s in site_dirs:
            process.stop(s)


def federated(work: Path, rounds: int) -> dict[str, float]:
    with _demo_sites(work) as site_dirs:
        fed = write_federation(work, site_dirs)
        plan = {**demo_plan(2 * rounds + 1, 50.0), "target_epsilon": None, "noise_multiplier": 1.0}
        model = make_model(30, 2)  # the demo's model on breast cancer: 30 features, 2 classes
        spec = api.with_pooled_scaling(
            fed,
            make_job(
                model, "breast-cancer", "target", plan, name="bench", n_features=30, n_outputs=2
            ),
        )
        api.submit(fed, spec)
        approve_pending(site_dirs)
        links = [SyftSite(login) for login in fed.sites]
        for link in links:
            link.meta(spec.dataset)
        blob = TrainRound.of(initial_weights(spec))
        meter = CpuMeter([process.server_pid(s) for s in site_dirs])
        with ThreadPoolExecutor(3) as pool:
            list(pool.map(lambda link: call_with_retry(link, spec, blob), links))  # warm-up
            meter.start()
            walls, overheads, trains = [], [], {link.name: [] for link in links}
            for _ in range(rounds):
                started = time.perf_counter()
                list(pool.map(lambda link: call_with_retry(link, spec, blob), links))
                wall = time.perf_counter() - started
                timings = [last_timing(s) for s in site_dirs]
                for link, timing in zip(links, timings, strict=True):
                    trains[link.name].append(timing["train_seconds"])
                walls.append(wall)
                overheads.append(wall - max(t["train_seconds"] for t in timings))
            servers_cpu, client_cpu = meter.stop()
        slowest = max(links, key=lambda link: np.median(trains[link.name]))
        slowest_dir = site_dirs[links.index(slowest)]
        alone, runtime, train = [], [], []
        meter.start()
        for _ in range(rounds):
            started = time.perf_counter()
            call_with_retry(slowest, spec, blob)
            alone.append(time.perf_counter() - started)
            timing = last_timing(slowest_dir)
            runtime.append(timing["runtime_seconds"])
            train.append(timing["train_seconds"])
        alone_servers_cpu, alone_client_cpu = meter.stop()
        med_runtime, med_train = float(np.median(runtime)), float(np.median(train))
        round_cpu = (sum(servers_cpu) + client_cpu) / rounds
        return {
            "alone_train_s": med_train,
            "alone_runtime_overhead_s": med_runtime - med_train,
            "alone_syft_http_s": float(np.median(alone)) - med_runtime,
            "alone_server_cpu_s": max(alone_servers_cpu) / rounds,
            "alone_client_cpu_s": alone_client_cpu / rounds,
            "round_cpu_s": round_cpu,
            "round_cpu_floor_s": round_cpu / (psutil.cpu_count() or 1),
            "round_wall_s": float(np.median(walls)),
            "round_overhead_seconds": float(np.median(overheads)),
            "slowest_alone_s": float(np.median(alone)),
            "parallel_ratio": float(np.median(walls) / np.median(alone)),
        }


def distributed_rounds(work: Path, rounds: int) -> dict[str, float]:
    """Distributed DP's round rate over three real HTTP datasites (``scripts/demo --secure``'s
    job): each round is mask, sign and unmask at every site, one DP-SGD step."""
    from demo import secure_plan

    with _demo_sites(work) as site_dirs:
        fed = write_federation(work, site_dirs)
        plan = secure_plan(rounds, 8.0)  # epsilon 8: the noise stays above the policy floor
        spec = api.with_pooled_scaling(
            fed,
            make_job(
                make_model(30, 2),
                "breast-cancer",
                "target",
                plan,
                name="bench_ddp",
                n_features=30,
                n_outputs=2,
            ),
        )
        spec = api.with_peers(fed, spec)
        spec = api.with_sample_rate(spec, api.dataset_metas(fed, "breast-cancer"))
        api.submit(fed, spec)
        approve_pending(site_dirs)
        seconds: list[float] = []
        api.train(fed, spec, work / "run", on_round=lambda rec: seconds.append(rec.seconds))
        steady = seconds[1:] or seconds  # the first round also fetches keys and warms up
        return {
            "distributed_round_s": float(np.median(steady)),
            "distributed_rounds_per_s": float(1.0 / np.median(steady)),
            "distributed_first_round_s": float(seconds[0]),
        }


def last_timing(site: SiteDir) -> dict[str, float]:
    """The site's own timing of its last released round, from its audit log (never released)."""
    entries = AuditLog(SiteStore(site.db_path)).entries()
    return next(e["detail"]["timing"] for e in reversed(entries) if e["event"] == "released")


class CpuMeter:
    """CPU seconds (user + system) used by the site servers and by this process in a span."""

    def __init__(self, pids: list[int]) -> None:
        self.servers = [psutil.Process(pid) for pid in pids]
        self.me = psutil.Process()
        self._start: list[float] = []

    def _now(self) -> list[float]:
        return [sum(p.cpu_times()[:2]) for p in [*self.servers, self.me]]

    def start(self) -> None:
        self._start = self._now()

    def stop(self) -> tuple[list[float], float]:
        used = [b - a for a, b in zip(self._start, self._now(), strict=True)]
        return used[:-1], used[-1]


class PeakRss:
    """Samples a process's RSS every 50 ms in a thread."""

    def __init__(self, pid: int) -> None:
        self.proc = psutil.Process(pid)
        self.peak = self.proc.memory_info().rss
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.05):
            try:
                self.peak = max(self.peak, self.proc.memory_info().rss)
            except psutil.Error:
                return

    def stop(self) -> float:
        self._stop.set()
        self._thread.join()
        return self.peak / 2**20


def scale(work: Path, rows: int) -> dict[str, float]:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(rows, 30)).astype(np.float32)
    frame = pd.DataFrame(x, columns=[f"f{i}" for i in range(30)])
    frame["target"] = (x[:, 0] + 0.5 * x[:, 1] > 0).astype(np.int64)
    site = start_site(work, f"scale-{rows}", frame.head(100), 50.0, dataset="warmup")
    try:
        rss = PeakRss(process.server_pid(site))
        started = time.perf_counter()
        admin.upload(site, "big", validate_table(frame, "target"))
        upload_s = time.perf_counter() - started
        PolicyStore(site.policies_path).set(
            "big", DatasetPolicy(allowed_domains=["uni.edu"], max_epsilon_per_job=50.0)
        )
        fed = write_federation(work, [site])
        spec = make_job(
            make_model(30, 2),
            "big",
            "target",
            {
                "rounds": 2,
                "batch_size": 256,
                "noise_multiplier": 1.0,
                "learning_rate": 0.5,
                "validation_fraction": 0.0,
                "delta": 1e-7,  # at most 1/n for 1M rows
            },
            n_features=30,
            n_outputs=2,
        )
        BudgetLedger(SiteStore(site.db_path)).set_budget("ada@uni.edu", "big", 50.0, 1e-7)
        api.submit(fed, spec)
        approve_pending([site])
        link = SyftSite(fed.sites[0])
        upload_rss = rss.stop()
        rss = PeakRss(process.server_pid(site))
        calls, replies = [], []
        for _ in range(2):  # the first call may overlap the server's background warm-up
            started = time.perf_counter()
            replies.append(call_with_retry(link, spec, TrainRound()))
            calls.append(time.perf_counter() - started)
        assert all(r["status"] == "ok" for r in replies), replies
        calls_rss = rss.stop()
        return {
            "upload_seconds": upload_s,
            "epoch_seconds": last_timing(site)["train_seconds"],
            "call_seconds": calls[0],
            "warm_call_seconds": calls[1],
            "peak_rss_mb": max(upload_rss, calls_rss),
            "peak_rss_mb_calls": calls_rss,
        }
    finally:
        process.stop(site)


def main() -> None:
    if "--upload-scale" in sys.argv:  # a 1M-row categorical bank table (bench_upload.py)
        import bench_upload

        bench_upload.main([a for a in sys.argv[1:] if a != "--upload-scale"])
        return
    if "--utility" in sys.argv:  # distributed DP against per-site DP and central (bench_utility.py)
        import bench_utility

        bench_utility.main([a for a in sys.argv[1:] if a != "--utility"])
        return
    if "--commands" in sys.argv:  # each admin command's wall time (bench_commands.py)
        import bench_commands

        bench_commands.main([a for a in sys.argv[1:] if a != "--commands"])
        return
    if "--round-rate" in sys.argv:  # distributed DP's rounds over real sites, alone
        with tempfile.TemporaryDirectory(prefix="fedsite-bench-", ignore_cleanup_errors=True) as t:
            print(json.dumps(distributed_rounds(Path(t), rounds=20)))
        return
    if "--algorithms" in sys.argv:  # the federated algorithms' comparison (bench_algorithms.py)
        import bench_algorithms

        bench_algorithms.main([a for a in sys.argv[1:] if a != "--algorithms"])
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer repetitions, no 1M rows")
    parser.add_argument("--json", action="store_true", help="last line: one JSON object")
    args = parser.parse_args()
    results: dict[str, object] = {
        "machine": f"{platform.machine()}, {psutil.cpu_count()} cpus, "
        f"{psutil.virtual_memory().total / 2**30:.0f} GiB, "
        f"torch {torch.__version__}"
    }
    dp = dp_overhead(reps=9 if args.quick else 31)
    results.update(dp)
    results["dp_overhead_ratio"] = max(dp["demo_linear_ratio"], dp["digits_cnn_ratio"])
    # the sites' directories hold the generated tables (160 MB at 1M rows): not kept
    with tempfile.TemporaryDirectory(prefix="fedsite-bench-", ignore_cleanup_errors=True) as tmp:
        work = Path(tmp)
        results.update(federated(work / "fed", rounds=4 if args.quick else 8))
        results.update(distributed_rounds(work / "ddp", rounds=6 if args.quick else 20))
        for rows, tag in ((100_000, "100k"), (1_000_000, "1m")):
            if args.quick and rows > 100_000:
                continue
            for key, value in scale(work / tag, rows).items():
                results[f"{key}_{tag}"] = value
    if not args.json:
        from policies.console import table

        table(
            "bench",
            ["measure", "value"],
            [[k, f"{v:.3f}" if isinstance(v, float) else v] for k, v in results.items()],
        )
    print(json.dumps(results))


if __name__ == "__main__":
    main()
