"""The sandboxed trainer: every round at a datasite runs in a child process of the server.

Defence in depth around code that is already the site's own (no researcher code runs at a
site): a bug or a crafted spec that slipped past the review must still not reach a secret, the
network, or the server's memory and time.

* Workers are forked from a ``multiprocessing`` fork server that the datasite starts at launch
  with a scrubbed environment, after syft has read and dropped the secrets: they never held the
  signing key or the admin password in memory, and their environment names no site path.
* Each worker, at start: a network namespace of its own with no interface up (no network), and
  when the site runs as root, the ``nobody`` user, so the site's 0600 files (identity key, admin
  password, databases) cannot be opened. ``isolation()`` reports what was achieved.
* Each round: an address-space limit of ``max_memory_mb`` on top of the worker's warm size,
  and ``max_seconds_per_round`` of wall time, after which the pool is terminated and replaced.
* The pool is warm before the first round when it can be: it is built in the background when
  the admin approves a job (``warm_soon``), else at the first round. Each worker imports torch,
  Opacus and the training code and trains a tiny model once, so a round pays none of torch's
  start-up. The fork server itself preloads nothing: a site that is never sent a job (most
  sites between jobs, and many of a test run's) never pays torch's import (about 3 CPU-s).
"""

from __future__ import annotations

import contextlib
import ctypes
import multiprocessing as mp
import multiprocessing.pool
import os
import resource
import stat
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from datasites.errors import SandboxLimit  # noqa: F401  re-exported
from policies.engine.round_task import RoundOutput, RoundTask

NOBODY = 65534
CLONE_NEWNET = 0x40000000
_KEEP_ENV = ("PATH", "LANG", "LC_ALL", "TZ", "TMPDIR", "CUDA_VISIBLE_DEVICES")
_KEEP_PREFIX = ("OMP_", "MKL_", "OPENBLAS_")
_MB = 1 << 20
WARM_TIMEOUT_S = 120.0  # the longest a new pool waits for its worker's warm-up


def clean_environment() -> dict[str, str]:
    """The environment a trainer gets: thread and locale settings, nothing about the site."""
    return {k: v for k, v in os.environ.items() if k in _KEEP_ENV or k.startswith(_KEEP_PREFIX)}


def _init_worker() -> None:
    """Runs once in every trainer process before it takes a task."""
    env = clean_environment()  # the fork server started with it; drop anything added since
    os.environ.clear()
    os.environ.update(env)
    try:
        _warm()  # every lazy import of the training path happens before privileges drop
        _ISOLATION["network"] = _leave_network()
        _ISOLATION["user"] = _drop_root()
        os.chdir("/")
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    except Exception as exc:  # never raise here: a pool respawns failing workers forever
        _ISOLATION["error"] = f"{type(exc).__name__}: {exc}"


_ISOLATION: dict[str, Any] = {}


def _leave_network() -> str:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.unshare(CLONE_NEWNET) == 0:
        return "isolated"
    return f"shared (unshare: errno {ctypes.get_errno()}; needs CAP_SYS_ADMIN)"


def _drop_root() -> str:
    if os.geteuid() != 0:
        return f"uid {os.geteuid()} (not root: site files stay readable to the trainer)"
    blocked = _unreadable_import_paths()
    if blocked:  # as nobody, the worker's first lazy import (torch has many) would fail
        return (
            f"uid 0 (kept: nobody cannot read {blocked[0]}, where Python imports from; "
            "install Python where other users can read it)"
        )
    os.setgroups([])
    os.setgid(NOBODY)
    os.setuid(NOBODY)
    return "nobody"


def _unreadable_import_paths() -> list[str]:
    """Import directories (stdlib, site-packages, the project) that ``nobody`` cannot list.

    A user outside the owner and group needs the others' search bit on every ancestor and read
    and search on the directory itself: a Python under ``/root`` (pyenv, say) fails that.
    """
    blocked = []
    for entry in sys.path:
        path = os.path.abspath(entry or os.getcwd())
        if not os.path.isdir(path):
            continue
        ancestors = [*reversed(Path(path).parents), Path(path)]
        try:
            modes = [os.stat(p).st_mode for p in ancestors]
        except OSError:
            continue
        searchable = all(m & stat.S_IXOTH for m in modes)
        if not (searchable and modes[-1] & stat.S_IROTH):
            blocked.append(path)
    return blocked


def _warm() -> list[RoundOutput]:
    """Train a tiny model through both engines and evaluate it: imports and lazy set-up.

    Returns the two rounds' outputs, so that a test can see the warm-up really trained."""
    import numpy as np

    from policies.engine.round_task import RoundTask, run_task

    layers = [
        {"type": "Linear", "in_features": 2, "out_features": 2},
        {"type": "LayerNorm", "normalized_shape": [2]},
    ]
    plan = {"batch_size": 2, "noise_multiplier": 1.0, "validation_fraction": 0.5}
    x, y = np.zeros((4, 2), np.float32), np.array([0, 1, 0, 1])
    return [  # fused engine, then Opacus' hooks
        run_task(RoundTask({"input": [2], "layers": spec}, plan, x.copy(), y, 0, None, None, 1.0))
        for spec in (layers[:1], layers)
    ]


def _run(task: RoundTask, max_memory_mb: int) -> RoundOutput:
    from policies.engine.distributed import distributed_step
    from policies.engine.round_task import run_task

    # a distributed-DP round is one noised step's integer sum, which the runtime masks
    train = distributed_step if task.plan.get("dp") == "distributed" else run_task
    if "error" in _ISOLATION:
        raise RuntimeError(f"the trainer could not start: {_ISOLATION['error']}")
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    base = _address_space()
    resource.setrlimit(resource.RLIMIT_AS, (base + max_memory_mb * _MB, hard))
    try:
        return train(task)
    except RuntimeError as exc:  # torch's CPU allocator reports a failed mmap this way
        if "allocate memory" in str(exc):
            raise MemoryError(str(exc)[:200]) from None
        raise
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


