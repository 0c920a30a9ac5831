"""Each federated algorithm of issue 12, end to end on two real datasites over HTTP.

FedProx, transfer learning with frozen layers, int8 and top-k compression, personalization, and
every strategy: submitted with the researcher package, approved through the site's review,
trained by the sites' own runtime. Plan algorithms and strategies are paired so that each
strategy also runs on real sites (FedAdam is in the README workflow test, FedAvg everywhere).
The attack on frozen layers uses a plain syft client.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from datasites.ledger.store import SiteStore
from datasites.review.queue import ReviewQueue
from datasites.serving.config import SiteDir
from policies.wire import ReplayLast, encode_weights
from researcher import api, sites
from researcher import model as local_model
from researcher.strategy import FedMedian, strategy_named
from tests.conftest import approve_job, breast_cancer_frame, last_json, queued
from tests.integration.conftest import job

pytestmark = pytest.mark.integration
SHARED_SITES = True  # the worker's running sites (tests/integration/conftest.py)
EMAIL = "ada.algorithms@uni.edu"  # this module's researcher there
PLAN = {"rounds": 1, "noise_multiplier": 1.0, "batch_size": 64, "learning_rate": 0.5}


@pytest.fixture(scope="module")
def fed(federation):
    fed, made = federation
    for s in made:
        s.cli("budget", "set", "--researcher", EMAIL, "--dataset", "cancer", "--epsilon", "200")
        s.cli("policy", "set", "--dataset", "cancer", "--max-epsilon-per-job", "20")
    return fed, made


def _approved(fed, made, spec, initial=None):  # noqa: ANN001, ANN202
    api.submit(fed, spec, initial=initial)
    for s in made:
        approve_job(s.dir, spec.name)
    return spec


def _test_set(spec):  # noqa: ANN001, ANN202
    frame = breast_cancer_frame()
    x = frame.drop(columns=["target"]).to_numpy(np.float32)
    return x, frame["target"].to_numpy()


def _train(fed, spec, run: Path, **kw):  # noqa: ANN001, ANN202
    spec = api.saved_job(fed, spec.name)
    return api.train(fed, spec, run, test=_test_set(spec), **kw)


def test_fedprox_with_int8_updates_and_fedyogi(fed, tmp_path: Path) -> None:
    fed, made = fed
    plan = {**PLAN, "proximal_mu": 0.5, "compression": "int8"}
    spec = _approved(fed, made, api.with_pooled_scaling(fed, job(plan)))
    (item,) = queued(ReviewQueue(SiteDir(made[0].dir)), spec.name)
    shown = made[0].cli("review", item.request_id[:8])
    assert "FedProx" in shown.stdout and "compressed" in shown.stdout
    start = local_model.weights_of(local_model.build(spec))
    result = _train(fed, spec, tmp_path / "prox", strategy=strategy_named("fedyogi"))
    assert [len(r["sites"]) for r in result.rounds] == [2]
    assert result.rounds[-1]["test_accuracy"] is not None  # one DP round: no accuracy promise
    assert all(np.isfinite(v).all() for v in result.weights.values())
    assert not np.allclose(result.weights["0.weight"], start["0.weight"])


def test_frozen_layers_stay_as_sent_and_cannot_be_swapped(fed, tmp_path: Path) -> None:
    fed, made = fed
    plain = api.with_pooled_scaling(fed, job(PLAN))
    initial = local_model.weights_of(local_model.build(plain, seed=5))
    spec = api.with_pooled_scaling(fed, job({**PLAN, "frozen": ["0"]}, initial=initial))
    _approved(fed, made, spec, initial=initial)
    # attack: a plain syft client calls the approved job with other frozen weights while it
    # still has rounds; refused before anything is charged or any round is taken
    before = last_json(made[0].cli("budget", "--json"))
    client = sites.connect(fed.sites[0])
    swapped = {**initial, "0.weight": np.ones_like(initial["0.weight"])}
    reply = sites.run_round(
        client, spec, sites.find_asset(client, "cancer"), encode_weights(swapped)
    )
    assert reply["status"] == "refused" and "frozen layers differ" in reply["reason"]
    assert last_json(made[0].cli("budget", "--json")) == before
    result = _train(fed, spec, tmp_path / "frozen", strategy=strategy_named("fedavgm"))
    assert np.array_equal(result.weights["0.weight"], initial["0.weight"])
    assert not np.allclose(result.weights["2.weight"], initial["2.weight"])
    assert [len(r["sites"]) for r in result.rounds] == [2] * len(result.rounds)


def test_top_k_updates_with_error_feedback_and_norm_bounding(fed, tmp_path: Path) -> None:
    fed, made = fed
    plan = {**PLAN, "compression": "topk", "topk_fraction": 0.2}
    spec = _approved(fed, made, api.with_pooled_scaling(fed, job(plan)))
    start = local_model.weights_of(local_model.build(spec))
    result = _train(fed, spec, tmp_path / "topk", strategy=strategy_named("norm-bounded"))
    assert all(np.isfinite(v).all() for v in result.weights.values())
    assert not np.allclose(result.weights["0.weight"], start["0.weight"])
    for s in made:  # each site keeps its error-feedback residual between rounds
        with SiteStore(SiteDir(s.dir).db_path).connect() as conn:
            kinds = [r[0] for r in conn.execute("SELECT kind FROM job_state")]
        assert "residual" in kinds


def test_personalized_models_stay_at_the_sites(fed, tmp_path: Path) -> None:
    fed, made = fed
    plan = {**PLAN, "site_metrics": True, "personalize_layers": ["2"], "personalize_epochs": 1}
    spec = _approved(fed, made, api.with_pooled_scaling(fed, job(plan)))
    run = tmp_path / "personal"
    result = _train(fed, spec, run, strategy=FedMedian())
    assert [len(r["sites"]) for r in result.rounds] == [2]
    import json

    personalized = json.loads((run / "personalized.json").read_text())
    assert set(personalized["sites"]) == {"hospital-a", "hospital-b"}
    assert all("val_accuracy" in m for m in personalized["sites"].values())
    for s in made:
        kept = last_json(s.cli("models", "--json"))
        assert [m["job"] for m in kept] == [spec.name]
        [mine] = [r for r in last_json(s.cli("budget", "--json")) if r["researcher"] == EMAIL]
        charges = [r for r in mine["releases"] if r["job"] == spec.job_id]
        assert charges and {r["status"] for r in charges} == {"committed"}
    # attack from a plain syft client: ask for the tuned model again, or for one more pass
    client = sites.connect(fed.sites[0])
    asset = sites.find_asset(client, "cancer")
    before = last_json(made[0].cli("budget", "--json"))
    replayed = sites.run_round(client, spec, asset, ReplayLast().encode())
    assert replayed.get("personalized") and not {"weights", "update"} & set(replayed)
    again = sites.run_round(client, spec, asset, encode_weights(result.weights))
    assert again["status"] == "refused" and "all have run" in again["reason"]
    assert last_json(made[0].cli("budget", "--json")) == before  # nothing new charged
