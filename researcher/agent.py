"""The researcher's session agent: logins kept between commands, without a file that holds them.

``researcher datasets`` and ``status`` ran for 10-15 s: each fresh process imported syft (5-8 s
on a loaded 2-core machine) and logged in to every site (about 1.5 s each). Caching the login in
a file would save only the second part: the process still needs syft to speak to a site. So the
first such command starts this agent, a background process that imports syft once, keeps each
site's logged-in client in memory, and answers later commands over a Unix socket; they never
import syft.

Who may use it: this user only. The agent lives in ``.fedsite-agent/`` beside the federation
file (the folder that already holds its password files): a folder of mode 0700 owned by this
user, a symlink or another user's folder is never used (the command then works in-process). The
socket is 0600; the agent answers only a peer of its own uid (``SO_PEERCRED``), and a command
talks only to a socket whose owner and peer are its own uid: a look-alike socket set up by
someone else would otherwise receive the passwords of ``password_env`` sites. No credential is
ever written to disk: a syft login's signing key never expires, so a file would hold a password
equivalent for ever. The agent exits after ``FEDSITE_AGENT_IDLE_S`` (900) seconds unused, or as
soon as its socket is removed; ``FEDSITE_AGENT=off`` keeps every command in its own process.

A kept session the site no longer accepts (a restarted site, a removed account, a changed key)
is dropped and the command logs in afresh, once, without the user noticing.

This module is syft-free at import: the CLI imports it, and it must stay fast.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import socket
import stat
import struct
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from policies import errors as policy_errors
from policies import socket_lines
from researcher import errors
from researcher.federation import Federation

AGENT_DIR = ".fedsite-agent"
SOCKET_NAME = "agent.sock"
MAX_CALL_BYTES = 1 << 16
MAX_REPLY_BYTES = 64 << 20
START_TIMEOUT_S = 180.0  # syft's import alone is 5-8 s on a loaded machine; a slow disk more
CALL_TIMEOUT_S = 600.0
_UNIX_PATH_MAX = 100  # sun_path is 108 bytes; longer paths go through /proc/self/fd

log = logging.getLogger(__name__)


def enabled() -> bool:
    """Whether a command should ask the agent: not when switched off, nor when this process
    has syft loaded already (a test, a notebook): there the in-process path is as fast."""
    return os.environ.get("FEDSITE_AGENT", "on").lower() not in ("off", "0", "no", "false") and (
        "syft" not in sys.modules
    )


def agent_dir(federation: Path) -> Path | None:
    """The agent's private folder beside ``federation``, made 0700 if new; None when it is not
    safe to use: a symlink, not a folder, or another user's."""
    folder = Path(federation).resolve().parent / AGENT_DIR
    with contextlib.suppress(FileExistsError):
        os.mkdir(folder, 0o700)
    try:
        st = os.lstat(folder)
    except OSError:
        return None
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid():
        return None
    if stat.S_IMODE(st.st_mode) != 0o700:
        os.chmod(folder, 0o700, follow_symlinks=False)  # ours: tighten it, never loosen
    return folder


# --- the command's side ----------------------------------------------------------------------


def ask(federation: Path, op: str, **args: Any) -> Any:
    """The result of ``op`` from the agent, started if none runs; None when no agent can serve
    (an unsafe folder, an agent that would not start): the caller then works in-process.

    Errors the agent met (a missing job, a refused login) are raised here as the same class."""
    folder = agent_dir(federation)
    if folder is None:
        return None
    call = {
        "op": op,
        "federation": str(Path(federation).resolve()),
        "args": args,
        "env": _password_env(Federation.load(Path(federation))),
    }
    line = json.dumps(call).encode() + b"\n"
    raw = _exchange(folder, line)
    if raw is None:
        if not _start(folder):
            return None
        raw = _exchange(folder, line)
        if raw is None:
            return None
    return _result(raw)


def _password_env(fed: Federation) -> dict[str, str]:
    """The ``password_env`` variables this command was given: the agent reads them from the
    call, not from the environment it happened to start with."""
    names = {s.password_env for s in fed.sites if s.password_env}
    return {n: os.environ[n] for n in sorted(names) if n in os.environ}


