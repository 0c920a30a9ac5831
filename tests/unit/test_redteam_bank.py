"""Red team of the categorical upload, the one-hot layout, the imbalance features and the
PostgreSQL back end, in-process with the site's own code.

A test marked ``xfail(strict=True)`` reproduces a leak that is still there: it asserts what
should hold, and fails today. The others are attacks that held; they pin that down.
"""

from __future__ import annotations

import io
import sys
import tracemalloc
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from sqlalchemy.engine import URL

from datasites.data.mock import make_mock
from datasites.data.store import read_private, write_private
from datasites.data.tables import load_table, validate_table
from datasites.errors import Refused, TableError
from datasites.ledger.audit import AuditLog
from datasites.ledger.budget import BudgetLedger
from datasites.ledger.store import SiteStore, check_db_url
from policies import imbalance
from policies.accounting import Mechanism
from policies.engine.prepare import ENCODED_BYTES_PER_VALUE, site_scaling, table_arrays
from policies.layout import MAX_WIDTH, check_layout, width
from policies.plan import JobSpec

RARE = "HIV+ (patient 4711)"


def _clinic(n: int = 400, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    return pd.DataFrame(
        {
            "age": rng.integers(20, 80, n),
            "dx": rng.choice(["cold", "flu"], n),
            "y": rng.choice([0, 1], n),
        }
    )


def _published(table, rows: int = 300) -> dict:
    """What ``datasites.serving.admin.upload`` publishes for ``table`` (its own ``_meta``)."""
    from datasites.serving.admin import _meta

    release = make_mock(table.frame, table.target, rows=rows, seed=1)
    return {**_meta(table, "clinic", release), "mock": release.mock}


# ---------------------------------------------------------------------------------------------
# 1. Category lists and label sets: published from the private rows, with no noise and no
#    minimum count. Adding or removing one row changes them deterministically (epsilon = inf).


def test_a_category_held_by_one_row_is_not_published() -> None:
    frame = _clinic()
    frame.loc[7, "dx"] = RARE  # one patient's free-text value, <= --max-categories distinct
    table = validate_table(frame, "y")
    meta = _published(table)
    published = str({k: v for k, v in meta.items() if k != "mock"})
    mock_categories = meta["mock"]["dx"].cat.categories.tolist()
    assert RARE not in published and RARE not in mock_categories


def test_one_text_cell_does_not_publish_a_numeric_columns_values(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    ages = rng.choice([23, 31, 47, 58, 64, 71, 88, 102], 200)
    frame = pd.DataFrame({"age": ages.astype(str), "y": rng.choice([0, 1], 200)})
    frame.loc[3, "age"] = "unknown"  # a typical stray cell; pyarrow does not read it as null
    path = tmp_path / "clinic.csv"
    frame.to_csv(path, index=False)
    with pytest.raises(TableError, match="numbers and text"):  # refused, nothing published
        validate_table(load_table(path), "y")


def test_decimal_and_date_columns_do_not_publish_their_values(tmp_path: Path) -> None:
    import decimal

    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = np.random.default_rng(2)
    n = 30
    balances = [decimal.Decimal(f"{v}.17") for v in rng.integers(100, 99_999, n)]
    births = pd.to_datetime(rng.integers(0, 20_000, n), unit="D")
    table = pa.table(
        {
            "balance": pa.array(balances, pa.decimal128(12, 2)),
            "born": pa.array(births),
            "y": pa.array(rng.choice([0, 1], n)),
        }
    )
    path = tmp_path / "bank.parquet"
    pq.write_table(table, path)
    with pytest.raises(TableError, match="dates"):  # dates are refused, not published
        validate_table(load_table(path), "y")
    pq.write_table(table.drop(["born"]), path)
    checked = validate_table(load_table(path), "y")  # decimals are numbers
    assert checked.categories() == {}
    assert checked.frame["balance"].dtype == np.float64
    assert str(balances[0]) not in str(_published(checked)["categories"])


def test_a_float_targets_exact_values_are_not_in_the_mock() -> None:
    frame = _clinic()
    frame["y"] = frame["y"].astype(float)
    frame.loc[9, "y"] = 73.25  # one row's exact lab value
    table = validate_table(frame, "y")
    meta = _published(table)
    assert 73.25 not in set(meta["mock"]["y"].tolist())
    assert meta["n_classes"] is None  # it is a continuous target, not a label set


def test_a_text_targets_values_are_capped_like_a_features_categories() -> None:
    frame = _clinic(300)
    frame["y"] = [f"patient {i} / SSN 078-05-{1000 + i}" for i in range(len(frame))]
    with pytest.raises(TableError, match="distinct text values"):  # refused: nothing published
        validate_table(frame, "y")


def test_class_counts_and_feature_stats_come_from_the_mock_only() -> None:
    """Held: class_counts / feature_mean / feature_std are post-processing of the DP mock;
    two tables differing in one row's label give the same statistics for the same mock."""
    frame = _clinic()
    table = validate_table(frame, "y")
    meta = _published(table)
    mock = meta["mock"]
    shares = mock["y"].value_counts(normalize=True).reindex([0, 1]).to_numpy()
    assert meta["class_counts"] == [round(float(s) * meta["rows"], 1) for s in shares]
    assert meta["class_codes"] is True  # decided by dtype and schema, not counts


# ---------------------------------------------------------------------------------------------
# 2. The one-hot layout: a padded layout passes the site's check and the review's model check,
#    and is expanded in the *server* process (outside the trainer's memory limit), before any
#    charge: memory = exact rows x researcher-chosen width.


def _spec(layout: dict) -> JobSpec:
    import dataclasses

    from researcher.job import make_job

    spec = make_job(
        [{"type": "Linear", "in_features": width(layout), "out_features": 2}],
        "clinic",
        "y",
        {"rounds": 1, "noise_multiplier": 5.0, "batch_size": 64},
        name="pad",
        n_features=width(layout),
        n_outputs=2,
    )
    return dataclasses.replace(spec, layout=layout)


def test_a_padded_layout_cannot_make_the_server_expand_the_table_past_its_memory_limit() -> None:
    n = 1000
    table = validate_table(_clinic(n), "y")
    meta = {k: v for k, v in _published(table).items() if k != "mock"}
    pad = sorted({"cold", "flu", *(f"zz{i:05d}" for i in range(MAX_WIDTH - 3))})
    layout = {"columns": [["age", None], ["dx", pad]]}
    check_layout(layout)
    spec = _spec(layout)
    site_scaling(spec, meta)  # 1,000 rows: 160 MB, allowed
    frame = table.frame
    tracemalloc.start()
    try:
        table_arrays(frame, "y", spec.layout)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    per_row = peak / n
    # README "Scale": 1M-row tables are a supported upload; there the padded layout is refused
    # before anything is encoded or charged, from the published row count
    with pytest.raises(Refused, match="GiB"):
        site_scaling(spec, {**meta, "rows": 1_000_000})
    assert per_row <= ENCODED_BYTES_PER_VALUE * width(layout) * 1.5


def test_a_layout_is_checked_against_the_published_schema_alone() -> None:
    """Held: refusal of a layout lacking a category is decided from metadata, and encoding
    under a covering layout never fails on a row (no row-dependent refusal)."""
    table = validate_table(_clinic(), "y")
    meta = {k: v for k, v in _published(table).items() if k != "mock"}
    short = {"columns": [["age", None], ["dx", ["cold"]]]}
    with pytest.raises(Refused, match="lacks categories"):
        site_scaling(_spec(short), meta)
    ok = {"columns": [["age", None], ["dx", ["cold", "flu", "zzz"]]]}
    x, _ = table_arrays(table.frame, "y", ok)
    assert x.shape == (len(table.frame), 4) and x[:, 3].sum() == 0


# ---------------------------------------------------------------------------------------------
# 3. The score histogram: each row lands in exactly one bin whatever its score (NaN, +-inf,
#    1e308), so a swap moves two counts by one (L2 sqrt 2) as charged.


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf, 1e308, -1e308, 8.0, -8.0])
def test_one_row_moves_one_bin_whatever_its_score(bad: float) -> None:
    rng = np.random.default_rng(0)
    scores = rng.normal(0, 3, 200)
    labels = rng.choice([0.0, 1.0, 2.0, -1.0, np.nan], 200)
    base = imbalance.histograms(scores[1:], labels[1:])
    for label in (0.0, 1.0, np.nan, 7.0):
        with_row = imbalance.histograms(np.r_[bad, scores[1:]], np.r_[label, labels[1:]])
        diff = with_row - base
        assert diff.sum() == 1 and np.abs(diff).sum() == 1


