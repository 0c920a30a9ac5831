"""The README's researcher sequence, command by command, and a round lost by the researcher
replayed on resume."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from datasites.serving.config import SiteDir
from researcher import api, sites
from researcher.errors import JobError
from researcher.job import make_job
from tests.conftest import approve_job, last_json, run_cli
from tests.integration.conftest import job

pytestmark = pytest.mark.integration
SHARED_SITES = True  # the worker's running sites (tests/integration/conftest.py)
EMAIL = "ada.workflow@uni.edu"  # this module's researcher there


def _hers(site) -> int:  # noqa: ANN001
    """How many requests this module's researcher has at the site, as ``datasite requests``
    lists them (over the admin channel: the site keeps each report, so a listing is cheap)."""
    from datasites.serving import channel

    items = channel.call(site.dir, channel.Requests()).items
    return sum(1 for i in items if i["researcher"] == EMAIL)


README_JOB = """import torch.nn as nn

DATASET = "cancer"
PLAN = {"rounds": 3, "batch_size": 64, "learning_rate": 0.5, "target_epsilon": 2.0}


def make_model(n_features, n_outputs):
    return nn.Sequential(nn.Linear(n_features, 16), nn.ReLU(), nn.Linear(16, n_outputs))
"""


def test_the_readme_researcher_sequence(federation, tmp_path: Path) -> None:
    """submit, status, train, status, train --resume: each exits 0 (status crashed on the
    progress file that train writes beside the saved jobs)."""
    fed, made = federation
    for s in made:
        s.cli("budget", "set", "--researcher", EMAIL, "--dataset", "cancer", "--epsilon", "30")
    f = str(fed.path)
    # a job that cannot run on these tables stops at submit, one line, before any site sees it
    misfit = tmp_path / "misfit.py"
    misfit.write_text(
        'DATASET = "cancer"\nPLAN = {"rounds": 1, "noise_multiplier": 1.0}\n'
        'MODEL = [{"type": "Linear", "in_features": 6, "out_features": 2}]\n'
    )
    before = _hers(made[0])
    refused = run_cli("researcher", "submit", str(misfit), "-f", f, check=False)
    assert refused.returncode == 1 and refused.stderr.count("\n") == 1, refused.stderr
    assert "expects 6 features, gets [30]" in refused.stderr
    narrow = make_job(  # the Python API, with a spec built by hand: the mock dry run stops it
        [{"type": "Linear", "in_features": 6, "out_features": 2}],
        "cancer",
        "target",
        {"rounds": 1, "noise_multiplier": 1.0},
        n_features=6,
    )
    with pytest.raises(JobError, match=r"dry run on hospital-a's mock: .*has 30 feature"):
        api.submit(fed, narrow)
    assert _hers(made[0]) == before
    job_py = tmp_path / "job.py"
    job_py.write_text(
        README_JOB + 'STRATEGY = {"name": "fedavgm", "server_lr": 0.5, "momentum": 0.5}\n'
    )
    submitted = last_json(run_cli("researcher", "submit", str(job_py), "-f", f, "--json"))
    assert submitted["strategy"] == {"name": "fedavgm", "server_lr": 0.5, "momentum": 0.5}
    spec = api.saved_job(fed, None)
    pending = last_json(run_cli("researcher", "status", "-f", f, "--json"))
    assert {v["status"] for v in pending["sites"].values()} == {"pending"}, pending
    early = run_cli(
        "researcher", "train", "-f", f, "--run-dir", str(tmp_path / "early"), check=False
    )
    assert early.returncode == 1 and early.stderr.count("\n") == 1, early.stderr
    assert "pending at hospital-a, hospital-b" in early.stderr
    assert not (tmp_path / "early").exists()
    for s in made:
        approve_job(s.dir, spec.name)
    run_dir = tmp_path / "runs" / "1"
    trained = run_cli("researcher", "train", "-f", f, "--run-dir", str(run_dir))
    assert "strategy: fedavgm (server_lr=0.5, momentum=0.5)" in trained.stdout
    assert (run_dir / "model.pt").exists() and (run_dir / "state.json").exists()
    # the job file's strategy ran, momentum and all (its state checkpointed for a resume)
    assert json.loads((run_dir / "strategy.json").read_text())["momentum"] == 0.5
    with np.load(run_dir / "strategy.npz") as npz:
        assert npz.files and all(k.startswith("fedavgm|velocity/") for k in npz.files)
    done = last_json(run_cli("researcher", "status", "-f", f, "--json"))
    assert {v["status"] for v in done["sites"].values()} == {"done"}, done
    resumed = run_cli("researcher", "train", "-f", f, "--resume", str(run_dir), check=False)
    assert resumed.returncode == 0, resumed.stderr


def test_a_round_lost_by_the_researcher_is_replayed_on_resume(federation, tmp_path) -> None:
    """The sites release round 2 but the researcher never receives it (Ctrl-C mid-round): on
    --resume each site hands back that same reply, untrained and uncharged, and the run ends."""
    from policies.wire import ReplayLast, decode_weights, encode_weights
    from researcher.rounds import Checkpoint

    fed, made = federation
    for s in made:
        s.cli("budget", "set", "--researcher", EMAIL, "--dataset", "cancer", "--epsilon", "50")
    spec = api.with_pooled_scaling(fed, job({"rounds": 2, "noise_multiplier": 1.5}))
    api.submit(fed, spec, dry=False)
    for s in made:
        approve_job(s.dir, spec.name)
    run = tmp_path / "run"

    class Interrupted(Exception):
        pass

    def stop_after_round_1(rec) -> None:  # noqa: ANN001
        raise Interrupted

    with pytest.raises(Interrupted):
        api.train(fed, spec, run, on_round=stop_after_round_1)
    _, done, weights, _ = Checkpoint(run).load()
    assert done == 1
    lost = {}  # what the interrupted client had asked for, and never saw
    for login in fed.sites:
        client = sites.connect(login)
        asset = sites.find_asset(client, "cancer")
        assert sites.run_round(client, spec, asset, ReplayLast().encode())["round"] == 1
        lost[login.name] = sites.run_round(client, spec, asset, encode_weights(weights))
        assert lost[login.name]["status"] == "ok" and lost[login.name]["round"] == 2
    spent = {s.name: last_json(s.cli("budget", "--json")) for s in made}
    seen = {}
    result = api.train(
        fed, spec, run, resume=True, on_round=lambda rec: seen.setdefault(rec.round, rec)
    )
    assert len(result.rounds) == 2 and (run / "model.pt").exists()
    for update in seen[2].updates:  # the lost replies, byte for byte, not a third round
        np.testing.assert_array_equal(
            update.weights["0.weight"], decode_weights(lost[update.site]["weights"])["0.weight"]
        )
    assert {s.name: last_json(s.cli("budget", "--json")) for s in made} == spent


def test_a_site_killed_between_check_and_submit_leaves_a_recorded_job_that_a_retry_finishes(
    federation, tmp_path, monkeypatch
) -> None:
    """Submit is all or nothing: every site is checked first; a site that dies after the check
    leaves the job recorded where it is pending, ``status`` says where it is missing, and the
    same submit again sends it there only, under the same job id. Runs last: it restarts b."""
    from datasites.serving.process import stop

    fed, made = federation
    plan = {"rounds": 1, "noise_multiplier": 1.5}
    spec_named = job(plan, name="killed_mid_submit")
    real_submit = sites.submit
    calls = []

    def submit_then_kill(client, s, asset):  # noqa: ANN001, ANN202
        calls.append(client.name)
        if len(calls) == 1:  # the check passed everywhere; now hospital-b goes down
            stop(SiteDir(made[1].dir))
        return real_submit(client, s, asset)

    monkeypatch.setattr(sites, "submit", submit_then_kill)
    with pytest.raises(JobError, match="run the same submit again") as err:
        api.submit(fed, spec_named, dry=False)
    assert "hospital-b" in str(err.value) and "pending at hospital-a" in str(err.value)
    record = api.saved_jobs(fed)[-1]
    assert record.name == spec_named.name and record.job_id == spec_named.job_id
    monkeypatch.setattr(sites, "submit", real_submit)
    with pytest.raises(JobError, match="nothing was submitted: hospital-b"):
        api.submit(fed, spec_named, dry=False)  # b is still down: nothing new anywhere
    made[1].relaunch()
    sites._SESSIONS.clear()
    state = api.status(fed, spec_named)
    assert state["hospital-a"]["status"] == "pending"
    assert state["hospital-b"]["status"] == "not submitted"
    assert "run the same submit again" in state["hospital-b"]["reason"]
    again = job(plan, name="killed_mid_submit")  # a reload draws a new job id: the record's wins
    assert again.job_id != spec_named.job_id
    requests = api.submit(fed, again, dry=False)
    assert set(requests) == {"hospital-a", "hospital-b"}
    sites._SESSIONS.clear()  # `researcher status` is a new process, with a new login
    state = api.status(fed, spec_named)
    listed = {s.name: last_json(s.cli("requests", "--json")) for s in made}
    assert {v["status"] for v in state.values()} == {"pending"}, (state, requests, listed)
    for s in made:  # one request per site for this job, all under the first job id
        mine = [i for i in last_json(s.cli("requests", "--json")) if i["job"] == spec_named.name]
        assert len(mine) == 1
