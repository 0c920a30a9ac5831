"""A datasite's life: init, launch, upload, accounts, kill -9, relaunch, and what survives."""

from __future__ import annotations

import os
import signal
import socket
import stat
import time
from pathlib import Path

import pytest
import syft as sy

from tests import server_zygote
from tests.conftest import Site, free_port, last_json, make_site, run_cli

pytestmark = pytest.mark.integration


def researcher_login(site: Site, email: str, password: str):  # noqa: ANN201
    return site.login(email, password)


def bcrypt_costs(site: Site) -> dict[str, int]:
    """Each account's bcrypt cost factor, as syft stored its password hash (``$2b$NN$``)."""
    import json
    import sqlite3

    from datasites.serving.config import SiteDir

    (db,) = SiteDir(site.dir).state_dir.glob("*/db/*.db")
    with sqlite3.connect(db) as conn:
        users = [json.loads(row[0]) for row in conn.execute("SELECT fields FROM User")]
    return {u["email"]: int(u["hashed_password"].split("$")[2]) for u in users}


def test_init_writes_secret_files_0600_and_never_the_default_password(tmp_path: Path) -> None:
    d = tmp_path / "s"
    run_cli("datasite", "init", "clinic", "--dir", str(d), "--port", str(free_port()))
    for name in ("admin-password", "identity.key"):
        assert stat.S_IMODE((d / name).stat().st_mode) == 0o600
    assert (d / "admin-password").read_text().strip() != "changethis"
    again = run_cli("datasite", "init", "clinic", "--dir", str(d), check=False)
    assert again.returncode == 1 and "already holds a datasite" in again.stderr


def test_uninitialised_dir_is_one_clear_error(tmp_path: Path) -> None:
    proc = run_cli("datasite", "status", "--dir", str(tmp_path / "never"), check=False)
    assert proc.returncode == 1
    assert "not an initialised datasite" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


