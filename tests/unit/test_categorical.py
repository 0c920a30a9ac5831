"""Categorical columns: encoded at upload, published, laid out federation-wide, encoded at sites."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from datasites.data.mock import make_mock
from datasites.data.tables import validate_table
from datasites.errors import Refused, TableError
from policies.engine.mock_round import dry_run
from policies.engine.prepare import site_scaling, table_arrays
from policies.errors import PlanError
from policies.layout import align_stats, encode, encoded_names, federation_layout, width
from researcher.job import make_job
from researcher.rounds import pooled_scaling


def _bank(n: int = 400, regions: tuple[str, ...] = ("east", "north"), seed: int = 0):
    rng = np.random.default_rng(seed)
    return pd.DataFrame(
        {
            "balance": rng.normal(1000, 300, n),
            "region": rng.choice(list(regions), n),
            "student": rng.choice(["No", "Yes"], n),
            "default": rng.choice(["No", "Yes"], n, p=[0.8, 0.2]),
        }
    )


def _meta(table, name: str = "bank") -> dict:
    """What admin.upload publishes, less the syft part."""
    release = make_mock(table.frame, table.target, rows=300, seed=1)
    own = {"columns": [[c, table.categories().get(c)] for c in table.features]}
    x = encode(release.mock, table.target, own)
    return {
        "dataset": name,
        "target": table.target,
        "rows": release.rows,
        "schema": table.schema(),
        "categories": table.categories(),
        "feature_mean": x.mean(0).tolist(),
        "feature_std": [float(v) or 1.0 for v in x.std(0)],
    }, release


def test_text_columns_become_categoricals_with_sorted_published_categories() -> None:
    table = validate_table(_bank(), "default")
    assert table.frame["region"].dtype.name == "category"
    assert table.categories() == {"region": ["east", "north"], "student": ["No", "Yes"]}
    assert ["region", "category"] in table.schema()
    assert table.classes == ["No", "Yes"]  # a text target stays class codes
    assert sorted(table.frame["default"].unique()) == [0, 1]


def test_a_column_over_max_categories_is_refused_naming_it_and_its_count() -> None:
    frame = _bank(10_000)
    frame["account_id"] = [f"acct-{i}" for i in range(len(frame))]
    with pytest.raises(TableError, match=r"column 'account_id' has 10000 distinct text values"):
        validate_table(frame, "default")
    with pytest.raises(TableError, match=r"column 'region' has 2 .*--max-categories 1"):
        validate_table(_bank(), "default", max_categories=1)


def test_a_label_with_one_class_only_is_refused() -> None:
    frame = _bank()
    frame["default"] = "No"
    with pytest.raises(TableError, match=r"target column 'default' has one value only \('No'\)"):
        validate_table(frame, "default")


def test_missing_text_is_refused_not_turned_into_a_category() -> None:
    frame = _bank(20)
    frame.loc[3, "region"] = None
    with pytest.raises(TableError, match=r"missing values in column\(s\) region \(1\)"):
        validate_table(frame, "default")


def test_the_mock_draws_categoricals_from_the_published_categories_only() -> None:
    frame = _bank(4000, regions=("east", "north", "west"))
    frame.loc[frame.index[:3000], "region"] = "north"  # north is most of the table
    table = validate_table(frame, "default")
    mock = make_mock(table.frame, "default", rows=2000, seed=0).mock
    assert mock["region"].dtype.name == "category"
    assert list(mock["region"].cat.categories) == ["east", "north", "west"]
    share = (mock["region"] == "north").mean()
    assert 0.7 < share < 0.95, share  # true share: 0.75 + a third of the rest ~= 0.83


def test_the_federation_layout_unites_categories_seen_at_one_site_only() -> None:
    meta_a, _ = _meta(validate_table(_bank(regions=("east", "north")), "default"))
    meta_b, _ = _meta(validate_table(_bank(regions=("north", "south")), "default"))
    layout = federation_layout({"a": meta_a, "b": meta_b})
    assert layout == {
        "columns": [
            ["balance", None],
            ["region", ["east", "north", "south"]],
            ["student", ["No", "Yes"]],
        ]
    }
    assert width(layout) == 6
    assert encoded_names(layout)[:3] == ["balance", "region=east", "region=north"]
    assert (
        federation_layout({"a": {"target": "y", "schema": [["a", "float64"], ["y", "int64"]]}})
        is None
    )


def test_sites_that_disagree_on_columns_or_kinds_are_named() -> None:
    meta_a, _ = _meta(validate_table(_bank(), "default"))
    other = _bank().drop(columns=["student"])
    meta_b, _ = _meta(validate_table(other, "default"))
    with pytest.raises(PlanError, match="different feature columns"):
        federation_layout({"a": meta_a, "b": meta_b})
    numeric = _bank()
    numeric["region"] = 1.0
    meta_c, _ = _meta(validate_table(numeric, "default"))
    with pytest.raises(PlanError, match="'region' is categorical at a and numeric elsewhere"):
        federation_layout({"a": meta_a, "c": meta_c})


def test_each_site_encodes_to_the_layout_so_widths_match() -> None:
    table_a = validate_table(_bank(regions=("east", "north")), "default")
    table_b = validate_table(_bank(regions=("north", "south")), "default")
    layout = {
        "columns": [
            ["balance", None],
            ["region", ["east", "north", "south"]],
            ["student", ["No", "Yes"]],
        ]
    }
    xa, _ = table_arrays(table_a.frame, "default", layout)
    xb, _ = table_arrays(table_b.frame, "default", layout)
    assert xa.shape == (400, 6) and xb.shape == (400, 6)
    assert xa[:, 3].sum() == 0 and xb[:, 1].sum() == 0  # no south at a, no east at b
    north_b = (table_b.frame["region"] == "north").to_numpy()
    np.testing.assert_array_equal(xb[:, 2], north_b.astype(np.float32))
    np.testing.assert_array_equal(xa[:, 1:4].sum(1), np.ones(400, np.float32))  # one-hot
    np.testing.assert_allclose(xa[:, 0], table_a.frame["balance"].to_numpy(np.float32))


def test_a_value_outside_the_layout_and_a_table_without_layout_are_refused() -> None:
    table = validate_table(_bank(regions=("east", "north")), "default")
    narrow = {"columns": [["balance", None], ["region", ["east"]], ["student", ["No", "Yes"]]]}
    with pytest.raises(
        Refused, match=r"column 'region' holds values outside the layout: \['north'\]"
    ):
        table_arrays(table.frame, "default", narrow)
    with pytest.raises(Refused, match="region, student are categorical and the job carries no"):
        table_arrays(table.frame, "default")


def test_a_site_refuses_a_layout_missing_its_published_categories() -> None:
    table = validate_table(_bank(regions=("east", "north")), "default")
    meta, _ = _meta(table)
    narrow = {
        "columns": [["balance", None], ["region", ["east", "west"]], ["student", ["No", "Yes"]]]
    }
    model = [{"type": "Linear", "in_features": 5, "out_features": 2}]
    spec = make_job(model, "bank", "default", {"rounds": 1, "noise_multiplier": 1.0}, n_features=5)
    from dataclasses import replace

    with pytest.raises(Refused, match=r"lacks categories \['north'\] of column 'region'"):
        site_scaling(replace(spec, layout=narrow), meta)


def test_published_statistics_move_onto_the_layout_and_pool() -> None:
    meta_a, _ = _meta(validate_table(_bank(regions=("east", "north")), "default"))
    meta_b, _ = _meta(validate_table(_bank(regions=("north", "south"), seed=1), "default"))
    layout = federation_layout({"a": meta_a, "b": meta_b})
    mean_a, std_a = align_stats(meta_a, layout)
    assert mean_a[3] == 0.0 and std_a[3] == 1.0  # 'south' is not at a: standardised as is
    assert mean_a[1] == pytest.approx(meta_a["feature_mean"][1])
    aligned = []
    for meta in (meta_a, meta_b, meta_b):  # three sites: the outlier rule is on
        mean, std = align_stats(meta, layout, missing_std=0.0)
        aligned.append({**meta, "feature_mean": mean, "feature_std": std})
    pooled = pooled_scaling(aligned, [False, True, True, True, True, True])
    # b's 'region=south' on the layout (its own column 3 is 'student=No': comparing with that
    # failed when b's noised student share came out low, 2026-12-07)
    south_b = aligned[1]["feature_mean"][3]
    assert all(np.isfinite(pooled["mean"])) and 0 < pooled["mean"][3] < south_b


def test_a_dry_run_on_a_categorical_mock_trains_at_the_layout_width() -> None:
    table_a = validate_table(_bank(regions=("east", "north")), "default")
    meta_a, release = _meta(table_a)
    meta_b, _ = _meta(validate_table(_bank(regions=("north", "south")), "default"))
    layout = federation_layout({"a": meta_a, "b": meta_b})
    model = [{"type": "Linear", "in_features": width(layout), "out_features": 2}]
    plan = {"rounds": 1, "noise_multiplier": 1.0, "batch_size": 32}
    spec = make_job(model, "bank", "default", plan, n_features=width(layout))
    from dataclasses import replace

    out = dry_run(release.mock, "", replace(spec, layout=layout))
    assert out["status"] == "ok", out
    assert out["shapes"]["0.weight"] == [2, 6]
    with pytest.raises(PlanError, match=r"takes \[6\] inputs; the layout gives 1"):
        replace(spec, layout={"columns": [["balance", None]]})


def test_the_review_checks_the_layout_against_the_published_schema() -> None:
    from dataclasses import replace

    from datasites.review.access import DatasetPolicy
    from datasites.review.report import Submission, build_report
    from researcher.job import render

    meta, _ = _meta(validate_table(_bank(regions=("east", "north")), "default"))
    model = [{"type": "Linear", "in_features": 6, "out_features": 2}]
    spec = make_job(model, "bank", "default", {"rounds": 1, "noise_multiplier": 2.0}, n_features=6)

    def model_check(layout: dict) -> tuple[bool, str]:
        code = render(replace(spec, layout=layout))
        sub = Submission(code, "ada@uni.edu", "bank", 400, ("data", "weights"), 4, 2, (), "", meta)
        check = next(
            c for c in build_report(sub, DatasetPolicy(), set()).checks if c.name == "model"
        )
        return check.passed, check.reason

    wide = [["balance", None], ["region", ["east", "north", "south"]], ["student", ["No", "Yes"]]]
    passed, reason = model_check({"columns": wide})
    assert passed and "one-hot layout of region, student" in reason and "(6 inputs)" in reason
    lacking = [["balance", None], ["region", ["east", "south", "west"]], ["student", ["No", "Yes"]]]
    passed, reason = model_check({"columns": lacking})
    assert not passed and "lacks categories ['north'] of column 'region'" in reason


def test_validation_leaves_the_callers_frame_as_it_was() -> None:
    """validate_table copies no data (a 1M-row table), yet never writes into the caller's."""
    frame = _bank(50)
    frame["flag"] = frame["balance"] > 1000
    before = frame.copy()
    table = validate_table(frame, "default")
    pd.testing.assert_frame_equal(frame, before)
    assert table.frame["flag"].dtype == np.int64 and table.frame["region"].dtype.name == "category"


