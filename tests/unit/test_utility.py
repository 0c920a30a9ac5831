"""Utility warnings from public numbers: they fire on a job that cannot learn, name the cause and
the fix, stay quiet on a good plan, and never fail the admin's report."""

from __future__ import annotations

import pytest

from datasites.review.access import DatasetPolicy
from datasites.review.report import Submission, build_report
from policies import utility
from policies.autoplan import SiteNumbers, suggest
from policies.plan import TrainingPlan
from policies.privacy import privacy_plan
from researcher.job import make_job, render

FEATURES = [f"x{i}" for i in range(13)]


def meta(rows: int, mock_epsilon: float = 1.0, **extra) -> dict:
    """A site's published metadata, as an upload writes it (wine-like: 13 columns, 3 classes)."""
    return {
        "target": "y",
        "rows": rows,
        "mock_rows": min(rows, 1000),
        "mock_epsilon": mock_epsilon,
        "mock_delta": 1e-5,
        "schema": [[c, "float64"] for c in FEATURES] + [["y", "int64"]],
        "classes": ["0", "1", "2"],
        "n_classes": 3,
        "class_counts": [rows / 3] * 3,
        "feature_mean": [0.0] * 13,
        "feature_std": [1.0] * 13,
        **extra,
    }


def kinds(warnings: list[utility.UtilityWarning]) -> list[str]:
    return [w.kind for w in warnings]


def test_a_step_that_is_mostly_noise_is_named_with_its_fix() -> None:
    plan = TrainingPlan.of(
        batch_size=2,
        rounds=30,
        local_epochs=5,
        target_epsilon=1.0,
        site_metrics=False,
        accountant="rdp",
    )
    sigma = privacy_plan(plan, 300).noise_multiplier
    found = utility.step_warnings(plan, {"a": 300}, {"a": sigma})
    assert kinds(found) == ["step_noise"]
    assert "at a" in found[0].cause and "raise batch_size" in found[0].fix


def test_the_auto_plan_on_the_same_site_raises_no_step_warning() -> None:
    auto = suggest([SiteNumbers("a", 300)], 1.0, {"accountant": "rdp"})
    assert utility.step_warnings(auto.plan(), {"a": 300}, auto.noise_multiplier) == []


def test_a_huge_sigma_over_a_small_batch_warns_and_a_small_one_does_not() -> None:
    plan = TrainingPlan.of(batch_size=32, target_epsilon=3.0)
    assert kinds(utility.step_warnings(plan, {"a": 1_000}, {"a": 40.0})) == ["step_noise"]
    assert utility.step_warnings(plan, {"a": 1_000}, {"a": 1.0}) == []


def test_statistics_from_a_small_mock_warn_with_a_mock_epsilon_that_suffices() -> None:
    plan = TrainingPlan.of(target_epsilon=3.0)
    found = utility.statistic_warnings({"a": meta(66)}, plan)
    assert kinds(found) == ["statistics"]
    text = found[0].text
    assert "66-row mock at epsilon 1" in text and "x0" in text and "declare bounds" in text
    wanted = float(text.split("--mock-epsilon ")[1].split(",")[0])
    assert wanted > 1.0
    # at the suggested epsilon, the same site no longer warns
    assert utility.statistic_warnings({"a": meta(66, mock_epsilon=wanted)}, plan) == []


def test_the_rows_the_check_asks_for_clear_the_mocks_range_search_bar() -> None:
    """The check stands in for the mock's range search without importing it (policies/ does
    not import datasites/): a site it passes must have rows enough for the search's widest
    window on a small table's grid to stand clear, or a silent check hides a weak range."""
    import math

    from datasites.data import mock

    bins = len(mock.GRID) - 1
    widths = range(1, mock.MAX_WIDTH + 1)
    bar = mock._threshold(sum(bins - w + 1 for w in widths)) * math.sqrt(mock.MAX_WIDTH)
    assert utility.RANGE_SIGMAS * math.sqrt(utility.RANGE_WINDOW) >= bar


def test_statistics_of_a_large_site_bounded_columns_or_no_scaling_do_not_warn() -> None:
    plan = TrainingPlan.of(target_epsilon=3.0)
    assert utility.statistic_warnings({"a": meta(5_000)}, plan) == []
    bounds = {c: [0.0, 10.0] for c in FEATURES}
    assert utility.statistic_warnings({"a": meta(66, bounds=bounds)}, plan) == []
    unscaled = TrainingPlan.of(target_epsilon=3.0, standardize=False)
    assert utility.statistic_warnings({"a": meta(66)}, unscaled) == []


def test_the_owner_is_told_at_upload_to_declare_bounds_where_the_mock_cannot_read_them() -> None:
    """The same test as the researchers' warning, phrased for the one who can fix it free."""
    found = utility.upload_warning(meta(66))
    assert found is not None and found.kind == "statistics"
    assert "--bounds FILE" in found.fix and "x0" in found.cause and "66 rows" in found.cause
    wanted = float(found.fix.split("--mock-epsilon ")[1])
    assert utility.upload_warning(meta(66, mock_epsilon=wanted)) is None
    assert utility.upload_warning(meta(5_000)) is None
    assert utility.upload_warning(meta(66, bounds={c: [0.0, 10.0] for c in FEATURES})) is None


