"""FedAvg against np.average, and its typed errors."""

from __future__ import annotations

import numpy as np
import pytest

from researcher.errors import AggregationError
from researcher.rounds import pooled_scaling
from researcher.strategy import FedAvg, Update


def updates(rng: np.random.Generator, ns: list[int]) -> list[Update]:
    return [
        Update(
            f"s{i}",
            {
                "w": rng.normal(size=(3, 2)).astype(np.float32),
                "b": rng.normal(size=2).astype(np.float32),
            },
            n,
        )
        for i, n in enumerate(ns)
    ]


def test_fedavg_equals_weighted_np_average() -> None:
    rng = np.random.default_rng(0)
    ups = updates(rng, [10, 30, 60])
    out = FedAvg().aggregate(1, ups, ups[0].weights)
    for k in ("w", "b"):
        ref = np.average(np.stack([u.weights[k] for u in ups]), axis=0, weights=[10, 30, 60])
        np.testing.assert_allclose(out[k], ref, rtol=1e-6)


def test_fedavg_rejects_empty_and_mismatched_updates() -> None:
    rng = np.random.default_rng(1)
    ups = updates(rng, [5, 5])
    with pytest.raises(AggregationError, match="no updates"):
        FedAvg().aggregate(2, [], ups[0].weights)
    bad = Update("evil", {"w": np.zeros((4, 2), np.float32), "b": np.zeros(2, np.float32)}, 5)
    with pytest.raises(AggregationError, match="evil sent w of shape"):
        FedAvg().aggregate(2, [ups[0], bad], ups[0].weights)


def test_pooled_scaling_matches_the_pooled_data() -> None:
    rng = np.random.default_rng(2)
    parts = [rng.normal(loc=i, scale=1 + i, size=(50 * (i + 1), 3)) for i in range(3)]
    metas = [
        {"rows": len(p), "feature_mean": p.mean(0).tolist(), "feature_std": p.std(0).tolist()}
        for p in parts
    ]
    pooled = np.concatenate(parts)
    got = pooled_scaling(metas)
    np.testing.assert_allclose(got["mean"], pooled.mean(0), rtol=1e-9)
    np.testing.assert_allclose(got["std"], pooled.std(0), rtol=1e-9)


def test_pooled_scaling_leaves_out_a_site_whose_dp_range_missed() -> None:
    """A small site's DP mock can miss a column's range (std 1e9 where others say ~2)."""
    rng = np.random.default_rng(3)
    parts = [rng.normal(loc=5, scale=2, size=(100, 2)) for _ in range(3)]
    metas = [
        {"rows": len(p), "feature_mean": p.mean(0).tolist(), "feature_std": p.std(0).tolist()}
        for p in parts
    ]
    metas[1]["feature_mean"][0], metas[1]["feature_std"][0] = 3e8, 1e9
    got = pooled_scaling(metas)
    kept = np.concatenate([parts[0], parts[2]])[:, 0]
    np.testing.assert_allclose(got["mean"][0], kept.mean(), rtol=1e-9)
    np.testing.assert_allclose(got["std"][0], kept.std(), rtol=1e-9)
    np.testing.assert_allclose(got["std"][1], np.concatenate(parts)[:, 1].std(), rtol=1e-9)


def test_pooled_scaling_keeps_the_one_site_that_holds_a_columns_values() -> None:
    """Issue 25, label-skewed digits: a pixel blank at two of three sites publishes [0, 0.001]
    and a std of ~0 there. The median of the three stds was then ~0, the one site that holds
    the pixel's values (std 2.2, range [0, 10]) was left out as the outlier, and the pooled
    range [0, 0.001] clamped the column to nothing at every site. Blank sites are no witness
    to a column's spread: the values' site stays, the pooled range covers them, and the
    pooled std is the three sites' mixture."""
    rng = np.random.default_rng(4)
    values = np.clip(rng.normal(5, 2.5, 120), 0, 10)
    parts = [np.zeros(100), values, np.zeros(90)]
    metas = [
        {
            "rows": len(p),
            "feature_mean": [float(p.mean())],
            "feature_std": [float(p.std()) or 3e-4],
            "feature_low": [0.0],
            "feature_high": [10.0 if p.any() else 0.001],
        }
        for p in parts
    ]
    got = pooled_scaling(metas)
    assert (got["low"][0], got["high"][0]) == (0.0, 10.0)
    assert got["std"][0] == pytest.approx(np.concatenate(parts).std(), rel=1e-3)
    # a site whose std is ten times off the others' (a range that reached a noise spike) is
    # still left out when three sites hold the column's values
    spike = [dict(m, feature_high=[10.0], feature_std=[2.0]) for m in metas]
    spike[0] = dict(spike[0], feature_std=[9e4], feature_high=[1e6])
    assert pooled_scaling(spike)["high"][0] == 10.0


