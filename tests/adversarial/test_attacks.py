"""The attacks that got rows and keys out of earlier versions, run end to end against a real
datasite. Each ends with the same two assertions: nothing private (no row, raw or standardised,
and no site secret) is in what the attacker received, and the server still serves.

Attacks that the declarative job cannot express are sent as the raw syft request that a plain
client can send; the researcher package's converter is tried too, where it applies.
"""

from __future__ import annotations

import base64
import io
import time

import numpy as np
import pytest
import torch
from torch import nn

from datasites.errors import ReviewError
from policies.errors import PlanError
from policies.torch_model import to_spec
from researcher import sites
from researcher.errors import JobError, SiteError
from researcher.job import render
from tests.adversarial.conftest import (
    ADA,
    DATASET,
    EVE,
    PLAN,
    assert_nothing_private,
    assert_serving,
    job,
    plain_submit,
    template_with,
)

pytestmark = pytest.mark.integration


def submitted_and_refused(arena, name: str, source: str, check: str, **overrides) -> None:
    """Submit raw, expect ``check`` to fail, no approval even with override, no result."""
    client = arena.client(EVE)
    asset = arena.asset(client)
    plain_submit(client, asset, name, source, **overrides)
    item = arena.item(name)
    failed = {c.name for c in item.report.failures()}
    assert check in failed, (name, item.report.to_dict())
    with pytest.raises(ReviewError):
        arena.queue().approve(item.request_id)
    with pytest.raises(ReviewError, match="cannot be overridden"):
        arena.queue().approve(item.request_id, override=True, reason="attack")
    got: object = None
    try:
        got = getattr(client.code, name)(data=asset, weights="")
    except Exception as exc:  # syft: not approved
        got = str(exc)
    assert_nothing_private(arena, got)
    assert_serving(arena)


def old_style(name: str, model_source: str) -> dict:
    literal = job(name).to_dict()
    literal.pop("model")
    literal["model_source"] = model_source
    literal["model_factory"] = "make_model"
    return literal


BUFFER_MODEL = """import torch.nn as nn
class M(nn.Module):
    def __init__(s, n):
        super().__init__(); s.l = nn.Linear(n, 2); s.register_buffer('b', torch.zeros(8, n))
    def forward(s, x):
        s.b.copy_(x[:8]); return s.l(x)
def make_model(n_features, n_outputs):
    return M(n_features)
"""


