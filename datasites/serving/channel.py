"""The admin channel: the ``datasite`` commands' way into their own running server.

A Unix socket in the site's DIR (``admin.sock``, mode 0600) that the server process serves from a
thread (``channel_server``), speaking one JSON line each way: a typed call (one dataclass per
command, below) and its reply. The server already has syft loaded and an admin client, so a
command pays neither syft's import (about 7 s of CPU) nor a login (about 1.5 s).

Who may use it: the site's owner only. The socket file is 0600 in DIR, the server checks the
peer's uid (``SO_PEERCRED``), and every call carries the token the server writes to
``admin-token`` (0600, new at each launch). None of this is reachable over HTTP: a researcher's
syft login never meets it.

This module is syft-free and light: the CLI imports it, and it must stay fast.
"""

from __future__ import annotations

import json
import os
import socket
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from datasites import errors
from datasites.errors import DatasiteError, ServerError
from policies import socket_lines

SOCKET_NAME = "admin.sock"
TOKEN_NAME = "admin-token"
MAX_CALL_BYTES = 1 << 20  # a call is a few fields; a file travels as its path, never inline
MAX_REPLY_BYTES = 64 << 20
CALL_TIMEOUT_S = 900.0  # an upload of a large table takes minutes on this machine
_UNIX_PATH_MAX = 100  # sun_path is 108 bytes on Linux; longer paths go through /proc/self/fd


# --- the calls: one dataclass per command, its fields are the command's arguments -----------


@dataclass(frozen=True)
class Requests:
    """Every request with its policy report (``ReviewItem.to_dict()`` each)."""


@dataclass(frozen=True)
class Review:
    request_id: str


@dataclass(frozen=True)
class Approve:
    request_id: str
    override: bool = False
    reason: str = ""


@dataclass(frozen=True)
class Deny:
    request_id: str
    reason: str


@dataclass(frozen=True)
class UsersList:
    pass


@dataclass(frozen=True)
class UsersAdd:
    email: str
    name: str


@dataclass(frozen=True)
class UsersRemove:
    email: str


@dataclass(frozen=True)
class ResetPassword:
    email: str


@dataclass(frozen=True)
class Budget:
    pass


@dataclass(frozen=True)
class BudgetSet:
    researcher: str
    dataset: str
    epsilon: float
    delta: float


@dataclass(frozen=True)
class Upload:
    """The server reads ``file`` itself (an absolute path): the rows never cross the socket."""

    name: str
    file: str
    target: str
    description: str
    mock_rows: int
    mock_epsilon: float
    max_categories: int
    max_memory_mb: int
    bounds: str = ""  # an absolute path to the owner's bounds file (TOML, YAML, CSV), or ""


# --- the replies -----------------------------------------------------------------------------


@dataclass(frozen=True)
class ItemsReply:
    items: list[dict[str, Any]]


@dataclass(frozen=True)
class ItemReply:
    """One request: its ``to_dict()``, its code, and the plan spelled out for the reviewer."""

    item: dict[str, Any]
    code: str = ""
    plan_rows: list[list[str]] | None = None
    model_input: list[int] | None = None


@dataclass(frozen=True)
class UsersReply:
    users: list[dict[str, str]]


@dataclass(frozen=True)
class PasswordReply:
    email: str
    password: str


@dataclass(frozen=True)
class DoneReply:
    pass


@dataclass(frozen=True)
class BudgetReply:
    rows: list[dict[str, Any]]
    public: list[dict[str, Any]]
    totals: dict[str, dict[str, Any]]


@dataclass(frozen=True)
class UploadReply:
    name: str
    rows: int
    mock_rows: int
    columns: list[str]
    target: str
    mock_epsilon: float
    # per bounded column, how many values were clamped: the owner's alone, never published
    clamped: dict[str, int] = field(default_factory=dict)
    # what would make the published statistics useful (declared bounds), when anything would
    advice: list[str] = field(default_factory=list)


CALLS: dict[str, tuple[type, type]] = {
    "requests": (Requests, ItemsReply),
    "review": (Review, ItemReply),
    "approve": (Approve, ItemReply),
    "deny": (Deny, ItemReply),
    "users_list": (UsersList, UsersReply),
    "users_add": (UsersAdd, PasswordReply),
    "users_remove": (UsersRemove, DoneReply),
    "reset_password": (ResetPassword, PasswordReply),
    "budget": (Budget, BudgetReply),
    "budget_set": (BudgetSet, DoneReply),
    "upload": (Upload, UploadReply),
}
OP_OF = {call: op for op, (call, _) in CALLS.items()}
_SCALARS = {"str": str, "bool": bool, "int": int, "float": (int, float)}


