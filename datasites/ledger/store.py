"""The datasite's own SQLite database (ledger, audit log, approvals), apart from syft's.

Connections are opened per operation with a busy timeout so the server process and the admin CLI
can both write; ``immediate()`` takes the write lock up front so a read-check-write sequence is
atomic across processes.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

SCHEMA = """
CREATE TABLE IF NOT EXISTS budgets (
    researcher TEXT NOT NULL, dataset TEXT NOT NULL,
    epsilon_total REAL NOT NULL, delta REAL NOT NULL,
    PRIMARY KEY (researcher, dataset));
CREATE TABLE IF NOT EXISTS charges (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    researcher TEXT NOT NULL, dataset TEXT NOT NULL, job_id TEXT NOT NULL,
    noise_multiplier REAL NOT NULL, sample_rate REAL NOT NULL, steps INTEGER NOT NULL,
    epsilon REAL NOT NULL, accountant TEXT NOT NULL,
    status TEXT NOT NULL CHECK (status IN ('reserved', 'committed')),
    kind TEXT NOT NULL DEFAULT 'training',
    created_at TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now')));
CREATE TABLE IF NOT EXISTS audit (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    at TEXT NOT NULL, actor TEXT NOT NULL, event TEXT NOT NULL,
    request_id TEXT, code_hash TEXT, detail TEXT NOT NULL, prev_hash TEXT NOT NULL,
    hash TEXT NOT NULL);
CREATE TRIGGER IF NOT EXISTS audit_no_update BEFORE UPDATE ON audit
    BEGIN SELECT RAISE(ABORT, 'the audit log is append-only'); END;
CREATE TRIGGER IF NOT EXISTS audit_no_delete BEFORE DELETE ON audit
    BEGIN SELECT RAISE(ABORT, 'the audit log is append-only'); END;
CREATE TABLE IF NOT EXISTS approvals (
    code_id TEXT PRIMARY KEY, request_id TEXT NOT NULL, researcher TEXT NOT NULL,
    dataset TEXT NOT NULL, code_hash TEXT NOT NULL, job TEXT NOT NULL,
    rounds_allowed INTEGER NOT NULL, rounds_run INTEGER NOT NULL DEFAULT 0,
    override_reason TEXT, approved_at TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS released (
    code_id TEXT PRIMARY KEY, round INTEGER NOT NULL, reply TEXT NOT NULL, at TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS job_state (
    code_id TEXT NOT NULL, kind TEXT NOT NULL, value BLOB NOT NULL,
    detail TEXT NOT NULL DEFAULT '{}', at TEXT NOT NULL, PRIMARY KEY (code_id, kind));
"""


def _migrate(conn: sqlite3.Connection) -> None:
    """Bring a database written by an earlier version up to this schema."""
    columns = {row[1] for row in conn.execute("PRAGMA table_info(charges)")}
    if "kind" not in columns:  # before metrics were charged, every charge was training
        conn.execute("ALTER TABLE charges ADD COLUMN kind TEXT NOT NULL DEFAULT 'training'")


class SiteStore:
    """Opens connections to the datasite's own database, creating its tables once."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        with self.connect() as conn:
            conn.executescript(SCHEMA)
            _migrate(conn)

    def _open(self) -> sqlite3.Connection:
        conn = sqlite3.connect(self.path, timeout=30.0, isolation_level=None)
        conn.row_factory = sqlite3.Row
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=FULL")
        return conn

    @contextmanager
    def connect(self) -> Iterator[sqlite3.Connection]:
        conn = self._open()
        try:
            yield conn
        finally:
            conn.close()

    @contextmanager
    def immediate(self) -> Iterator[sqlite3.Connection]:
        """A write transaction that holds the lock from its first statement to commit."""
        conn = self._open()
        try:
            conn.execute("BEGIN IMMEDIATE")
            yield conn
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        finally:
            conn.close()