def test_full_lifecycle_survives_kill_9(tmp_path: Path, breast_cancer_csv: Path) -> None:
    site = make_site(tmp_path, "hospital-a")
    try:
        status = last_json(site.cli("status", "--json"))
        assert {"name", "url", "port", "pid", "running"} <= set(status)
        assert status["running"] and status["port"] == site.port

        site.cli(
            "upload", "--name", "cancer", "--file", str(breast_cancer_csv), "--target", "target"
        )
        creds = last_json(
            site.cli("users", "add", "--email", "ada@uni.edu", "--name", "Ada", "--json")
        )
        assert creds["email"] == "ada@uni.edu" and len(creds["password"]) >= 16

        ada = researcher_login(site, "ada@uni.edu", creds["password"])
        asset = ada.datasets["cancer"].assets[0]
        assert asset.mock.shape[1] == 31
        assert asset.data is None  # the private rows are not readable by a researcher

        # one request left pending, one approved (plain syft, as any client could)
        # the asset's private half is the stub naming the site's Parquet file (its row count):
        # the rows themselves are read by the site's runtime alone (datasites/data/store.py);
        # syft runs the code on the mock too
        @sy.syft_function_single_use(data=asset)
        def count_rows(data):
            return int(data["rows"].sum()) if "rows" in data.columns else len(data)

        @sy.syft_function_single_use(data=asset)
        def mean_radius(data):
            return float(data["mean radius"].mean())

        ada.code.request_code_execution(count_rows)
        ada.code.request_code_execution(mean_radius)
        admin = site.admin()
        [r for r in admin.requests if r.code.service_func_name == "count_rows"][0].approve()

        pid = status["pid"]
        os.kill(pid, signal.SIGKILL)
        deadline = time.time() + 10
        while time.time() < deadline and last_json(site.cli("status", "--json"))["running"]:
            time.sleep(0.2)
        assert not last_json(site.cli("status", "--json"))["running"]

        site.cli("launch", "--detach")
        admin = site.login("admin@fedsite.io", site.password)
        assert [d.name for d in admin.datasets.get_all()] == ["cancer"]
        assert "ada@uni.edu" in [u.email for u in admin.users.get_all()]
        states = {r.code.service_func_name: r.status.name for r in admin.requests}
        assert states == {"count_rows": "APPROVED", "mean_radius": "PENDING"}

        ada = researcher_login(site, "ada@uni.edu", creds["password"])
        assert ada.code.count_rows(data=ada.datasets["cancer"].assets[0]).get() == 569
        listed = last_json(site.cli("datasets", "--json"))
        # the published row count is a DP count (noise sd ~41 at the default mock epsilon)
        assert abs(listed[0]["rows"] - 569) < 200 and listed[0]["target"] == "target"
        assert listed[0]["mock_epsilon"] == 1.0
        # the mock is a public release: in the spend of a researcher who has run nothing yet
        site.cli("users", "add", "--email", "bo@uni.edu", "--name", "Bo")
        site.cli(
            "budget", "set", "--researcher", "bo@uni.edu", "--dataset", "cancer", "--epsilon", "3"
        )
        [bo] = last_json(site.cli("budget", "--json"))
        # a launched server hashes at syft's bcrypt cost; the suite's forked ones at a lower
        # one (tests/server_zygote.py), which must not be what a real site does
        costs = bcrypt_costs(site)
        assert costs["bo@uni.edu"] == 12, costs
        assert costs["ada@uni.edu"] == server_zygote.SUITE_BCRYPT_COST < 12
        assert bo["epsilon_spent"] == pytest.approx(1.0, abs=0.01) and bo["charges"] == 0
        assert [(r["kind"], r["public"]) for r in bo["releases"]] == [("mock", True)]
        # the private table, the ledger, the logs: nothing under the site dir is readable by others
        exposed = [
            f"{p.relative_to(site.dir)} {oct(p.stat().st_mode & 0o777)}"
            for p in [site.dir, *site.dir.rglob("*")]
            if not p.is_symlink() and p.stat().st_mode & 0o077
        ]
        assert exposed == []
    finally:
        site.cli("stop", check=False)


def test_bad_inputs_leave_state_untouched(
    site: Site, breast_cancer_csv: Path, tmp_path: Path
) -> None:
    site.cli("upload", "--name", "cancer", "--file", str(breast_cancer_csv), "--target", "target")
    bad_csv = tmp_path / "bad.csv"
    bad_csv.write_text("a,b,label\n1,x,0\n2,y,1\n")
    nan_csv = tmp_path / "nan.csv"
    nan_csv.write_text("a,label\n1,0\n,1\n")
    empty_csv = tmp_path / "empty.csv"
    empty_csv.write_text("")
    cases = {
        "file not found": ["--name", "x1", "--file", str(tmp_path / "nope.csv"), "--target", "t"],
        "target column 'nope' not found": [
            "--name",
            "x2",
            "--file",
            str(breast_cancer_csv),
            "--target",
            "nope",
        ],
        "column 'b' has 2 distinct text values, more than --max-categories 1": [
            "--name",
            "x3",
            "--file",
            str(bad_csv),
            "--target",
            "label",
            "--max-categories",
            "1",
        ],
        "missing values in column(s) a (1)": [
            "--name",
            "x4",
            "--file",
            str(nan_csv),
            "--target",
            "label",
        ],
        "empty": ["--name", "x5", "--file", str(empty_csv), "--target", "label"],
        "may hold only letters": ["--name", "bad name!", "--file", str(bad_csv), "--target", "l"],
        "--mock-rows must be in": [
            "--name",
            "x6",
            "--file",
            str(breast_cancer_csv),
            "--target",
            "target",
            "--mock-rows",
            "-5",
        ],
        "already exists": [
            "--name",
            "cancer",
            "--file",
            str(breast_cancer_csv),
            "--target",
            "target",
        ],
    }
    for needle, args in cases.items():
        proc = site.cli("upload", *args, check=False)
        assert proc.returncode == 1, needle
        assert needle in proc.stderr, (needle, proc.stderr)
        assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    names = [d["name"] for d in last_json(site.cli("datasets", "--json"))]
    assert names == ["cancer"]
    governance = {  # each must fail with one line and change nothing
        "no dataset 'nosuch'": ("policy", "set", "--dataset", "nosuch", "--allow-domain", "a.b"),
        "no dataset 'nosuch' on": (
            "budget", "set", "--researcher", "a@b.c", "--dataset", "nosuch", "--epsilon", "1",
        ),
        "finite epsilon": (
            "budget", "set", "--researcher", "a@b.c", "--dataset", "cancer", "--epsilon", "inf",
        ),
        "no account a@b.c on this datasite": (
            "budget", "set", "--researcher", "a@b.c", "--dataset", "cancer", "--epsilon", "1",
        ),
    }  # fmt: skip
    for needle, args in governance.items():
        proc = site.cli(*args, check=False)
        assert proc.returncode == 1 and needle in proc.stderr, (needle, proc.stderr)
        assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert "Infinity" not in site.cli("budget", "--json").stdout


