"""A warm parent for the suite's site servers: ``launch(site)`` forks one from it.

Tests only. A server started by ``datasite launch`` is a fresh interpreter that imports syft,
uvicorn, the runtime and (through Opacus) torch before it serves: about 5.5 of the 11 CPU-seconds
a start costs here (``scripts/bench`` and the server log's ``start:`` line), and the suite starts
about thirty. This process imports all of that once per test worker; each launch is then a
``fork()`` that runs :func:`datasites.serving.serve.serve` itself, from its first line (the site's
files made private, the identity read from DIR), so only the imports are shared, and one fork
server for the sites' trainers, spawned here with the trainers' scrubbed environment and torch
preloaded (``_start_trainer_parent``). A restart after a stop or kill -9
forks too (``Site.relaunch``): what survives it is on disk, not in the process. What only a fresh
process shows (the ``datasite launch`` command, its environment, kill -9 and relaunch) is tested
through the real command in ``test_site_lifecycle`` and ``test_readme_walk``.

The forked server is a real syft server over HTTPS on a loopback port, in its own session, its
output in the site's ``server.log``, its pid in ``server.pid``; ``datasite stop`` stops it as any
other (``process.server_pid`` knows it by ``datasites.serving.serve`` in its command line, which
this process carries as an argument).

Wire: one JSON line per launch on stdin (``{"root": DIR}``), one back on stdout (``{"pid": N}``).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import traceback
from pathlib import Path

SERVE_MODULE = "datasites.serving.serve"  # in this process's command line: see process.server_pid


def _preload() -> None:
    """What a server imports before it serves, in the order ``serve`` imports it."""
    from datasites.serving import channel_server, limits, serve, syft_patches  # noqa: F401

    with syft_patches.optional_imports_deferred():  # as serve() imports it
        import syft.server.uvicorn  # noqa: F401
    import uvicorn  # noqa: F401
    from syft.protocol.data_protocol import get_data_protocol

    from datasites.training import site_job  # noqa: F401  serve's warm-up thread's imports
    from policies import accounting  # noqa: F401

    # syft builds its object-version table on a server's first metadata answer (~0.8 CPU-s
    # each, 29 s over a run); it depends only on the classes imported above, as in a server
    get_data_protocol()
    _cheaper_password_hashing()


# bcrypt's cost factor for the forked sites' passwords (syft's is 12, in the launched ones)
SUITE_BCRYPT_COST = 4


def _cheaper_password_hashing() -> None:
    """The forked sites hash passwords with bcrypt at cost 4, not syft's 12.

    At cost 12 a hash or a check takes 0.25 CPU-s here, and a run's forked sites made about 140
    hashes (each site's admin, each user added, each password set) and 175 checks (each
    login): 76 CPU-s, an eighth of the suite. A check costs what the stored hash says, so
    hashing cheaper is enough. Django advises the same for test suites. Only the cost changes:
    the same bcrypt, salts and comparisons, and a wrong password is refused as before. A site
    started by ``datasite launch`` keeps syft's 12 (test_site_lifecycle reads its stored hash).
    """
    import bcrypt
    from syft.service.user import user

    def gensalt(rounds: int = 12, prefix: bytes = b"2b") -> bytes:
        return bcrypt.gensalt(SUITE_BCRYPT_COST, prefix)

    user.gensalt = gensalt


# What every trainer imports (``sandbox._warm``: torch, Opacus, both engines, and torch._dynamo,
# which torch's optimizers import at their first step): about 3 CPU-s a trainer, 26 trainers a run
TRAINER_PRELOAD = (
    "torch",
    "torch._dynamo",
    "opacus",
    "policies.engine.dp_sgd",
    "policies.engine.round_task",
    "policies.engine.distributed",
    "tests.trainer_parent",  # each trainer reseeds the global generators
)


def _start_trainer_parent() -> None:
    """One warm parent for the trainers of every site this zygote forks.

    A launched site spawns its own bare fork server (``sandbox.start_early``) and each trainer
    it forks imports torch and Opacus itself: about 3 CPU-s a trainer, and the suite's sites
    build about 26. Here the fork server is spawned once, as the site's is (with the trainers'
    scrubbed environment, before this process serves anything), preloading that import; the
    forked sites send their pools' requests to it. Each trainer still runs
    ``sandbox._init_worker`` (the environment cleared again, the warm-up rounds, the network
    namespace, the dropped user) and talks only to the site that asked for it. What a site's
    own fork server does at launch is tested through ``datasite launch`` (test_site_lifecycle,
    test_readme_walk, the notebook) and in tests/unit/test_sandbox.py."""
    from multiprocessing import forkserver

    from datasites.training import sandbox

    forkserver.set_forkserver_preload(list(TRAINER_PRELOAD))
    with sandbox._scrubbed_environment():
        forkserver.ensure_running()


def _use_the_trainer_parent() -> None:
    """In the forked site: ``sandbox.start_early`` as the zygote's fork server answers it."""
    from multiprocessing import forkserver

    from datasites.training import sandbox

    # running, and the zygote's child: waitpid on it here (ensure_running's check) would raise
    forkserver._forkserver.ensure_running = lambda: None  # type: ignore[method-assign]
    sandbox._FORK_SERVER_STARTED = True


