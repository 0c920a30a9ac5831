"""Admin operations on a running datasite, over syft's HTTP API.

This is one of the few modules that imports syft; its errors are translated into DatasiteError
subclasses here, at the boundary.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import syft as sy
from syft.serde.serialize import _serialize

from datasites.data.mock import DEFAULT_MOCK_EPSILON, class_keys, make_mock
from datasites.data.store import remove_private, write_private
from datasites.data.tables import Table, clamp
from datasites.errors import AuthError, ServerError, TableError
from datasites.serving import sessions, syft_client
from datasites.serving.config import SiteDir
from datasites.serving.syft_client import check_reply
from policies import tls
from policies.console import quiet
from policies.labels import label_text
from policies.layout import encode
from policies.metadata import format_meta
from policies.scaling import floored_std

if TYPE_CHECKING:
    from datasites.data.mock import MockRelease

ASSET_NAME = "table"


def syft_errors(what: str):  # noqa: ANN201
    """This wing's one translation of syft's failures (``syft_client.syft_errors``)."""
    return syft_client.syft_errors(what, ServerError, ServerError)


def login(url: str, email: str, password: str) -> Any:
    """A syft client for ``email``, with syft's failures turned into one-line errors. syft's
    client gets the pinned sessions first (``syft_client.install``): no connect retries, and
    pinned trust for HTTPS sites."""
    syft_client.install()
    host, _, port = url.rpartition(":")
    try:
        with syft_errors(f"login to {url}"), quiet():
            return sy.login(url=host, port=int(port), email=email, password=password)
    except ServerError as exc:
        cause = str(exc.__cause__ or "").lower()
        if "credential" in cause or "not found" in cause:
            raise AuthError(f"login to {url} as {email} refused: wrong email or password") from exc
        if "no datasite answers" in str(exc):
            raise ServerError(f"no datasite answers at {url}; is it launched?") from exc
        raise


def admin_client(site: SiteDir) -> Any:
    """The admin's client, reused within this process (``sessions``): a syft login fetches the
    whole API, about 1.5 s. ``process`` forgets it when it launches or stops the site. Over
    HTTPS the admin trusts the site's own certificate file, nothing else."""
    config = site.config()
    if config.tls:
        tls.pin(config.url, tls.Trust(ca_file=site.tls_cert))
    password = site.admin_password()
    return sessions.session(
        config.url,
        config.admin_email,
        password,
        lambda: login(config.url, config.admin_email, password),
    )


@dataclass(frozen=True)
class UploadResult:
    name: str
    rows: int
    mock_rows: int
    columns: list[str]
    target: str
    mock_epsilon: float
    # per bounded column, how many values lay outside its declared bounds and were clamped:
    # the owner's alone (upload output, ``datasite datasets``), never published
    clamped: dict[str, int] = field(default_factory=dict)
    # what would make the published statistics useful, when the mock cannot read them above
    # its noise (``policies.utility.upload_warning``): public numbers only
    advice: list[str] = field(default_factory=list)


def dataset_names(client: Any) -> list[str]:
    with quiet():
        return [d.name for d in client.datasets.get_all()]