LAYOUT = {
    "columns": [
        ["balance", None],
        ["region", ["east", "north", "south"]],
        ["student", ["No", "Yes"]],
    ]
}


def test_the_test_split_and_a_site_encode_the_same_rows_identically(tmp_path) -> None:  # noqa: ANN001
    """The researcher's --test rows and a site's rows go through one encoding
    (``policies.layout.features``): the same table, a CSV at the researcher and validated at the
    site (text columns stored as categoricals, the target as class codes), gives the same x."""
    from researcher.api import read_test_rows as _test_split

    raw = _bank(300, regions=("east", "north", "south"), seed=3)
    raw["balance"] = raw["balance"].round(2)  # a CSV round trip keeps every value
    path = tmp_path / "test.csv"
    raw.to_csv(path, index=False)
    table = validate_table(raw, "default")
    site_x, site_y = table_arrays(table.frame, "default", LAYOUT)
    test_x, test_y = _test_split(path, "default", LAYOUT, table.classes)
    assert test_x.dtype == site_x.dtype == np.float32 and site_x.shape == (300, 6)
    np.testing.assert_array_equal(test_x, site_x)
    np.testing.assert_array_equal(test_y, site_y)


def test_text_columns_without_a_layout_are_one_line_at_a_site_and_at_the_researcher(
    tmp_path,  # noqa: ANN001
) -> None:
    """The same refusal on both sides; the --test split once crashed on a text column with
    numpy's "could not convert string to float"."""
    from researcher.api import read_test_rows as _test_split
    from researcher.errors import JobError

    raw = _bank(50)
    path = tmp_path / "test.csv"
    raw.to_csv(path, index=False)
    why = "region, student are categorical and the job carries no one-hot layout"
    with pytest.raises(Refused, match=why):
        table_arrays(validate_table(raw, "default").frame, "default")
    with pytest.raises(JobError, match=f"test file {path}: column\\(s\\) {why}"):
        _test_split(path, "default", None, ["No", "Yes"])
