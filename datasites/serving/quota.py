"""What a researcher may store in syft's action and blob stores (issue 24, item 4).

syft 0.9.5 lets every logged-in user ``action.set`` any object, run ``action.execute`` on the
server's numpy, and allocate and write blob storage; nothing bounds them (four 24 MB uploads
grew a site by 100 MB). The job path needs exactly one of these: calling the approved job,
syft's client first uploads the ``weights`` string with ``action.set`` and then passes its id
to ``code.call``. So for a user below data owner, in the server process:

* blob storage writes, ``action.execute`` and ``action.np_array`` are refused outright (the
  server is launched with a blob threshold above any request, so honest weights never need
  blob storage);
* ``action.set`` takes only a plain string held inline (no twin, no blob, no link), and only
  within the user's quota of bytes and objects held at once;
* the upload is removed when the ``code.call`` that names it has run, and any upload left
  unused for :data:`UNUSED_SECONDS` is removed at the next upload, by anyone.

The registry of uploads is a small SQLite file in the site directory, so a restart keeps it.
"""

from __future__ import annotations

import logging
import sqlite3
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

log = logging.getLogger("datasites.serving.quota")

UPLOADS_FILE = "uploads.db"
UNUSED_SECONDS = 3600.0
REFUSED = {
    "action.execute",
    "action.np_array",
    "blob_storage.allocate",
    "blob_storage.allocate_for_user",
    "blob_storage.write_to_disk",
    "blob_storage.mark_write_complete",
    "blob_storage.delete",
    "blob_storage.mount_azure",
}
# syft endpoints a researcher role may call that the job path never needs, each a way in
# (red team, round 2): a request carrying a second change that rewrites the approved code
# (request.submit, code.update), a rename onto another researcher's e-mail and budget
# (user.update), and stores without bound (code.submit, logs, projects, notifications)
REFUSED |= {
    "request.submit",
    "code.submit",
    "code.update",
    "code.delete",
    "code.store_execution_output",
    "code_status.create",
    "user.update",
    "user.create",
    "user.delete",
    "user.request_password_reset",
    "log.add",
    "log.append",
    "log.delete",
    "log.restart",
    "network.add_peer",
    "notifications.reply",
}
REFUSED_PREFIXES = ("project.",)
# a researcher's code requests: each is stored whole (up to the body cap), so their rate is
# bounded; an honest researcher submits one job per site at a time
REQUEST_PATH = "code.request_code_execution"
MAX_REQUESTS_PER_HOUR = 30
# the job template with the largest model spec is a few KB; syft stores a request's code whole,
# several times over (red team: 18 MB of docstrings grew a site by 43 MB)
MAX_REQUEST_BYTES = 512 * 1024
WATCHED = REFUSED | {"action.set", "code.call", REQUEST_PATH}


def refused_path(path: str) -> bool:
    """A syft endpoint this datasite does not open to researchers."""
    return path in REFUSED or path.startswith(REFUSED_PREFIXES)


