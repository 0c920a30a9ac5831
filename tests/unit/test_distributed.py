"""A site's share of a distributed DP-SGD step: the integer sum is the clipped gradients' sum
times gamma, every row stays within the accounted sensitivities, and the noise is the share."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from policies import skellam
from policies.engine.distributed import SUM, _clip_scale_round, distributed_step
from policies.engine.mock_round import dry_run
from policies.engine.round_task import RoundTask
from policies.plan import JobSpec, TrainingPlan
from policies.torch_model import build
from tests.unit.distributed_job import MODEL, small_table, start_weights

PEERS = tuple(c * 64 for c in "abc")


def _plan(**kw) -> TrainingPlan:  # noqa: ANN003
    fields = {
        "aggregation": "secure",
        "dp": "distributed",
        "peers": PEERS,
        "site_metrics": False,
        "noise_multiplier": 1.0,
        "sample_rate": 1.0,
        "batch_size": 50,
        "standardize": False,
        "max_grad_norm": 0.5,
        **kw,
    }
    return TrainingPlan.of(**fields)


def test_the_sum_is_gamma_times_the_clipped_gradients_at_sample_rate_one() -> None:
    x, y = small_table()
    plan = _plan()
    weights = start_weights()
    task = RoundTask(MODEL, plan.to_dict(), x.copy(), y, 0, None, weights, 1e-9)
    got = distributed_step(task, _test_seed=1).weights[SUM]
    model = build(MODEL)
    for name, p in model.named_parameters():
        p.data = torch.as_tensor(weights[name])
    rows = []
    for i in range(len(x)):
        model.zero_grad()
        out = model(torch.as_tensor(x[i : i + 1]))
        torch.nn.functional.cross_entropy(out, torch.as_tensor(y[i : i + 1])).backward()
        g = torch.cat([p.grad.reshape(-1) for p in model.parameters()]).double().numpy()
        rows.append(g * min(1.0, 0.5 / np.linalg.norm(g)))
    gamma = skellam.scale(0.5, got.size, 50)
    expected = gamma * np.sum(rows, axis=0)
    # rounding adds at most one unit per row and coordinate, about sqrt(50) in sum
    assert got.dtype == np.int64
    assert np.max(np.abs(got - expected)) < 50
    assert np.abs(expected).max() > 10 * 50  # the check above is not trivially met


def test_each_rounded_row_stays_within_the_accounted_sensitivities() -> None:
    rng = np.random.default_rng(2)
    grads = rng.normal(size=(64, 300)) * 1e6  # far past the clip
    grads[0] = 0.0
    grads[1, :] = 1e-3
    gamma = skellam.scale(1.0, 300, 64)
    rounded = _clip_scale_round(grads, 1.0, gamma, rng.random)
    l2, l1 = skellam.sensitivities(1.0, 300, gamma)
    assert np.linalg.norm(rounded, axis=1).max() <= l2
    assert np.abs(rounded).sum(axis=1).max() <= l1
    assert np.abs(rounded[0]).max() == 0


def test_non_finite_rows_add_nothing_and_the_noise_is_the_share() -> None:
    x, y = small_table(200)
    x[:100] = np.nan  # rows that would poison a sum contribute zero instead
    plan = _plan(batch_size=200, colluding_sites=1)
    task = RoundTask(MODEL, plan.to_dict(), x.copy(), y, 0, None, start_weights(), 2.0)
    totals = np.stack([distributed_step(task, _test_seed=s).weights[SUM] for s in range(40)])
    assert np.isfinite(totals).all()
    gamma = skellam.scale(0.5, totals.shape[1], 200)
    l2, _ = skellam.sensitivities(0.5, totals.shape[1], gamma)
    share = (2.0 * l2) ** 2 / plan.honest_sites  # 1/(3 - 1) of the total variance
    noise_var = totals.var(axis=0).mean()  # the sampled rows are the same: only noise varies
    assert plan.honest_sites == 2
    assert math.isclose(noise_var, share, rel_tol=0.25)


def test_a_distributed_dry_run_on_the_mock_returns_weights_one_step_away() -> None:
    x, y = small_table(120)
    import pandas as pd

    frame = pd.DataFrame(x, columns=[f"f{i}" for i in range(4)]).assign(label=y)
    spec = JobSpec("dist", "t", "label", MODEL, _plan(sample_rate=0.5, noise_multiplier=0.8))
    result = dry_run(frame, "", spec, n_classes=2)
    assert result["status"] == "ok" and result["mode"] == "dry-run"
    assert result["privacy"]["noise_multiplier"] == pytest.approx(0.8)
    assert "weights" in result


def test_a_distributed_round_completes_from_the_survivors_when_min_sites_allows(tmp_path) -> None:  # noqa: ANN001
    """Three peers, min_sites 2: one site never masks; the two survivors' pair seeds with it
    remove its masks, and the sum is exactly the survivors' two noised sums. Each survivor's
    share was sized for 2 honest sites, so the sum still carries the plan's noise."""
    from datasites.errors import Refused
    from datasites.ledger.store import SiteStore
    from datasites.training.job_state import JobState
    from datasites.training.secure_agg import SecureSite
    from policies import secagg
    from policies.wire import Participant, SecAggMask, SecAggSign, SecAggUnmask

    seeds = ("11" * 32, "22" * 32, "33" * 32)
    peers = tuple(
        secagg.fingerprint(secagg.public_bytes(secagg.identity_of(s).public_key())) for s in seeds
    )
    plan = _plan(peers=peers, min_sites=2)
    assert plan.honest_sites == 2
    spec = JobSpec("dist", "t", "label", MODEL, plan)
    sites = [
        SecureSite(JobState(SiteStore(tmp_path / f"s{i}.db")), "code", spec, seed)
        for i, seed in enumerate(seeds)
    ]
    entries = [s.hello()["secagg"] for s in sites]
    env = SecAggMask("r1", "", tuple(Participant.from_dict(e) for e in entries))
    x, y = small_table()
    sums, masked = [], []
    for site in sites[:2]:  # the third site dies before it masks
        pair = site.check_round(env, plan.survivors_needed)
        task = RoundTask(MODEL, plan.to_dict(), x.copy(), y, 0, None, start_weights(), 1.0)
        sums.append(distributed_step(task).weights[SUM])
        masked.append(site.masked_integers(env, pair, sums[-1]))
    survivors = tuple(sorted(s.me for s in sites[:2]))
    sign = SecAggSign("r1", survivors)
    signatures = {s.me: s.sign(sign, plan.survivors_needed)["signature"] for s in sites[:2]}
    unmask = SecAggUnmask("r1", survivors, signatures)
    opened = [s.unmask(unmask, plan.survivors_needed) for s in sites[:2]]
    size = sums[0].size
    total = secagg.unmask_sum(
        [secagg.decode_vector(m["masked"], size) for m in masked],
        [secagg.unb64(o["self_seed"], 32) for o in opened],
        [
            (s.me, gone, secagg.unb64(seed, 32))
            for s, o in zip(sites[:2], opened, strict=True)
            for gone, seed in o["dropped"].items()
        ],
    )
    assert skellam.signed(total).tolist() == (sums[0] + sums[1]).tolist()
    # one survivor alone is refused: fewer than min_sites
    with pytest.raises(Refused, match="fewer than the 2"):
        sites[0].sign(SecAggSign("r1", (sites[0].me,)), plan.survivors_needed)
