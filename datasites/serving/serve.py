"""The datasite server process: ``python -m datasites.serving.serve DIR``.

Runs syft 0.9.5's FastAPI app under uvicorn in *this* process (not in a multiprocessing child as
``sy.orchestra.launch`` does), so the pid in ``server.pid`` is the server and ``kill -9`` of it
leaves no orphan holding the port. Identity, admin secret and state location come from DIR and
are handed to syft through the environment variables it reads at import time; the secrets are
removed from the environment right after, so code running inside the server cannot read them.
"""

from __future__ import annotations

import io
import os
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TextIO

from datasites.ledger.store import SYFT_SCHEMA, SiteStore, is_postgres
from datasites.serving import limits, quota, syft_patches
from datasites.serving.config import SiteDir, keep_private
from datasites.training import runtime, sandbox

SITE_DIR_ENV = "FEDSITE_DIR"
BLOB_THRESHOLD_MB = 1_000_000
_SECRET_ENV = ("DEFAULT_ROOT_PASSWORD", "SERVER_PRIVATE_KEY")


def _prepare_environment(site: SiteDir) -> None:
    config = site.config()
    env = {
        "SERVER_UID": config.server_uid,
        "SERVER_PRIVATE_KEY": site.signing_key(),
        "DEFAULT_ROOT_EMAIL": config.admin_email,
        "DEFAULT_ROOT_USERNAME": f"{config.name} admin",
        "DEFAULT_ROOT_PASSWORD": site.admin_password(),
        "SYFT_TEMP_ROOT": str(site.state_dir.resolve()),
        SITE_DIR_ENV: str(site.root.resolve()),
        "SYFT_NAME": config.name,
        "SYFT_SERVER_TYPE": "datasite",
        "SYFT_RESET": "False",
        "SYFT_DEV_MODE": "False",
        "SYFT_IN_MEMORY_WORKERS": "True",
        "SYFT_N_CONSUMERS": "0",
        "SYFT_CREATE_PRODUCER": "False",
        "SYFT_PROCESSES": "1",
        # no client upload ever goes to blob storage (researchers may not write it: quota.py);
        # every request is bounded by the body cap instead (limits.py)
        "MIN_SIZE_BLOB_STORAGE_MB": str(BLOB_THRESHOLD_MB),
    }
    db_url = site.db_url()  # with its password, from db-password
    if db_url:
        env["SYFT_DB_URL"] = db_url
    if is_postgres(db_url):
        # syft 0.9.5 rebuilds its URL without options, so its schema comes through libpq's
        # environment: its tables go to 'syft', the site's own to 'datasite' (SiteStore)
        env["PGOPTIONS"] = f"-c search_path={SYFT_SCHEMA}"
        SiteStore(db_url)  # both schemas exist before syft creates its tables
    os.environ.update(env)


class _Masked(io.TextIOBase):
    """A stream that writes through with a secret replaced by ``***``.

    syft 0.9.5 prints its database URL, password included, into the server log at launch
    ("Using PostgresDBConfig and postgresql://user:PASSWORD@...", and its settings dict)."""

    def __init__(self, stream: TextIO, secret: str) -> None:
        from urllib.parse import quote

        once = quote(secret, safe="")
        # syft logs the URL %-encoded, and its connection string encoded twice (red team)
        self._stream = stream
        self._secrets = sorted({secret, once, quote(once, safe="")}, key=len, reverse=True)

    def write(self, text: str) -> int:
        masked = text
        for secret in self._secrets:
            masked = masked.replace(secret, "***")
        self._stream.write(masked)
        return len(text)

    def flush(self) -> None:
        self._stream.flush()

    def fileno(self) -> int:
        return self._stream.fileno()

    def isatty(self) -> bool:
        return self._stream.isatty()


def _mask_db_password(db_url: str) -> None:
    from sqlalchemy.engine import make_url

    password = make_url(db_url).password if db_url else None
    if password:
        sys.stdout = _Masked(sys.stdout, password)
        sys.stderr = _Masked(sys.stderr, password)


def _warm_runtime() -> None:
    """Import the server-side half of the runtime once, in the background, after launch.

    Training itself runs in the sandbox's trainer pool (its fork server started before
    serving, its workers when a job is approved); this keeps the first call from paying for
    the accountant's and the runtime's imports.
    """
    from datasites.training import site_job  # noqa: F401
    from policies import accounting  # noqa: F401


