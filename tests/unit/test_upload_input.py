"""Bad input at upload: each gets one clear line, exit 1, and nothing is written or charged."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from datasites.data.tables import MAX_FEATURES, load_table, validate_table
from datasites.errors import TableError
from datasites.serving.config import SiteDir, init_site
from tests.conftest import run_cli


def test_a_utf8_bom_is_skipped(tmp_path: Path) -> None:
    path = tmp_path / "bom.csv"
    rows = b"30,north,0\n41,south,1\n" * 5  # five rows a region: published by name
    path.write_bytes(b"\xef\xbb\xbfage,region,label\n" + rows)
    frame = load_table(path)
    assert list(frame.columns) == ["age", "region", "label"]
    assert validate_table(frame, "label").categories() == {"region": ["north", "south"]}


def test_semicolons_are_read_with_decimal_commas_or_points(tmp_path: Path) -> None:
    comma = tmp_path / "eu.csv"
    comma.write_text("balance;region;label\n1,5;north;0\n-2,25;south;1\n")
    frame = load_table(comma)
    assert frame["balance"].tolist() == [1.5, -2.25]
    assert frame["region"].astype(str).tolist() == ["north", "south"]
    point = tmp_path / "points.csv"
    point.write_text("balance;label\n1.5;0\n2;1\n")
    assert load_table(point)["balance"].tolist() == [1.5, 2.0]


def test_an_excel_workbook_is_refused_also_when_named_csv(tmp_path: Path) -> None:
    disguised = tmp_path / "book.csv"
    disguised.write_bytes(b"PK\x03\x04\x14\x00\x06\x00" + b"\x00" * 100)
    with pytest.raises(TableError, match="an Excel workbook named .csv; save the sheet as CSV"):
        load_table(disguised)
    old = tmp_path / "book.xls"
    old.write_bytes(b"\xd0\xcf\x11\xe0" + b"\x00" * 100)
    with pytest.raises(TableError, match="Excel workbooks are not read"):
        load_table(old)


def test_a_5000_column_csv_is_refused_from_its_header_in_seconds(tmp_path: Path) -> None:
    path = tmp_path / "wide.csv"
    header = ",".join(f"c{i}" for i in range(5000)) + ",label\n"
    row = ",".join("1.0" for _ in range(5000)) + ",0\n"
    path.write_text(header + row * 200)
    started = time.perf_counter()
    with pytest.raises(TableError, match=f"5000 feature columns; at most {MAX_FEATURES}"):
        load_table(path)
    assert time.perf_counter() - started < 2.0


def test_a_wide_parquet_is_refused_from_its_footer(tmp_path: Path) -> None:
    path = tmp_path / "wide.parquet"
    pd.DataFrame(np.zeros((3, MAX_FEATURES + 2))).rename(columns=str).to_parquet(path)
    with pytest.raises(TableError, match=f"{MAX_FEATURES + 1} feature columns"):
        load_table(path)


def test_a_table_five_times_the_memory_budget_is_refused_before_it_is_read(
    tmp_path: Path,
) -> None:
    """A sparse file: a real header and rows, then 40 GB that take no disk. Reading it would
    be killed for memory; its size is estimated from the first rows and refused at once."""
    path = tmp_path / "huge.csv"
    path.write_text("a,b,c,label\n" + "1.25,2.5,3.75,0\n" * 1000)
    with path.open("r+b") as fh:
        fh.truncate(40 * 2**30)
    started = time.perf_counter()
    with pytest.raises(TableError, match=r"about 2,68\d,\d{3},\d{3} rows x 4 columns .* memory"):
        load_table(path, max_memory_mb=1536)
    assert time.perf_counter() - started < 1.0


def test_a_ragged_csv_is_one_line(tmp_path: Path) -> None:
    path = tmp_path / "ragged.csv"
    path.write_text("a,b,label\n1,2,0\n1,2,3,4\n")
    with pytest.raises(TableError, match="cannot be read: CSV parse error"):
        load_table(path)


@pytest.fixture
def site(tmp_path: Path) -> SiteDir:
    init_site(tmp_path / "s", "s", port=1)  # never launched: bad input is refused before
    return SiteDir(tmp_path / "s")


def test_each_bad_upload_is_one_line_exit_1_and_writes_nothing(
    site: SiteDir, tmp_path: Path
) -> None:
    rng = np.random.default_rng(0)
    ids = tmp_path / "ids.csv"
    pd.DataFrame(
        {"x": rng.normal(size=10_000), "id": [f"u{i}" for i in range(10_000)], "y": [0, 1] * 5000}
    ).to_csv(ids, index=False)
    one_class = tmp_path / "one.csv"
    one_class.write_text("x,region,y\n1,a,1\n2,b,1\n")
    excel = tmp_path / "data.xlsx"
    excel.write_bytes(b"PK\x03\x04")
    cases = {
        "column 'id' has 10000 distinct text values, more than --max-categories 32": ids,
        "target column 'y' has one value only (1)": one_class,
        "Excel workbooks are not read": excel,
    }
    before = sorted(p.name for p in site.root.rglob("*"))
    for needle, path in cases.items():
        proc = run_cli(
            "datasite", "upload", "--dir", str(site.root), "--name", "d", "--file", str(path),
            "--target", "y", check=False,
        )  # fmt: skip
        assert proc.returncode == 1, (needle, proc.stdout, proc.stderr)
        assert needle in proc.stderr, (needle, proc.stderr)
        assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert sorted(p.name for p in site.root.rglob("*")) == before
    assert site.datasets_meta() == {}