class SiteDown(ServerError):
    """No server runs for this DIR (no token, or nobody listens on the socket)."""


class ChannelError(DatasiteError):
    """A call the channel refused as such: bad token, malformed message, unknown operation."""


def decode(cls: type, data: Any) -> Any:
    """``cls`` from a JSON object with exactly its fields, each scalar of its declared type:
    decoded once, where the message enters (a call's fields reach the handlers typed)."""
    if not isinstance(data, dict):
        raise ChannelError(f"{cls.__name__}: expected an object")
    names = {f.name for f in fields(cls)}
    required = {
        f.name for f in fields(cls) if f.default is MISSING and f.default_factory is MISSING
    }
    if set(data) - names or required - set(data):
        raise ChannelError(f"{cls.__name__}: fields {sorted(data)} are not {sorted(names)}")
    for f in fields(cls):
        kind = _SCALARS.get(str(f.type))
        value = data.get(f.name)
        if (
            kind is not None
            and f.name in data
            and (
                not isinstance(value, kind)  # type: ignore[arg-type]
                or (str(f.type) != "bool" and isinstance(value, bool))
            )
        ):
            raise ChannelError(f"{cls.__name__}.{f.name}: expected {f.type}")
    return cls(**data)


# --- the client side -------------------------------------------------------------------------


def socket_path(root: Path) -> Path:
    return root / SOCKET_NAME


def token_path(root: Path) -> Path:
    return root / TOKEN_NAME


def call(root: Path, message: Any, url: str = "") -> Any:
    """Send one call to the server of DIR ``root`` and return its typed reply.

    A refused call raises the error class the server named (``ReviewError``, ``TableError``, ...)
    with its one line; a server that does not run raises ServerError at once."""
    op = OP_OF[type(message)]
    down = SiteDown(
        f"no datasite answers at {url or root}; start it with "
        f"'datasite launch --dir {root} --detach'"
    )
    try:
        token = token_path(root).read_text().strip()
    except FileNotFoundError:
        raise down from None
    except OSError as exc:
        raise ServerError(f"cannot read {exc.filename}: {exc.strerror}") from exc
    line = json.dumps({"op": op, "token": token, "args": asdict(message)}).encode() + b"\n"
    try:
        raw = _exchange(socket_path(root), line)
    except (FileNotFoundError, ConnectionRefusedError):
        raise down from None
    except OSError as exc:
        raise ServerError(f"the admin channel of {root} failed: {exc.strerror or exc}") from exc
    return _reply(CALLS[op][1], raw)


def _exchange(path: Path, line: bytes) -> bytes:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(CALL_TIMEOUT_S)
        with unix_address(path) as address:
            sock.connect(address)
        sock.sendall(line)
        sock.shutdown(socket.SHUT_WR)
        return read_line(sock, MAX_REPLY_BYTES)


def read_line(sock: socket.socket, limit: int) -> bytes:
    """Bytes up to the first newline (or the end), refusing more than ``limit``."""
    return socket_lines.read_line(sock, limit, ChannelError)


def _reply(cls: type, raw: bytes) -> Any:
    try:
        data = json.loads(raw)
    except ValueError:
        raise ServerError("the datasite's admin channel answered nothing readable") from None
    if not data.get("ok"):
        kind = getattr(errors, str(data.get("kind")), None)
        if not (isinstance(kind, type) and issubclass(kind, DatasiteError)):
            kind = DatasiteError
        raise kind(str(data.get("error") or "the datasite refused the call"))
    return cls(**data["result"])


class unix_address:  # noqa: N801  a context manager used like a function
    """The address to bind or connect ``path`` by: itself, or, when it is longer than a Unix
    socket address may be (108 bytes; pytest's temporary paths get there), the same file through
    ``/proc/self/fd/N`` of its directory, held open for the duration."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.fd: int | None = None

    def __enter__(self) -> str:
        if len(os.fsencode(self.path)) <= _UNIX_PATH_MAX:
            return str(self.path)
        self.fd = os.open(self.path.parent, os.O_RDONLY | os.O_DIRECTORY)
        return f"/proc/self/fd/{self.fd}/{self.path.name}"

    def __exit__(self, *exc: object) -> None:
        if self.fd is not None:
            os.close(self.fd)