def _ups(*values: float, n: tuple[int, ...] | None = None) -> list[Update]:
    return [
        Update(f"s{i}", {"w": np.array([v], np.float32)}, (n or (1,) * len(values))[i])
        for i, v in enumerate(values)
    ]


def test_server_optimizers_follow_their_update_rules_by_hand() -> None:
    """Current w = 1, sites give 2 and 4 with rows 1 and 3: FedAvg 3.5, delta 2.5."""
    from researcher.strategy import FedAdam, FedAvgM, FedYogi

    current = {"w": np.array([1.0], np.float32)}
    ups = _ups(2.0, 4.0, n=(1, 3))
    assert FedAvg().aggregate(1, ups, current)["w"][0] == pytest.approx(3.5)
    m = FedAvgM(server_lr=1.0, momentum=0.9)
    first = m.aggregate(1, ups, current)["w"][0]  # v = 2.5; w = 1 + 2.5
    assert first == pytest.approx(3.5)
    second = m.aggregate(2, ups, {"w": np.array([first], np.float32)})["w"][0]
    assert second == pytest.approx(3.5 + (0.9 * 2.5 + 0.0))  # delta 0, v = 2.25
    adam = FedAdam(server_lr=0.1, beta_1=0.9, beta_2=0.99, tau=1e-9)
    # m = 0.1 * 2.5 = 0.25; v = 0.01 * 6.25 = 0.0625; w = 1 + 0.1 * 0.25 / 0.25 = 1.1
    assert adam.aggregate(1, ups, current)["w"][0] == pytest.approx(1.1, rel=1e-6)
    yogi = FedYogi(server_lr=0.01, beta_1=0.9, beta_2=0.99, tau=1e-3)
    # v = 0 - 0.01 * 6.25 * sign(0 - 6.25) = 0.0625; w = 1 + 0.01 * 0.25 / (0.25 + 0.001)
    assert yogi.aggregate(1, ups, current)["w"][0] == pytest.approx(1 + 0.0025 / 0.251, rel=1e-6)
    # a second Yogi step with v above delta^2 shrinks v additively, as Adam would not
    v_before = float(yogi.v["w"][0])
    yogi.aggregate(2, _ups(1.0, 1.0), {"w": np.array([0.0], np.float32)})  # delta 1
    assert float(yogi.v["w"][0]) == pytest.approx(v_before + 0.01 * 1.0)  # sign(0.0625 - 1) = -1


def test_robust_strategies_by_hand() -> None:
    from researcher.strategy import FedMedian, FedTrimmedAvg, NormBounded

    current = {"w": np.array([0.0, 0.0], np.float32)}
    ups = [
        Update(f"s{i}", {"w": np.array(v, np.float32)}, 1)
        for i, v in enumerate([[1.0, 5.0], [2.0, -1.0], [3.0, 0.0], [100.0, 2.0], [4.0, 1.0]])
    ]
    np.testing.assert_allclose(FedMedian().aggregate(1, ups, current)["w"], [3.0, 1.0])
    # trim 1 of 5 at each end: column 0 keeps 2, 3, 4; column 1 keeps 0, 1, 2
    np.testing.assert_allclose(FedTrimmedAvg(beta=0.2).aggregate(1, ups, current)["w"], [3.0, 1.0])
    bounded = NormBounded(max_norm=5.0).aggregate(1, ups[3:4] + ups[1:2], current)["w"]
    big = np.array([100.0, 2.0]) * 5.0 / np.hypot(100.0, 2.0)  # scaled to norm 5
    np.testing.assert_allclose(bounded, (big + np.array([2.0, -1.0])) / 2, rtol=1e-6)


