"""A real datasite on loopback, an honest researcher (ada) and an attacker (eve), and the two
assertions every attack ends with: nothing private in what the researcher got, and the server
still serves."""

from __future__ import annotations

import base64
import importlib.util
import io
import json
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import syft as sy

from datasites.review.queue import ReviewQueue
from datasites.serving.config import SiteDir
from datasites.serving.process import responding
from researcher import sites
from researcher.federation import SiteLogin
from researcher.job import make_job, render
from tests.conftest import Site, breast_cancer_frame, last_json, make_site, queued

ADA, EVE = "ada@uni.edu", "eve@uni.edu"
DATASET = "cancer"
LAYERS = [
    {"type": "Linear", "in_features": 30, "out_features": 8},
    {"type": "ReLU"},
    {"type": "Linear", "in_features": 8, "out_features": 2},
]
PLAN = {"rounds": 2, "noise_multiplier": 3.0, "batch_size": 64}


@dataclass
class Arena:
    site: Site
    logins: dict[str, SiteLogin]
    rows: np.ndarray  # the private table's features, as the attacker would like them
    _queue: ReviewQueue | None = None
    _clients: dict[str, Any] = field(default_factory=dict)

    def client(self, who: str = EVE, fresh: bool = False) -> Any:
        """A logged-in client, one per researcher for the suite: a syft login fetches the whole
        API (about 1.5 s here), which was a third of the suite's time."""
        if fresh or who not in self._clients:
            self._clients[who] = sites.connect(self.logins[who])
        return self._clients[who]

    def asset(self, client: Any) -> Any:
        return sites.find_asset(client, DATASET)

    def queue(self) -> ReviewQueue:
        if self._queue is None:  # one admin session for the whole suite
            self._queue = ReviewQueue(SiteDir(self.site.dir))
        return self._queue

    def item(self, function: str) -> Any:
        """The request for ``function``, with its report: only its own is built (a report runs
        the budget's accountant over the researcher's history, seconds once eve has one)."""
        return next(iter(queued(self.queue(), function)))

    def secrets(self) -> list[str]:
        d = self.site.dir
        return [
            (d / f).read_text().strip() for f in ("admin-password", "identity.key", "split.key")
        ]

    def spent(self, who: str) -> float:
        from datasites.ledger.budget import BudgetLedger
        from datasites.ledger.store import SiteStore

        ledger = BudgetLedger(SiteStore(SiteDir(self.site.dir).db_path))
        return ledger.budget(who, DATASET).epsilon_spent


@pytest.fixture(scope="package")
def arena(tmp_path_factory, breast_cancer_csv: Path) -> Iterator[Arena]:
    root = tmp_path_factory.mktemp("arena")
    site = make_site(root, "hospital-a")
    site.cli("upload", "--name", DATASET, "--file", str(breast_cancer_csv), "--target", "target")
    site.cli("policy", "set", "--dataset", DATASET, "--allow-domain", "uni.edu")
    logins = {}
    for email in (ADA, EVE):
        creds = last_json(site.cli("users", "add", "--email", email, "--name", email, "--json"))
        path = root / f"{email}.pw"
        path.write_text(creds["password"])
        logins[email] = SiteLogin("hospital-a", site.url, email, path, fingerprint=site.fingerprint)
        site.cli("budget", "set", "--researcher", email, "--dataset", DATASET, "--epsilon", "20")
    rows = breast_cancer_frame().drop(columns=["target"]).to_numpy(np.float64)
    yield Arena(site, logins, rows)
    site.cli("stop", check=False)


def job(name: str, plan: dict | None = None, layers: list | None = None) -> Any:
    return make_job(layers or LAYERS, DATASET, "target", plan or PLAN, name=name, n_features=30)


def plain_submit(client: Any, asset: Any, name: str, source: str, **overrides: Any) -> Any:
    """Submit arbitrary source with a plain syft client, as an attacker would.

    ``overrides`` are set on syft's SubmitUserCode before it is sent (e.g. ``func_name``).
    """
    path = Path(tempfile.mkdtemp()) / f"{name}.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    policy = sy.MixedInputPolicy(data=asset, weights=str, client=client)
    fn = sy.syft_function(input_policy=policy)(getattr(module, name))
    for key, value in overrides.items():
        setattr(fn, key, value)
    return client.code.request_code_execution(fn)


def template_with(name: str, job_literal: dict) -> str:
    """The project's exact template around any job literal the attacker likes."""
    spec = job(name)
    source = render(spec).replace(repr(spec.to_dict()), repr(job_literal))
    return source.replace(f"def {spec.name}(", f"def {name}(")


def arrays_in(reply: Any) -> list[np.ndarray]:
    """Every numeric array a reply holds, weights decoded, so leaks can be searched for."""
    found: list[np.ndarray] = []

    def walk(value: Any) -> None:
        if isinstance(value, dict):
            nums = [v for v in value.values() if isinstance(v, int | float)]
            if nums:  # a dict's own scalars: one array of them
                found.append(np.asarray(nums, dtype=np.float64))
            for v in value.values():
                walk(v)
        elif isinstance(value, list | tuple):
            nums = [v for v in value if isinstance(v, int | float)]
            if nums:
                found.append(np.asarray(nums, dtype=np.float64))
            for v in value:
                walk(v)
        elif isinstance(value, np.ndarray):
            found.append(value.astype(np.float64).ravel())
        elif isinstance(value, str) and len(value) > 64:
            try:
                with np.load(io.BytesIO(base64.b64decode(value)), allow_pickle=False) as npz:
                    found.extend(npz[k].astype(np.float64).ravel() for k in npz.files)
            except Exception:
                pass
        elif hasattr(value, "to_numpy"):
            found.append(np.asarray(value.to_numpy(), dtype=np.float64).ravel())

    walk(reply)
    return found


def assert_nothing_private(arena: Arena, reply: Any) -> None:
    """No secret string, and no private row (raw or standardised), in anything received."""
    text = json.dumps(reply, default=repr)
    for secret in arena.secrets():
        assert secret not in text
    mean, std = arena.rows.mean(0), arena.rows.std(0)
    keys = set()
    for table in (arena.rows, (arena.rows - mean) / np.where(std > 0, std, 1)):
        keys |= {tuple(np.round(r[:4], 3)) for r in table}
    for values in arrays_in(reply):
        windows = np.lib.stride_tricks.sliding_window_view(values, 4) if len(values) >= 4 else []
        hits = sum(tuple(np.round(w, 3)) in keys for w in windows)
        assert hits == 0, f"{hits} private row prefixes found in the reply"


def assert_serving(arena: Arena) -> None:
    assert responding(arena.site.url, cafile=arena.site.dir / "tls.crt")
    client = arena.client(ADA)
    assert arena.asset(client) is not None
