"""A warm parent for the suite's site servers: ``launch(site)`` forks one from it.

Tests only. A server started by ``datasite launch`` is a fresh interpreter that imports syft,
uvicorn, the runtime and (through Opacus) torch before it serves: about 5.5 of the 11 CPU-seconds
a start costs here (``scripts/bench`` and the server log's ``start:`` line), and the suite starts
about thirty. This process imports all of that once per run; each launch is then a
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

One zygote serves the whole run, every xdist worker (``Zygote``): a worker connects to its Unix
socket and sends one JSON line per launch (``{"root": DIR}``), and reads one back (``{"pid": N}``).
"""

from __future__ import annotations

import json
import os
import signal
import socket
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
    """Serve fork requests on the socket in argv[2] until the owner (the pytest process that
    made the socket's directory) is gone or says stop."""
    path, owner = Path(sys.argv[2]), int(os.environ[OWNER_ENV])
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(str(path))  # before the imports: a worker's request waits in the backlog
    listener.listen(64)
    (path.parent / "pid").write_text(str(os.getpid()))
    _preload()
    _start_trainer_parent()
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # children are reaped by the kernel
    listener.settimeout(1.0)
    while _alive(owner):
        try:
            conn, _ = listener.accept()
        except TimeoutError:
            continue
        with conn:
            conn.settimeout(None)
            request = json.loads(conn.makefile().readline() or "{}")
            if "root" not in request:  # the owner's stop, or a client that went away
                if request.get("stop"):
                    break
                continue
            sys.stdout.flush()
            sys.stderr.flush()
            pid = os.fork()
            if pid == 0:
                listener.close()
                conn.close()
                _serve_child(request["root"])
            conn.sendall((json.dumps({"pid": pid}) + "\n").encode())
    listener.close()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return True


# The directory of the run's one zygote (its socket, pid, log and start lock), made by the
# process that owns the run (xdist's controller, or pytest alone) and inherited by its workers
DIR_ENV = "FEDSITE_TEST_ZYGOTE_DIR"
OWNER_ENV = "FEDSITE_TEST_ZYGOTE_OWNER"


def configure() -> None:
    """In the process that owns the run (pytest_configure, before xdist starts its workers):
    a private directory for the run's one zygote, named in the environment the workers
    inherit, with the environment the zygote will start with. The zygote itself starts on the
    first launch of any worker (a run of unit tests starts none)."""
    if os.environ.get(DIR_ENV):
        return  # a worker: the controller made it
    import tempfile

    home = Path(tempfile.mkdtemp(prefix="fedsite-zygote-"))
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_")}
    (home / "env.json").write_text(json.dumps({**env, OWNER_ENV: str(os.getpid())}))
    os.environ[DIR_ENV] = str(home)
    os.environ[OWNER_ENV] = str(os.getpid())


def unconfigure() -> None:
    """In the owner, when the run ends: stop the zygote and remove its directory."""
    home = os.environ.get(DIR_ENV)
    if not home or os.environ.get(OWNER_ENV) != str(os.getpid()):
        return
    import shutil

    _ZYGOTE.stop()
    shutil.rmtree(home, ignore_errors=True)
    del os.environ[DIR_ENV], os.environ[OWNER_ENV]


class Zygote:
    """A handle on the run's one zygote, shared by every test worker: started by the first
    worker that launches a site (under a file lock), reached over a Unix socket in a directory
    only this user may open, stopped by the run's owner.

    One and not one per worker: each imports syft, torch and Opacus and spawns a preloaded
    trainer fork server (about 25 CPU-s), and the three workers' three zygotes were 50 CPU-s of
    a run that is CPU-bound on two cores."""

    def __init__(self) -> None:
        self._lock = threading.Lock()

    @property
    def home(self) -> Path:
        if not os.environ.get(DIR_ENV):
            configure()  # pytest without this conftest's configure (a test's own child)
        return Path(os.environ[DIR_ENV])

    def pid(self) -> int:
        return int((self.home / "pid").read_text())

    def fork(self, root: Path) -> int:
        with self._lock:
            self._ensure_running()
            reply = self._ask({"root": str(root.resolve())})
        if not reply:
            raise RuntimeError(f"the server zygote did not answer; its log: {self.home / 'log'}")
        return int(json.loads(reply)["pid"])

    def _ask(self, request: dict[str, object]) -> str:
        with socket.socket(socket.AF_UNIX) as conn:
            conn.settimeout(300)  # the first answer waits for the zygote's imports
            conn.connect(str(self.home / "sock"))
            conn.sendall((json.dumps(request) + "\n").encode())
            return conn.makefile().readline()

    def _answering(self) -> bool:
        with socket.socket(socket.AF_UNIX) as conn:
            try:
                conn.connect(str(self.home / "sock"))
            except OSError:
                return False
            return True

    def _ensure_running(self) -> None:
        import fcntl
        import time

        if self._answering():
            return
        with open(self.home / "start.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if self._answering():
                return  # another worker started it meanwhile
            (self.home / "sock").unlink(missing_ok=True)
            env = json.loads((self.home / "env.json").read_text())
            with open(self.home / "log", "ab") as log:
                proc = subprocess.Popen(
                    [
                        sys.executable,
                        "-m",
                        "tests.server_zygote",
                        SERVE_MODULE,
                        str(self.home / "sock"),
                    ],
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=log,
                    env=env,
                    cwd=Path(__file__).resolve().parents[1],  # not a test's chdir
                    start_new_session=True,
                )
            deadline = time.monotonic() + 60
            while not self._answering():
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"the server zygote did not start: {self.home / 'log'}")
                time.sleep(0.05)

    def stop(self) -> None:
        with self._lock:
            if self._answering():
                self._ask({"stop": True})


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


if __name__ == "__main__":
    main()
