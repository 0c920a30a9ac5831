"""scripts/bench --upload-scale: a 1M-row x 30-column bank table with categoricals.

Measured on this machine, within one run:
1. ``datasite upload`` as a real child process, ``--runs`` times (each a new dataset on one
   launched site): wall seconds and the child's peak RSS (psutil, every 20 ms), and the server's.
   Mean, min and max over the runs. Goals (issue 14): <= 15 s and <= 1.5 GB.
2. Where an upload goes, once, in this process: read (pyarrow), validate (categoricals),
   the DP mock, the Parquet file; the rest of the CLI's wall time is syft's share (interpreter
   start, syft's import, login, the upload of the stub and the mock twin) and ours outside the
   phases.
3. The mock twin: its categorical columns hold only published categories.
4. One DP round of a job built from the published schema (the one-hot layout) at the site:
   the call's wall time, and the site's own timing of it (training, the whole runtime).
   ``upload_100_rows_*``: the same command on 100 rows, its fixed cost (start-up, syft's
   import and login, the ledger's accountant), so the table's own share is the difference.
5. A table 5x the memory budget (a sparse file) is refused in one line, with its time.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import pandas as pd
import psutil
from demo import approve_pending, start_site, write_federation

from datasites.data.mock import make_mock
from datasites.data.store import write_private
from datasites.data.tables import DEFAULT_MAX_MEMORY_MB, load_table, validate_table
from datasites.ledger.audit import AuditLog
from datasites.ledger.budget import BudgetLedger
from datasites.ledger.store import SiteStore
from datasites.review.access import DatasetPolicy, PolicyStore
from datasites.serving import process
from datasites.serving.config import SiteDir
from policies.wire import TrainRound
from researcher import api
from researcher.rounds import call_with_retry
from researcher.sites import SyftSite

EMAIL = "ada@uni.edu"
CATEGORIES = {
    "region": ["north", "south", "east", "west", "centre", "islands", "abroad", "unknown"],
    "product": ["current", "savings", "mortgage", "card", "loan"],
    "channel": ["branch", "web", "app", "phone"],
    "segment": ["retail", "premium", "private", "smb", "corporate", "student"],
    "employment": ["employed", "self", "retired", "student", "unemployed", "other", "unknown"],
    "education": ["primary", "secondary", "tertiary", "postgrad", "unknown"],
    "student": ["No", "Yes"],
}
N_NUMERIC = 22  # + 7 categorical + the target = 30 columns


class PeakRss:
    """Peak RSS of a process and its children, sampled every 20 ms."""

    def __init__(self, pid: int) -> None:
        self.proc = psutil.Process(pid)
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                procs = [self.proc, *self.proc.children(recursive=True)]
                self.peak = max(self.peak, sum(p.memory_info().rss for p in procs))
            except psutil.Error:
                pass
            time.sleep(0.02)

    def stop(self) -> float:
        self._stop.set()
        self._thread.join()
        return self.peak / 2**20


def bank_csv(path: Path, rows: int, seed: int = 0) -> Path:
    """A synthetic bank table: skewed numeric columns, text categories, a ~3% default rate."""
    rng = np.random.default_rng(seed)
    data: dict[str, object] = {}
    for i in range(N_NUMERIC):
        col = rng.lognormal(6, 1, rows) if i % 3 == 0 else rng.normal(0, 1, rows)
        data[f"x{i}"] = np.round(col, 3) if i % 4 else rng.integers(0, 90, rows)
    for name, values in CATEGORIES.items():
        data[name] = rng.choice(values, rows)
    score = np.asarray(data["x1"]) + 0.8 * (data["student"] == "Yes") - 2.6
    data["default"] = np.where(score + rng.normal(0, 0.5, rows) > 0, "Yes", "No")
    pd.DataFrame(data).to_csv(path, index=False)
    return path


def upload_once(site: SiteDir, name: str, csv: Path) -> dict[str, float]:
    cmd = [sys.executable, "-m", "datasites.cli", "upload", "--dir", str(site.root)]
    cmd += ["--name", name, "--file", str(csv), "--target", "default", "--json"]
    server = PeakRss(process.server_pid(site))
    started = time.perf_counter()
    child = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    rss = PeakRss(child.pid)
    out, err = child.communicate(timeout=600)
    seconds = time.perf_counter() - started
    peak, server_peak = rss.stop(), server.stop()
    if child.returncode != 0:
        raise RuntimeError(f"upload failed: {err.strip()}")
    return {"seconds": seconds, "peak_rss_mb": peak, "server_peak_rss_mb": server_peak}


def phases(csv: Path, work: Path) -> dict[str, float]:
    """Our share, step by step, in this process (syft is already imported here)."""
    out: dict[str, float] = {}
    t = time.perf_counter()
    frame = load_table(csv)
    out["read_s"] = time.perf_counter() - t
    t = time.perf_counter()
    table = validate_table(frame, "default")
    out["validate_s"] = time.perf_counter() - t
    t = time.perf_counter()
    make_mock(table.frame, "default")
    out["mock_s"] = time.perf_counter() - t
    t = time.perf_counter()
    write_private(work, "phases", table.frame)
    out["parquet_s"] = time.perf_counter() - t
    return out


def one_round(work: Path, site: SiteDir, dataset: str) -> dict[str, float]:
    PolicyStore(site.policies_path).set(
        dataset, DatasetPolicy(allowed_domains=["uni.edu"], max_epsilon_per_job=50.0)
    )
    BudgetLedger(SiteStore(site.site_db)).set_budget(EMAIL, dataset, 50.0, 1e-7)
    fed = write_federation(work, [site])
    job = work / "job.py"
    job.write_text(
        f"DATASET = {dataset!r}\n"
        "PLAN = {'rounds': 1, 'batch_size': 256, 'noise_multiplier': 1.0, "
        "'learning_rate': 0.5, 'validation_fraction': 0.0, 'delta': 1e-7}\n"
        "import torch.nn as nn\n"
        "def make_model(n_features, n_outputs):\n"
        "    return nn.Linear(n_features, n_outputs)\n"
    )
    spec = api.with_pooled_scaling(fed, api.load_job(fed, job))
    api.submit(fed, spec)  # a dry run on the categorical mock twin first
    approve_pending([site])
    rss = PeakRss(process.server_pid(site))
    started = time.perf_counter()
    reply = call_with_retry(SyftSite(fed.sites[0]), spec, TrainRound())
    seconds = time.perf_counter() - started
    if reply.get("status") != "ok":
        raise RuntimeError(f"round failed: {reply}")
    timing = AuditLog(SiteStore(site.site_db)).entries()
    released = next(e["detail"]["timing"] for e in reversed(timing) if e["event"] == "released")
    return {
        "round_seconds": seconds,
        "round_train_seconds": released.get("train_seconds"),
        "round_runtime_seconds": released.get("runtime_seconds"),
        "round_server_peak_rss_mb": rss.stop(),
        "model_inputs": spec.architecture.input[0],
    }


def refused_too_big(work: Path, site: SiteDir) -> dict[str, object]:
    """A sparse CSV estimated at well over 5x the budget: one line, no OOM."""
    path = work / "huge.csv"
    header = ",".join(f"x{i}" for i in range(29)) + ",default\n"
    path.write_text(header + (",".join(["1.5"] * 29) + ",No\n") * 1000)
    with path.open("r+b") as fh:
        fh.truncate(20 * 2**30)
    cmd = [sys.executable, "-m", "datasites.cli", "upload", "--dir", str(site.root)]
    cmd += ["--name", "huge", "--file", str(path), "--target", "default"]
    started = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    return {
        "refused_exit": proc.returncode,
        "refused_seconds": time.perf_counter() - started,
        "refused_line": proc.stderr.strip(),
    }


def summary(values: list[float]) -> dict[str, float]:
    return {"mean": statistics.mean(values), "min": min(values), "max": max(values)}


def main(argv: list[str]) -> None:
    import argparse

    parser = argparse.ArgumentParser(prog="scripts/bench --upload-scale")
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="fedsite-upload-", ignore_cleanup_errors=True) as tmp:
        work = Path(tmp)
        csv = bank_csv(work / "bank.csv", args.rows)
        warm = pd.DataFrame({"a": np.arange(100.0), "target": np.arange(100) % 2})
        site = start_site(work, "bank", warm, 50.0, dataset="warmup")
        try:
            runs = [upload_once(site, f"bank{i}", csv) for i in range(args.runs)]
            # the fixed cost of the command: a 100-row table of the same columns
            small = bank_csv(work / "small.csv", 100, seed=1)
            fixed = [upload_once(site, f"small{i}", small) for i in range(args.runs)]
            meta = site.datasets_meta()["bank0"]
            results: dict[str, object] = {
                "rows": args.rows,
                "columns": 30,
                "csv_mb": csv.stat().st_size / 2**20,
                "memory_budget_mb": DEFAULT_MAX_MEMORY_MB,
                "upload_seconds": summary([r["seconds"] for r in runs]),
                "upload_peak_rss_mb": summary([r["peak_rss_mb"] for r in runs]),
                "server_peak_rss_mb": summary([r["server_peak_rss_mb"] for r in runs]),
                "upload_100_rows_seconds": summary([r["seconds"] for r in fixed]),
                "upload_100_rows_peak_rss_mb": summary([r["peak_rss_mb"] for r in fixed]),
                "mock_rows": meta["mock_rows"],
                "published_categories": sum(len(v) for v in meta["categories"].values()),
            }
            results.update(phases(csv, work))
            results.update(one_round(work, site, "bank0"))
            results.update(refused_too_big(work, site))
        finally:
            process.stop(site)
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main(sys.argv[1:])