class Uploads:
    """Which user uploaded which object, of how many bytes, when."""

    def __init__(self, path: Path) -> None:
        self._db = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None)
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS uploads "
            "(uid TEXT PRIMARY KEY, user TEXT NOT NULL, bytes INTEGER NOT NULL, at REAL NOT NULL)"
        )
        self._lock = threading.Lock()

    def usage(self, user: str) -> tuple[int, int]:
        with self._lock:
            row = self._db.execute(
                "SELECT COUNT(*), COALESCE(SUM(bytes), 0) FROM uploads WHERE user = ?", (user,)
            ).fetchone()
        return int(row[0]), int(row[1])

    def reserve(self, uid: str, user: str, size: int, quota: tuple[int, int]) -> str | None:
        """Record the upload, or say why it is over ``quota`` (objects, bytes)."""
        with self._lock:
            count, used = self._db.execute(
                "SELECT COUNT(*), COALESCE(SUM(bytes), 0) FROM uploads WHERE user = ?", (user,)
            ).fetchone()
            if count + 1 > quota[0] or used + size > quota[1]:
                return (
                    f"upload refused: this datasite holds at most {quota[0]} objects and "
                    f"{quota[1]} bytes of yours at once (you hold {count}, {used} bytes; this "
                    f"one is {size} bytes); an upload is removed when the job call using it ends"
                )
            self._db.execute(
                "INSERT OR REPLACE INTO uploads VALUES (?, ?, ?, ?)",
                (uid, user, size, time.time()),
            )
        return None

    def release(self, uids: list[str], user: str | None = None) -> list[str]:
        """Forget these uploads (of ``user`` only, when given); the ones that were known."""
        with self._lock:
            known = [
                uid
                for uid in uids
                if self._db.execute(
                    "SELECT 1 FROM uploads WHERE uid = ? AND (? IS NULL OR user = ?)",
                    (uid, user, user),
                ).fetchone()
            ]
            self._db.executemany("DELETE FROM uploads WHERE uid = ?", [(u,) for u in known])
        return known

    def stale(self, older_than: float) -> list[str]:
        with self._lock:
            rows = self._db.execute("SELECT uid FROM uploads WHERE at < ?", (older_than,))
            return [r[0] for r in rows.fetchall()]


def _refusal(message: str) -> Any:
    from syft.service.response import SyftError

    return SyftError(message=message)


def _inline_string(obj: Any) -> int | None:
    """The size of a plain inline string ActionObject, else None."""
    from syft.service.action.action_object import ActionObject
    from syft.types.twin_object import TwinObject

    if not isinstance(obj, ActionObject) or isinstance(obj, TwinObject):
        return None
    if obj.syft_blob_storage_entry_id is not None or obj.syft_action_saved_to_blob_store:
        return None
    data = obj.syft_action_data_cache
    return len(data.encode()) if isinstance(data, str) else None


def _uids(values: Any) -> list[str]:
    """The ids of ActionObjects (or UIDs) among a call's arguments."""
    from syft.service.action.action_object import ActionObject
    from syft.types.uid import UID

    found = []
    for value in values:
        if isinstance(value, ActionObject):
            found.append(str(value.id))
        elif isinstance(value, UID):
            found.append(str(value))
    return found


def _request_too_big(message: Any) -> str | None:
    """Why a code request is too large to store (None: it is not)."""
    from syft.serde.serialize import _serialize

    size = len(_serialize(message, to_bytes=True))
    if size <= MAX_REQUEST_BYTES:
        return None
    return (
        f"request refused: {size} bytes, more than the {MAX_REQUEST_BYTES} a job's code "
        "request may take on this datasite"
    )


class RequestRate:
    """Code requests per researcher in the last hour, in this server process."""

    def __init__(self, limit: int = MAX_REQUESTS_PER_HOUR, window: float = 3600.0) -> None:
        self.limit, self.window = limit, window
        self._seen: dict[str, list[float]] = {}
        self._lock = threading.Lock()

    def take(self, user: str) -> str | None:
        """Count one more request of ``user``, or say why it is refused."""
        now = time.time()
        with self._lock:
            recent = [t for t in self._seen.get(user, []) if now - t < self.window]
            if len(recent) >= self.limit:
                self._seen[user] = recent
                return (
                    f"request refused: this datasite takes at most {self.limit} code requests "
                    "an hour from one researcher; try again later"
                )
            self._seen[user] = [*recent, now]
        return None