def test_wrong_password_is_refused(site: Site) -> None:
    with pytest.raises(Exception, match="Invalid credentials"):
        site.login("admin@fedsite.io", "wrong")
    with pytest.raises(Exception):  # noqa: B017  the syft default admin does not exist
        site.login(
            "info@openmined.org",
            "changethis",
        )
    # the admin commands go through the admin channel, whose key is the launch's token (the
    # password is the console's and syft's): a wrong token is one line, exit 1
    token = site.dir / "admin-token"
    good = token.read_text()
    token.write_text("not-the-token\n")
    try:
        proc = site.cli("users", "list", check=False)
        assert proc.returncode == 1 and "wrong token" in proc.stderr, proc.stderr
        assert len(proc.stderr.strip().splitlines()) == 1
    finally:
        token.write_text(good)


def test_port_in_use_and_double_launch(site: Site, tmp_path: Path) -> None:
    assert "already running" in site.cli("launch", "--detach", check=False).stderr
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        d = tmp_path / "other"
        run_cli("datasite", "init", "other", "--dir", str(d), "--port", str(port))
        proc = run_cli("datasite", "launch", "--detach", "--dir", str(d), check=False)
    assert proc.returncode == 1 and f"port {port}" in proc.stderr
    assert not (d / "server.pid").exists()


def test_a_researcher_password_is_reset_and_an_account_removed(site: Site) -> None:
    """Attack: keep using a leaked password after the admin reset it, or an account after its
    removal. Neither logs in; the admin account cannot be targeted."""
    first = last_json(site.cli("users", "add", "--email", "cy@uni.edu", "--name", "Cy", "--json"))
    new = last_json(site.cli("users", "reset-password", "--email", "cy@uni.edu", "--json"))
    assert new["password"] != first["password"]
    with pytest.raises(Exception, match="Invalid credentials"):
        site.login("cy@uni.edu", first["password"])
    site.login("cy@uni.edu", new["password"])
    refused = site.cli("users", "remove", "--email", "admin@fedsite.io", check=False)
    assert refused.returncode == 1 and "not a researcher account" in refused.stderr
    site.cli("users", "remove", "--email", "cy@uni.edu")
    with pytest.raises(Exception):  # noqa: B017  the account is gone
        site.login("cy@uni.edu", new["password"])
    emails = [u["email"] for u in last_json(site.cli("users", "list", "--json"))]
    assert "cy@uni.edu" not in emails and "admin@fedsite.io" in emails
    gone = site.cli("users", "reset-password", "--email", "cy@uni.edu", check=False)
    assert gone.returncode == 1 and "no account cy@uni.edu" in gone.stderr
