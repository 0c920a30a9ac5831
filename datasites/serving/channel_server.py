"""The server's end of the admin channel (``channel``): a thread of the datasite server process.

It answers the ``datasite`` commands with the code they used to run themselves (``ReviewQueue``,
``admin``, ``BudgetLedger``), in this process, through syft's in-process root client: no
HTTP, no login, no import. One call at a time (admin operations are few, and serialising them
keeps two approvals of one job from racing here). Policy reports are cached by (request id,
code hash, policy version), so listing the queue costs one fetch of the requests, not a report
per request.

Access: the socket is created 0600 in DIR; a peer whose uid is not this process's is dropped
before it is read; a call without the launch's token is refused. The token is never logged.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import json
import logging
import os
import secrets
import socket
import struct
import threading
from collections.abc import Callable
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

from datasites.errors import DatasiteError, ServerError
from datasites.serving import channel
from datasites.serving.channel import (
    ChannelError,
    DoneReply,
    ItemReply,
    ItemsReply,
    PasswordReply,
    UploadReply,
    UsersReply,
)
from datasites.serving.config import SiteDir
from policies.errors import FedsiteError

log = logging.getLogger("datasites.channel")
_CACHE_LIMIT = 2000
_READ_TIMEOUT_S = 10.0


class AdminChannel:
    """The listening socket, its token, and the handlers of each call."""

    def __init__(self, site: SiteDir, root_client: Callable[[], Any]) -> None:
        self.site = site
        self._root_client = root_client
        self._lock = threading.Lock()
        self._reports: dict[tuple[str, str, str], Any] = {}
        self._token = secrets.token_urlsafe(32)
        self._sock = _listen(channel.socket_path(site.root))
        _write_token(channel.token_path(site.root), self._token)
        self._thread = threading.Thread(target=self._serve, name="admin-channel", daemon=True)

    def start(self) -> AdminChannel:
        self._thread.start()
        return self

    def close(self) -> None:
        """Remove the socket and the token (the server is stopping): commands say it is down."""
        with contextlib.suppress(OSError):
            self._sock.close()
        for path in (channel.socket_path(self.site.root), channel.token_path(self.site.root)):
            path.unlink(missing_ok=True)

    # --- the loop ------------------------------------------------------------------------

    def _serve(self) -> None:
        self._warm()
        while True:
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return  # closed: the server stops
            with conn:
                try:
                    self._answer(conn)
                except Exception:  # one broken connection never stops the channel
                    log.exception("admin channel: a connection failed")

    def _warm(self) -> None:
        """Log in the root client and import the handlers' modules before the first call."""
        try:
            self._session()
            from datasites.ledger import budget  # noqa: F401
            from datasites.review import queue  # noqa: F401
        except Exception:
            log.exception("admin channel: warm-up failed (calls will retry)")

    def _answer(self, conn: socket.socket) -> None:
        if _peer_uid(conn) != os.getuid():
            return  # another local user: not a word back
        conn.settimeout(_READ_TIMEOUT_S)
        raw = channel.read_line(conn, channel.MAX_CALL_BYTES)
        conn.sendall(json.dumps(self.handle(raw)).encode() + b"\n")

    def handle(self, raw: bytes) -> dict[str, Any]:
        """One call's JSON reply: ``{"ok": true, "result": {...}}`` or the error's one line."""
        try:
            op, message = self._decode(raw)
            with self._lock:
                result = getattr(self, f"_do_{op}")(message)
            return {"ok": True, "result": asdict(result)}
        except FedsiteError as exc:
            return {"ok": False, "kind": type(exc).__name__, "error": str(exc)}
        except Exception as exc:
            log.exception("admin channel: a call failed")
            return {"ok": False, "kind": "ServerError", "error": f"the call failed ({exc!r})"}

    def _decode(self, raw: bytes) -> tuple[str, Any]:
        try:
            data = json.loads(raw)
        except ValueError:
            raise ChannelError("the call is not JSON") from None
        if not isinstance(data, dict) or not isinstance(data.get("token"), str):
            raise ChannelError("refused: the call carries no token")
        if not hmac.compare_digest(data["token"].encode(), self._token.encode()):
            raise ChannelError("refused: wrong token (the server was relaunched?)")
        op = data.get("op")
        if op not in channel.CALLS:
            raise ChannelError(f"unknown operation {op!r}")
        return op, channel.decode(channel.CALLS[op][0], data.get("args"))

    # --- the handlers: the code the commands ran themselves, called here ------------------

    def _session(self) -> Any:
        """The admin client ``admin_client(site)`` returns in this process: syft's in-process
        root client (the server's own key is the admin account's), made once."""
        from datasites.serving import sessions

        config = self.site.config()
        password = self.site.admin_password()
        return sessions.session(config.url, config.admin_email, password, self._root_client)

    def _queue(self) -> Any:
        self._session()
        return _cached_queue(self.site, self._reports)

    def _do_requests(self, _: channel.Requests) -> ItemsReply:
        return ItemsReply([i.to_dict() for i in self._queue().items()])

    def _do_review(self, call: channel.Review) -> ItemReply:
        return _item_reply(self._queue().find(call.request_id))

    def _do_approve(self, call: channel.Approve) -> ItemReply:
        item = self._queue().approve(call.request_id, override=call.override, reason=call.reason)
        from datasites.training import sandbox

        sandbox.warm_soon()  # its rounds are coming: the trainers start now, not at the first
        return ItemReply(item.to_dict())

    def _do_deny(self, call: channel.Deny) -> ItemReply:
        return ItemReply(self._queue().deny(call.request_id, call.reason).to_dict())

    def _do_users_list(self, _: channel.UsersList) -> UsersReply:
        from datasites.serving import admin

        return UsersReply(admin.list_users(self._session()))

    def _do_users_add(self, call: channel.UsersAdd) -> PasswordReply:
        from datasites.serving import admin

        self._session()
        return PasswordReply(call.email, admin.add_user(self.site, call.email, call.name))

    def _do_users_remove(self, call: channel.UsersRemove) -> DoneReply:
        from datasites.serving import admin

        self._session()
        admin.remove_user(self.site, call.email)
        return DoneReply()

    def _do_reset_password(self, call: channel.ResetPassword) -> PasswordReply:
        from datasites.serving import admin

        self._session()
        return PasswordReply(call.email, admin.reset_password(self.site, call.email))

    def _do_budget(self, _: channel.Budget) -> channel.BudgetReply:
        return channel.BudgetReply(*ledger_rows(_ledger(self.site)))

    def _do_budget_set(self, call: channel.BudgetSet) -> DoneReply:
        from datasites.ledger.budget import check_budget
        from datasites.serving import admin

        check_budget(call.epsilon, call.delta)
        accounts = {u["email"].lower() for u in admin.list_users(self._session())}
        if call.researcher.lower() not in accounts:
            raise ServerError(
                f"no account {call.researcher} on this datasite; add it first with "
                "'datasite users add'"
            )
        _ledger(self.site).set_budget(call.researcher, call.dataset, call.epsilon, call.delta)
        return DoneReply()

    def _do_upload(self, call: channel.Upload) -> UploadReply:
        from datasites.data.tables import load_table, validate_table
        from datasites.serving import admin

        if not Path(call.file).is_absolute():
            raise ChannelError("upload: the file's path must be absolute")
        frame = load_table(Path(call.file), max_memory_mb=call.max_memory_mb)
        table = validate_table(frame, call.target, max_categories=call.max_categories)
        declared = None
        if call.bounds:
            from datasites.data.tables import load_bounds

            if not Path(call.bounds).is_absolute():
                raise ChannelError("upload: the bounds file's path must be absolute")
            declared = load_bounds(Path(call.bounds), table)
        self._session()
        result = admin.upload(
            self.site,
            call.name,
            table,
            call.description,
            call.mock_rows,
            call.mock_epsilon,
            declared,
        )
        return UploadReply(**result.__dict__)


