"""Shared fixtures: real datasites on free loopback ports, driven through the real CLI."""

from __future__ import annotations

import contextlib
import functools
import json
import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
from sklearn.datasets import load_breast_cancer

# the researcher agent (researcher/agent.py) outlives a command by design; tests that mean to
# exercise it switch it on for their own child processes
os.environ.setdefault("FEDSITE_AGENT", "off")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_cli(
    tool: str, *args: str, check: bool = True, env: dict | None = None, child: bool = False
) -> subprocess.CompletedProcess:
    """Run ``datasite`` or ``researcher`` with a user's arguments; exit code, stdout, stderr.

    In this process by default: a child pays syft's import (about 7 s here) on every command,
    which was most of the suite's time. ``child=True`` (or an ``env``) runs a real child process,
    for the tests of what only a fresh process shows (start-up, environment).
    """
    module = {"datasite": "datasites.cli", "researcher": "researcher.cli"}[tool]
    if child or env is not None:
        proc = subprocess.run(
            [sys.executable, "-m", module, *args],
            capture_output=True,
            text=True,
            timeout=300,
            env=env,
        )
    else:
        proc = _in_process(module, list(args))
    if check and proc.returncode != 0:
        raise AssertionError(
            f"{tool} {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
        )
    return proc


def _in_process(module: str, args: list[str]) -> subprocess.CompletedProcess:
    """The CLI's ``main()`` with this argv and captured streams, as ``python -m`` would run it."""
    import importlib
    import io
    import traceback

    main = importlib.import_module(module).main
    out, err = io.StringIO(), io.StringIO()
    saved = sys.argv, sys.stdout, sys.stderr
    sys.argv, sys.stdout, sys.stderr = [module, *args], out, err
    code = 0
    try:
        main()
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except Exception:  # what the interpreter does with an uncaught exception
        traceback.print_exc(file=err)
        code = 1
    finally:
        sys.argv, sys.stdout, sys.stderr = saved
    return subprocess.CompletedProcess([module, *args], code, out.getvalue(), err.getvalue())


@contextlib.contextmanager
def console_on(site_dir: Path, login_delay: float | None = None) -> Iterator[str]:
    """The admin console of ``site_dir`` as ``datasite console`` serves it
    (``datasites.console.app.server``, the same app, options and address), from a thread of
    this process; yields its URL. A child process paid syft's import again (about 8 CPU-s, in
    each of three modules). The command's own argument checks are in test_cli_guards."""
    import threading
    import time

    from datasites.console.app import server
    from datasites.console.sessions import BASE_DELAY
    from datasites.serving.config import SiteDir

    delay = BASE_DELAY if login_delay is None else login_delay
    # uvicorn's logging set-up would bind handlers to this test's captured stderr, closed after
    console = server(SiteDir(site_dir), free_port(), delay, own_logging=False)
    thread = threading.Thread(target=console.run, name="console", daemon=True)
    thread.start()
    deadline = time.time() + 60
    while not console.started:
        if not thread.is_alive() or time.time() > deadline:
            raise RuntimeError("the console did not start")
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{console.config.port}"
    finally:
        console.should_exit = True
        thread.join(10)


def queued(queue, function: str) -> list:  # noqa: ANN001
    """A ReviewQueue's items for one job (syft's function name), in order: their reports only.

    ``queue.items()`` builds every request's report, each running the budget's accountant, and
    a site's queue grows over a test module: finding one job by listing all was quadratic."""
    return queue.items(where=lambda r: r.code.service_func_name == function)


def last_json(proc: subprocess.CompletedProcess):
    return json.loads(proc.stdout.strip().splitlines()[-1])