def test_balanced_weights_never_read_private_labels() -> None:
    """Held: 'balanced' is resolved from the published counts; without them it is refused."""
    from policies.errors import PlanError
    from policies.plan import TrainingPlan

    plan = TrainingPlan.of(noise_multiplier=1.0, class_weight="balanced")
    assert imbalance.resolve(plan, [90.0, 10.0]).imbalance.class_weight == pytest.approx(
        (100 / 180, 5.0)
    )
    with pytest.raises(PlanError):
        imbalance.resolve(plan, None)


# ---------------------------------------------------------------------------------------------
# 4. The private table's file: what a refusal tells the researcher.


def test_a_refusal_about_the_table_file_names_no_site_path(tmp_path: Path) -> None:
    stub = write_private(tmp_path, "clinic", _clinic(20))
    (tmp_path / "tables" / stub["fedsite_table"].iloc[0]).unlink()
    with pytest.raises(Refused) as refused:
        read_private(tmp_path, stub)
    reason = str(refused.value)
    assert str(tmp_path) not in reason and stub["fedsite_table"].iloc[0] not in reason, reason


def test_a_stub_cannot_name_a_file_outside_the_tables_folder(tmp_path: Path) -> None:
    (tmp_path / "admin-password").write_text("s3cret")
    for name in ("../admin-password", "/etc/passwd", "..", "x/../../admin-password.parquet"):
        stub = pd.DataFrame({"fedsite_table": [name], "rows": [1]})
        with pytest.raises(Refused, match="names no table file"):
            read_private(tmp_path, stub)


