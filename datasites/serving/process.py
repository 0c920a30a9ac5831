"""Start, stop and inspect a datasite's server process from its DIR."""

from __future__ import annotations

import os
import signal
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import psutil

from datasites.errors import ServerError
from datasites.serving import sessions
from datasites.serving.config import SiteDir, port_in_use

READY_TIMEOUT_S = 90.0


@dataclass(frozen=True)
class SiteStatus:
    name: str
    url: str
    port: int
    pid: int | None
    running: bool
    responding: bool
    fingerprint: str = ""  # SHA-256 of the identity key: this site among a job's peers
    tls_fingerprint: str = ""  # SHA-256 of the TLS certificate: what researchers pin
    database: str = "sqlite"  # where syft's store and the site's tables are: never a password

    def to_dict(self) -> dict[str, object]:
        return {
            "name": self.name,
            "url": self.url,
            "port": self.port,
            "pid": self.pid,
            "running": self.running,
            "responding": self.responding,
            "fingerprint": self.fingerprint,
            "tls_fingerprint": self.tls_fingerprint,
            "database": self.database,
        }


def server_pid(site: SiteDir) -> int | None:
    """The pid of the live server of this DIR, or None (a stale pid file is ignored)."""
    try:
        pid = int(site.pid_path.read_text().strip())
    except (OSError, ValueError):
        return None
    try:
        proc = psutil.Process(pid)
        alive = proc.status() != psutil.STATUS_ZOMBIE
        cmd = " ".join(proc.cmdline())
    except psutil.Error:
        return None
    return pid if alive and "datasites.serving.serve" in cmd else None


def responding(url: str, timeout: float = 2.0, cafile: Path | None = None) -> bool:
    """Whether syft's metadata route answers; over HTTPS, trusting only the site's own cert."""
    context = ssl.create_default_context(cafile=str(cafile)) if url.startswith("https") else None
    try:
        with urllib.request.urlopen(
            f"{url}/api/v2/metadata", timeout=timeout, context=context
        ) as resp:
            return resp.status == 200
    except (urllib.error.URLError, OSError):
        return False


def require_answering(site: SiteDir) -> None:
    """Refuse in one line, in milliseconds, when the site's server does not answer.

    Every admin command that talks to the server calls this before it imports syft (about 5 s)
    and logs in: a dead server used to cost 10 s of urllib3 retries and three warnings.
    """
    config = site.config()
    if not responding(config.url, cafile=site.tls_cert):
        raise ServerError(
            f"no datasite answers at {config.url}; start it with "
            f"'datasite launch --dir {site.root} --detach'"
        )


def status(site: SiteDir) -> SiteStatus:
    config = site.config()
    pid = server_pid(site)
    up = pid is not None and responding(config.url, cafile=site.tls_cert)
    return SiteStatus(
        config.name,
        config.url,
        config.port,
        pid,
        pid is not None,
        up,
        site.fingerprint(),
        site.tls_fingerprint(),
        config.db_url or "sqlite (state/ and site.db in DIR)",  # site.toml's: no password
    )


def _serve_command(site: SiteDir) -> list[str]:
    return [sys.executable, "-m", "datasites.serving.serve", str(site.root.resolve())]


def _check_can_start(site: SiteDir) -> None:
    config = site.config()
    pid = server_pid(site)
    if pid is not None:
        raise ServerError(f"datasite {config.name!r} is already running (pid {pid})")
    if _port_stays_busy(config.host, config.port):
        raise ServerError(f"port {config.port} on {config.host} is already in use")


def _port_stays_busy(host: str, port: int, grace: float = 5.0) -> bool:
    """Whether the port is still taken after ``grace`` seconds.

    Right after a server dies (kill -9, a crash), the kernel takes a moment to tear down its
    connections, and a relaunch in that moment would be refused for nothing.
    """
    deadline = time.monotonic() + grace
    while port_in_use(host, port):
        if time.monotonic() > deadline:
            return True
        time.sleep(0.2)
    return False


def launch_detached(site: SiteDir, timeout: float = READY_TIMEOUT_S) -> SiteStatus:
    """Start the server in its own session and return once it answers HTTP requests."""
    _check_can_start(site)
    sessions.forget(site.config().url)
    with open(site.log_path, "ab") as log:
        proc = subprocess.Popen(
            _serve_command(site),
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )

    def exited() -> str | None:
        return None if proc.poll() is None else f"server exited with code {proc.returncode}"

    return wait_until_answering(site, exited, proc.kill, timeout)


def wait_until_answering(
    site: SiteDir, exited: Callable[[], str | None], kill: Callable[[], None], timeout: float
) -> SiteStatus:
    """Return the status once the just-started server answers. ``exited()`` says why the server
    is gone (None while it lives): that is raised at once; past ``timeout`` it is ``kill()``ed."""
    config = site.config()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        gone = exited()
        if gone is not None:
            raise ServerError(f"{gone}; see {site.log_path}")
        if responding(config.url, timeout=1.0, cafile=site.tls_cert):
            return status(site)
        time.sleep(0.2)
    kill()
    raise ServerError(f"server did not answer within {timeout:.0f}s; see {site.log_path}")


def launch_foreground(site: SiteDir) -> None:
    """Replace this process with the server; Ctrl-C stops it cleanly."""
    _check_can_start(site)
    os.execv(sys.executable, _serve_command(site))


def stop(site: SiteDir, timeout: float = 15.0) -> bool:
    """Stop the server; False when none was running."""
    sessions.forget(site.config().url)
    pid = server_pid(site)
    if pid is None:
        site.pid_path.unlink(missing_ok=True)
        return False
    proc = psutil.Process(pid)
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout)
    except psutil.TimeoutExpired:
        proc.kill()
        proc.wait(5)
    site.pid_path.unlink(missing_ok=True)
    return True