def ledger_rows(ledger: Any) -> tuple[list[dict], list[dict], dict[str, dict]]:
    """What ``datasite budget`` shows: each budget with its dataset's total, the public
    releases, and every dataset's total (here for the running server, and for the CLI when the
    server is stopped)."""
    totals = {t.dataset: t.to_dict() for t in ledger.totals()}
    rows = [{**b.to_dict(), "dataset_total": totals.get(b.dataset)} for b in ledger.all()]
    return rows, ledger.public_releases(), totals


def _ledger(site: SiteDir) -> Any:
    from datasites.ledger.budget import BudgetLedger
    from datasites.ledger.store import SiteStore

    return BudgetLedger(SiteStore(site.site_db))


def _item_reply(item: Any) -> ItemReply:
    """What ``datasite review`` prints beside the item: the plan spelled out, the model input."""
    from datasites.review.describe import plan_rows

    job = item.report.job
    return ItemReply(
        item.to_dict(),
        item.raw_code,
        plan_rows(job) if job else None,
        list(job.architecture.input) if job else None,
    )


def _cached_queue(site: SiteDir, reports: dict[tuple[str, str, str], Any]) -> Any:
    """A ReviewQueue whose items reuse their report while nothing it was built from changed.

    The key is (request id, code hash, policy version); the version digests what a report
    reads besides the request: the site's policies, its datasets' published metadata, the job
    ids approved so far, and the budget ledger (budgets, caps, public releases). Status and deny reason are read fresh."""
    from datasites.review.queue import ReviewQueue

    class CachedQueue(ReviewQueue):
        def items(self, where: Any = None) -> list[Any]:
            self._version = _policy_version(self)
            return super().items(where)

        def _prefetch_code(self, requests: list[Any]) -> None:
            super()._prefetch_code(requests)
            for request in requests:
                _fetched(request)

        def _read_item(self, request: Any, assets: dict[str, str], used: set[str]) -> Any:
            key = (str(request.id.no_dash), str(request.code.code_hash), self._version)
            cached = reports.get(key)
            if cached is None:
                item = super()._read_item(request, assets, used)
                if len(reports) >= _CACHE_LIMIT:
                    reports.clear()
                reports[key] = item
                return item
            status = request.status.name
            reason = request.deny_reason if status == "REJECTED" else None
            return replace(
                cached,
                request=request,
                status=status,
                deny_reason=reason if isinstance(reason, str) else None,
            )

    return CachedQueue(site)


