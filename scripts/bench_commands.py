"""scripts/bench --commands: how long each admin command (and the researcher's datasets and status)
takes, as a user runs it.

One real datasite (plain HTTP on loopback) with the demo's breast-cancer table, a researcher and
``PENDING`` (20) pending requests, plus a few more that approve and deny use up (each run acts on
its own request, so 20 stay pending throughout). Every command runs as a fresh
``python -m datasites.cli`` process, as from a shell, ``--runs`` times (5): the table shows the
median and the range (min-max) of the wall time, the median CPU seconds (the command's process
plus what the site's server spent meanwhile: on a loaded machine the wall time is mostly
waiting for a core), and whether every run ended as expected.

``--code DIR`` runs the CLI (and the server it launches) from another checkout of the project,
to compare a branch with main on the same machine in the same minutes.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
from demo import EMAIL, free_port, split_data, write_federation

from datasites.serving.config import SiteDir

PENDING = 20


_CPU: list[float] = []  # CPU seconds of the last command: its process plus the site's server


def _server_cpu(site: Path | None) -> float:
    try:
        pid = int((site / "server.pid").read_text()) if site else 0
        times = psutil.Process(pid).cpu_times() if pid else None
    except (OSError, ValueError, psutil.Error):
        return 0.0
    return times.user + times.system if times else 0.0


def _cli(
    code: Path, *args: str, ok: bool = True, module: str = "datasites.cli", site: Path | None = None
) -> tuple[float, bool, str]:
    """(wall seconds, ended as expected, stdout) of one ``datasite`` (or, with ``module``,
    ``researcher``) command in a fresh process; its CPU seconds (the command's and the
    server's) go to ``_CPU``."""
    env = {**os.environ, "PYTHONPATH": str(code)}
    site = Path(args[args.index("--dir") + 1]) if "--dir" in args else site
    server_before = _server_cpu(site)
    child = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", module, *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=code,
    )
    took = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    own = after.ru_utime - child.ru_utime + after.ru_stime - child.ru_stime
    _CPU.append(own + max(0.0, _server_cpu(site) - server_before))
    expected = (proc.returncode == 0) == ok
    if not expected:
        print(
            f"  unexpected exit {proc.returncode}: {' '.join(args[:3])}: {proc.stderr.strip()[-300:]}"
        )
    return took, expected, proc.stdout