def upload(  # noqa: PLR0913
    site: SiteDir,
    name: str,
    table: Table,
    description: str = "",
    mock_rows: int = 1000,
    mock_epsilon: float = DEFAULT_MOCK_EPSILON,
    bounds: dict[str, tuple[float, float]] | None = None,
) -> UploadResult:
    """Build the DP mock twin of a validated table and upload both, unless the name is taken.

    The mock is charged in the ledger as a public release before it leaves, and the charge is
    withdrawn if the upload fails (nothing was released then). The private rows go to the
    site's own Parquet file, and the syft asset holds a stub naming it (``datasites.data.store``:
    syft's upload path cost most of the time and memory of a large upload); the file is removed
    again if the upload fails.
    """
    # here, not at the top: the user commands need no privacy accountant (opacus, ~1.2 s)
    from datasites.ledger.budget import BudgetLedger
    from datasites.ledger.store import SiteStore

    client = admin_client(site)
    if name in dataset_names(client):
        raise TableError(f"a dataset named {name!r} already exists on this datasite")
    clamped: dict[str, int] = {}
    if bounds:  # declared public bounds: the private rows are kept clamped to them
        frame, clamped = clamp(table.frame, bounds)
        table = Table(frame, table.target, table.classes)
    release = make_mock(
        table.frame, table.target, rows=mock_rows, epsilon=mock_epsilon, bounds=bounds
    )
    _check_request_size(site, release.mock)
    meta = {**_meta(table, name, release), "description": description}
    dataset = sy.Dataset(name=name, description=description or f"{name}: ~{release.rows} rows")
    stub = write_private(site.root, name, table.frame)
    dataset.add_asset(
        sy.Asset(name=ASSET_NAME, description=format_meta(meta), data=stub, mock=release.mock)
    )
    ledger = BudgetLedger(SiteStore(site.site_db))
    try:
        charge = ledger.charge_public(name, f"upload:{name}", "mock", release.mechanism)
    except BaseException:
        remove_private(site.root, stub)
        raise
    try:
        with syft_errors(f"upload of {name!r} failed"), quiet():
            check_reply(client.upload_dataset(dataset), f"upload of {name!r} failed", ServerError)
    except BaseException:
        ledger.withdraw_public(charge)
        remove_private(site.root, stub)
        raise
    # the site's own record keeps the clamp counts beside what it published (OWNER_ONLY: never
    # in the asset's description)
    site.save_dataset_meta(name, {**meta, OWNER_ONLY: {"clamped": clamped}})
    return UploadResult(
        name,
        len(table.frame),
        len(release.mock),
        list(table.frame.columns),
        table.target,
        release.epsilon,
        clamped,
        _advice(meta),
    )


def _advice(meta: dict[str, Any]) -> list[str]:
    from policies.utility import upload_warning

    warning = upload_warning(meta)
    return [warning.text] if warning else []


def _check_request_size(site: SiteDir, mock: pd.DataFrame) -> None:
    """Refuse, before anything is written, a mock twin the server's body cap would refuse."""
    from datasites.serving.limits import MARGIN_BYTES, MiB, effective

    size = len(_serialize(mock, to_bytes=True))
    cap = effective(site).request_bytes
    if size + MARGIN_BYTES > cap:
        raise TableError(
            f"the mock twin is {size / MiB:.1f} MiB, past this datasite's request limit of "
            f"{cap / MiB:.1f} MiB: lower --mock-rows, or raise the limit "
            "('datasite limits set --max-request-mb')"
        )


OWNER_ONLY = "owner_only"


def _class_codes(target: Any) -> bool:
    values = target.unique()
    return bool(
        pd.api.types.is_integer_dtype(target) and set(values.tolist()) == set(range(len(values)))
    )


def published_classes(table: Table, keys: list) -> list[str] | None:
    """The class list a dataset publishes: the labels its stored codes stand for (re-coded at
    upload, ``datasites.data.tables``), or the codes themselves when the labels were already
    0..k-1; None for a target that is not class codes (a measurement)."""
    if not keys or not _class_codes(table.frame[table.target]):
        return None
    return list(table.classes) if table.classes else [label_text(k) for k in keys]


def _mock_class_counts(labels: pd.Series, keys: list, rows: int) -> list[float] | None:
    if not keys:
        return None
    shares = labels.value_counts(normalize=True).reindex(keys, fill_value=0.0)
    return [round(float(v) * rows, 1) for v in shares]