def _fetched(request: Any) -> None:
    """Mark a request as fetched in this very call: syft's ``request.status`` re-fetches the
    request first (one call per request) and the refetch drops the code that ``_prefetch_code``
    placed, so ``request.code`` was a second call per request. Sixty calls for thirty requests
    were most of a listing's time; the listing's own fetch is as fresh as either."""
    object.__setattr__(request, "refresh", _no_refresh)


def _no_refresh() -> None:
    return None


def _policy_version(queue: Any) -> str:
    digest = hashlib.sha256()
    for path in (queue.site.policies_path, queue.site.datasets_path):
        with contextlib.suppress(FileNotFoundError):
            digest.update(path.read_bytes())
        digest.update(b"\0")
    digest.update(json.dumps(sorted(queue.approvals.job_ids())).encode())
    digest.update(json.dumps(ledger_rows(_ledger(queue.site)), default=str).encode())
    return digest.hexdigest()


def _listen(path: Path) -> socket.socket:
    """A Unix socket at ``path``, 0600 from its creation (umask), listening."""
    path.unlink(missing_ok=True)  # a crashed server's; launch checked that none runs
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old = os.umask(0o177)
    try:
        with channel.unix_address(path) as address:
            sock.bind(address)
    finally:
        os.umask(old)
    os.chmod(path, 0o600)
    sock.listen(16)
    return sock


def _write_token(path: Path, token: str) -> None:
    path.unlink(missing_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(token + "\n")


def _peer_uid(conn: socket.socket) -> int:
    """The uid of the process at the other end (Linux ``SO_PEERCRED``: pid, uid, gid)."""
    creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    return struct.unpack("3i", creds)[1]


def start(site: SiteDir, root_client: Callable[[], Any]) -> AdminChannel:
    """Open the channel of ``site``; ServerError if its socket cannot be made."""
    try:
        return AdminChannel(site, root_client).start()
    except OSError as exc:
        raise ServerError(f"cannot open the admin channel in {site.root}: {exc}") from exc


__all__ = ["AdminChannel", "DatasiteError", "start"]
