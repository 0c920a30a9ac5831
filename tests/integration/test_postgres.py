"""A datasite on PostgreSQL (``datasite init --db-url postgresql://...``), in a real throwaway
cluster: syft's store and the site's own tables are really there, in their own schemas, and a
``kill -9`` of the server followed by a crash and restart of PostgreSQL loses nothing."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest
import sqlalchemy as sa
from sqlalchemy.engine import make_url
from sqlalchemy.pool import NullPool

from datasites.ledger.audit import AuditLog
from datasites.ledger.budget import BudgetLedger
from datasites.ledger.store import SiteStore
from datasites.serving.config import SiteDir
from policies.accounting import Mechanism
from researcher import sites
from researcher.federation import SiteLogin
from tests.conftest import Site, free_port, last_json, run_cli
from tests.integration.conftest import job, request_id

pytestmark = pytest.mark.integration
EMAIL = "ada@uni.edu"


def _count(url: str, sql: str) -> int:
    engine = sa.create_engine(url, poolclass=NullPool)
    with engine.connect() as conn:
        return int(conn.exec_driver_sql(sql).scalar_one())


def test_a_bad_db_url_is_one_line_and_writes_nothing(tmp_path: Path, pg_cluster) -> None:
    wrong = make_url(pg_cluster.url).set(password="wrong").render_as_string(hide_password=False)
    no_password = pg_cluster.url.replace(f":{make_url(pg_cluster.url).password}@", "@")
    assert "@" in no_password and make_url(no_password).password is None
    for url, says in [
        (wrong, "password authentication failed"),
        (no_password, "USER:PASSWORD@HOST:PORT/DATABASE"),
        ("mysql://u:p@127.0.0.1:3306/d", "scheme 'mysql' is not supported"),
    ]:
        d = tmp_path / "s"
        proc = run_cli("datasite", "init", "s", "--dir", str(d), "--db-url", url, check=False)
        assert proc.returncode == 1 and says in proc.stderr, proc.stderr
        assert len(proc.stderr.strip().splitlines()) == 1 and not d.exists()
        assert "wrong" not in proc.stderr  # the password is not echoed


def _kill_9(site: Site) -> None:
    pid = last_json(site.cli("status", "--json"))["pid"]
    os.kill(pid, signal.SIGKILL)
    deadline = time.time() + 10
    while time.time() < deadline and last_json(site.cli("status", "--json"))["running"]:
        time.sleep(0.2)
    assert not last_json(site.cli("status", "--json"))["running"]


def test_kill_9_and_a_postgres_crash_lose_nothing(
    tmp_path: Path, pg_cluster, breast_cancer_csv: Path
) -> None:
    url = pg_cluster.new_database()
    site = Site(tmp_path / "pg-site", "pg-site", free_port())
    run_cli(
        "datasite", "init", site.name, "--dir", str(site.dir), "--port", str(site.port),
        "--self-signed", "--db-url", url,
    )  # fmt: skip
    site.relaunch()
    try:
        site.cli(
            "upload", "--name", "cancer", "--file", str(breast_cancer_csv), "--target", "target"
        )
        password = last_json(site.cli("users", "add", "--email", EMAIL, "--name", "Ada", "--json"))[
            "password"
        ]
        site.cli("budget", "set", "--researcher", EMAIL, "--dataset", "cancer", "--epsilon", "5")
        site.cli("policy", "set", "--dataset", "cancer", "--allow-domain", "uni.edu")

        # the URL's password is in its own 0600 file, never in site.toml
        from sqlalchemy.engine import make_url

        password_file = site.dir / "db-password"
        assert password_file.read_text().strip() == make_url(url).password
        assert password_file.stat().st_mode & 0o777 == 0o600
        assert make_url(url).password not in (site.dir / "site.toml").read_text()
        shown = last_json(site.cli("status", "--json"))["database"]  # where, and no password
        assert shown.startswith("postgresql://") and make_url(url).password not in shown
        # where things are: syft's tables in 'syft', the site's in 'datasite', no SQLite anywhere
        assert SiteDir(site.dir).site_db == url
        assert _count(url, 'SELECT count(*) FROM syft."Dataset"') == 1
        assert _count(url, 'SELECT count(*) FROM syft."User"') == 2  # the admin and Ada
        assert _count(url, "SELECT count(*) FROM datasite.charges WHERE kind = 'mock'") == 1
        assert _count(url, "SELECT count(*) FROM pg_tables WHERE schemaname = 'public'") == 0
        # uploads.db is the gate's registry of researchers' transient weight uploads (deleted
        # as each call ends; datasites/serving/quota.py), not site state a fail-over must carry
        stray = [
            p.name
            for p in site.dir.rglob("*")
            if p.suffix in (".db", ".sqlite") and p.name != "uploads.db"
        ]
        assert stray == []

        # a real job round through the server: approved, trained, charged and committed there
        (tmp_path / "ada.pw").write_text(password)
        login = SiteLogin(
            site.name, site.url, EMAIL, tmp_path / "ada.pw", fingerprint=site.fingerprint
        )
        client = sites.connect(login)
        asset = sites.find_asset(client, "cancer")
        spec = job({"rounds": 1, "target_epsilon": 1.0, "batch_size": 64})
        sites.submit(client, spec, asset)
        site.cli("approve", request_id(site, spec.name))
        reply = sites.run_round(client, spec, asset, "")
        assert reply["status"] == "ok", last_json(site.cli("audit", "--json"))[-1]
        # and a second job's reservation, made as the server dies (it stays charged)
        ledger = BudgetLedger(SiteStore(url))
        ledger.reserve(EMAIL, "cancer", "job-in-flight", Mechanism(2.0, 0.05, 50), "prv")
        before = last_json(site.cli("budget", "--json"))
        statuses = [(r["job"], r["status"]) for r in before[0]["releases"] if not r["public"]]
        assert (spec.job_id, "committed") in statuses and ("job-in-flight", "reserved") in statuses
        audit_before = last_json(site.cli("audit", "--json"))
        assert "approved" in [e["event"] for e in audit_before]
        assert _count(url, "SELECT count(*) FROM datasite.approvals") == 1

        _kill_9(site)
        pg_cluster.stop("immediate")  # a crash: recovery replays the WAL at the next start
        pg_cluster.start()
        site.relaunch()

        assert last_json(site.cli("budget", "--json")) == before
        # the CLI refuses a broken chain; the same entries, oldest first, hashes and all
        assert last_json(site.cli("audit", "--json")) == audit_before
        assert AuditLog(SiteStore(url), site.dir).verify()
        admin = site.admin()
        assert [d.name for d in admin.datasets.get_all()] == ["cancer"]
        ada = site.login(EMAIL, password)
        assert ada.datasets["cancer"].assets[0].mock.shape[1] == 31
    finally:
        site.cli("stop", check=False)
