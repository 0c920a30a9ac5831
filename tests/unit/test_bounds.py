"""Issue 25 item 3: public bounds declared by the data owner (``datasite upload --bounds``)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from sklearn.datasets import load_wine

from datasites.data import mock as M
from datasites.data.tables import clamp, load_bounds, validate_table
from datasites.errors import TableError
from datasites.review.report import PolicyReport, _note_ranges
from datasites.serving.admin import _meta
from datasites.serving.config import SiteDir, init_site
from tests.conftest import run_cli


def _table() -> pd.DataFrame:
    rng = np.random.default_rng(0)
    return pd.DataFrame(
        {
            "age": rng.integers(18, 90, 200),
            "bmi": rng.normal(27, 4, 200),
            "region": ["north", "south"] * 100,
            "y": rng.integers(0, 2, 200),
        }
    )


def test_toml_yaml_and_csv_declare_the_same_bounds(tmp_path: Path) -> None:
    table = validate_table(_table(), "y")
    toml = tmp_path / "b.toml"
    toml.write_text("[bounds]\nage = [18, 100]\nbmi = { lower = 10.0, upper = 60.0 }\n")
    yaml = tmp_path / "b.yaml"
    yaml.write_text("age: [18, 100]\nbmi: {lower: 10, upper: 60}\n")
    csv = tmp_path / "b.csv"
    csv.write_text("column,lower,upper\nage,18,100\nbmi,10,60\n")
    want = {"age": (18.0, 100.0), "bmi": (10.0, 60.0)}
    assert load_bounds(toml, table) == load_bounds(yaml, table) == load_bounds(csv, table) == want
    star = tmp_path / "star.csv"
    star.write_text("column,lower,upper\n*,0,16\n")
    assert load_bounds(star, table) == {"age": (0.0, 16.0), "bmi": (0.0, 16.0)}


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("column,lower,upper\nage,18,100\n", "no bounds for column(s) 'bmi'"),
        ("column,lower,upper\nage,18,100\nbmi,60,10\n", "'bmi' has lower 60 > upper 10"),
        ("column,lower,upper\nage,18,100\nbmi,nan,60\n", "'bmi' has a bound that is not a finite"),
        ("column,lower,upper\nage,18,100\nbmi,10,60\nweight,1,2\n", "bounds for 'weight'"),
        ("column,lower,upper\nage,18,100\nbmi,10,60\nregion,0,1\n", "bounds for 'region'"),
        ("column,lower,upper\nage,18,100\nbmi,ten,60\n", "both must be numbers"),
        ("col,lo,hi\nage,18,100\n", "needs the header column,lower,upper"),
    ],
)
def test_a_bad_bounds_file_is_one_clear_error(tmp_path: Path, text: str, needle: str) -> None:
    path = tmp_path / "b.csv"
    path.write_text(text)
    with pytest.raises(TableError, match=None) as caught:
        load_bounds(path, validate_table(_table(), "y"))
    assert needle in str(caught.value) and "\n" not in str(caught.value)


def test_values_are_clamped_and_counted_for_the_owner() -> None:
    frame = validate_table(_table(), "y").frame
    clamped, counts = clamp(frame, {"age": (20.0, 80.0), "bmi": (0.0, 100.0)})
    age = frame["age"].to_numpy()
    assert counts == {"age": int(((age < 20) | (age > 80)).sum()), "bmi": 0}
    assert counts["age"] > 0
    assert clamped["age"].between(20, 80).all() and clamped["age"].dtype == frame["age"].dtype
    assert frame["age"].min() < 20  # the caller's table is untouched


def test_declared_bounds_are_published_and_spend_nothing_on_a_range(monkeypatch) -> None:
    """With every column bounded there is no range release: the class counts and the shapes
    share the whole budget (no grid histogram is noised), and the published ranges are the
    declared ones, marked declared."""
    wine = load_wine(as_frame=True).frame.sample(66, random_state=0).reset_index(drop=True)
    table = validate_table(wine, "target")
    features = table.features
    x = table.frame[features]
    bounds = {c: (float(x[c].min()) * 0.9, float(x[c].max()) * 1.1) for c in features}
    sizes = []
    real_noisy = M._noisy
    monkeypatch.setattr(M, "_noisy", lambda c, s: sizes.append(len(c)) or real_noisy(c, s))
    release = M.make_mock(table.frame, "target", bounds=bounds, seed=0)
    assert len(M.GRID) - 1 not in sizes and len(features) * (len(M.GRID) - 1) not in sizes
    meta = _meta(table, "w", release)
    assert meta["bounds_source"] == dict.fromkeys(features, "declared")
    assert meta["bounds"] == {c: list(b) for c, b in bounds.items()}
    assert meta["feature_low"] == [b[0] for b in bounds.values()]
    mean = np.asarray(meta["feature_mean"])
    assert np.all((mean >= meta["feature_low"]) & (mean <= meta["feature_high"]))
    report = PolicyReport()
    _note_ranges(report, meta)
    assert "13 declared" in str(report.to_dict()) and "alcohol [" in str(report.to_dict())


@pytest.fixture
def site(tmp_path: Path) -> SiteDir:
    init_site(tmp_path / "s", "s", port=1)  # never launched: bad bounds are refused before
    return SiteDir(tmp_path / "s")


def test_a_bad_bounds_file_at_upload_exits_1_and_writes_nothing(site, tmp_path: Path) -> None:
    data = tmp_path / "t.csv"
    _table().to_csv(data, index=False)
    bounds = tmp_path / "b.toml"
    bounds.write_text("age = [18, 100]\nbmi = [60, 10]\n")
    before = sorted(p.name for p in site.root.rglob("*"))
    proc = run_cli(
        "datasite", "upload", "--dir", str(site.root), "--name", "d", "--file", str(data),
        "--target", "y", "--bounds", str(bounds), check=False,
    )  # fmt: skip
    assert proc.returncode == 1, proc.stdout
    assert "'bmi' has lower 60 > upper 10" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert sorted(p.name for p in site.root.rglob("*")) == before
    assert site.datasets_meta() == {}
