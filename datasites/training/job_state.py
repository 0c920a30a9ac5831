"""What a site keeps for a job between its calls, beside the ledger: never released as such.

* ``residual``: the top-k compression's error-feedback vector (``policies.compression``), a
  function of the job's DP releases, added to the next round's update;
* ``personalized``: the model a job's personalization pass fine-tuned on this site's rows. It
  stays here: only its DP validation metrics left. ``datasite models`` lists them;
* ``secagg/*``: secure aggregation's X25519 key for the job, and per round label the self-mask
  seed, the participants and the survivor set this site signed (``secure_agg``).
"""

from __future__ import annotations

import io
import json
from datetime import UTC, datetime
from typing import Any

import numpy as np

from datasites.ledger.store import SiteStore
from policies.wire import Weights

RESIDUAL, PERSONALIZED = "residual", "personalized"


class JobState:
    def __init__(self, store: SiteStore) -> None:
        self.store = store

    def residual(self, code_id: str) -> np.ndarray | None:
        arrays = self._get(code_id, RESIDUAL)
        return None if arrays is None else arrays["residual"]

    def put_residual(self, code_id: str, residual: np.ndarray) -> None:
        self._put(code_id, RESIDUAL, {"residual": residual}, {})

    def put_model(self, code_id: str, weights: Weights, detail: dict[str, Any]) -> None:
        self._put(code_id, PERSONALIZED, weights, detail)

    def model(self, code_id: str) -> Weights | None:
        return self._get(code_id, PERSONALIZED)

    def models(self) -> list[dict[str, Any]]:
        """Every personalized model on this site, with its job, researcher and dataset."""
        with self.store.connect() as conn:
            rows = conn.execute(
                "SELECT s.code_id, s.detail, s.at, a.request_id, a.researcher, a.dataset, a.job "
                "FROM job_state s JOIN approvals a ON a.code_id = s.code_id "
                "WHERE s.kind = ? ORDER BY s.at",
                (PERSONALIZED,),
            ).fetchall()
        return [
            {
                "request": r["request_id"],
                "job": json.loads(r["job"]).get("name"),
                "researcher": r["researcher"],
                "dataset": r["dataset"],
                "at": r["at"],
                **json.loads(r["detail"]),
            }
            for r in rows
        ]

    def detail(self, code_id: str, kind: str) -> dict[str, Any] | None:
        """A JSON record kept for the job (secure aggregation's keys and round state)."""
        with self.store.connect() as conn:
            row = conn.execute(
                "SELECT detail FROM job_state WHERE code_id = ? AND kind = ?", (code_id, kind)
            ).fetchone()
        return None if row is None else json.loads(row[0])

    def put_detail(self, code_id: str, kind: str, detail: dict[str, Any]) -> None:
        self._put(code_id, kind, {}, detail)

    def claim(self, code_id: str, kind: str, detail: dict[str, Any]) -> dict[str, Any]:
        """Store ``detail`` unless a record exists; either way return the stored one. Check and
        write are one transaction: two concurrent calls cannot both believe they were first
        (red team: a site signed two survivor sets for one round that way)."""
        with self.store.immediate() as conn:
            conn.execute(
                "INSERT INTO job_state VALUES (?, ?, ?, ?, ?) ON CONFLICT DO NOTHING",
                (code_id, kind, b"", json.dumps(detail), datetime.now(UTC).isoformat()),
            )
            row = conn.execute(
                "SELECT detail FROM job_state WHERE code_id = ? AND kind = ?", (code_id, kind)
            ).one()
        return json.loads(row[0])

    def _put(self, code_id: str, kind: str, arrays: dict[str, np.ndarray], detail: dict) -> None:
        buf = io.BytesIO()
        np.savez(buf, **arrays)
        with self.store.immediate() as conn:
            conn.execute(
                "INSERT INTO job_state VALUES (?, ?, ?, ?, ?) ON CONFLICT (code_id, kind) DO UPDATE"
                " SET value = excluded.value, detail = excluded.detail, at = excluded.at",
                (code_id, kind, buf.getvalue(), json.dumps(detail), datetime.now(UTC).isoformat()),
            )

    def _get(self, code_id: str, kind: str) -> dict[str, np.ndarray] | None:
        with self.store.connect() as conn:
            row = conn.execute(
                "SELECT value FROM job_state WHERE code_id = ? AND kind = ?", (code_id, kind)
            ).fetchone()
        if row is None:
            return None
        with np.load(io.BytesIO(row[0]), allow_pickle=False) as npz:
            return {k: npz[k] for k in npz.files}
