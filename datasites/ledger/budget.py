"""The privacy budget ledger: (researcher, dataset) -> epsilon allowed, and every charge made.

Reserve before training, commit after. A reservation counts as spent from the moment it is
written, so a job interrupted by a crash stays charged (conservative). The check and the insert
happen in one ``SiteStore.immediate()`` transaction (SQLite's ``BEGIN IMMEDIATE``, PostgreSQL's
row lock), so two concurrent jobs cannot both take the last of a budget.

Composition: the spend of a (researcher, dataset) pair is the epsilon of *all* its charged
mechanisms composed in one accountant at the budget's delta. Adaptive composition of DP-SGD runs
is exactly what Opacus' accountants compute for the steps of one run, so this is sound, and it is
never larger than the sum of the per-job epsilons (which is reported alongside).

Public releases (the DP mock twin of a dataset) are charged once, under ``PUBLIC``, and count in
the spend of every researcher on that dataset: each of them sees the mock beside their own jobs.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import NotRequired, TypedDict

from datasites.ledger.store import SiteStore
from policies.accounting import Mechanism, epsilon
from policies.errors import BudgetExceeded, PlanError

DEFAULT_EPSILON = 1.0
DEFAULT_DELTA = 1e-5
_SLACK = 1e-9
PUBLIC = "*"  # the researcher of a release everyone sees


class ReleaseMechanism(TypedDict):
    """A charge's mechanism as the budget listings (and their ``--json``) show it."""

    type: str
    noise_multiplier: float
    sample_rate: float
    steps: int
    l2_sensitivity: NotRequired[float]
    l1_sensitivity: NotRequired[float]


class Release(TypedDict):
    """One charged release of a (researcher, dataset), as the listings show it."""

    kind: str
    public: bool
    job: str
    mechanism: ReleaseMechanism
    epsilon: float
    accountant: str
    status: str
    at: str


class PublicRelease(Release):
    dataset: str


class BudgetRow(TypedDict):
    """``Budget.to_dict``: one row of ``datasite budget --json``."""

    researcher: str
    dataset: str
    epsilon_total: float
    epsilon_spent: float
    epsilon_sum_of_jobs: float
    epsilon_remaining: float
    delta: float
    charges: int
    default: bool
    releases: list[Release]


@dataclass(frozen=True)
class Budget:
    researcher: str
    dataset: str
    epsilon_total: float
    delta: float
    epsilon_spent: float
    epsilon_sum: float
    charges: int
    is_default: bool
    releases: tuple[Release, ...] = field(default=())

    @property
    def remaining(self) -> float:
        return max(0.0, self.epsilon_total - self.epsilon_spent)

    def to_dict(self) -> BudgetRow:
        return {
            "researcher": self.researcher,
            "dataset": self.dataset,
            "epsilon_total": self.epsilon_total,
            "epsilon_spent": self.epsilon_spent,
            "epsilon_sum_of_jobs": self.epsilon_sum,
            "epsilon_remaining": self.remaining,
            "delta": self.delta,
            "charges": self.charges,
            "default": self.is_default,
            "releases": list(self.releases),
        }


@dataclass(frozen=True)
class Charge:
    id: int
    epsilon_job: float
    epsilon_spent_after: float
    budget: Budget


def check_budget(epsilon_total: float, delta: float) -> None:
    """PlanError unless a budget is a finite epsilon > 0 at 0 < delta < 1 (no server needed)."""
    if not (0 < epsilon_total < math.inf) or not 0 < delta < 1:
        raise PlanError("a budget needs a finite epsilon > 0 and 0 < delta < 1")


