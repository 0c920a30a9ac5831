"""The demo: one datasite on loopback with scikit-learn's breast-cancer data, seen by a researcher.

Launches a real datasite (embedded SQLite, loopback port), uploads the data with its mock twin,
adds a researcher, then as that researcher lists datasets, dry-runs a DP job on the mock, submits
it; as the admin prints the policy report and approves; then runs one DP round at the site.
"""

from __future__ import annotations

import argparse
import json
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from sklearn.datasets import load_breast_cancer

JOB = """import torch.nn as nn

DATASET = "breast-cancer"
PLAN = {"rounds": 3, "batch_size": 64, "learning_rate": 0.5, "target_epsilon": 2.0,
        "max_grad_norm": 1.0}


def make_model(n_features, n_outputs):
    return nn.Sequential(nn.Linear(n_features, 16), nn.ReLU(), nn.Linear(16, n_outputs))
"""


def sh(*args: str) -> str:
    proc = subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True)
    if proc.returncode:
        sys.exit(f"demo failed at {' '.join(args[:3])}: {proc.stderr.strip()}")
    return proc.stdout


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--json", action="store_true", help="last line: a JSON summary")
    parser.add_argument("--keep", action="store_true", help="leave the datasite running")
    args = parser.parse_args()
    started = time.time()
    work = Path(tempfile.mkdtemp(prefix="fedsite-demo-"))
    site = work / "hospital-a"
    csv = work / "breast_cancer.csv"
    load_breast_cancer(as_frame=True).frame.to_csv(csv, index=False)
    say = (lambda *_: None) if args.json else print
    ds = ["datasites.cli"]
    say(sh(*ds, "init", "hospital-a", "--dir", str(site), "--port", str(free_port())))
    try:
        say(sh(*ds, "launch", "--dir", str(site), "--detach"))
        say(
            sh(
                *ds,
                "upload",
                "--dir",
                str(site),
                "--name",
                "breast-cancer",
                "--file",
                str(csv),
                "--target",
                "target",
            )
        )
        creds = json.loads(
            sh(
                *ds,
                "users",
                "add",
                "--dir",
                str(site),
                "--email",
                "ada@uni.edu",
                "--name",
                "Ada",
                "--json",
            )
        )
        (work / "ada.password").write_text(creds["password"])
        sh(
            *ds,
            "policy",
            "set",
            "--dir",
            str(site),
            "--dataset",
            "breast-cancer",
            "--allow-domain",
            "uni.edu",
        )
        sh(
            *ds,
            "budget",
            "set",
            "--dir",
            str(site),
            "--researcher",
            "ada@uni.edu",
            "--dataset",
            "breast-cancer",
            "--epsilon",
            "3",
        )
        url = json.loads(sh(*ds, "status", "--dir", str(site), "--json"))["url"]
        fed = work / "federation.toml"
        fed.write_text(
            f'[[sites]]\nname = "hospital-a"\nurl = "{url}"\nemail = "ada@uni.edu"\n'
            'password_file = "ada.password"\n'
        )
        job = work / "job.py"
        job.write_text(JOB)
        rs = ["researcher.cli"]
        say("--- what the researcher sees ---")
        say(sh(*rs, "datasets", "-f", str(fed)))
        dry = json.loads(sh(*rs, "try", str(job), "-f", str(fed), "--json"))
        say(sh(*rs, "try", str(job), "-f", str(fed)) if not args.json else "")
        sub = json.loads(sh(*rs, "submit", str(job), "-f", str(fed), "--json"))
        say("--- the admin reviews ---")
        req = json.loads(sh(*ds, "requests", "--dir", str(site), "--json"))[0]
        say(sh(*ds, "approve", "--dir", str(site), req["id"][:8]))
        status = json.loads(sh(*rs, "status", "-f", str(fed), "--json"))
        say(sh(*rs, "status", "-f", str(fed)))
        say(sh(*ds, "audit", "--dir", str(site)))
        summary = {
            "site": url,
            "job": sub["job"],
            "dry_run": dry["metrics"],
            "epsilon_per_site": dry["epsilon_per_site"],
            "status": status["sites"],
            "report_passed": req["report"]["passed"],
            "seconds": round(time.time() - started, 1),
            "dir": str(work),
        }
        print(
            json.dumps(summary)
            if args.json
            else f"demo done in {summary['seconds']} s; state in {work}"
        )
    finally:
        if not args.keep:
            subprocess.run(
                [sys.executable, "-m", "datasites.cli", "stop", "--dir", str(site)],
                capture_output=True,
            )


if __name__ == "__main__":
    main()
