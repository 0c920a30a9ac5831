"""The audit log shows any change made behind its back, by someone who can write the database.

The attacker here has what a database administrator or a stolen-and-returned ``site.db`` gives:
they drop the append-only triggers (or patch the file's bytes), and they know the code, so they
re-link the chain with its public SHA-256 after each change. They do not have ``audit.key``,
which lives in the site directory, not in the database. Every test runs on SQLite and on a real
throwaway PostgreSQL, and checks that the untouched log verified first.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Callable
from pathlib import Path

import pytest
import sqlalchemy as sa
from sqlalchemy.pool import NullPool

from datasites.ledger.audit import GENESIS, HEAD_FILE, KEY_FILE, AuditLog, _digest
from datasites.ledger.store import SITE_SCHEMA, SiteStore
from tests.conftest import last_json, run_cli


@pytest.fixture(params=["sqlite", "postgresql"])
def target(request, tmp_path: Path) -> Path | str:
    if request.param == "sqlite":
        return tmp_path / "site.db"
    return request.getfixturevalue("pg_cluster").new_database()


def _log(target: Path | str, home: Path) -> AuditLog:
    log = AuditLog(SiteStore(target), home)
    log.record("admin", "approved", "req1", "c1", reason="fine", rounds=3)
    log.record("runtime", "executed", "req1", "c1", round=1, epsilon_job=0.698)
    log.record("runtime", "released", "req1", "c1", round=1, n=128)
    log.record("admin", "denied", "req2", "c2", reason="no")
    assert log.problem() is None  # the untouched log verifies
    return log


class Attacker:
    """Raw write access to the audit table, with the append-only triggers out of the way."""

    def __init__(self, target: Path | str) -> None:
        self.target = target

    def sql(self, *statements: tuple[str, dict]) -> None:
        if isinstance(self.target, Path):
            conn = sqlite3.connect(self.target)
            conn.execute("DROP TRIGGER IF EXISTS audit_no_update")
            conn.execute("DROP TRIGGER IF EXISTS audit_no_delete")
            for sql, params in statements:
                conn.execute(sql, params)
            conn.commit()
            conn.close()
            return
        engine = sa.create_engine(self.target, poolclass=NullPool)
        with engine.begin() as conn:
            conn.exec_driver_sql(f"SET search_path TO {SITE_SCHEMA}")
            conn.exec_driver_sql("ALTER TABLE audit DISABLE TRIGGER USER")
            for sql, params in statements:
                conn.execute(sa.text(sql), params)
            conn.exec_driver_sql("ALTER TABLE audit ENABLE TRIGGER USER")
        engine.dispose()

    def rows(self) -> list[dict]:
        with SiteStore(self.target).connect() as conn:
            return [dict(r) for r in conn.execute("SELECT * FROM audit ORDER BY seq")]

    def relink(self) -> None:
        """Recompute every link with the public SHA-256: what the code shows anyone."""
        prev, updates = GENESIS, []
        for r in self.rows():
            fields = [r["at"], r["actor"], r["event"], r["request_id"], r["code_hash"], r["detail"]]
            digest = _digest(prev, fields)
            updates.append(
                (
                    "UPDATE audit SET prev_hash = :p, hash = :h WHERE seq = :s",
                    {"p": prev, "h": digest, "s": r["seq"]},
                )
            )
            prev = digest
        self.sql(*updates)


def _forge(a: Attacker) -> None:
    """A new last row: an approval that never happened."""
    last = a.rows()[-1]
    fields = ["2030-01-01T00:00:00.000+00:00", "admin", "approved", "req9", "c9", "{}"]
    a.sql(
        (
            "INSERT INTO audit (at, actor, event, request_id, code_hash, detail, prev_hash, hash)"
            " VALUES (:at, :ac, :ev, :rq, :cd, :dt, :p, :h)",
            dict(zip(["at", "ac", "ev", "rq", "cd", "dt"], fields, strict=True))
            | {"p": last["hash"], "h": _digest(last["hash"], fields)},
        )
    )


def _forge_between(a: Attacker) -> None:
    """A row slipped in between two others (a free seq number), the chain re-linked."""
    a.sql(
        ("UPDATE audit SET seq = seq * 10", {}),  # room: 10, 20, 30, 40
        (
            "INSERT INTO audit (seq, at, actor, event, request_id, code_hash, detail, prev_hash,"
            " hash) SELECT 15, at, actor, 'overridden', request_id, code_hash, detail,"
            " prev_hash, hash FROM audit WHERE seq = 10",
            {},
        ),
    )
    a.relink()


def _delete_middle(a: Attacker) -> None:
    a.sql(("DELETE FROM audit WHERE seq = :s", {"s": a.rows()[1]["seq"]}))
    a.relink()


def _delete_last(a: Attacker) -> None:
    """The newest row (the denial) goes; everything left still links, untouched."""
    a.sql(("DELETE FROM audit WHERE seq = :s", {"s": a.rows()[-1]["seq"]}))


def _reorder(a: Attacker) -> None:
    """Two rows swap places (the release before the execution)."""
    one, two = (r["seq"] for r in a.rows()[1:3])
    a.sql(
        ("UPDATE audit SET seq = -1 WHERE seq = :s", {"s": one}),
        ("UPDATE audit SET seq = :a WHERE seq = :b", {"a": one, "b": two}),
        ("UPDATE audit SET seq = :a WHERE seq = -1", {"a": two}),
    )


def _reorder_relinked(a: Attacker) -> None:
    _reorder(a)
    a.relink()


def _edit_detail(a: Attacker) -> None:
    """The epsilon the runtime recorded, made smaller; the link left as it was."""
    row = a.rows()[1]
    detail = json.dumps({**json.loads(row["detail"]), "epsilon_job": 0.001}, sort_keys=True)
    a.sql(("UPDATE audit SET detail = :d WHERE seq = :s", {"d": detail, "s": row["seq"]}))


def _edit_detail_relinked(a: Attacker) -> None:
    _edit_detail(a)
    a.relink()


ATTACKS: dict[str, Callable[[Attacker], None]] = {
    "forged last row": _forge,
    "forged row between two, relinked": _forge_between,
    "deleted middle row, relinked": _delete_middle,
    "deleted last row": _delete_last,
    "reordered pair": _reorder,
    "reordered pair, relinked": _reorder_relinked,
    "edited detail": _edit_detail,
    "edited detail, relinked": _edit_detail_relinked,
}


@pytest.mark.parametrize("attack", list(ATTACKS))
def test_every_change_behind_the_log_fails_verify(
    target: Path | str, tmp_path: Path, attack: str
) -> None:
    log = _log(target, tmp_path)
    before = len(log.entries())
    ATTACKS[attack](Attacker(target))
    assert log.entries() != [] and log.verify() is False, attack
    assert log.problem() is not None and "\n" not in log.problem()
    if attack.startswith("deleted last"):
        assert len(log.entries()) == before - 1
        assert "entry 4" in log.problem()


def test_writing_the_sqlite_file_s_bytes_is_caught(tmp_path: Path) -> None:
    """No SQL at all: the bytes of a detail patched in site.db, same length, triggers intact."""
    db = tmp_path / "site.db"
    log = _log(db, tmp_path)
    with sqlite3.connect(db) as conn:
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")  # every row in the main file
    raw = db.read_bytes()
    assert raw.count(b'"epsilon_job": 0.698') == 1
    db.write_bytes(raw.replace(b'"epsilon_job": 0.698', b'"epsilon_job": 0.001'))
    assert log.entries()[1]["detail"]["epsilon_job"] == 0.001  # the edit took
    assert not log.verify() and "entry 2 does not match" in str(log.problem())


def test_a_log_cannot_be_verified_without_its_anchor_or_its_key(tmp_path: Path) -> None:
    log = _log(tmp_path / "site.db", tmp_path)
    for name in (KEY_FILE, HEAD_FILE):  # secrets of the site: its owner's alone
        assert (tmp_path / name).stat().st_mode & 0o777 == 0o600
    head = (tmp_path / HEAD_FILE).read_text()
    (tmp_path / HEAD_FILE).unlink()
    assert "anchor" in str(log.problem())
    (tmp_path / HEAD_FILE).write_text(head)
    assert log.verify()
    (tmp_path / KEY_FILE).unlink()
    assert "key" in str(log.problem())


def test_a_log_from_before_the_key_keeps_verifying_and_is_then_covered(tmp_path: Path) -> None:
    """Entries linked with plain SHA-256 (before this change) stay valid as a prefix, and the
    head taken with the new key protects them; a plain link after it is a forgery."""
    db = tmp_path / "site.db"
    store = SiteStore(db)
    prev = GENESIS
    with store.immediate() as conn:
        for i in range(3):
            fields = ["2024-01-01T00:00:00.000+00:00", "admin", "approved", f"r{i}", None, "{}"]
            digest = _digest(prev, fields)
            conn.execute(
                "INSERT INTO audit (at, actor, event, request_id, code_hash, detail, prev_hash,"
                " hash) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (*fields, prev, digest),
            )
            prev = digest
    log = AuditLog(store, tmp_path)
    assert log.verify()  # an old log, no key yet: the chain alone
    log.record("admin", "denied", "r9", None, reason="later")
    assert (tmp_path / HEAD_FILE).read_text().split()[0] == "4" and log.verify()
    a = Attacker(db)
    a.sql(("UPDATE audit SET event = 'overridden' WHERE seq = 2", {}))
    a.relink()
    assert not log.verify()


@pytest.mark.parametrize("attack", ["forged last row", "deleted last row", "edited detail"])
def test_datasite_audit_says_so_in_one_line_and_exits_1(tmp_path: Path, attack: str) -> None:
    from datasites.serving.config import SiteDir, init_site

    site = SiteDir(tmp_path / "site")
    init_site(site.root, "audited")
    log = _log(site.db_path, site.root)
    assert log.verify()
    ok = run_cli("datasite", "audit", "--dir", str(site.root), "--json")
    assert len(last_json(ok)) == 4
    ATTACKS[attack](Attacker(site.db_path))
    for args in ([], ["--json"]):
        proc = run_cli("datasite", "audit", "--dir", str(site.root), *args, check=False)
        assert proc.returncode == 1 and proc.stdout.strip() == ""
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and "the audit log was tampered with: entry" in lines[0], lines
