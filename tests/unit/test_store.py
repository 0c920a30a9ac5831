"""The site store's one SQL dialect and its URL rules (no database needed)."""

from __future__ import annotations

import pytest

from datasites.errors import ConfigError
from datasites.ledger.store import Row, _named, check_db_url, is_postgres


def test_placeholders_become_named_binds_but_not_inside_literals() -> None:
    sql = "SELECT a::text FROM t WHERE b = ? AND c = '?:x' AND d IN (?, ?)"
    assert _named(sql) == (
        "SELECT a\\:\\:text FROM t WHERE b = :p0 AND c = '?\\:x' AND d IN (:p1, :p2)",
        3,
    )


def test_a_value_without_its_placeholder_is_refused_not_dropped(tmp_path) -> None:  # noqa: ANN001
    from datasites.ledger.store import SiteStore

    store = SiteStore(tmp_path / "site.db")
    with pytest.raises(ValueError, match="2 placeholder"), store.connect() as conn:
        conn.execute("SELECT ?, ?", (1, 2, 3))


def test_a_row_answers_by_index_name_and_dict() -> None:
    row = Row(("id", "value"), (7, memoryview(b"ab")))
    assert row[0] == 7 and row["value"] == b"ab" and dict(row) == {"id": 7, "value": b"ab"}
    first, second = row
    assert (first, second) == (7, b"ab")


@pytest.mark.parametrize(
    ("url", "says"),
    [
        ("postgresql+psycopg://u:p@h:5432/d", "scheme 'postgresql+psycopg' is not supported"),
        ("postgresql://u@h:5432/d", "USER:PASSWORD@HOST:PORT/DATABASE"),
        ("postgresql://u:p@h/d", "USER:PASSWORD@HOST:PORT/DATABASE"),
        ("postgresql://u:p@h:5432/d?sslmode=require", "no '?' options"),
        ("not a url", "is not a database URL"),
    ],
)
def test_a_db_url_syft_cannot_open_is_refused(url: str, says: str) -> None:
    with pytest.raises(ConfigError, match=says.replace("?", r"\?").replace("+", r"\+")):
        check_db_url(url)


def test_good_urls_pass_and_only_postgresql_moves_the_site_tables() -> None:
    check_db_url("postgresql://u:p@h:5432/d")
    check_db_url("sqlite:////tmp/syft.db")
    assert is_postgres("postgresql://u:p@h:5432/d")
    assert not is_postgres("sqlite:////tmp/syft.db")