class BudgetLedger:
    """Budgets and charges of one datasite, in its own database (SQLite or PostgreSQL)."""

    def __init__(self, store: SiteStore, accountant: str = "prv") -> None:
        self.store = store
        self.accountant = accountant

    def set_budget(self, researcher: str, dataset: str, epsilon_total: float, delta: float) -> None:
        if researcher.strip() == PUBLIC:
            raise PlanError(f"{PUBLIC!r} names the public, not a researcher")
        check_budget(epsilon_total, delta)
        with self.store.immediate() as conn:
            conn.execute(
                "INSERT INTO budgets VALUES (?, ?, ?, ?) ON CONFLICT (researcher, dataset) "
                "DO UPDATE SET epsilon_total = excluded.epsilon_total, delta = excluded.delta",
                (researcher.lower(), dataset, float(epsilon_total), float(delta)),
            )

    def budget(self, researcher: str, dataset: str) -> Budget:
        with self.store.connect() as conn:
            return self._budget(conn, researcher.lower(), dataset)

    def all(self) -> list[Budget]:
        with self.store.connect() as conn:
            pairs = conn.execute(
                "SELECT researcher, dataset FROM budgets UNION "
                "SELECT researcher, dataset FROM charges WHERE researcher != ? ORDER BY 1, 2",
                (PUBLIC,),
            ).fetchall()
            return [self._budget(conn, r, d) for r, d in pairs]

    def reserve(
        self,
        researcher: str,
        dataset: str,
        job_id: str,
        releases: Sequence[tuple[str, Mechanism]] | Mechanism,
        job_accountant: str,
    ) -> Charge:
        """Record a job's charges (one row per kind of release) or raise BudgetExceeded.

        ``releases`` pairs a kind ("training", "metrics", "mock") with its mechanism; a bare
        Mechanism is training alone. Check and insert are one transaction.
        """
        if isinstance(releases, Mechanism):
            releases = [("training", releases)]
        mechanisms = [m for _, m in releases]
        researcher = researcher.lower()
        with self.store.immediate() as conn:
            existing = conn.execute(
                "SELECT id, noise_multiplier, sample_rate, steps, l2, l1 FROM charges "
                "WHERE job_id = ? AND researcher = ? AND dataset = ? ORDER BY id",
                (job_id, researcher, dataset),
            ).fetchall()
            if existing:  # one charge per job, made at its first round, covers all its rounds
                budget = self._budget(conn, researcher, dataset)
                mine = [Mechanism(r[1], r[2], r[3], r[4], r[5]) for r in existing]
                job_eps = epsilon(mine, budget.delta, job_accountant)
                return Charge(existing[0][0], job_eps, budget.epsilon_spent, budget)
            before = self._budget(conn, researcher, dataset)
            history = self._mechanisms(conn, researcher, dataset)
            after = epsilon([*history, *mechanisms], before.delta, self.accountant)
            job_eps = epsilon(mechanisms, before.delta, job_accountant)
            if after > before.epsilon_total + _SLACK:
                raise BudgetExceeded(
                    f"job would bring epsilon for {researcher} on {dataset!r} to {after:.3f}, "
                    f"past the budget of {before.epsilon_total:.3f} "
                    f"({before.remaining:.3f} remaining){self._public_note(conn, dataset)}"
                )
            ids = [
                self._insert(
                    conn, researcher, dataset, job_id, kind, m, before.delta, job_accountant
                )
                for kind, m in releases
            ]
            budget = self._budget(conn, researcher, dataset)
        return Charge(ids[0], job_eps, after, budget)

    def _insert(  # noqa: PLR0913
        self,
        conn,  # noqa: ANN001
        researcher: str,
        dataset: str,
        job_id: str,
        kind: str,
        mechanism: Mechanism,
        delta: float,
        accountant: str,
    ) -> int:
        cur = conn.execute(
            "INSERT INTO charges (researcher, dataset, job_id, noise_multiplier, sample_rate,"
            " steps, epsilon, accountant, status, kind, l2, l1)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?, 'reserved', ?, ?, ?) RETURNING id",
            (
                researcher,
                dataset,
                job_id,
                mechanism.noise_multiplier,
                mechanism.sample_rate,
                mechanism.steps,
                epsilon([mechanism], delta, accountant),
                accountant,
                kind,
                mechanism.l2,
                mechanism.l1,
            ),
        )
        return int(cur.fetchone()[0])

    def commit(self, charge_id: int) -> None:
        """Mark every charge of the job that ``charge_id`` belongs to as committed."""
        with self.store.immediate() as conn:
            conn.execute(
                "UPDATE charges SET status = 'committed' WHERE (job_id, researcher, dataset) = "
                "(SELECT job_id, researcher, dataset FROM charges WHERE id = ?)",
                (charge_id,),
            )

    def withdraw(self, charge_id: int) -> int:
        """Cancel the still-reserved charges of ``charge_id``'s job; return how many went.

        Called when a job's round failed before anything of it was released: the reply was a
        fixed line, so there is nothing to account. Committed charges are never withdrawn.
        """
        with self.store.immediate() as conn:
            cur = conn.execute(
                "DELETE FROM charges WHERE status = 'reserved' AND researcher != ? AND "
                "(job_id, researcher, dataset) = "
                "(SELECT job_id, researcher, dataset FROM charges WHERE id = ?)",
                (PUBLIC, charge_id),
            )
            return cur.rowcount

    def charge_public(self, dataset: str, job_id: str, kind: str, mechanism: Mechanism) -> int:
        """Record a release every researcher sees (the mock twin): it counts in every budget."""
        with self.store.immediate() as conn:
            charge = self._insert(
                conn, PUBLIC, dataset, job_id, kind, mechanism, DEFAULT_DELTA, self.accountant
            )
            conn.execute("UPDATE charges SET status = 'committed' WHERE id = ?", (charge,))
        return charge

    def withdraw_public(self, charge_id: int) -> None:
        """Undo a public charge whose release never happened (a failed upload)."""
        with self.store.immediate() as conn:
            conn.execute("DELETE FROM charges WHERE id = ? AND researcher = ?", (charge_id, PUBLIC))

    def public_releases(self, dataset: str | None = None) -> list[PublicRelease]:
        """Releases every researcher sees, with their dataset, oldest first."""
        with self.store.connect() as conn:
            names = (
                [dataset]
                if dataset
                else [
                    r[0]
                    for r in conn.execute(
                        "SELECT DISTINCT dataset FROM charges WHERE researcher = ? ORDER BY 1",
                        (PUBLIC,),
                    )
                ]
            )
            return [
                {"dataset": name, **rel}
                for name in names
                for rel in self._releases(conn, PUBLIC, name)
            ]

    def releases(self, researcher: str, dataset: str) -> list[Release]:
        """Every charged release of a (researcher, dataset), in order: kind, job, mechanism."""
        with self.store.connect() as conn:
            return self._releases(conn, researcher.lower(), dataset)

    def _releases(self, conn, researcher: str, dataset: str) -> list[Release]:  # noqa: ANN001
        rows = conn.execute(
            "SELECT kind, job_id, noise_multiplier, sample_rate, steps, epsilon, accountant, "
            "status, created_at, researcher, l2, l1 FROM charges WHERE researcher IN (?, ?) AND dataset = ? ORDER BY id",
            (researcher, PUBLIC, dataset),
        ).fetchall()
        return [
            {
                "kind": r["kind"],
                "public": r["researcher"] == PUBLIC,
                "job": r["job_id"],
                "mechanism": _mechanism_dict(r),
                "epsilon": r["epsilon"],
                "accountant": r["accountant"],
                "status": r["status"],
                "at": r["created_at"],
            }
            for r in rows
        ]

    def _public_note(self, conn, dataset: str) -> str:  # noqa: ANN001
        public = self._mechanisms(conn, PUBLIC, dataset)
        if not public:
            return ""
        spent = epsilon(public, DEFAULT_DELTA, self.accountant)
        return f"; the public mock twin alone spends {spent:.3f} of every budget on it"

    def _mechanisms(self, conn, researcher: str, dataset: str) -> list[Mechanism]:  # noqa: ANN001
        rows = conn.execute(
            "SELECT noise_multiplier, sample_rate, steps, l2, l1 FROM charges "
            "WHERE researcher IN (?, ?) AND dataset = ? ORDER BY id",
            (researcher, PUBLIC, dataset),
        ).fetchall()
        return [Mechanism(*r) for r in rows]

    def _budget(self, conn, researcher: str, dataset: str) -> Budget:  # noqa: ANN001
        row = conn.execute(
            "SELECT epsilon_total, delta FROM budgets WHERE researcher = ? AND dataset = ?",
            (researcher, dataset),
        ).fetchone()
        total, delta = (row[0], row[1]) if row else (DEFAULT_EPSILON, DEFAULT_DELTA)
        history = self._mechanisms(conn, researcher, dataset)
        sums = conn.execute(
            "SELECT COALESCE(SUM(epsilon), 0), "
            "COUNT(DISTINCT CASE WHEN researcher = ? THEN job_id END) FROM charges "
            "WHERE researcher IN (?, ?) AND dataset = ?",
            (researcher, researcher, PUBLIC, dataset),
        ).fetchone()
        spent = epsilon(history, delta, self.accountant)
        releases = tuple(self._releases(conn, researcher, dataset))
        return Budget(
            researcher, dataset, total, delta, spent, sums[0], sums[1], row is None, releases
        )


def _mechanism_dict(row) -> ReleaseMechanism:  # noqa: ANN001
    """A charge's mechanism as the budget listings show it."""
    noise = "skellam" if row["l2"] else "gaussian"
    out: ReleaseMechanism = {
        "type": noise if row["sample_rate"] >= 1.0 else f"poisson-subsampled {noise}",
        "noise_multiplier": row["noise_multiplier"],
        "sample_rate": row["sample_rate"],
        "steps": row["steps"],
    }
    if row["l2"]:
        out["l2_sensitivity"], out["l1_sensitivity"] = row["l2"], row["l1"]
    return out
