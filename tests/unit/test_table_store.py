"""The private table at rest in the site's own Parquet file, behind the syft asset's stub."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from datasites.data.store import is_stub, read_private, remove_private, write_private
from datasites.errors import Refused


def test_the_stub_reads_back_the_table_with_its_categoricals(tmp_path: Path) -> None:
    frame = pd.DataFrame({"a": [1.5, 2.5], "r": pd.Categorical(["x", "y"]), "y": [0, 1]})
    stub = write_private(tmp_path, "d", frame)
    assert is_stub(stub) and len(stub) == 1
    (path,) = (tmp_path / "tables").glob("d-*.parquet")
    assert path.stat().st_mode & 0o777 == 0o600
    pd.testing.assert_frame_equal(read_private(tmp_path, stub), frame)
    remove_private(tmp_path, stub)
    assert not path.exists()


def test_a_table_given_as_data_is_used_as_it_is(tmp_path: Path) -> None:
    frame = pd.DataFrame({"a": [1.0], "y": [0]})
    pd.testing.assert_frame_equal(read_private(tmp_path, frame), frame)


def test_a_stub_naming_a_path_outside_the_tables_or_a_changed_file_is_refused(
    tmp_path: Path,
) -> None:
    stub = write_private(tmp_path, "d", pd.DataFrame({"a": [1.0, 2.0], "y": [0, 1]}))
    bad = stub.assign(fedsite_table="../site.db")
    with pytest.raises(Refused, match="names no table file"):
        read_private(tmp_path, bad)
    with pytest.raises(Refused, match="not the one uploaded"):
        read_private(tmp_path, stub.assign(rows=3))
