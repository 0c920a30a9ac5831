"""A persistent cache of the accountant's answers, shared by the processes of one user.

Why: an Opacus PRV composition costs about 0.3 s here, and a noise search makes about twenty of
them. A site server, the admin's review of the same request and the researcher's ``plan`` each
searched for the same plan's noise, and a restarted server searched again. The answers are pure
functions of their arguments, of Opacus' version and of this package's accounting code, so
those are the key: a changed accountant never reads an old answer.

Trust: the site's budget checks read these answers, so the file must be as private as the site's
own state: a directory 0700 and a file 0600, both this user's, or the cache is not used. Any
trouble with it (locked, corrupt, read-only, another owner) makes the call compute as if there
were no cache: the cache can make an answer slower, never different and never an error.

``FEDSITE_ACCOUNTING_CACHE``: the file's path, or ``off``; by default
``$XDG_CACHE_HOME/fedsite/accounting.sqlite`` (``~/.cache`` when that is unset).
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import sqlite3
import stat
import threading
from collections.abc import Callable
from dataclasses import astuple, is_dataclass
from pathlib import Path
from typing import Any, ParamSpec, cast

ENV = "FEDSITE_ACCOUNTING_CACHE"
# the code whose answers are kept, and this module (how they are keyed and stored)
_SOURCES = ("accounting.py", "skellam.py", "accounting_cache.py")
_log = logging.getLogger(__name__)

P = ParamSpec("P")


def default_path() -> Path | None:
    """Where the cache lives for this process, or None when it is switched off."""
    chosen = os.environ.get(ENV, "")
    if chosen.lower() == "off":
        return None
    if chosen:
        return Path(chosen)
    base = os.environ.get("XDG_CACHE_HOME") or (
        str(Path(os.environ["HOME"]) / ".cache") if os.environ.get("HOME") else ""
    )
    return Path(base) / "fedsite" / "accounting.sqlite" if base else None


@functools.cache
def code_version() -> str:
    """Opacus' version and the accounting code's own bytes: part of every key."""
    import opacus

    digest = hashlib.sha256(opacus.__version__.encode())
    here = Path(__file__).parent
    for name in _SOURCES:
        digest.update((here / name).read_bytes())
    return digest.hexdigest()[:16]


def _key(namespace: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> str:
    """An exact, canonical key: floats by ``repr`` (which round-trips), dataclasses as tuples."""

    def plain(value: Any) -> Any:
        if hasattr(value, "item") and callable(value.item) and getattr(value, "ndim", 1) == 0:
            value = value.item()  # a numpy scalar: the Python number it stands for
        if is_dataclass(value) and not isinstance(value, type):
            return [type(value).__name__, *map(plain, astuple(value))]
        if isinstance(value, tuple | list):
            return [plain(v) for v in value]
        if isinstance(value, float):
            return repr(value)
        return value

    text = json.dumps(
        [namespace, code_version(), plain(args), sorted((k, plain(v)) for k, v in kwargs.items())]
    )
    return hashlib.sha256(text.encode()).hexdigest()


class _Store:
    """The SQLite file, opened on first use; ``None`` answers where it cannot be used."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._conn: sqlite3.Connection | None = None
        self._path: Path | None = None
        self._failed = False

    def _connection(self) -> sqlite3.Connection | None:
        path = default_path()
        if path != self._path:  # the environment changed (tests): reopen
            self.close()
            self._path = path
        if self._conn is None and not self._failed and path is not None:
            try:
                self._conn = _open(path)
            except sqlite3.OperationalError as exc:  # locked by a writer: try at the next call
                _log.debug("accounting cache %s busy: %s", path, exc)
            except (OSError, sqlite3.Error) as exc:
                self._failed = True
                _log.debug("accounting cache %s not used: %s", path, exc)
        return self._conn

    def get(self, key: str) -> float | None:
        """A row that ``put`` wrote: its float; None for anything else."""
        values = self.get_floats(key)
        return values[0] if values is not None and len(values) == 1 else None

    def get_floats(self, key: str) -> tuple[float, ...] | None:
        """A row that ``put`` or ``put_floats`` wrote: its floats, in order; None for anything
        else: only float.hex's own spelling is read ("0.5" parses as hex 0.3125)."""
        with self._lock:
            conn = self._connection()
            if conn is None:
                return None
            try:
                row = conn.execute("SELECT value FROM answers WHERE key = ?", (key,)).fetchone()
                if row is None:
                    return None
                spelled = row[0].split(",")
                values = tuple(float.fromhex(v) for v in spelled)
                exact = all(v.hex() == s for v, s in zip(values, spelled, strict=True))
                return values if exact else None
            except (sqlite3.Error, ValueError, TypeError, AttributeError):  # not what it wrote
                return None

    def put(self, key: str, value: float) -> None:
        self._put(key, float(value).hex())

    def put_floats(self, key: str, values: tuple[float, ...]) -> None:
        self._put(key, ",".join(float(v).hex() for v in values))

    def _put(self, key: str, spelled: str) -> None:
        with self._lock:
            conn = self._connection()
            if conn is None:
                return
            try:
                with conn:
                    added = conn.execute(
                        "INSERT OR IGNORE INTO answers (key, value) VALUES (?, ?)",
                        (key, spelled),
                    ).lastrowid
                    if added and added % PRUNE_EVERY == 0:
                        _prune(conn)
            except sqlite3.Error:
                pass  # busy or read-only: the answer is still right, only not kept

    def close(self) -> None:
        """Forget the file: the next call opens it, and checks it, again."""
        if self._conn is not None:
            self._conn.close()
        self._conn, self._path, self._failed = None, None, False