def _ready() -> bool:
    return True


def _address_space() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[0]) * resource.getpagesize()


def _probe(paths: list[str], host: str, port: int) -> dict[str, Any]:
    """What a trainer can reach: used by the tests to check the isolation claims."""
    import socket

    readable = {}
    for path in paths:
        try:
            with open(path, "rb") as fh:
                readable[path] = len(fh.read(64)) >= 0
        except OSError:
            readable[path] = False
    try:
        with socket.create_connection((host, port), timeout=2):
            network = True
    except OSError:
        network = False
    return {
        "uid": os.getuid(),
        "env": sorted(os.environ),
        "readable": readable,
        "network": network,
        "isolation": dict(_ISOLATION),
    }


class TrainerPool:
    """A warm pool of sandboxed trainer processes; ``run`` gives one round to one of them."""

    def __init__(self, workers: int = 1) -> None:
        self.workers = workers
        self._slots = threading.BoundedSemaphore(workers)
        self._lock = threading.Lock()
        self._pool = self._new_pool()

    def _new_pool(self) -> multiprocessing.pool.Pool:
        """A pool whose worker is warm: its initializer (torch's import, a warm-up round, some
        seconds) runs before any task, and a round's time limit must count the round only,
        not the start of the worker that trains it (its charge stays if it is stopped)."""
        pool = _context().Pool(self.workers, initializer=_init_worker)
        with contextlib.suppress(mp.TimeoutError):  # a worker that cannot start: the round's
            pool.apply_async(_ready).get(timeout=WARM_TIMEOUT_S)  # own limit then reports it
        return pool

    def run(self, task: RoundTask, max_seconds: float, max_memory_mb: int) -> RoundOutput:
        """The round's result; SandboxLimit when it ran out of time or memory."""
        with self._slots:  # the time limit counts from when a worker is free
            with self._lock:  # a replacement under way (``restart``): wait for its warm worker
                current = self._pool
            pending = current.apply_async(_run, (task, max_memory_mb))
            try:
                return pending.get(timeout=max_seconds)
            except mp.TimeoutError:
                self.restart()
                raise SandboxLimit(
                    f"the round ran past the site's limit of {max_seconds:g} s and was stopped"
                ) from None
            except MemoryError:
                raise SandboxLimit(
                    f"the round needed more than the site's limit of {max_memory_mb} MB"
                ) from None

    def probe(self, paths: list[str], host: str = "127.0.0.1", port: int = 1) -> dict[str, Any]:
        return self._pool.apply(_probe, (paths, host, port))

    def restart(self) -> None:
        """Stop the pool now (the round past its limit is answered at once, and stops taking
        CPU) and warm its replacement in the background; ``run`` waits for it, under the
        lock, before the next round's clock starts."""
        self._lock.acquire()
        self._pool.terminate()

        def replace() -> None:
            try:
                self._pool = self._new_pool()
            finally:
                self._lock.release()

        threading.Thread(target=replace, name="trainer-pool-restart", daemon=True).start()

    def close(self) -> None:
        with self._lock:
            self._pool.terminate()


def _context() -> Any:
    return mp.get_context("forkserver")


_POOL: TrainerPool | None = None
_POOL_LOCK = threading.Lock()
_FORK_SERVER_STARTED = False


def start(workers: int = 1) -> TrainerPool:
    """Start the fork server and the pool with a scrubbed environment; call before serving.

    The server is still single-threaded here, so swapping ``os.environ`` for the fork server's
    start cannot race a request that reads it.
    """
    global _POOL
    with _POOL_LOCK:
        if _POOL is None:
            with _scrubbed_environment():
                _POOL = TrainerPool(workers)
        return _POOL


def start_early() -> None:
    """Start the fork server now, with a scrubbed environment; call first thing.

    Only the fork server's spawn reads the environment, so only the spawn runs under the
    scrubbed one, here, while this process is single-threaded and before the site's secrets are
    in its environment at all. The workers fork from the fork server, not from this process:
    the pool can then be built at any time (``pool``, ``warm_soon``) without touching this
    process's environment. The fork server preloads nothing, so this costs a bare interpreter.
    """
    from multiprocessing import forkserver

    global _FORK_SERVER_STARTED
    with _scrubbed_environment():
        forkserver.ensure_running()
    _FORK_SERVER_STARTED = True


@contextlib.contextmanager
def _scrubbed_environment() -> Iterator[None]:
    """This process's ``os.environ`` is the trainers' clean one inside, its own again after: a
    process spawned inside (the fork server) inherits nothing else. Only for a single-threaded
    moment: another thread reading the environment meanwhile would see the clean one."""
    saved = dict(os.environ)
    os.environ.clear()
    os.environ.update(clean_environment())
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved)


def warm_soon() -> None:
    """Build the pool in the background if it is not built: a job was approved, so its rounds
    are coming, and the first should not wait for the trainer's torch import."""
    if _POOL is None:
        threading.Thread(target=pool, name="trainer-pool", daemon=True).start()


def pool() -> TrainerPool:
    """The site's pool, built on first use (``datasites.serving.serve`` started its fork server
    at launch: ``start_early``). Without that, ``start`` starts both, as a test does."""
    global _POOL
    if _POOL is not None:
        return _POOL
    if not _FORK_SERVER_STARTED:
        return start()
    with _POOL_LOCK:
        if _POOL is None:
            _POOL = TrainerPool(1)
        return _POOL