def test_one_malicious_site_breaks_fedavg_but_not_the_robust_strategies(tmp_path) -> None:
    """Five in-process sites train for real; one sends its update scaled by -50 (sign flip and
    boost). FedAvg's global model moves far from the honest average; median and trimmed mean
    stay next to it, and norm bounding keeps the damage small."""
    from researcher.rounds import run_federation
    from researcher.site import InProcessSite
    from researcher.strategy import FedMedian, FedTrimmedAvg, NormBounded
    from tests.unit.test_round_loop import LocalSite, _spec, _table

    honest = [LocalSite(f"h{i}", _table(i)) for i in range(4)]

    def attacker(spec, weights):  # noqa: ANN001, ANN202
        from policies.wire import decode_weights, encode_weights

        reply = LocalSite("evil", _table(9))(spec, weights)
        start = decode_weights(weights) if weights else None
        w = decode_weights(reply["weights"])
        base = start or {k: np.zeros_like(v) for k, v in w.items()}
        reply["weights"] = encode_weights({k: base[k] - 50 * (w[k] - base[k]) for k in w})
        return reply

    def run(strategy, sites):  # noqa: ANN001, ANN202
        out = tmp_path / strategy.name / str(len(sites))
        return run_federation(None, _spec(1), out, sites=sites, strategy=strategy).weights[
            "0.weight"
        ]

    clean = run(FedAvg(), [s.site() for s in honest])
    for s in honest:
        s.trained = 0
    evil = InProcessSite("evil", {}, attacker)
    errors = {}
    for strategy in (FedAvg(), FedMedian(), FedTrimmedAvg(beta=0.2), NormBounded(max_norm=0.5)):
        for s in honest:
            s.trained = 0
        got = run(strategy, [*(s.site() for s in honest), evil])
        errors[strategy.name] = float(np.abs(got - clean).max())
    assert errors["fedavg"] > 5 * max(errors["median"], errors["trimmed-mean"])
    assert errors["norm-bounded"] < errors["fedavg"] / 5


# --- a strategy and its parameters, as a job file's STRATEGY names them (issue 27) -------------


def test_every_strategy_round_trips_through_its_config() -> None:
    from researcher.strategy import STRATEGIES, FedAvgM, strategy_config, strategy_from

    for name in STRATEGIES:
        made = strategy_from(name)
        config = strategy_config(made)
        assert config["name"] == name
        again = strategy_from(config)
        assert type(again) is type(made) and strategy_config(again) == config
    tuned = strategy_from({"name": "fedavgm", "server_lr": 0.5, "momentum": 0.5})
    assert isinstance(tuned, FedAvgM) and (tuned.server_lr, tuned.momentum) == (0.5, 0.5)
    assert strategy_config(tuned) == {"name": "fedavgm", "server_lr": 0.5, "momentum": 0.5}
    assert strategy_config(strategy_from("fedadam"))["beta_2"] == 0.99  # defaults spelled out


@pytest.mark.parametrize(
    ("config", "needle"),
    [
        ({"name": "fedavgm", "momentum": 1.0}, "momentum must be in [0, 1), got 1.0"),
        ({"name": "fedavgm", "server_lr": -0.1}, "server_lr must be > 0"),
        ({"name": "fedyogi", "tau": float("nan")}, "tau must be a number"),
        ({"name": "trimmed-mean", "beta": 0.5}, "beta must be in [0, 0.5), got 0.5"),
        ({"name": "norm-bounded", "max_norm": True}, "max_norm must be a number, got True"),
        ({"name": "fedavg", "server_lr": 1.0}, "'fedavg' has no parameter 'server_lr'"),
        (["fedavgm"], "a strategy is a name or a dict"),
    ],
)
def test_a_strategy_parameter_out_of_range_is_refused_by_name(config, needle: str) -> None:  # noqa: ANN001
    from researcher.strategy import strategy_from

    with pytest.raises(AggregationError) as caught:
        strategy_from(config)
    assert needle in str(caught.value)


def test_a_strategy_object_checks_its_parameters_too() -> None:
    """From Python a bad momentum diverged rounds later, far from where it was set."""
    from researcher.strategy import FedAdam, FedAvgM, NormBounded

    with pytest.raises(AggregationError, match="momentum must be in"):
        FedAvgM(momentum=1.5)
    with pytest.raises(AggregationError, match="beta_1 must be in"):
        FedAdam(beta_1=-0.1)
    with pytest.raises(AggregationError, match="max_norm must be > 0"):
        NormBounded(max_norm=0.0)


def test_a_run_records_its_strategy_for_a_resume(tmp_path) -> None:
    """The run's strategy.json names the strategy and parameters the rounds used: a resume
    without --strategy goes on with them (``api.strategy_for``), not with a default."""
    from researcher.rounds import Checkpoint, run_federation
    from researcher.strategy import FedAvgM, strategy_from
    from tests.unit.test_round_loop import LocalSite, _spec, _table

    assert Checkpoint.strategy_in(tmp_path) is None
    sites = [LocalSite(n, _table(i)).site() for i, n in enumerate("ab")]
    run_federation(None, _spec(1), tmp_path, sites=sites, strategy=FedAvgM(0.5, 0.25))
    recorded = Checkpoint.strategy_in(tmp_path)
    assert recorded == {"name": "fedavgm", "server_lr": 0.5, "momentum": 0.25}
    again = strategy_from(recorded)
    assert isinstance(again, FedAvgM) and again.momentum == 0.25