def _exchange(folder: Path, line: bytes) -> bytes | None:
    """One call and its reply line; None when no agent of ours listens there."""
    path = folder / SOCKET_NAME
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return None
    if not stat.S_ISSOCK(st.st_mode) or st.st_uid != os.getuid():
        return None  # not our agent's socket: never send it a password
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(CALL_TIMEOUT_S)
        try:
            with _unix_address(path) as address:
                sock.connect(address)
        except (FileNotFoundError, ConnectionRefusedError):
            return None  # a socket left by an agent that died
        if peer_uid(sock) != os.getuid():
            return None
        sock.sendall(line)
        sock.shutdown(socket.SHUT_WR)
        return read_line(sock, MAX_REPLY_BYTES) or None


def _result(raw: bytes) -> Any:
    try:
        data = json.loads(raw)
    except ValueError:
        raise errors.ResearcherError("the researcher agent answered nothing readable") from None
    if data.get("ok"):
        return data["result"]
    name = str(data.get("kind"))
    kind = getattr(errors, name, None) or getattr(policy_errors, name, None)
    if not (isinstance(kind, type) and issubclass(kind, policy_errors.FedsiteError)):
        kind = errors.ResearcherError
    raise kind(str(data.get("error") or "the researcher agent refused the call"))


def _start(folder: Path) -> bool:
    """Start the agent (one at a time: a lock in the folder) and wait until it answers."""
    lock_fd = os.open(folder / "agent.lock", os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600)
    try:
        fcntl.flock(lock_fd, fcntl.LOCK_EX)
        if _alive(folder):
            return True  # another command started it while we waited for the lock
        with contextlib.suppress(FileNotFoundError):
            os.unlink(folder / SOCKET_NAME)  # an agent that died left it
        log_fd = os.open(
            folder / "agent.log", os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW, 0o600
        )
        try:
            proc = subprocess.Popen(  # noqa: S603  our own interpreter and module
                [sys.executable, "-m", "researcher.agent", str(folder)],
                stdin=subprocess.DEVNULL,
                stdout=log_fd,
                stderr=log_fd,
                start_new_session=True,  # outlives this command; ^C here does not stop it
                close_fds=True,
            )
        finally:
            os.close(log_fd)
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline and proc.poll() is None:
            if _alive(folder):
                return True
            time.sleep(0.05)
        return False
    finally:
        os.close(lock_fd)


def _alive(folder: Path) -> bool:
    try:
        return _exchange(folder, b'{"op": "ping"}\n') is not None
    except OSError:
        return False


def peer_uid(sock: socket.socket) -> int:
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    return int(struct.unpack("3i", creds)[1])


def read_line(sock: socket.socket, limit: int) -> bytes:
    """Bytes up to the first newline (or the end), refusing more than ``limit``."""
    return socket_lines.read_line(sock, limit, errors.ResearcherError)


@contextlib.contextmanager
def _unix_address(path: Path) -> Iterator[str]:
    """``path``, or the same file through ``/proc/self/fd/N`` of its folder when it is longer
    than a socket address may be (pytest's temporary paths get there)."""
    if len(os.fsencode(path)) <= _UNIX_PATH_MAX:
        yield str(path)
        return
    fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        yield f"/proc/self/fd/{fd}/{path.name}"
    finally:
        os.close(fd)


# --- the agent's side ------------------------------------------------------------------------


def idle_limit_s() -> float:
    try:
        return float(os.environ.get("FEDSITE_AGENT_IDLE_S", "900"))
    except ValueError:
        return 900.0