class _StartClock:
    """Seconds since this process was created, per phase of the start, for ``server.log``:
    what ``datasite launch`` waits on (issue 26 asked for the figure)."""

    def __init__(self) -> None:
        import psutil

        self._created = psutil.Process().create_time()
        self.marks: list[tuple[str, float, float]] = []

    def mark(self, phase: str) -> None:
        self.marks.append((phase, time.time() - self._created, time.process_time()))

    def line(self) -> str:
        """Wall and CPU seconds per phase: on a loaded machine the wall time is mostly waiting."""
        steps, last, last_cpu = [], 0.0, 0.0
        for phase, at, cpu in self.marks:
            steps.append(f"{phase} {at - last:.1f} s (cpu {cpu - last_cpu:.1f})")
            last, last_cpu = at, cpu
        return f"start: app ready {last:.1f} s after exec, cpu {last_cpu:.1f} s: " + ", ".join(
            steps
        )


def _app_factory(site: SiteDir, channels: list, clock: _StartClock) -> Callable[[], Any]:
    """syft's app behind the body cap (``limits.app_factory``), then the admin channel on the worker it made (``channel_server``):
    the ``datasite`` commands reach this process through it, with no import and no login."""

    def factory() -> Any:
        from syft.server.server import ServerRegistry
        from syft.types.uid import UID

        from datasites.serving import channel_server

        clock.mark("uvicorn")
        app = limits.app_factory()
        clock.mark("syft app and database")
        worker = ServerRegistry.server_for(UID(site.config().server_uid))
        channels.append(channel_server.start(site, lambda: worker.root_client))
        clock.mark("admin channel")
        print(clock.line(), flush=True)
        return app

    return factory


def serve(root: Path) -> None:
    clock = _StartClock()
    clock.mark("python and imports")
    keep_private()  # syft's database, blob store and our site.db: 0600, before any is opened
    # trainer processes: the fork server starts now, with a scrubbed environment, before any
    # secret is in this process's; its workers (torch) start when a job is approved
    sandbox.start_early()
    site = SiteDir(root)
    config = site.config()
    _mask_db_password(site.db_url())
    _prepare_environment(site)
    with syft_patches.optional_imports_deferred():  # torch, matplotlib: a quarter of the import
        import syft.server.uvicorn  # noqa: F401  reads the identity variables at import
    import uvicorn

    clock.mark("syft import")
    for name in _SECRET_ENV:
        os.environ.pop(name, None)
    syft_patches.install()
    syft_patches.summarise_dataframe_repr()
    runtime.serve_site(site.root.resolve())  # where run_job trains and charges, in this process
    caps = limits.cached(site)
    quota.install(site.root, lambda: (caps().quota_objects, caps().quota_bytes))
    threading.Thread(target=_warm_runtime, name="warm-runtime", daemon=True).start()
    site.pid_path.write_text(f"{os.getpid()}\n")
    channels: list = []
    try:
        uvicorn.run(
            _app_factory(site, channels, clock),  # syft's app behind the body cap, + channel
            host=config.host,
            port=config.port,
            factory=True,
            log_level="warning",
            # clients keep connections alive; without a bound, SIGTERM waited for them until
            # 'datasite stop' gave up and killed the server (15 s a stop over HTTPS)
            timeout_graceful_shutdown=2,
            # uvicorn closes an idle kept-alive connection after 5 s by default; a client that
            # sent its next request as that close was under way read "Remote end closed
            # connection" on a POST it may not retry (seen on a loaded machine: an admin's
            # add_user right after the upload). 30 s leaves that race to far rarer idle gaps.
            timeout_keep_alive=30,
            # HTTPS only when the site has a certificate (datasite init --self-signed / --tls-cert)
            ssl_certfile=str(site.tls_cert) if config.tls else None,
            ssl_keyfile=str(site.tls_key) if config.tls else None,
        )
    finally:
        for opened in channels:
            opened.close()
        if site.pid_path.exists() and site.pid_path.read_text().strip() == str(os.getpid()):
            site.pid_path.unlink()


if __name__ == "__main__":
    serve(Path(sys.argv[1]))
