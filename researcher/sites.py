"""Talking to datasites as a researcher, over syft: the one syft boundary of this package."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, cast

import syft as sy
from syft.service.policy.policy import OutputPolicyExecuteCount
from syft.types.result import Err

from policies import tls
from policies.console import quiet
from policies.metadata import parse_meta
from policies.plan import JobSpec
from policies.wire import RoundCall, RoundReply
from researcher import syft_adapter
from researcher.errors import SiteError, Unreachable
from researcher.federation import SiteLogin
from researcher.job import as_function
from researcher.syft_adapter import check_reply


@contextmanager
def syft_errors(what: str, client: Any = None) -> Iterator[None]:
    """This wing's one translation of syft's failures (``syft_adapter.syft_errors``); a client
    whose site stopped answering is dropped from the session cache."""
    try:
        with syft_adapter.syft_errors(what, SiteError, Unreachable):
            yield
    except Unreachable:
        for key in [k for k, v in _SESSIONS.items() if v is client]:
            _SESSIONS.pop(key, None)
        raise


_SESSIONS: dict[tuple[str, str, str], Any] = {}
LOGINS = 0  # syft logins this process made: the researcher agent reports it (a kept one is 0)


def _session_key(login: SiteLogin) -> tuple[str, str, str]:
    """Sessions are kept per URL, email, and a hash of the password and the trusted TLS
    identity: a changed password or pinned fingerprint never reuses an old session."""
    secret = f"{login.password()}|{login.fingerprint}|{login.ca_file}"  # trust is part of it
    return (login.url, login.email, hashlib.sha256(secret.encode()).hexdigest())


def has_session(login: SiteLogin) -> bool:
    return _session_key(login) in _SESSIONS


def forget(login: SiteLogin) -> None:
    """Drop the kept session of ``login`` (its key was refused, or the site changed)."""
    _SESSIONS.pop(_session_key(login), None)


def connect(login: SiteLogin, fresh: bool = False) -> Any:
    """A logged-in client for ``login``, reused within this process: a syft login fetches the
    whole API (about 0.7 s here for a researcher), and one command often talks to a site several
    times. ``fresh`` logs in again (after a dropped connection). syft's client gets the pinned
    sessions first (``syft_adapter.install``): no connect retries (rounds retry), pinned trust
    for HTTPS."""
    global LOGINS
    syft_adapter.install()
    key = _session_key(login)
    if not fresh and key in _SESSIONS:
        return _SESSIONS[key]
    host, _, port = login.url.rpartition(":")
    if login.url.startswith("https://"):
        tls.pin(login.url, login.trust())
    try:
        with syft_errors(f"{login.name}: login refused"), quiet():
            client = sy.login(
                url=host, port=int(port), email=login.email, password=login.password()
            )
    except Unreachable as exc:
        _SESSIONS.pop(key, None)
        raise Unreachable(f"{login.name}: no datasite answers at {login.url}") from exc
    LOGINS += 1
    _SESSIONS[key] = client
    return client


def asset_meta(asset: Any) -> dict[str, Any]:
    return parse_meta(asset.description.text if asset.description else "")


def datasets(client: Any, preview_rows: int = 5) -> list[dict[str, Any]]:
    out = []
    with syft_errors(client.name, client), quiet():
        for ds in client.datasets.get_all():
            asset = ds.assets[0]
            meta = asset_meta(asset)
            mock = asset.mock
            out.append(
                {
                    "name": ds.name,
                    "rows": meta.get("rows"),
                    "target": meta.get("target"),
                    "schema": meta.get("schema"),
                    "categories": meta.get("categories") or {},
                    "n_classes": meta.get("n_classes"),
                    "classes": meta.get("classes"),
                    "mock_epsilon": meta.get("mock_epsilon"),
                    # per numeric column: [low, high], declared by the owner or found by the DP
                    # release ("dp", "weak"): what every round clamps to
                    "bounds": meta.get("bounds") or {},
                    "bounds_source": meta.get("bounds_source") or {},
                    "mock_preview": mock.head(preview_rows).to_dict(orient="records"),
                }
            )
    return out


def find_asset(client: Any, dataset: str) -> Any:
    with syft_errors(client.name, client), quiet():
        for ds in client.datasets.get_all():
            if ds.name == dataset:
                return ds.assets[0]
    raise SiteError(f"dataset {dataset!r} not found on {client.name}")


def submit(client: Any, spec: JobSpec, asset: Any) -> str:
    """One code request for this job on this site; returns the request id."""
    policy = sy.MixedInputPolicy(data=asset, weights=str, client=client)
    what = f"{client.name}: submission refused"
    with syft_errors(what, client), quiet(), as_function(spec) as function:
        fn = sy.syft_function(
            input_policy=policy,
            # each round, and a replay of it if the reply was lost: the site counts rounds
            output_policy=OutputPolicyExecuteCount(limit=syft_call_limit(spec)),
        )(function)
        request = check_reply(client.code.request_code_execution(fn), what, SiteError)
    return str(request.id.no_dash)


def status(client: Any, spec: JobSpec) -> dict[str, Any]:
    """pending / approved / denied (with the admin's reason) for this job on this site.

    The job's code is looked up once by name, and each request matched by its code's id: a
    request's ``.code`` is a round trip of its own, and a queue of 30 took seconds."""
    with syft_errors(client.name, client), quiet():
        requests = list(client.requests)  # first: a key the site no longer knows fails here
        if not requests:
            return {"status": "not submitted", "reason": None}
        codes = check_reply(
            client.api.services.code.get_by_service_func_name(spec.name), client.name, SiteError
        )
        ours = {code.id for code in codes if spec.job_id in code.raw_code}
        for request in requests:
            if _code_id(request) in ours:
                state = request.status.name
                if state == "REJECTED":
                    reason = request.deny_reason
                    return {
                        "status": "denied",
                        "reason": reason if isinstance(reason, str) else None,
                    }
                return {"status": state.lower(), "reason": None}
    return {"status": "not submitted", "reason": None}


def _code_id(request: Any) -> Any:
    """The id of the code a request carries, read from the request itself (no round trip)."""
    try:
        return request.code_id
    except Exception:  # a request without code (syft raises SyftException)
        return None


def _fetch(result: Any) -> Any:
    """The value behind a call's result pointer: one request.

    ``ActionObject.get()`` makes a second one (``has_storage_permission``) only to decide
    whether to print a warning; a round does not need it.
    """
    if not hasattr(result, "refresh_object"):
        return result
    fresh = result.refresh_object()
    if not hasattr(fresh, "syft_action_data"):
        raise SiteError(f"unexpected reply {type(fresh).__name__}")
    if issubclass(fresh.syft_action_data_type, Err):
        raise SiteError(f"the job failed: {fresh.syft_action_data.err()}")
    return fresh.syft_action_data


def run_round(client: Any, spec: JobSpec, asset: Any, weights: str) -> RoundReply:
    """Call the approved job once; returns the runtime's dict (ok, refused or failed).

    ``weights`` is the call as it travels: ``RoundCall.encode()`` (``SyftSite.call``), or any
    string at all from a test playing the attacker."""
    with syft_errors(client.name, client), quiet():  # dropped connection: Unreachable, retried
        fn = _job_function(client, spec)
        value = check_reply(_fetch(fn(data=asset, weights=weights)), client.name, SiteError)
    if not isinstance(value, dict) or "status" not in value:
        raise SiteError(f"{client.name}: unexpected reply {type(value).__name__}")
    return cast(RoundReply, value)  # a dict with a status; the readers check each field


def _job_function(client: Any, spec: JobSpec) -> Any:
    """``client.code.<job>``, built from the job's code item when the client's API predates it.

    syft answers a name its API lacks by fetching the whole API again: a login's worth of work
    (about 1.5 CPU-s here, and the server's serialisation of every endpoint), once per site and
    job in every process that logged in before the job was submitted (the agent's kept
    sessions, a script that submits then trains). One small call fetches the code item instead,
    and the function is built from it as syft builds its API's (``SyftAPI.for_user``: path
    ``code.call``, the code's id as ``uid``). The site checks every call against the approval
    whichever way it was built."""
    code = client.api.services.code
    try:
        return object.__getattribute__(code, spec.name)  # plain lookup: no refresh on a miss
    except AttributeError:
        pass
    from syft.client.api import generate_remote_function
    from syft.serde.signature import signature_remove

    items = check_reply(code.get_by_service_func_name(spec.name), client.name, SiteError)
    if not items:
        raise SiteError(f"{client.name}: no job {spec.name} was submitted here")
    item = items[-1]  # as syft's API: the last code item of a name is the one it calls
    api = client.api
    fn = generate_remote_function(
        api,
        api.server_uid,
        signature_remove(item.signature, ["context", "self"]),
        "code.call",
        api.make_call,
        pre_kwargs={"uid": item.id},
        communication_protocol=api.communication_protocol,
        warning=None,
    )
    code._add_submodule(spec.name, fn)  # where a refreshed API would have put it
    return fn


@dataclass
class SyftSite:
    """A datasite over syft's HTTP client (:class:`researcher.site.Site`): it logs in on first
    use, and again after :meth:`drop`."""

    login: SiteLogin
    client: Any = None
    asset: Any = None
    published: dict[str, Any] = field(default_factory=dict)
    drops: int = 0

    @property
    def name(self) -> str:
        return self.login.name

    def meta(self, dataset: str) -> dict[str, Any]:
        self._ensure(dataset)
        return self.published

    def call(self, spec: JobSpec, call: RoundCall) -> RoundReply:
        self._ensure(spec.dataset)
        return run_round(self.client, spec, self.asset, call.encode())

    def drop(self) -> None:
        self.client = None
        self.drops += 1

    def _ensure(self, dataset: str) -> None:
        if self.client is None:
            self.client = connect(self.login, fresh=self.drops > 0)
            self.asset = find_asset(self.client, dataset)
            self.published = asset_meta(self.asset)


def fingerprint(client: Any) -> str:
    """The site's identity: SHA-256 of the Ed25519 key its syft server signs with."""
    with syft_errors("reading the site's identity key"):
        verify_key = str(client.metadata.verify_key)
    return hashlib.sha256(bytes.fromhex(verify_key)).hexdigest()


def syft_call_limit(spec: JobSpec) -> int:
    """Executions syft allows the job: rounds and replays, and for a secure job each round's
    sign and unmask calls and the key exchange. The site counts rounds itself; this is slack."""
    per_call = 4 if spec.plan.aggregation.secure else 2
    return per_call * spec.plan.calls + 8