@dataclass
class Site:
    dir: Path
    name: str
    port: int

    @property
    def url(self) -> str:
        """Test sites serve HTTPS only (``datasite init --self-signed``), as deployed ones do."""
        return f"https://127.0.0.1:{self.port}"

    @property
    def fingerprint(self) -> str:
        """The site's TLS certificate fingerprint: what a researcher pins."""
        from datasites.serving.config import SiteDir

        return SiteDir(self.dir).tls_fingerprint()

    def login(self, email: str, password: str):  # noqa: ANN201
        """A plain syft client, trusting this site's certificate only."""
        import syft as sy

        from policies import tls
        from researcher import syft_adapter

        syft_adapter.install()  # syft's client gets the pinned sessions
        tls.pin(self.url, tls.Trust(fingerprint=self.fingerprint))
        return sy.login(url="https://127.0.0.1", port=self.port, email=email, password=password)

    @property
    def password(self) -> str:
        return (self.dir / "admin-password").read_text().strip()

    def cli(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        return run_cli("datasite", *args, "--dir", str(self.dir), check=check)

    def relaunch(self) -> None:
        """Start the stopped (or killed) server again, forked from the warm parent.

        The forked server runs ``serve`` from its first line on the same DIR, so what a restart
        keeps or loses is tested as well as through ``datasite launch``, whose fresh process
        (about 10 CPU-s of imports) is tested where the start itself is the point:
        ``test_site_lifecycle`` (kill -9 and relaunch included) and ``test_readme_walk``."""
        from datasites.serving.config import SiteDir
        from tests import server_zygote

        server_zygote.launch(SiteDir(self.dir))

    def published_rows(self, dataset: str) -> int:
        """The DP row count the site published at upload: what its rounds are computed from."""
        from datasites.serving.config import SiteDir

        return int(SiteDir(self.dir).datasets_meta()[dataset]["rows"])

    def public_mechanisms(self, dataset: str) -> list:
        """The mechanisms of the dataset's public releases (its DP mock), as the ledger holds."""
        from datasites.ledger.budget import BudgetLedger
        from datasites.ledger.store import SiteStore
        from datasites.serving.config import SiteDir
        from policies.accounting import Mechanism

        ledger = BudgetLedger(SiteStore(SiteDir(self.dir).site_db))
        return [
            Mechanism(m["noise_multiplier"], m["sample_rate"], m["steps"])
            for m in (r["mechanism"] for r in ledger.public_releases(dataset))
        ]

    def admin(self):  # noqa: ANN201
        return self.login("admin@fedsite.io", self.password)


# every site the helpers below started, for the session's end: a fixture that fails after its
# servers started never reaches its own stop, and they ran on (and took CPU) for the whole run
_STARTED: list[Site] = []


@pytest.fixture(scope="session", autouse=True)
def _no_server_outlives_the_session() -> Iterator[None]:
    yield
    from datasites.serving import process
    from datasites.serving.config import SiteDir

    for site in _STARTED:
        if SiteDir(site.dir).pid_path.exists():
            process.stop(SiteDir(site.dir))


def make_site(root: Path, name: str) -> Site:
    """A site initialised through the CLI and launched (forked from the run's warm server
    parent, ``tests/server_zygote.py``: the real ``datasite launch`` is tested on its own)."""
    from datasites.serving.config import SiteDir
    from tests import server_zygote

    site = Site(root / name, name, free_port())
    _STARTED.append(site)
    run_cli(
        "datasite", "init", name, "--dir", str(site.dir), "--port", str(site.port), "--self-signed"
    )
    server_zygote.launch(SiteDir(site.dir))
    return site


def upload_table(
    site_dir: Path,
    name: str,
    table: Path | pd.DataFrame,
    target: str,
    mock_epsilon: float | None = None,
) -> Any:
    """``datasite upload`` as the CLI sends it, with its defaults: over the admin channel, and
    the running site reads the file itself (a frame is written beside the site first).

    Not ``admin.upload`` in the test process, which logged in to the site over syft as its
    admin: the whole API, with syft's library endpoints, serialised by the site and read here,
    about 0.8 CPU-s a site that the CLI never pays."""
    from datasites.data.mock import DEFAULT_MOCK_EPSILON
    from datasites.data.tables import DEFAULT_MAX_CATEGORIES
    from datasites.serving import channel

    if isinstance(table, pd.DataFrame):
        path = site_dir.parent / f".{site_dir.name}-{name}.csv"
        table.to_csv(path, index=False)
        table = path
    call = channel.Upload(
        name=name,
        file=str(table.resolve()),
        target=target,
        description="",
        mock_rows=1000,  # the CLI's defaults (datasite upload --help)
        mock_epsilon=DEFAULT_MOCK_EPSILON if mock_epsilon is None else mock_epsilon,
        max_categories=DEFAULT_MAX_CATEGORIES,
        max_memory_mb=1536,
    )
    return channel.call(site_dir, call)


def add_researcher(site_dir: Path, email: str, name: str) -> str:
    """``datasite users add`` over the admin channel (as ``upload_table``): the password."""
    from datasites.serving import channel

    return str(channel.call(site_dir, channel.UsersAdd(email, name)).password)


def pending_item(site_dir: Path, job: str) -> dict[str, Any]:
    """``datasite requests`` over the admin channel: the job's one pending request, with its
    policy report (``ReviewItem.to_dict()``). The review runs at the site, as for the admin."""
    from datasites.serving import channel

    items = channel.call(site_dir, channel.Requests()).items
    (item,) = [i for i in items if i["job"] == job and i["status"] == "pending"]
    return dict(item)


def approve_job(site_dir: Path, job: str) -> dict[str, Any]:
    """``datasite approve`` of the job's pending request over the admin channel (a failing
    report is refused, as for the admin); the approved item. No syft login in the test."""
    from datasites.serving import channel

    request_id = pending_item(site_dir, job)["id"]
    return dict(channel.call(site_dir, channel.Approve(request_id)).item)


def make_sites(root: Path, *names: str) -> list[Site]:
    """Several sites, initialised through the CLI and launched at once, as ``make_site``."""
    from concurrent.futures import ThreadPoolExecutor

    from datasites.serving.config import SiteDir
    from tests.server_zygote import launch

    made = [Site(root / name, name, free_port()) for name in names]
    _STARTED.extend(made)
    for site in made:
        run_cli(
            "datasite",
            "init",
            site.name,
            "--dir",
            str(site.dir),
            "--port",
            str(site.port),
            "--self-signed",
        )
    with ThreadPoolExecutor(len(made)) as pool:
        list(pool.map(lambda site: launch(SiteDir(site.dir)), made))
    return made


def pytest_configure(config: pytest.Config) -> None:
    from tests import server_zygote

    server_zygote.configure()  # the run's one warm server parent, shared by its workers


def pytest_unconfigure(config: pytest.Config) -> None:
    from tests import server_zygote

    server_zygote.unconfigure()


def _shared_directory_modes() -> dict[str, int]:
    """The whole modes (sticky bit included) of the temporary directory and its parents."""
    import stat
    import tempfile

    top = Path(tempfile.gettempdir()).resolve()
    return {str(p): stat.S_IMODE(p.stat().st_mode) for p in [top, *top.parents]}


def pytest_sessionstart(session: pytest.Session) -> None:
    if not os.environ.get("PYTEST_XDIST_WORKER"):  # once, in the process that owns the run
        session.config.stash[_MODES] = _shared_directory_modes()


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """The run fails if it changed the mode of /tmp or a parent: a test once restored /tmp
    without its sticky bit, loosening the machine for every user and switching the accounting
    cache off in every later run (it refuses such a folder), and nothing failed."""
    before = session.config.stash.get(_MODES, None)
    if before is None:
        return
    after = _shared_directory_modes()
    changed = [p for p, mode in before.items() if after.get(p) != mode]
    if changed:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
        for p in changed:
            sys.stderr.write(
                f"the test run changed the mode of {p} from {oct(before[p])} to {oct(after[p])}\n"
            )


_MODES = pytest.StashKey[dict[str, int]]()


def pytest_xdist_make_scheduler(config: pytest.Config, log: object) -> object:
    """``--dist loadgroup`` (scripts/test) as this suite needs it: a file per worker, as
    ``--dist loadfile`` gives, except that the adversarial package (one arena site for all its
    files) and the integration modules on the shared sites (``SHARED_SITES``) each go to one
    worker whole, so that their sites start once and not once per worker.

    A scheduler and not ``xdist_group`` marks: xdist 3.8 groups by renaming ``item._nodeid``,
    which pytest 9 no longer reads, so marked tests were spread one by one over the workers
    and every worker started each module's servers."""
    if config.getvalue("dist") != "loadgroup":
        return None
    from xdist.scheduler import LoadScopeScheduling

    root = config.rootpath

    class ByGroup(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return _group(root, nodeid.split("::")[0])

    return ByGroup(config, log)


@functools.cache
def _group(root: Path, path: str) -> str:
    if path.startswith("tests/adversarial/"):
        return "adversarial"
    source = root / path
    if source.suffix == ".py" and "\nSHARED_SITES = True" in source.read_text():
        return "shared-sites"
    return path


@pytest.fixture(scope="session")
def breast_cancer_csv(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data") / "breast_cancer.csv"
    load_breast_cancer(as_frame=True).frame.to_csv(path, index=False)
    return path


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Iterator[Site]:
    s = make_site(tmp_path_factory.mktemp("sites"), "hospital-a")
    yield s
    s.cli("stop", check=False)


def breast_cancer_frame() -> pd.DataFrame:
    return load_breast_cancer(as_frame=True).frame


@pytest.fixture(scope="session")
def pg_cluster():  # noqa: ANN201
    """A real PostgreSQL cluster for this test session (``scripts/pg_throwaway``)."""
    from tests import pg

    reason = pg.binaries_missing()
    if reason:
        pytest.skip(reason)
    cluster = pg.start_cluster()
    yield cluster
    pg.remove_cluster(cluster)


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    """With ``FEDSITE_TEST_TIMELINE=FILE``, one JSON line per test phase: worker, test, phase,
    start and stop (epoch seconds). Which worker ran what, and when: the suite's wall time is
    its longest worker's chain (docs/maintainers.md, "Finding where the suite's time goes")."""
    path = os.environ.get("FEDSITE_TEST_TIMELINE")
    if not path or os.environ.get("PYTEST_XDIST_WORKER"):
        return  # under xdist the controller writes, from the reports its workers send
    node = getattr(report, "node", None)  # the worker that ran it (xdist's controller)
    line = {
        "worker": node.gateway.id if node is not None else "main",
        "test": report.nodeid,
        "phase": report.when,
        "start": report.start,
        "stop": report.stop,
    }
    with open(path, "a") as out:
        out.write(json.dumps(line) + "\n")
