"""What the accountant's persistent cache gives a new user: the auto-plan of a minimal job (only
``target_epsilon`` 3, every other field its default) for tables the defaults were not tuned on,
computed in a fresh process with a cold cache file and again in a second fresh process that
finds the first one's answers: what a second ``researcher plan``, the site's review of the same
job or a restarted server pays.

``python scripts/bench_accounting_cache.py [--runs 5]``: seconds per plan, mean (min-max) over
the runs, each run on its own new cache file.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# two sites each: the DP row counts a split of these tables publishes (none is a tuned table)
TABLES = {
    "diabetes (442 rows, 2 sites)": (221, 221),
    "generated 1,000 rows, 3 sites": (310, 340, 350),
    "generated 5,000 rows, 2 sites": (2400, 2600),
    "olivetti faces (400 rows, 4 sites)": (100, 100, 100, 100),
}

_PLAN = """
import json, sys, time
started = time.perf_counter()
from policies import autoplan
from policies.autoplan import SiteNumbers
rows = json.loads(sys.argv[1])
auto = autoplan.suggest([SiteNumbers(f"s{i}", n) for i, n in enumerate(rows)], 3.0)
print(json.dumps({"seconds": time.perf_counter() - started, "noise": auto.noise_multiplier}))
"""


def _plan(rows: tuple[int, ...], cache: Path) -> dict[str, object]:
    env = {**os.environ, "FEDSITE_ACCOUNTING_CACHE": str(cache), "PYTHONPATH": str(ROOT)}
    out = subprocess.run(
        [sys.executable, "-c", _PLAN, json.dumps(rows)],
        capture_output=True,
        text=True,
        check=True,
        env=env,
    ).stdout
    result: dict[str, object] = json.loads(out.strip().splitlines()[-1])
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args(argv)
    print("table: cold s, warm s (mean (min-max)); the same noise both times")
    for name, rows in TABLES.items():
        cold, warm = [], []
        for _ in range(args.runs):
            with tempfile.TemporaryDirectory() as work:
                cache = Path(work) / "accounting.sqlite"
                first, second = _plan(rows, cache), _plan(rows, cache)
            assert first["noise"] == second["noise"], (first, second)
            cold.append(float(first["seconds"]))  # type: ignore[arg-type]
            warm.append(float(second["seconds"]))  # type: ignore[arg-type]

        def summary(xs: list[float]) -> str:
            return f"{sum(xs) / len(xs):.2f} ({min(xs):.2f}-{max(xs):.2f})"

        print(f"{name}: {summary(cold)}, {summary(warm)}", flush=True)


if __name__ == "__main__":
    start = time.perf_counter()
    main()
    print(f"({time.perf_counter() - start:.0f} s)")