class Gate:
    """The wrapper of ``Server.handle_api_call_with_unsigned_result`` (see the module doc)."""

    def __init__(self, uploads: Uploads, quota: Callable[[], tuple[int, int]]) -> None:
        self.uploads = uploads
        self.quota = quota
        self.requests = RequestRate()

    def wrap(self, original: Callable[..., Any]) -> Callable[..., Any]:
        gate = self

        def handle(server: Any, api_call: Any, *args: Any, **kwargs: Any) -> Any:
            from syft.client.api import SignedSyftAPICall

            message = getattr(api_call, "message", api_call)
            path = getattr(message, "path", "")
            # unsigned calls and bad signatures: syft refuses them (required_signed_calls)
            watched = path in WATCHED or refused_path(path)
            if not watched or not isinstance(api_call, SignedSyftAPICall):
                return original(server, api_call, *args, **kwargs)
            if not api_call.is_valid:
                return original(server, api_call, *args, **kwargs)
            if gate.privileged(server, api_call.credentials):
                return original(server, api_call, *args, **kwargs)
            user = str(api_call.credentials)
            if refused_path(path):
                return _refusal(f"{path} is not open to researchers on this datasite")
            if path == REQUEST_PATH:
                refused = _request_too_big(message) or gate.requests.take(user)
                if refused:
                    return _refusal(refused)
                return original(server, api_call, *args, **kwargs)
            if path == "action.set":
                return gate.upload(
                    server, message, user, lambda: original(server, api_call, *args, **kwargs)
                )
            try:
                return original(server, api_call, *args, **kwargs)
            finally:
                gate.remove(server, gate.uploads.release(_uids(message.kwargs.values()), user))

        return handle

    @staticmethod
    def privileged(server: Any, credentials: Any) -> bool:
        from syft.service.user.user_roles import ServiceRole

        role = server.get_role_for_credentials(credentials=credentials)
        return role.value >= ServiceRole.DATA_OWNER.value

    def upload(self, server: Any, message: Any, user: str, run: Callable[[], Any]) -> Any:
        from syft.service.response import SyftError

        obj = message.args[0] if message.args else message.kwargs.get("action_object")
        size = _inline_string(obj)
        if size is None:
            return _refusal(
                "action.set takes only a job's weights (a plain string) from researchers"
            )
        self.remove(server, self.uploads.release(self.uploads.stale(time.time() - UNUSED_SECONDS)))
        refused = self.uploads.reserve(str(obj.id), user, size, self.quota())
        if refused:
            return _refusal(refused)
        result = run()
        if isinstance(result, SyftError):
            self.uploads.release([str(obj.id)], user)
        return result

    @staticmethod
    def remove(server: Any, uids: list[str]) -> None:
        """Delete these objects from syft's stores, as the server itself."""
        if not uids:
            return
        from syft.service.context import AuthedServiceContext
        from syft.service.user.user_roles import ServiceRole
        from syft.types.uid import UID

        context = AuthedServiceContext(
            server=server, credentials=server.verify_key, role=ServiceRole.ADMIN
        )
        for uid in uids:
            try:
                server.services.action.delete(context, UID(uid))
            except Exception as exc:  # gone already; the registry has forgotten it either way
                log.info("upload %s not removed: %s", uid, exc)


def without_lib_endpoints(original: Callable[..., Any]) -> Callable[..., Any]:
    """The wrapper of ``Server.get_api``: a user below data owner is sent no library endpoints.

    Every one of syft's 563 library endpoints (numpy's functions on server-side objects) is a
    call to ``action.execute``, which the gate refuses such a user, yet they were 2.7 of the
    3.2 MB of the API that every login and refresh fetches: about 0.35 CPU-s to serialise at the
    site and 0.3 to read in the client, of a login's 1.1 s here. The API now lists what the
    researcher may call; the gate still refuses ``action.execute`` sent by hand."""

    def get_api(server: Any, for_user: Any = None, communication_protocol: Any = None) -> Any:
        api = original(server, for_user, communication_protocol)
        if for_user is not None and not Gate.privileged(server, for_user):
            api.lib_endpoints = {}
        return api

    return get_api


def install(site_root: Path, quota: Callable[[], tuple[int, int]]) -> Callable[[], None]:
    """Gate syft's API calls in this process; returns what undoes it (for tests)."""
    from syft.server.server import Server

    gate = Gate(Uploads(site_root / UPLOADS_FILE), quota)
    saved = Server.handle_api_call_with_unsigned_result, Server.get_api
    Server.handle_api_call_with_unsigned_result = gate.wrap(saved[0])
    Server.get_api = without_lib_endpoints(saved[1])

    def restore() -> None:
        Server.handle_api_call_with_unsigned_result, Server.get_api = saved

    return restore