# 1
def test_buffer_copy(arena) -> None:
    class Buffered(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.register_buffer("stolen", torch.zeros(8, 30))

    with pytest.raises(PlanError, match="Buffered"):
        to_spec(nn.Sequential(nn.Linear(30, 2), Buffered()), [30])
    lin = nn.Linear(30, 2)
    lin.register_buffer("stolen", torch.zeros(8, 30))  # a torch layer carrying a buffer
    with pytest.raises(PlanError, match="buffers"):
        to_spec(nn.Sequential(lin), [30])
    source = template_with("buffer_copy", old_style("buffer_copy", BUFFER_MODEL))
    submitted_and_refused(arena, "buffer_copy", source, "template")


# 2
def test_inplace_parameter_write(arena) -> None:
    class Writer(nn.Linear):
        def forward(self, x):
            with torch.no_grad():
                self.weight[:2].copy_(x[:2, : self.in_features])
            return super().forward(x)

    with pytest.raises(PlanError, match="Writer.*custom module"):
        to_spec(nn.Sequential(Writer(30, 2)), [30])
    literal = job("inplace_write").to_dict()
    literal["model"]["layers"][0]["type"] = "Writer"
    source = template_with("inplace_write", literal)
    submitted_and_refused(arena, "inplace_write", source, "template")


# 3
def test_batchnorm_statistics(arena) -> None:
    with pytest.raises(PlanError, match="BatchNorm1d.*running statistics"):
        to_spec(nn.Sequential(nn.Linear(30, 8), nn.BatchNorm1d(8), nn.Linear(8, 2)), [30])
    literal = job("batchnorm").to_dict()
    literal["model"]["layers"].insert(1, {"type": "BatchNorm1d", "num_features": 8})
    submitted_and_refused(arena, "batchnorm", template_with("batchnorm", literal), "template")


# 4
def test_batch_mixing_forward(arena) -> None:
    class Mix(nn.Module):
        def forward(self, x):
            return x + x[0]

    with pytest.raises(PlanError, match="Mix"):
        to_spec(nn.Sequential(nn.Linear(30, 2), Mix()), [30])
    source = template_with(
        "mix", old_style("mix", "def make_model(a, b):\n    return lambda x: x + x[0]\n")
    )
    submitted_and_refused(arena, "mix", source, "template")


# 5
def test_read_admin_password_file(arena) -> None:
    path = arena.site.dir / "admin-password"
    source = f"def read_pw(data, weights):\n    return open({str(path)!r}).read()\n"
    submitted_and_refused(arena, "read_pw", source, "template")
    mm = old_style("memmap", "import numpy\nK = numpy.memmap('/proc/self/cmdline')\n")
    submitted_and_refused(arena, "memmap", template_with("memmap", mm), "template")


# 6
def test_code_execution_through_allowed_modules(arena) -> None:
    literal = job("code_exec").to_dict()
    literal["model"]["layers"][0]["out_features"] = "__import__('os').system('id')"
    literal["model"]["layers"][1] = {"type": "__import__", "name": "os"}
    submitted_and_refused(arena, "code_exec", template_with("code_exec", literal), "template")


# 7
def test_huge_model(arena) -> None:
    huge = [
        {"type": "Linear", "in_features": 30, "out_features": 65536},
        {"type": "Linear", "in_features": 65536, "out_features": 65536},
        {"type": "Linear", "in_features": 65536, "out_features": 2},
    ]
    with pytest.raises(JobError, match="parameters, above"):
        job("huge", layers=huge)
    literal = job("huge").to_dict()
    literal["model"]["layers"] = huge
    submitted_and_refused(arena, "huge", template_with("huge", literal), "template")
    # under the hard cap but over the dataset's limit: the report says so before anything runs
    big = job(
        "big",
        layers=[
            {"type": "Linear", "in_features": 30, "out_features": 40000},
            {"type": "Linear", "in_features": 40000, "out_features": 2},
        ],
    )
    client = arena.client(EVE)
    sites.submit(client, big, arena.asset(client))
    item = arena.item(big.name)
    assert "model_size" in {c.name for c in item.report.failures()}
    assert_serving(arena)


# 8
def test_endless_and_memory_hungry_jobs_are_stopped(arena) -> None:
    site = arena.site
    client = arena.client(EVE)
    asset = arena.asset(client)
    slow = job(
        "slow",
        {"rounds": 1, "noise_multiplier": 5.0, "batch_size": 1, "local_epochs": 100},
    )
    wide = [
        {"type": "Linear", "in_features": 30, "out_features": 65536},
        {"type": "ReLU"},
        {"type": "Linear", "in_features": 65536, "out_features": 2},
    ]
    hungry = job("hungry", {"rounds": 1, "noise_multiplier": 5.0, "batch_size": 512}, wide)
    for spec in (slow, hungry):
        sites.submit(client, spec, asset)
        arena.queue().approve(arena.item(spec.name).request_id, override=True, reason="test")
    limits = ("--max-seconds-per-round", "--max-memory-mb")
    try:
        site.cli("policy", "set", "--dataset", DATASET, limits[0], "1")
        started = time.perf_counter()
        reply = sites.run_round(client, slow, asset, "")
        assert reply["status"] == "refused" and "limit of 1 s" in reply["reason"], reply
        assert time.perf_counter() - started < 30
        site.cli("policy", "set", "--dataset", DATASET, limits[0], "120", limits[1], "64")
        reply2 = sites.run_round(client, hungry, asset, "")
        assert reply2["status"] == "refused" and "64 MB" in reply2["reason"], reply2
        assert_nothing_private(arena, [reply, reply2])
        events = [e["event"] for e in arena.queue().audit.entries()]
        assert events.count("stopped") >= 2
    finally:
        site.cli("policy", "set", "--dataset", DATASET, limits[0], "300", limits[1], "4096")
    assert_serving(arena)
    ok = job("after_limits")
    client = arena.client(ADA)
    sites.submit(client, ok, arena.asset(client))
    arena.queue().approve(arena.item(ok.name).request_id)
    assert sites.run_round(client, ok, arena.asset(client), "")["status"] == "ok"


def _encode(weights: dict, compressed: bool = False) -> str:
    buf = io.BytesIO()
    (np.savez_compressed if compressed else np.savez)(buf, **weights)
    return base64.b64encode(buf.getvalue()).decode()


@pytest.fixture(scope="module")
def approved(arena):
    """One approved, honest-looking job of eve's, 6 rounds, for the weight attacks."""
    spec = job("weights_target", {**PLAN, "rounds": 6})
    client = arena.client(EVE)
    sites.submit(client, spec, arena.asset(client))
    arena.queue().approve(arena.item(spec.name).request_id)
    return spec


def _shapes(spec) -> dict:
    return spec.architecture.parameters


# 9
def test_nan_or_huge_incoming_weights(arena, approved) -> None:
    client = arena.client(EVE)
    asset = arena.asset(client)
    before = arena.spent(EVE)
    base = {k: np.zeros(s, np.float32) for k, s in _shapes(approved).items()}
    for bad, why in (
        ({**base, "0.weight": np.full((8, 30), np.nan, np.float32)}, "NaN"),
        ({**base, "0.weight": np.full((8, 30), 1e6, np.float32)}, "norm"),
        ({**base, "0.weight": np.zeros((8, 30), np.float64)}, "float32|characters|bytes"),
        ({**base, "extra": np.zeros(3, np.float32)}, "extra|characters"),
    ):
        reply = sites.run_round(client, approved, asset, _encode(bad))
        assert reply["status"] == "refused", reply
        assert any(w in reply["reason"] for w in why.split("|")), reply["reason"]
        assert_nothing_private(arena, reply)
    assert arena.spent(EVE) == before  # checked before anything is charged
    assert_serving(arena)


# 16
def test_decompression_bomb_as_weights(arena, approved) -> None:
    client = arena.client(EVE)
    bomb = {k: np.zeros(s, np.float32) for k, s in _shapes(approved).items()}
    bomb["0.weight"] = np.zeros((8, 30), np.float32)
    bomb["2.bias"] = np.zeros((2,), np.float32)
    bomb["2.weight"] = np.zeros((400_000_000 // 4,), np.float32).reshape(-1, 8)[:, :8]
    blob = _encode(bomb, compressed=True)
    assert len(blob) < 2_000_000
    reply = sites.run_round(client, approved, arena.asset(client), blob)
    assert reply["status"] == "refused"
    assert "compressed" in reply["reason"] or "characters" in reply["reason"]
    assert_serving(arena)


# 11 and 15
def test_replay_past_rounds_and_noise_is_unpredictable(arena) -> None:
    spec = job("replay", {**PLAN, "rounds": 2})
    client = arena.client(EVE)
    asset = arena.asset(client)
    sites.submit(client, spec, asset)
    arena.queue().approve(arena.item(spec.name).request_id)
    start = {k: np.full(s, 0.01, np.float32) for k, s in _shapes(spec).items()}
    blob = _encode(start)
    first = sites.run_round(client, spec, asset, blob)
    second = sites.run_round(client, spec, asset, blob)
    assert first["status"] == second["status"] == "ok"
    a = np.load(io.BytesIO(base64.b64decode(first["weights"])))["0.weight"]
    b = np.load(io.BytesIO(base64.b64decode(second["weights"])))["0.weight"]
    assert not np.allclose(a, b)  # same job, same weights: fresh noise and batches each time
    spent = arena.spent(EVE)
    third = sites.run_round(client, spec, asset, blob)
    assert third["status"] == "refused" and "all have run" in third["reason"]
    assert arena.spent(EVE) == spent
    assert_nothing_private(arena, [first, second, third])


# 10 and 12
def test_modified_literal_and_another_researchers_approval(arena) -> None:
    spec = job("adas_job")
    ada = arena.client(ADA)
    sites.submit(ada, spec, arena.asset(ada))
    arena.queue().approve(arena.item(spec.name).request_id)
    # eve resubmits ada's approved literal with less noise under the same job id
    literal = spec.to_dict()
    literal["plan"]["noise_multiplier"] = 0.3
    literal["name"] = "eves_copy"
    source = (
        render(spec).replace(spec.name, "eves_copy").replace(repr(spec.to_dict()), repr(literal))
    )
    submitted_and_refused(arena, "eves_copy", source, "job_id")
    # eve calls ada's approved code directly
    eve = arena.client(EVE)
    got: object
    try:
        got = sites.run_round(eve, spec, arena.asset(eve), "")
    except (SiteError, Exception) as exc:
        got = str(exc)
    assert not (isinstance(got, dict) and got.get("status") == "ok")
    assert_nothing_private(arena, got)
    assert_serving(arena)


# 13
def test_plain_syft_function_returning_data(arena) -> None:
    source = "def give(data, weights):\n    return data\n"
    submitted_and_refused(arena, "give", source, "template")
    lines = template_with("give2", job("give2").to_dict()).splitlines()
    lines.insert(3, "    weights = data.to_json()")
    submitted_and_refused(arena, "give2", "\n".join(lines) + "\n", "template")


# 14
def test_no_noise_and_epsilon_above_policy(arena) -> None:
    with pytest.raises(JobError, match="noise_multiplier"):
        job("no_noise", {"rounds": 1, "noise_multiplier": 0.0})
    literal = job("zero_noise").to_dict()
    literal["plan"]["noise_multiplier"] = 0.0
    submitted_and_refused(arena, "zero_noise", template_with("zero_noise", literal), "template")
    greedy = job("greedy", {"rounds": 1, "target_epsilon": 6.0, "batch_size": 64})  # policy: 3
    client = arena.client(EVE)
    asset = arena.asset(client)
    sites.submit(client, greedy, asset)
    item = arena.item(greedy.name)
    assert "dp_parameters" in {c.name for c in item.report.failures()}
    arena.queue().approve(item.request_id, override=True, reason="admin mistake")
    before = arena.spent(EVE)
    reply = sites.run_round(client, greedy, asset, "")
    assert reply["status"] == "refused" and "epsilon" in reply["reason"]
    assert arena.spent(EVE) == before
    assert_nothing_private(arena, reply)


# 17
def test_plan_that_would_blow_up_the_review(arena) -> None:
    for name, plan in (
        ("epochs_1e7", {"rounds": 1, "local_epochs": 10_000_000, "noise_multiplier": 1.0}),
        (
            "steps_1e6",
            {"rounds": 1000, "local_epochs": 100, "batch_size": 1, "noise_multiplier": 0.6},
        ),
    ):
        literal = job(name).to_dict()
        literal["plan"] = {**literal["plan"], **plan}
        client = arena.client(EVE)
        plain_submit(client, arena.asset(client), name, template_with(name, literal))
    started = time.perf_counter()
    bombs = {"epochs_1e7", "steps_1e6"}  # their reports: the rest of the queue is not the point
    listed = arena.queue().items(where=lambda r: r.code.service_func_name in bombs)
    items = {i.request.code.service_func_name: i for i in listed}
    assert time.perf_counter() - started < 60
    for name in ("epochs_1e7", "steps_1e6"):
        assert not items[name].report.passed
    assert_serving(arena)


# 18
def test_raw_code_is_the_template_but_syft_runs_something_else(arena) -> None:
    spec = job("decoy")
    client = arena.client(EVE)
    asset = arena.asset(client)
    plain_submit(client, asset, spec.name, render(spec), func_name="dict")
    item = arena.item("dict")
    failed = {c.name for c in item.report.failures()}
    assert "executed" in failed, item.report.to_dict()
    with pytest.raises(ReviewError, match="cannot be overridden"):
        arena.queue().approve(item.request_id, override=True, reason="looks like the template")
    got: object
    try:
        got = client.code.dict(data=asset, weights="")
    except Exception as exc:
        got = str(exc)
    assert_nothing_private(arena, got)
    assert_serving(arena)


# red team: researcher-supplied scaling that turns rows into infinities (a threshold query)
def test_scaling_that_would_overflow_rows(arena) -> None:
    literal = job("bad_scaling").to_dict()
    literal["scaling"] = {"mean": [0.0] * 30, "std": [1e-45] * 30}
    source = template_with("bad_scaling", literal)
    submitted_and_refused(arena, "bad_scaling", source, "template")


def _threshold_weights(spec, threshold: float) -> dict:
    """Weights that overflow to inf, then NaN in the loss, for rows whose feature 0 > threshold.

    Layer 0 computes x0 - threshold; ReLU keeps it only above the threshold; eleven gain layers
    of 1e4 each (every tensor within the norm bound) take any positive value past float32's
    range; the head turns it into logits (+inf, -inf), whose cross-entropy is NaN.
    """
    shapes = _shapes(spec)
    names = [n for n in shapes if n.endswith(".weight")]
    weights = {k: np.zeros(s, np.float32) for k, s in shapes.items()}
    weights[names[0]][0, 0] = 1.0
    weights["0.bias"][0] = -threshold
    for name in names[1:-1]:
        weights[name][0, 0] = 1e4
    weights[names[-1]][:, 0] = [1.0, -1.0]
    return weights


# red team: a NaN in one row's gradient turned the whole update NaN, and the release's refusal
# answered "is there a training row above this threshold?" once per round
def test_threshold_weights_cannot_turn_the_release_into_a_yes_no_answer(arena) -> None:
    gain = [{"type": "Linear", "in_features": 4, "out_features": 4} for _ in range(11)]
    layers = [
        {"type": "Linear", "in_features": 30, "out_features": 4},
        {"type": "ReLU"},
        *gain,
        {"type": "Linear", "in_features": 4, "out_features": 2},
    ]
    spec = job("threshold", {**PLAN, "rounds": 2}, layers)
    client = arena.client(EVE)
    asset = arena.asset(client)
    sites.submit(client, spec, asset)
    arena.queue().approve(arena.item(spec.name).request_id)
    replies = [
        sites.run_round(client, spec, asset, _encode(_threshold_weights(spec, t)))
        for t in (-5.0, 1e3)  # every row above the threshold; no row above it
    ]
    assert [r["status"] for r in replies] == ["ok", "ok"], replies
    for reply in replies:
        weights = np.load(io.BytesIO(base64.b64decode(reply["weights"])))
        assert all(np.isfinite(weights[k]).all() for k in weights.files)
        assert set(reply) == set(replies[0])
        assert set(reply["metrics"]) == set(replies[0]["metrics"])
    assert_nothing_private(arena, replies)
    assert_serving(arena)


# this stop's features: replaying a lost round, and DP site metrics, from a plain syft client
def test_replay_gives_no_free_round_and_metrics_are_only_noised_sums(arena) -> None:
    from policies.wire import ReplayLast

    replay = ReplayLast().encode()

    spec = job("replayer", {**PLAN, "rounds": 2})
    client = arena.client(EVE)
    asset = arena.asset(client)
    sites.submit(client, spec, asset)
    arena.queue().approve(arena.item(spec.name).request_id)

    def plain(weights: str) -> dict:  # the raw syft call, not the researcher package
        return getattr(client.code, spec.name)(data=asset, weights=weights).get()

    before = arena.spent(EVE)
    nothing = plain(replay)
    assert nothing["status"] == "refused" and "nothing was released" in nothing["reason"]
    assert arena.spent(EVE) == before  # a replay is never charged...
    first = sites.run_round(client, spec, asset, "")
    charged = arena.spent(EVE)
    assert first["status"] == "ok" and charged > before
    again = [plain(replay) for _ in range(2)]
    for reply in again:  # ...and trains nothing: the same weights, the same round
        assert reply["replayed"] is True and reply["round"] == 1
        assert reply["weights"] == first["weights"]
    assert arena.spent(EVE) == charged
    second = sites.run_round(client, spec, asset, "")
    third = sites.run_round(client, spec, asset, "")
    assert second["status"] == "ok" and second["round"] == 2  # replays took no round
    assert third["status"] == "refused" and "all have run" in third["reason"]
    for reply in (first, second, *again):  # no exact metric, no timing, leaves
        assert set(reply["metrics"]) == {"steps", "val_rows", "val_loss", "val_accuracy"}
    assert arena.spent(EVE) == charged
    assert_nothing_private(arena, [nothing, first, second, third, *again])
    assert_serving(arena)


def test_the_mock_and_its_metadata_from_a_plain_syft_client(arena) -> None:
    """A plain syft client reads the DP mock twin and its published metadata, as often as it
    likes: no private row is in the mock, the published means come from the DP release (not
    the private table), and the one public charge made at upload is all it costs."""
    from datasites.ledger.budget import BudgetLedger
    from datasites.ledger.store import SiteStore
    from datasites.serving.config import SiteDir

    client = arena.client(EVE)
    before = arena.spent(EVE)
    for _ in range(2):  # reading twice is free
        asset = arena.asset(client)
        mock = asset.mock
        meta = sites.asset_meta(asset)
    features = mock.drop(columns=["target"])
    assert_nothing_private(arena, {"mock": features.to_numpy(), "meta": meta})
    # post-processing of the DP release (datasites.data.mock._column_stats): each in its
    # published range, and not the private table's
    mean = np.asarray(meta["feature_mean"])
    assert np.all((mean >= meta["feature_low"]) & (mean <= meta["feature_high"]))
    assert not np.allclose(mean, arena.rows.mean(0), rtol=1e-6)
    assert arena.spent(EVE) == before
    ledger = BudgetLedger(SiteStore(SiteDir(arena.site.dir).db_path))
    public = ledger.public_releases(DATASET)
    assert [(r["kind"], r["public"]) for r in public] == [("mock", True)]