# ---------------------------------------------------------------------------------------------
# 5. The ledger on SQLite and PostgreSQL: names travel as bound values.

HOSTILE = [
    "x'); DROP TABLE charges; --",
    "a' OR '1'='1",
    ":p0",
    "?",
    "\\'; SELECT pg_sleep(5); --",
    "eve@uni.edu' --",
    'ds"; DELETE FROM audit; --',
]


@pytest.fixture(params=["sqlite", "postgresql"])
def target(request, tmp_path: Path) -> Path | str:
    if request.param == "sqlite":
        return tmp_path / "site.db"
    return request.getfixturevalue("pg_cluster").new_database()


def test_hostile_names_are_data_not_sql(target, tmp_path: Path) -> None:
    store = SiteStore(target)
    ledger, audit = BudgetLedger(store), AuditLog(store, tmp_path)
    m = Mechanism(2.0, 0.01, 100)
    ledger.charge_public("clinic", "upload:clinic", "mock", m)
    for i, name in enumerate(HOSTILE):
        ledger.set_budget(name, name, 5.0, 1e-5)
        ledger.reserve(name, name, name, [("training", m), ("scores", m)], "prv")
        audit.record("runtime", "executed", name, name, reason=name, i=i)
    for name in HOSTILE:
        budget = ledger.budget(name, name)
        assert budget.epsilon_spent > 0 and {r["kind"] for r in budget.releases} == {
            "training",
            "scores",
        }
        assert ledger.budget("eve@uni.edu", name).epsilon_spent == 0.0
    assert ledger.budget("nobody", "clinic").epsilon_spent > 0  # the public mock charge stands
    assert audit.verify() and len(audit.entries()) == len(HOSTILE)


# ---------------------------------------------------------------------------------------------
# 6. The database password.

SPECIAL = "Tr0ub4dor&3!pw@x"  # a password a person picks: '&', '!', '@' are URL-encoded


def test_syft_launch_lines_do_not_carry_the_db_password(tmp_path: Path) -> None:
    from syft.store.db.db import DBConfig

    from datasites.serving.config import SiteDir, init_site
    from datasites.serving.serve import _mask_db_password

    url = URL.create("postgresql", "fed", SPECIAL, "127.0.0.1", 5432, "fed")
    init_site(tmp_path / "s", "s", db_url=url.render_as_string(hide_password=False))
    full = SiteDir(tmp_path / "s").db_url()  # what serve() hands syft as SYFT_DB_URL
    buffer, saved = io.StringIO(), (sys.stdout, sys.stderr)
    sys.stdout = sys.stderr = buffer
    try:
        _mask_db_password(full)
        config = DBConfig.from_connection_string(full)
        # syft 0.9.5: server/uvicorn.py logs its settings; server/server.py:832 prints this
        print(f"Starting server with settings: {{'db_url': {full!r}}}")
        print(f"Using {config.__class__.__name__} and {config.connection_string}")
    finally:
        sys.stdout, sys.stderr = saved
    logged = buffer.getvalue()
    from urllib.parse import unquote

    assert SPECIAL not in unquote(unquote(logged)), logged


def test_a_bad_db_url_error_does_not_echo_the_password() -> None:
    from datasites.errors import ConfigError

    with pytest.raises(ConfigError) as err:
        check_db_url("postgres ql://fed:Sup3rSecret@127.0.0.1:5432/fed")
    assert "Sup3rSecret" not in str(err.value)
