"""Append-only audit log of a datasite, hash-chained so that an edit is detectable.

Triggers in the schema refuse UPDATE and DELETE; each entry also carries the SHA-256 of the
previous entry, and :meth:`AuditLog.verify` re-walks the chain.
"""

from __future__ import annotations

import hashlib
import json
from datetime import UTC, datetime
from typing import Any

from datasites.ledger.store import SiteStore

GENESIS = "0" * 64


def _digest(prev: str, fields: list[Any]) -> str:
    return hashlib.sha256(json.dumps([prev, *fields], sort_keys=True).encode()).hexdigest()


class AuditLog:
    """Who did what to which request, when, with a hash of the code concerned."""

    def __init__(self, store: SiteStore) -> None:
        self.store = store

    def record(
        self,
        actor: str,
        event: str,
        request_id: str | None = None,
        code_hash: str | None = None,
        **detail: Any,
    ) -> None:
        at = datetime.now(UTC).isoformat(timespec="milliseconds")
        body = json.dumps(detail, sort_keys=True, default=str)
        with self.store.immediate() as conn:
            row = conn.execute("SELECT hash FROM audit ORDER BY seq DESC LIMIT 1").fetchone()
            prev = row[0] if row else GENESIS
            digest = _digest(prev, [at, actor, event, request_id, code_hash, body])
            conn.execute(
                "INSERT INTO audit (at, actor, event, request_id, code_hash, detail, prev_hash,"
                " hash) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (at, actor, event, request_id, code_hash, body, prev, digest),
            )

    def entries(self) -> list[dict[str, Any]]:
        with self.store.connect() as conn:
            rows = conn.execute("SELECT * FROM audit ORDER BY seq").fetchall()
        out = []
        for r in rows:
            entry = dict(r)
            entry["detail"] = json.loads(entry["detail"])
            out.append(entry)
        return out

    def verify(self) -> bool:
        """True when every entry's hash matches its content and its predecessor."""
        prev = GENESIS
        for e in self.entries():
            body = json.dumps(e["detail"], sort_keys=True, default=str)
            fields = [e["at"], e["actor"], e["event"], e["request_id"], e["code_hash"], body]
            if e["prev_hash"] != prev or e["hash"] != _digest(prev, fields):
                return False
            prev = e["hash"]
        return True