def _meta(table: Table, name: str, release: MockRelease) -> dict[str, Any]:
    """What researchers see: schema, declared bounds, and post-processing of the DP release."""
    mock = release.mock
    keys = class_keys(table.frame, table.target)
    own = {"columns": [[c, table.categories().get(c)] for c in table.features]}
    stats = _feature_stats(table, mock, release, own)
    return {
        "dataset": name,
        "target": table.target,
        "rows": release.rows,  # noisy
        "mock_rows": len(mock),
        "mock_epsilon": release.epsilon,
        "mock_delta": release.delta,
        "schema": table.schema(),
        # category lists of categorical columns: disclosed as schema, like the column names
        "categories": table.categories(),
        # the labels the target's codes 0..k-1 stand for, in code order: schema (disclosed),
        # from which the researcher builds the federation's label space (policies.labels)
        "classes": published_classes(table, keys),
        # the label set is schema (disclosed); a continuous target publishes no count of values
        "n_classes": len(keys) or None,
        # whether the target holds exactly the class codes 0..n_classes-1: published, so that a
        # site decides whether cross-entropy applies from metadata, never from private labels
        "class_codes": bool(keys) and _class_codes(table.frame[table.target]),
        # per class, the mock's label share times the noisy row count: post-processing of the
        # mock's noisy class counts, for "balanced" class weights (policies.imbalance)
        "class_counts": _mock_class_counts(mock[table.target], keys, release.rows),
        # each numeric feature's range: declared by the owner (public schema) or found by the DP
        # release ("dp"; "weak" where no decade stood clear of the noise)
        "bounds": {c: list(release.ranges[c]) for c in table.features if c in release.ranges},
        "bounds_source": {c: release.sources[c] for c in table.features if c in release.sources},
        # Over this site's own one-hot encoding (policies.layout.align_stats moves them onto the
        # federation's layout): every round clamps to [low, high] and standardises with these
        **stats,
    }


def _feature_stats(
    table: Table, mock: pd.DataFrame, release: MockRelease, own: dict[str, Any]
) -> dict[str, list[float]]:
    """Per input of this site's encoding: mean, std (floored, ``policies.scaling``), low, high.

    A numeric column's come from the release's ranges and noisy shape counts; a one-hot input's
    mean and std from the mock's category shares, its range [0, 1]."""
    encoded = encode(mock, table.target, own).astype(np.float64)
    mean, std = encoded.mean(axis=0), encoded.std(axis=0)
    low, high = np.zeros(len(mean)), np.ones(len(mean))
    at = 0
    for column, categories in own["columns"]:
        if categories is None:
            mean[at], std[at] = release.stats[column]
            low[at], high[at] = release.ranges[column]
        at += len(categories) if categories is not None else 1
    return {
        "feature_mean": [float(v) for v in mean],
        "feature_std": [float(v) for v in floored_std(std, low, high)],
        "feature_low": [float(v) for v in low],
        "feature_high": [float(v) for v in high],
    }


def add_user(site: SiteDir, email: str, name: str) -> str:
    """Register a researcher with a generated password and return it (shown once)."""
    client = admin_client(site)
    password = secrets.token_urlsafe(18)
    with syft_errors(f"cannot add {email}"), quiet():
        result = client.register(
            name=name, email=email, password=password, password_verify=password
        )
    check_reply(result, f"cannot add {email}", ServerError)
    return password


def list_users(client: Any) -> list[dict[str, str]]:
    with quiet():
        return [
            {"email": u.email, "name": u.name, "role": str(u.role.name)}
            for u in client.users.get_all()
        ]


def _researcher(client: Any, email: str) -> Any:
    """The syft account of a researcher; the admin's own account is never a target."""
    with quiet():
        users = [u for u in client.users.get_all() if u.email.lower() == email.lower()]
    if not users:
        raise ServerError(f"no account {email} on this datasite (see 'datasite users list')")
    if str(users[0].role.name) != "DATA_SCIENTIST":
        raise ServerError(f"{email} is not a researcher account; it is left as it is")
    return users[0]


def remove_user(site: SiteDir, email: str) -> None:
    """Delete a researcher's account: their logins stop; the ledger and audit keep their past."""
    client = admin_client(site)
    user = _researcher(client, email)
    with syft_errors(f"cannot remove {email}"), quiet():
        check_reply(client.users.delete(user.id), f"cannot remove {email}", ServerError)


def reset_password(site: SiteDir, email: str) -> str:
    """Give a researcher a new generated password and return it (shown once)."""
    client = admin_client(site)
    user = _researcher(client, email)
    password = secrets.token_urlsafe(18)
    with syft_errors(f"cannot reset the password of {email}"), quiet():
        result = client.users.update(uid=user.id, password=password)
    check_reply(result, f"cannot reset the password of {email}", ServerError)
    return password