def test_an_upload_of_a_small_table_advises_bounds_and_one_with_bounds_does_not() -> None:
    """What ``admin.upload`` returns to the owner, from the metadata it really publishes."""
    from sklearn.datasets import load_wine

    from datasites.data.mock import make_mock
    from datasites.data.tables import validate_table
    from datasites.serving.admin import _advice, _meta

    frame = load_wine(as_frame=True).frame.iloc[::2]  # 89 rows, 13 columns, 3 classes
    table = validate_table(frame, "target")
    advice = _advice(_meta(table, "wine", make_mock(table.frame, "target")))
    assert len(advice) == 1 and "--bounds" in advice[0]
    assert any(c in advice[0] for c in table.features)  # the weak ranges are named first
    # it speaks in published numbers only: the DP row count, never the private one (89)
    published = _meta(table, "wine", make_mock(table.frame, "target"))
    (text,) = _advice(published)
    assert f"for {published['rows']} rows" in text
    if published["rows"] != len(table.frame):
        assert f"for {len(table.frame)} rows" not in text
    declared = {c: (0.0, 2000.0) for c in table.features}
    bounded = _meta(table, "wine", make_mock(table.frame, "target", bounds=declared))
    assert _advice(bounded) == []


def test_a_site_whose_std_is_far_off_the_others_is_named_by_column() -> None:
    wild = meta(5_000, feature_std=[1.0] * 7 + [3.7e7] + [1.0] * 5)
    metas = {"a": meta(5_000), "b": meta(5_000), "c": wild}
    found = utility.statistic_warnings(metas, TrainingPlan.of(target_epsilon=3.0))
    assert len(found) == 1 and "column x7" in found[0].cause and "at c" in found[0].cause


def test_a_column_blank_at_two_sites_names_no_outlier() -> None:
    """Label skew leaves a pixel blank at two sites (range [0, 0.001], std ~0): the one site
    that holds its values is not "far off the others", and nothing is named; the pooling keeps
    that site too (researcher.rounds.pooled_scaling)."""
    ranged = {"feature_low": [0.0] * 13, "feature_high": [10.0] * 13}
    blank = dict(ranged, feature_high=[0.001] + [10.0] * 12)
    sites = {
        "a": meta(5_000, feature_std=[3e-4] + [1.0] * 12, **blank),
        "b": meta(5_000, feature_std=[2.2] + [1.0] * 12, **ranged),
        "c": meta(5_000, feature_std=[3e-4] + [1.0] * 12, **blank),
    }
    plan = TrainingPlan.of(target_epsilon=3.0)
    assert utility.statistic_warnings(sites, plan) == []
    # without the ranges, the same stds name b's column x0 as the outlier
    bare = {k: {f: v for f, v in m.items() if f not in ranged} for k, m in sites.items()}
    found = utility.statistic_warnings(bare, plan)
    assert len(found) == 1 and "column x0" in found[0].cause and "at b" in found[0].cause


def test_a_class_fewer_rows_than_batches_warns_and_a_big_batch_fixes_it() -> None:
    rare = {"a": meta(5_000, class_counts=[4_000, 990, 10])}
    small = TrainingPlan.of(batch_size=16, target_epsilon=3.0, validation_fraction=0.0)
    found = utility.class_warnings(small, rare)
    assert kinds(found) == ["classes"] and "class 2" in found[0].cause
    big = TrainingPlan.of(batch_size=1024, target_epsilon=3.0, validation_fraction=0.0)
    assert utility.class_warnings(big, rare) == []


def test_a_good_plan_on_a_good_federation_has_no_warning() -> None:
    metas = {s: meta(5_000, mock_epsilon=1.0) for s in ("a", "b", "c")}
    numbers = [SiteNumbers.from_meta(s, m) for s, m in metas.items()]
    auto = suggest(numbers, 3.0, {"accountant": "rdp"})
    assert utility.utility_warnings(auto.plan(), metas, auto.noise_multiplier) == []


MODEL = [{"type": "Linear", "in_features": 13, "out_features": 3}]


@pytest.mark.parametrize("rows", [66, 5_000])
def test_the_review_lists_warnings_apart_and_still_passes(rows: int) -> None:
    spec = make_job(
        MODEL,
        "wine",
        "y",
        {
            "rounds": 2,
            "batch_size": 2,
            "local_epochs": 20,
            "target_epsilon": 1.0,
            "site_metrics": False,
            "accountant": "rdp",
        },
        n_features=13,
        n_outputs=3,
    )
    sub = Submission(
        render(spec), "ada@uni.edu", "wine", rows, ("data", "weights"), 13, 3, (), "", meta(rows)
    )
    policy = DatasetPolicy(allowed_domains=["uni.edu"])

    def noise_of(job, n):  # noqa: ANN001, ANN202
        return privacy_plan(job.plan, n).noise_multiplier

    report = build_report(sub, policy, set(), noise_of=noise_of)
    assert report.passed, report.to_dict()
    names = [w.name for w in report.warnings]
    assert "utility (classes)" in names  # batches of 2 rows, 3 classes
    assert ("utility (statistics)" in names) == (rows == 66)
    assert report.to_dict()["warnings"][0]["reason"]
    assert build_report(sub, policy, set()).warnings == []  # no noise_of: not run