def _serve_child(root: str) -> None:
    """In the forked child: become a detached server of DIR, as ``launch --detach`` makes one."""
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)  # the parent reaps by ignoring; a server waits
    os.setsid()
    from datasites.serving.config import SiteDir

    log = os.open(SiteDir(Path(root)).log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.dup2(log, 1)
    os.dup2(log, 2)
    os.close(log)
    os.close(null)
    _reseed()
    code = 0
    try:
        from datasites.serving import serve
        from datasites.training import sandbox

        sandbox.start_early = _use_the_trainer_parent
        prepare = serve._prepare_environment
        serve._prepare_environment = lambda site: (prepare(site), _reread_identity())[0]
        serve.serve(Path(root))
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    except BaseException:  # a server's crash: in its log, as an exec'd server's would be
        traceback.print_exc()
        code = 1
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def _reread_identity() -> None:
    """What syft 0.9.5 reads from the environment when ``syft.server.server`` is imported (the
    site's key and uid, its admin's email, name and password: module globals and ``Server``'s
    keyword defaults), read again now that ``serve`` has put this site's in the environment; in
    an exec'd server that import comes after, and reads them itself."""
    import syft.server.server as server
    from syft.server import env

    server.signing_key_env = env.get_private_key_env()
    server.server_uid_env = env.get_server_uid_env()
    defaults = server.Server.__init__.__kwdefaults__
    assert defaults is not None
    for name, read in (
        ("root_email", env.get_default_root_email),
        ("root_username", env.get_default_root_username),
        ("root_password", env.get_default_root_password),
    ):
        value = read()
        setattr(server, f"default_{name}", value)
        defaults[name] = value


def _reseed() -> None:
    """Children of one parent share its generators' state; nothing at a site may draw the same
    numbers as another site (the code draws from the OS, but a global generator must not be the
    exception that two forked sites agree on)."""
    import numpy as np
    import torch

    np.random.seed(int.from_bytes(os.urandom(4), "little"))
    torch.seed()


def main() -> None:
    _preload()
    _start_trainer_parent()
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # children are reaped by the kernel
    for line in sys.stdin:
        root = json.loads(line)["root"]
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            _serve_child(root)
        print(json.dumps({"pid": pid}), flush=True)


class Zygote:
    """The test worker's handle on its zygote, started on the first launch."""

    def __init__(self) -> None:
        self._proc: subprocess.Popen[str] | None = None
        self._lock = threading.Lock()

    def fork(self, root: Path) -> int:
        with self._lock:
            if self._proc is None or self._proc.poll() is not None:
                self._proc = subprocess.Popen(
                    [sys.executable, "-m", "tests.server_zygote", SERVE_MODULE],
                    stdin=subprocess.PIPE,
                    stdout=subprocess.PIPE,
                    text=True,
                    start_new_session=True,
                )
            assert self._proc.stdin is not None and self._proc.stdout is not None
            self._proc.stdin.write(json.dumps({"root": str(root.resolve())}) + "\n")
            self._proc.stdin.flush()
            reply = self._proc.stdout.readline()
        if not reply:
            raise RuntimeError("the server zygote exited; its output is in the pytest log")
        return int(json.loads(reply)["pid"])

    def close(self) -> None:
        with self._lock:
            if self._proc is not None and self._proc.poll() is None:
                assert self._proc.stdin is not None
                self._proc.stdin.close()
                self._proc.wait(10)
            self._proc = None


_ZYGOTE = Zygote()


def launch(site, timeout: float = 90.0):  # noqa: ANN001, ANN201  (SiteDir -> SiteStatus)
    """``process.launch_detached`` with the server forked from the warm parent."""
    import psutil

    from datasites.serving import process, sessions

    process._check_can_start(site)
    sessions.forget(site.config().url)
    pid = _ZYGOTE.fork(site.root)

    def exited() -> str | None:
        try:
            alive = psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            alive = False
        return None if alive else f"server exited (pid {pid})"

    return process.wait_until_answering(site, exited, lambda: os.kill(pid, signal.SIGKILL), timeout)


def close() -> None:
    _ZYGOTE.close()


if __name__ == "__main__":
    main()