def serve(folder: Path) -> None:
    """Answer calls until idle for ``idle_limit_s()`` or until the socket is removed."""
    from researcher import api  # noqa: F401  syft: loaded once, before the first call

    path = folder / SOCKET_NAME
    old = os.umask(0o177)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        with _unix_address(path) as address:
            sock.bind(address)
    finally:
        os.umask(old)
    os.chmod(path, 0o600)
    inode = os.lstat(path).st_ino
    sock.listen(8)
    sock.settimeout(2.0)
    last = time.monotonic()
    try:
        while time.monotonic() - last < idle_limit_s() and _still_ours(path, inode):
            try:
                conn, _ = sock.accept()
            except TimeoutError:
                continue
            with conn:
                try:
                    _answer(conn)
                except Exception:  # one broken connection never stops the agent
                    log.exception("researcher agent: a connection failed")
            last = time.monotonic()
    finally:
        sock.close()
        if _still_ours(path, inode):
            path.unlink()


def _still_ours(path: Path, inode: int) -> bool:
    try:
        return os.lstat(path).st_ino == inode
    except OSError:
        return False


def _answer(conn: socket.socket) -> None:
    if peer_uid(conn) != os.getuid():
        return  # another local user: not a word back
    conn.settimeout(30.0)
    raw = read_line(conn, MAX_CALL_BYTES)
    conn.sendall(json.dumps(handle(raw), default=str).encode() + b"\n")


def handle(raw: bytes) -> dict[str, Any]:
    """One call: ``{"ok": true, "result": ...}`` or ``{"ok": false, "kind", "error"}``."""
    try:
        call = json.loads(raw)
        op = call["op"]
        if op == "ping":
            return {"ok": True, "result": None}
        with _environment(dict(call.get("env") or {})):
            fed = Federation.load(Path(call["federation"]))
            return {"ok": True, "result": _OPS[op](fed, dict(call.get("args") or {}))}
    except policy_errors.FedsiteError as exc:
        return {"ok": False, "kind": type(exc).__name__, "error": str(exc)}
    except Exception as exc:
        log.exception("researcher agent: a call failed")
        return {"ok": False, "kind": "ResearcherError", "error": f"agent: {type(exc).__name__}"}


@contextlib.contextmanager
def _environment(values: dict[str, str]) -> Iterator[None]:
    """The command's password variables, for this call only."""
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update({str(k): str(v) for k, v in values.items()})
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _datasets(fed: Federation, _: dict[str, Any]) -> Any:
    from researcher import api

    return with_fresh_logins(fed, lambda: api.datasets(fed), lambda v: isinstance(v, dict))


def _status(fed: Federation, args: dict[str, Any]) -> Any:
    from researcher import api

    spec = api.saved_job(fed, args.get("job"))
    return with_fresh_logins(
        fed, lambda: api.status(fed, spec), lambda v: v.get("status") == "unreachable"
    )


def _stats(fed: Federation, _: dict[str, Any]) -> Any:
    from researcher import sites

    return {"logins": sites.LOGINS, "pid": os.getpid()}


def with_fresh_logins(
    fed: Federation, run: Callable[[], dict[str, Any]], failed: Callable[[Any], bool]
) -> dict[str, Any]:
    """``run()``; where a site failed on a kept session, forget it and run once more: a
    session the site no longer takes logs in afresh, and a real failure fails again.

    A key the site no longer knows is not always an error at once: syft serves it as a guest,
    whose API lacks what the call reads (``client.requests`` is then not even iterable). So
    any failure while sessions are kept forgets them all and runs once more."""
    from researcher import sites

    kept = {s.name for s in fed.sites if sites.has_session(s)}
    try:
        result = run()
    except Exception:
        if not kept:
            raise
        log.warning("researcher agent: a kept session failed; logging in afresh")
        stale = [s for s in fed.sites if s.name in kept]
    else:
        stale = [s for s in fed.sites if s.name in kept and failed(result.get(s.name))]
        if not stale:
            return result
    for login in stale:
        sites.forget(login)
    return run()


_OPS: dict[str, Callable[[Federation, dict[str, Any]], Any]] = {
    "datasets": _datasets,
    "status": _status,
    "stats": _stats,
}


def main() -> None:
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(message)s")
    logging.getLogger("urllib3").setLevel(logging.ERROR)
    folder = Path(sys.argv[1])
    if agent_dir(folder.parent / "federation.toml") != folder.resolve():
        sys.exit(f"{folder} is not a safe agent folder")
    serve(folder)


if __name__ == "__main__":
    main()