def _submit(fed_path: Path, code: Path, n: int) -> None:
    """``n`` distinct jobs from the researcher, through the researcher API (no dry run)."""
    script = (
        "import sys\n"
        "from researcher import api\n"
        "from researcher.federation import Federation\n"
        "from researcher.job import make_job\n"
        "fed = Federation.load(sys.argv[1])\n"
        "model = [{'type': 'Linear', 'in_features': 30, 'out_features': 2}]\n"
        "for i in range(int(sys.argv[2])):\n"
        "    plan = {'rounds': 2, 'noise_multiplier': 1.5, 'batch_size': 64}\n"
        "    spec = make_job(model, 'breast-cancer', 'target', plan, name=f'job{i}',"
        " n_features=30, n_outputs=2)\n"
        "    api.submit(fed, spec, dry=False)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(code)}
    subprocess.run(
        [sys.executable, "-c", script, str(fed_path), str(n)], check=True, env=env, cwd=code
    )


def _pending_ids(code: Path, site: Path) -> list[str]:
    _, _, stdout = _cli(code, "requests", "--dir", str(site), "--json")
    items = json.loads(stdout.strip().splitlines()[-1])
    return [i["id"] for i in items if i["status"] == "pending"]


def _set_up(work: Path, code: Path, runs: int) -> tuple[Path, Path]:
    """A launched site with the table, Ada and PENDING + 2 * runs pending requests."""
    site = work / "hospital-a"
    share = split_data()[0][0]
    csv = work / "share.csv"
    share.to_csv(csv, index=False)
    _cli(code, "init", "hospital-a", "--dir", str(site), "--port", str(free_port()))
    _cli(code, "launch", "--dir", str(site), "--detach")
    d = ["--dir", str(site)]
    _cli(code, "upload", *d, "--name", "breast-cancer", "--file", str(csv), "--target", "target")
    _, _, stdout = _cli(code, "users", "add", *d, "--email", EMAIL, "--name", "Ada", "--json")
    (work / "hospital-a.password").write_text(
        json.loads(stdout.strip().splitlines()[-1])["password"]
    )
    (work / "hospital-a.password").chmod(0o600)
    _cli(code, "policy", "set", *d, "--dataset", "breast-cancer", "--allow-domain", "uni.edu",
         "--max-epsilon-per-job", "20")  # fmt: skip
    _cli(code, "budget", "set", *d, "--researcher", EMAIL, "--dataset", "breast-cancer",
         "--epsilon", "20")  # fmt: skip
    write_federation(work, [SiteDir(site)])
    _submit(work / "federation.toml", code, PENDING + 2 * runs)
    return site, csv


def measure(code: Path, runs: int, only: str = "") -> list[dict[str, object]]:
    """Each command ``runs`` times against one site; a row per command."""
    with tempfile.TemporaryDirectory(prefix="fedsite-cmds-", ignore_cleanup_errors=True) as tmp:
        work = Path(tmp)
        site, csv = _set_up(work, code, runs)
        d = ["--dir", str(site)]
        ids = _pending_ids(code, site)
        to_approve, to_deny = ids[:runs], ids[runs : 2 * runs]
        assert len(ids) >= PENDING + 2 * runs, f"only {len(ids)} pending requests"
        commands: dict[str, list[tuple[list[str], bool]]] = {
            "requests": [(["requests", *d], True)] * runs,
            "requests --json": [(["requests", *d, "--json"], True)] * runs,
            "review ID": [(["review", *d, ids[-1][:12]], True)] * runs,
            "approve ID": [(["approve", *d, i[:12]], True) for i in to_approve],
            "approve (no such id)": [(["approve", *d, "ffffffff"], False)] * runs,
            "deny ID": [(["deny", *d, i[:12], "--reason", "bench"], True) for i in to_deny],
            "users list": [(["users", "list", *d], True)] * runs,
            "users add": [
                (["users", "add", *d, "--email", f"r{k}@uni.edu", "--name", f"R{k}"], True)
                for k in range(runs)
            ],
            "budget": [(["budget", *d], True)] * runs,
            "budget set": [
                (
                    [
                        "budget",
                        "set",
                        *d,
                        "--researcher",
                        EMAIL,
                        "--dataset",
                        "breast-cancer",
                        "--epsilon",
                        str(20 + k),
                    ],
                    True,
                )  # fmt: skip
                for k in range(runs)
            ],
            "budget set --epsilon inf": [
                (
                    [
                        "budget",
                        "set",
                        *d,
                        "--researcher",
                        EMAIL,
                        "--dataset",
                        "breast-cancer",
                        "--epsilon",
                        "inf",
                    ],
                    False,
                )  # fmt: skip
            ]
            * runs,
            "upload": [
                (
                    [
                        "upload",
                        *d,
                        "--name",
                        f"b{k}",
                        "--file",
                        str(csv),
                        "--target",
                        "target",
                        "--mock-rows",
                        "100",
                    ],
                    True,
                )  # fmt: skip
                for k in range(runs)
            ],
            "audit": [(["audit", *d], True)] * runs,
            "status": [(["status", *d], True)] * runs,
            "--help": [(["--help"], True)] * runs,
        }
        rows = []
        if only == "researcher":
            rows = _researcher_rows(code, work, site, runs)
            _cli(code, "stop", *d, ok=True)
            return rows
        for name, calls in commands.items():
            times, cpu, good = [], [], True
            for args, ok in calls:
                took, expected, _ = _cli(code, *args, ok=ok)
                times.append(took)
                cpu.append(_CPU[-1])
                good &= expected
            rows.append(_row(name, times, good, cpu))
            print(f"  {name}: median {rows[-1]['median_s']:.2f} s", flush=True)
        rows += _researcher_rows(code, work, site, runs)
        rows.append(_row("launch --detach", *_launches(code, site, runs)))
        _cli(code, "stop", *d, ok=True)
        return rows


def _researcher_rows(code: Path, work: Path, site: Path, runs: int) -> list[dict[str, object]]:
    """``researcher datasets`` and ``status`` as a researcher runs them: the first command
    starts the agent that keeps the logins (``researcher/agent.py``), its own row; then each
    ``runs`` times. The agent is stopped at the end (its socket removed: it exits)."""
    fed = str(work / "federation.toml")
    env_before = os.environ.get("FEDSITE_AGENT")
    os.environ["FEDSITE_AGENT"] = "on"
    rows = []
    try:

        def researcher(*args: str) -> tuple[float, bool, str]:
            return _cli(code, *args, module="researcher.cli", site=site)

        took, good, _ = researcher("datasets", "-f", fed)
        rows.append(_row("researcher datasets, first (starts the agent)", [took], good, _CPU[-1:]))
        for name, args in (
            ("researcher datasets", ["datasets", "-f", fed]),
            ("researcher status", ["status", "-f", fed]),
        ):
            times, cpu, good = [], [], True
            for _ in range(runs):
                took, expected, _ = researcher(*args)
                times.append(took)
                cpu.append(_CPU[-1])
                good &= expected
            rows.append(_row(name, times, good, cpu))
            print(f"  {name}: median {rows[-1]['median_s']:.2f} s", flush=True)
    finally:
        (work / ".fedsite-agent" / "agent.sock").unlink(missing_ok=True)
        if env_before is None:
            os.environ.pop("FEDSITE_AGENT", None)
        else:
            os.environ["FEDSITE_AGENT"] = env_before
    return rows


def _launches(code: Path, site: Path, runs: int) -> tuple[list[float], bool, list[float]]:
    """``launch --detach`` until it returns (the server answers), after a stop, ``runs`` times;
    CPU: the command's own (the server's is read once it runs: not counted here)."""
    times, cpu, good = [], [], True
    for _ in range(runs):
        _cli(code, "stop", "--dir", str(site))
        took, expected, _ = _cli(code, "launch", "--dir", str(site), "--detach")
        times.append(took)
        cpu.append(_CPU[-1])
        good &= expected
    return times, good, cpu


def _row(name: str, times: list[float], good: bool, cpu: list[float]) -> dict[str, object]:
    return {
        "command": name,
        "median_s": statistics.median(times),
        "min_s": min(times),
        "max_s": max(times),
        "cpu_median_s": statistics.median(cpu),
        "runs": len(times),
        "as_expected": good,
    }


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="scripts/bench --commands", description=__doc__)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--code", type=Path, default=Path(__file__).resolve().parent.parent)
    parser.add_argument("--json", action="store_true", help="last line: the rows as JSON")
    parser.add_argument(
        "--only", choices=["researcher"], default="", help="only the researcher's commands"
    )
    args = parser.parse_args(argv)
    rows = measure(args.code.resolve(), args.runs, args.only)
    if not args.json:
        from policies.console import table

        table(
            f"commands, {PENDING}+ pending requests, {args.runs} runs each (fresh process)",
            ["command", "median s", "range s", "cpu s (median)", "as expected"],
            [
                [
                    r["command"],
                    f"{r['median_s']:.2f}",
                    f"{r['min_s']:.2f}-{r['max_s']:.2f}",
                    f"{r['cpu_median_s']:.2f}",
                    "yes" if r["as_expected"] else "NO",
                ]
                for r in rows
            ],
        )
    print(json.dumps(rows))


if __name__ == "__main__":
    main(sys.argv[1:])
