"""The bank demo's data and split (no server): ISLP's Default table, read from the installed
package, split into three banks by a realistic skew, and its summary over seeds."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

pytest.importorskip("ISLP", reason="scripts/setup installs islp==0.6.0 --no-deps")
sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts"))

import demo_bank  # noqa: E402


def test_default_is_read_and_split_by_students_and_balances() -> None:
    frame = demo_bank.load_default()
    assert len(frame) == 10_000 and (frame["default"] == "Yes").sum() == 333
    shares, test = demo_bank.split_banks(frame, seed=0)
    campus, private, mixed = shares
    assert len(test) == 2_500 and sum(map(len, shares)) == 7_500
    assert set(campus["student"]) == {"Yes"} and set(private["student"]) == {"No"}
    assert set(mixed["student"]) == {"Yes", "No"}  # the rest of both groups: mixed
    rates = [demo_bank.labels(s).mean() for s in shares]
    assert rates[1] > 2 * rates[0] and rates[0] > 2 * rates[2]  # high balances default most
    assert private["balance"].min() >= frame["balance"].quantile(0.75)
    other, _ = demo_bank.split_banks(frame, seed=1)
    assert len(other[0]) != len(campus)  # each seed draws its own split


def test_the_summary_gives_mean_and_range_per_figure() -> None:
    runs = [
        {
            "auc": a,
            "recall_at_50_precision": r,
            "centralized_auc": 0.95,
            "balanced_accuracy": 0.8,
            "pr_auc": 0.5,
            "centralized_recall_at_50_precision": 0.6,
            "seconds": 10.0,
            "privacy": {"b": {"epsilon": 3.2}},
        }
        for a, r in ((0.90, 0.4), (0.96, 0.7), (0.93, 0.5))
    ]
    out = demo_bank.summarise(runs)
    assert out["auc"] == pytest.approx(0.93) and (out["auc_min"], out["auc_max"]) == (0.90, 0.96)
    assert out["recall_at_50_precision_max"] == 0.7 and out["seconds"] == 30.0
    assert out["runs"] == 3 and out["privacy"] == {"b": {"epsilon": 3.2}}