def _private(path: Path, mode: int) -> None:
    """Refuse a path that another user owns or that others may write (OSError)."""
    info = path.stat()
    if info.st_uid != os.getuid():
        raise PermissionError(f"{path} is not this user's")
    if stat.S_IMODE(info.st_mode) & ~mode:
        raise PermissionError(f"{path} is open to others (mode {stat.S_IMODE(info.st_mode):o})")


def _safe_ancestors(directory: Path) -> None:
    """Refuse a directory below one that another user could rename or replace entries of
    (OSError): each ancestor is this user's or root's, and writable by no one else unless
    sticky (as /tmp is). Otherwise the checked directory could be swapped for another one
    between the check and the open (red team, session 14: a shared folder as the cache's
    parent let a planted 0.001 through)."""
    for ancestor in directory.resolve().parents:
        info = ancestor.stat()
        if info.st_uid not in (0, os.getuid()):
            raise PermissionError(f"{ancestor} is another user's")
        if info.st_mode & 0o022 and not info.st_mode & stat.S_ISVTX:
            raise PermissionError(f"{ancestor} may be written by others")


def _open(path: Path) -> sqlite3.Connection:
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    _safe_ancestors(path.parent)
    _private(path.parent, 0o700)
    os.close(os.open(path, os.O_RDWR | os.O_CREAT, 0o600))
    _private(path, 0o600)
    conn = sqlite3.connect(path, timeout=2.0, check_same_thread=False, isolation_level=None)
    conn.execute("CREATE TABLE IF NOT EXISTS answers (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
    conn.isolation_level = "DEFERRED"
    return conn


# Each distinct plan a researcher submits adds a row (about 160 bytes), and researchers choose
# their plans: the file is kept to MAX_ROWS (about 30 MB) by dropping the oldest half when it
# is over, checked once every PRUNE_EVERY answers kept.
MAX_ROWS = 200_000
PRUNE_EVERY = 1_000


def _prune(conn: sqlite3.Connection) -> None:
    (rows,) = conn.execute("SELECT count(*) FROM answers").fetchone()
    if rows > MAX_ROWS:
        conn.execute(
            "DELETE FROM answers WHERE rowid IN (SELECT rowid FROM answers ORDER BY rowid LIMIT ?)",
            (rows - MAX_ROWS // 2,),
        )


_store = _Store()


def persistent(namespace: str) -> Callable[[Callable[P, float]], Callable[P, float]]:
    """Keep a pure float-valued function's answers in the cache file. Exceptions are not kept:
    the next call raises them again."""

    def wrap(function: Callable[P, float]) -> Callable[P, float]:
        @functools.wraps(function)
        def cached(*args: P.args, **kwargs: P.kwargs) -> float:
            try:
                key = _key(namespace, tuple(args), dict(kwargs))
            except (TypeError, ValueError):  # an argument JSON cannot spell: compute, keep not
                return float(function(*args, **kwargs))
            found = _store.get(key)
            if found is not None:
                return found
            value = float(function(*args, **kwargs))
            _store.put(key, value)
            return value

        return cast(Callable[P, float], cached)

    return wrap


def persistent_floats(
    namespace: str,
) -> Callable[[Callable[P, tuple[float, ...]]], Callable[P, tuple[float, ...]]]:
    """``persistent`` for a pure function whose answer is a tuple of floats (a Renyi curve)."""

    def wrap(function: Callable[P, tuple[float, ...]]) -> Callable[P, tuple[float, ...]]:
        @functools.wraps(function)
        def cached(*args: P.args, **kwargs: P.kwargs) -> tuple[float, ...]:
            try:
                key = _key(namespace, tuple(args), dict(kwargs))
            except (TypeError, ValueError):
                return tuple(map(float, function(*args, **kwargs)))
            found = _store.get_floats(key)
            if found is not None:
                return found
            values = tuple(map(float, function(*args, **kwargs)))
            _store.put_floats(key, values)
            return values

        return cast(Callable[P, tuple[float, ...]], cached)

    return wrap
