"""Approvals recorded by ``datasite approve``: the site's own word on what may run, and how often.

The runtime trusts this table, not syft's request status and not the arguments it is called with:
a job runs only if its syft code id was approved here, with the plan stored here, for at most
``rounds_allowed`` calls.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from datasites.errors import AlreadyApproved
from datasites.ledger.store import SiteStore
from policies.errors import RoundLimitReached
from policies.wire import RoundReply


@dataclass(frozen=True)
class Approval:
    code_id: str
    request_id: str
    researcher: str
    dataset: str
    code_hash: str
    job: dict[str, Any]
    rounds_allowed: int
    rounds_run: int
    override_reason: str | None


class Approvals:
    def __init__(self, store: SiteStore) -> None:
        self.store = store

    def record(self, approval: Approval) -> None:
        """Write an approval, once: a code id or a job id that was ever approved is refused.

        There is no update path on purpose. Re-approving approved code (a second syft request
        on the same user code, which any logged-in user can file) used to reset ``rounds_run``
        while the ledger kept the job's one charge: fresh noisy rounds for no epsilon.
        """
        job_id = str(approval.job.get("job_id", ""))
        with self.store.immediate() as conn:  # check and insert in one write transaction
            clash: tuple[Any, ...] | None = conn.execute(
                "SELECT code_id, request_id FROM approvals WHERE code_id = ?", (approval.code_id,)
            ).fetchone()
            if clash is None and job_id:
                clash = next(
                    (
                        (r[0], r[1])
                        for r in conn.execute("SELECT code_id, request_id, job FROM approvals")
                        if json.loads(r[2]).get("job_id") == job_id
                    ),
                    None,
                )
            if clash is not None:
                raise AlreadyApproved(
                    f"job {job_id or approval.code_id} was already approved (request "
                    f"{str(clash[1])[:8]}); a job is approved once, submit a new job"
                )
            conn.execute(
                "INSERT INTO approvals VALUES (?, ?, ?, ?, ?, ?, ?, 0, ?, ?)",
                (
                    approval.code_id,
                    approval.request_id,
                    approval.researcher.lower(),
                    approval.dataset,
                    approval.code_hash,
                    json.dumps(approval.job),
                    approval.rounds_allowed,
                    approval.override_reason,
                    datetime.now(UTC).isoformat(),
                ),
            )

    def get(self, code_id: str) -> Approval | None:
        with self.store.connect() as conn:
            row = conn.execute("SELECT * FROM approvals WHERE code_id = ?", (code_id,)).fetchone()
        return _row(row) if row else None

    def record_release(self, code_id: str, round_no: int, reply: RoundReply) -> None:
        """Keep the last reply released to this job, so that a researcher who lost it (Ctrl-C,
        a dropped connection) can have it again without training or charging twice."""
        with self.store.immediate() as conn:
            conn.execute(
                "INSERT INTO released VALUES (?, ?, ?, ?) ON CONFLICT (code_id) DO UPDATE SET"
                " round = excluded.round, reply = excluded.reply, at = excluded.at",
                (code_id, round_no, json.dumps(reply), datetime.now(UTC).isoformat()),
            )

    def last_release(self, code_id: str) -> RoundReply | None:
        with self.store.connect() as conn:
            row = conn.execute(
                "SELECT reply FROM released WHERE code_id = ?", (code_id,)
            ).fetchone()
        return json.loads(row[0]) if row else None

    def job_ids(self) -> set[str]:
        with self.store.connect() as conn:
            rows = conn.execute("SELECT job FROM approvals").fetchall()
        return {json.loads(r[0]).get("job_id", "") for r in rows}

    def take_round(self, code_id: str) -> int:
        """Count one more call of an approved job, atomically; refuse past its limit.

        Rounds are counted per job id over every approval that carries it (there is one, as
        ``record`` refuses a second; counting over all of them keeps the limit even if an old
        database holds two).
        """
        with self.store.immediate() as conn:
            row = conn.execute(
                "SELECT rounds_allowed, job FROM approvals WHERE code_id = ?", (code_id,)
            ).fetchone()
            if row is None:
                raise RoundLimitReached("this code has no approval at this datasite")
            allowed, job_id = row[0], json.loads(row[1]).get("job_id")
            same_job = [
                r[0]
                for r in conn.execute("SELECT code_id, job FROM approvals")
                if r[0] == code_id or (job_id and json.loads(r[1]).get("job_id") == job_id)
            ]
            marks = ",".join("?" * len(same_job))
            run = conn.execute(
                f"SELECT COALESCE(SUM(rounds_run), 0) FROM approvals WHERE code_id IN ({marks})",
                same_job,
            ).one()[0]
            if run >= allowed:
                raise RoundLimitReached(
                    f"this approval covers {allowed} round(s) and all have run; submit a new job"
                )
            conn.execute(
                "UPDATE approvals SET rounds_run = rounds_run + 1 WHERE code_id = ?", (code_id,)
            )
        return int(run) + 1


def _row(row: Any) -> Approval:
    return Approval(
        row["code_id"],
        row["request_id"],
        row["researcher"],
        row["dataset"],
        row["code_hash"],
        json.loads(row["job"]),
        row["rounds_allowed"],
        row["rounds_run"],
        row["override_reason"],
    )
