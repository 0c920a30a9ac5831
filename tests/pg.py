"""A real, throwaway PostgreSQL for the tests: ``scripts/pg_throwaway`` under a temp dir.

One cluster per test session (initdb and start take about 4 s); each test that needs isolation
gets a fresh database in it. Tests skip, saying why, only where no PostgreSQL binaries exist.
"""

from __future__ import annotations

import glob
import shutil
import subprocess
import tempfile
import uuid
from dataclasses import dataclass
from pathlib import Path

import sqlalchemy as sa
from sqlalchemy.pool import NullPool

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "pg_throwaway"


def binaries_missing() -> str:
    """Why PostgreSQL cannot run here, or '' when it can."""
    if shutil.which("pg_ctl") or glob.glob("/usr/lib/postgresql/*/bin/initdb"):
        return ""
    return "no PostgreSQL binaries (pg_ctl, initdb) on PATH or in /usr/lib/postgresql"


@dataclass
class Cluster:
    data: Path

    def _run(self, *args: str) -> str:
        proc = subprocess.run(
            [str(SCRIPT), *args], capture_output=True, text=True, timeout=120, check=False
        )
        if proc.returncode != 0:
            raise RuntimeError(f"pg_throwaway {' '.join(args)}: {proc.stderr.strip()}")
        return proc.stdout.strip()

    @property
    def url(self) -> str:
        return self._run("url", str(self.data))

    def start(self) -> str:
        return self._run("start", str(self.data), *self._port())

    def _port(self) -> list[str]:
        port = self.data.with_name(self.data.name + ".port")
        return [port.read_text().strip()] if port.exists() else []

    def stop(self, mode: str = "fast") -> None:
        self._run("stop", str(self.data), mode)

    def new_database(self) -> str:
        """A fresh, empty database in the cluster; its URL."""
        name = f"t_{uuid.uuid4().hex[:12]}"
        engine = sa.create_engine(self.url, poolclass=NullPool)
        with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
            conn.exec_driver_sql(f"CREATE DATABASE {name}")
        engine.dispose()
        return self.url.rsplit("/", 1)[0] + f"/{name}"


def start_cluster() -> Cluster:
    # the cluster's owner is an unprivileged user (initdb refuses root): its parent must be
    # traversable by that user, which pytest's 0700 temp dirs are not
    parent = Path(tempfile.mkdtemp(prefix="fedsite-pg-"))
    parent.chmod(0o711)
    cluster = Cluster(parent / "data")
    cluster.start()
    return cluster


def remove_cluster(cluster: Cluster) -> None:
    try:
        cluster.stop("immediate")
    finally:
        shutil.rmtree(cluster.data.parent, ignore_errors=True)
