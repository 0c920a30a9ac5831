"""Three real datasites over HTTP: a site killed mid-run is skipped, rejoins on resume, and the
sites' own ledgers and audit logs agree. The round loop's logic (quorum, timeouts, retries,
replay) is unit-tested against in-process sites in tests/unit/test_round_loop.py."""

from __future__ import annotations

import os
import signal
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from torch import nn

from datasites.ledger.audit import AuditLog
from datasites.ledger.budget import BudgetLedger
from datasites.ledger.store import SiteStore
from datasites.review.access import DatasetPolicy, PolicyStore
from datasites.review.queue import ReviewQueue
from datasites.serving import process
from datasites.serving.config import SiteDir, init_site
from policies.tls import self_signed
from researcher import api
from researcher.federation import Federation
from researcher.job import make_job
from tests import server_zygote
from tests.conftest import add_researcher, breast_cancer_frame, free_port, upload_table

pytestmark = pytest.mark.integration

EMAIL = "ada@uni.edu"
MODEL = nn.Linear(30, 2)  # breast cancer: 30 features, 2 classes


def start(root: Path, name: str, frame) -> SiteDir:
    site = SiteDir(root / name)
    init_site(site.root, name, port=free_port(), tls=self_signed("127.0.0.1"))
    server_zygote.launch(site)  # forked warm: datasite launch is tested in test_site_lifecycle
    upload_table(site.root, "cancer", frame, "target")
    (root / f"{name}.pw").write_text(add_researcher(site.root, EMAIL, "Ada"))
    PolicyStore(site.policies_path).set(
        "cancer", DatasetPolicy(allowed_domains=["uni.edu"], max_epsilon_per_job=10.0)
    )
    BudgetLedger(SiteStore(site.db_path)).set_budget(EMAIL, "cancer", 10.0, 1e-5)
    return site


class Crash(Exception):
    pass


def test_a_killed_site_is_skipped_and_rejoins_on_resume(tmp_path: Path) -> None:
    frame = breast_cancer_frame().sample(frac=1.0, random_state=0)
    parts = [frame.iloc[:150], frame.iloc[150:330], frame.iloc[330:]]
    with ThreadPoolExecutor(3) as pool:  # three servers start at once: a third of the wait
        sites = list(pool.map(lambda a: start(tmp_path, *a), zip("abc", parts, strict=True)))
    try:
        (tmp_path / "fed.toml").write_text(
            "\n".join(
                f'[[sites]]\nname = "{s.config().name}"\nurl = "{s.config().url}"\n'
                f'fingerprint = "{s.tls_fingerprint()}"\n'
                f'email = "{EMAIL}"\npassword_file = "{s.config().name}.pw"\n'
                for s in sites
            )
        )
        fed = Federation.load(tmp_path / "fed.toml")
        spec = api.with_pooled_scaling(
            fed,
            make_job(
                MODEL,
                "cancer",
                "target",
                {"rounds": 4, "noise_multiplier": 1.5, "batch_size": 32},
                n_features=30,
                n_outputs=2,
            ),
        )
        api.submit(fed, spec)
        for s in sites:  # in this process, not over the channel (see the commit)
            queue = ReviewQueue(s)
            queue.approve(queue.items()[0].request_id)
        run = tmp_path / "run"
        records = {}

        def kill_c_then_crash(rec) -> None:  # noqa: ANN001
            records[rec.round] = rec
            if rec.round == 1:
                os.kill(process.server_pid(sites[2]), signal.SIGKILL)
            if rec.round == 2:
                raise Crash

        with pytest.raises(Crash):
            api.train(
                fed,
                spec,
                run,
                min_sites=2,
                timeout_s=60,
                on_round=kill_c_then_crash,
                retry_backoff=0.05,  # the dead site's retries: the behaviour, not the wait
            )
        assert [u.site for u in records[1].updates] == ["a", "b", "c"]
        assert [u.site for u in records[2].updates] == ["a", "b"] and "c" in records[2].skipped
        assert (run / "state.json").exists() and (run / "metrics.csv").exists()

        server_zygote.launch(sites[2])  # the killed site comes back
        result = api.train(
            fed,
            spec,
            run,
            resume=True,
            min_sites=1,
            timeout_s=60,
            on_round=lambda rec: records.__setitem__(rec.round, rec),
        )
        third, fourth = records[3], records[4]
        assert [u.site for u in third.updates] == ["a", "b", "c"]
        assert 0.0 <= third.updates[0].metrics["val_accuracy"] <= 1.0
        # on resume each site is asked for its last reply first (nothing new here: each had
        # released exactly what the checkpoint holds), then trains; c lost round 2 only
        for name, site, released in zip("abc", sites, (4, 4, 3), strict=True):
            events = [e["event"] for e in AuditLog(SiteStore(site.db_path)).entries()]
            assert events.count("replayed") == 1, name
            assert events.count("released") == released, name
        assert [u.site for u in fourth.updates] == ["a", "b", "c"] and not fourth.skipped

        # the aggregate of round 3 is np.average of the site updates weighted by rows
        from researcher.strategy import FedAvg

        agg3 = FedAvg().aggregate(3, third.updates, third.updates[0].weights)
        counts = [u.n for u in third.updates]
        for key, value in agg3.items():
            expected = np.average(
                np.stack([u.weights[key] for u in third.updates]), axis=0, weights=counts
            )
            np.testing.assert_allclose(value, expected, rtol=1e-6)
        agg4 = FedAvg().aggregate(4, fourth.updates, fourth.updates[0].weights)
        np.testing.assert_allclose(
            np.load(run / "global.npz")["0.weight"], agg4["0.weight"], rtol=1e-6
        )
        # the model handed back averages the last half of the 4 rounds (researcher.averaging),
        # its sum carried across the resume
        tail = (agg3["0.weight"] + agg4["0.weight"]) / 2
        np.testing.assert_allclose(result.weights["0.weight"], tail, rtol=1e-5)
        assert len(result.rounds) == 4 and (run / "model.pt").exists()
        states = api.status(fed, spec)
        assert {s["status"] for s in states.values()} == {"done"}, states
        assert all(s["rounds_done"] == 4 for s in states.values())
        assert (run / "accuracy.png").stat().st_size > 0 and (run / "epsilon.png").exists()
    finally:
        for s in sites:
            process.stop(s)
