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

Above the budgets, an admin may cap a dataset's total (``set_cap``): every release on it, over
all researchers and the public mock, composed in one accountant, the data subjects' guarantee.
That composition grows with every job of every researcher, and runs inside the write lock, so it
is Renyi DP over cached one-step curves (``policies.accounting.rdp_epsilon``): sound, a little
looser than PRV, and fast however long the history.

``would_fit`` is the one answer to "would this job fit", read-only: ``reserve`` asks it inside
its transaction, and the review asks it to fail a job that the runtime would refuse.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import NotRequired, TypedDict

from datasites.ledger.store import SiteStore
from policies.accounting import Mechanism, epsilon, rdp_epsilon
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
class DatasetTotal:
    """Every release on a dataset, over all researchers and the public mock, composed (RDP at
    ``delta``), beside the cap the admin set on it (None: no cap)."""

    dataset: str
    epsilon_spent: float
    delta: float
    epsilon_cap: float | None
    researchers: int

    @property
    def remaining(self) -> float | None:
        return None if self.epsilon_cap is None else max(0.0, self.epsilon_cap - self.epsilon_spent)

    def to_dict(self) -> dict[str, object]:
        return {
            "dataset": self.dataset,
            "epsilon_spent": self.epsilon_spent,
            "epsilon_cap": self.epsilon_cap,
            "epsilon_remaining": self.remaining,
            "delta": self.delta,
            "researchers": self.researchers,
        }


@dataclass(frozen=True)
class Fit:
    """Whether a job's releases fit, composed with what was spent before: the researcher's
    budget (the public mock included) and the dataset's cap. Read-only; ``reserve`` acts on it."""

    budget: Budget  # the researcher's, before the job
    total: DatasetTotal  # the dataset's, before the job
    epsilon_job: float  # the job's releases alone, at the budget's delta
    epsilon_after: float  # the researcher's spend composed with the job
    total_after: float | None  # the dataset's total with the job (None: no cap to check)
    public_spent: float = 0.0  # the public mock's share of every budget on the dataset
    charged: bool = False  # the job id is charged already: it spends nothing more

    @property
    def fits_budget(self) -> bool:
        return self.charged or self.epsilon_after <= self.budget.epsilon_total + _SLACK

    @property
    def fits_cap(self) -> bool:
        cap, after = self.total.epsilon_cap, self.total_after
        return self.charged or cap is None or after is None or after <= cap + _SLACK

    @property
    def fits(self) -> bool:
        return self.fits_budget and self.fits_cap

    def refusal(self) -> str | None:
        """Why the job cannot be charged, naming what is left (None when it fits)."""
        b, t = self.budget, self.total
        if not self.fits_budget:
            public = (
                f"; the public mock twin alone spends {self.public_spent:.3f} of every budget on it"
                if self.public_spent
                else ""
            )
            return (
                f"job would bring epsilon for {b.researcher} on {b.dataset!r} to "
                f"{self.epsilon_after:.3f}, past the budget of {b.epsilon_total:.3f} "
                f"({b.remaining:.3f} remaining){public}"
            )
        if not self.fits_cap:
            return (
                f"job would bring the total epsilon on {t.dataset!r} (every researcher and the "
                f"public mock) to {self.total_after:.3f}, past the dataset's cap of "
                f"{t.epsilon_cap:.3f} ({t.remaining:.3f} remaining)"
            )
        return None

    def summary(self) -> str:
        """One line for the review: the job beside both remainders, after it."""
        b, t = self.budget, self.total
        if self.charged:
            return f"job id already charged on {b.dataset!r}: it spends nothing more"
        public = (
            f", the public mock's {self.public_spent:.3f} included" if self.public_spent else ""
        )
        mine = (
            f"epsilon {self.epsilon_job:.3f} for this job (delta {b.delta:g}); "
            f"{b.researcher}'s spend on {b.dataset!r} composed with it: {self.epsilon_after:.3f} of "
            f"{b.epsilon_total:.3f} ({b.remaining:.3f} left before it{public})"
        )
        if t.epsilon_cap is None:
            return f"{mine}; no cap on the dataset's total ({t.epsilon_spent:.3f} spent)"
        return (
            f"{mine}; dataset total over every researcher and the mock: {self.total_after:.3f} "
            f"of its cap {t.epsilon_cap:.3f} ({t.remaining:.3f} left before it)"
        )


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
            fit = self._fit(conn, researcher, dataset, mechanisms, job_accountant)
            refusal = fit.refusal()
            if refusal is not None:  # checked and inserted under the same write lock
                raise BudgetExceeded(refusal)
            delta = fit.budget.delta
            ids = [
                self._insert(conn, researcher, dataset, job_id, kind, m, delta, job_accountant)
                for kind, m in releases
            ]
            budget = self._budget(conn, researcher, dataset)
        return Charge(ids[0], fit.epsilon_job, fit.epsilon_after, budget)

    def would_fit(
        self,
        researcher: str,
        dataset: str,
        releases: Sequence[tuple[str, Mechanism]] | Mechanism,
        job_accountant: str = "prv",
        job_id: str | None = None,
    ) -> Fit:
        """What ``reserve`` would decide now, with the same arithmetic; writes nothing."""
        if isinstance(releases, Mechanism):
            releases = [("training", releases)]
        mechanisms = [m for _, m in releases]
        with self.store.connect() as conn:
            return self._fit(conn, researcher.lower(), dataset, mechanisms, job_accountant, job_id)

    def _fit(  # noqa: PLR0913
        self,
        conn,  # noqa: ANN001
        researcher: str,
        dataset: str,
        mechanisms: Sequence[Mechanism],
        job_accountant: str,
        job_id: str | None = None,
    ) -> Fit:
        before = self._budget(conn, researcher, dataset)
        total = self._total(conn, dataset)
        public = self._public_spent(conn, dataset)
        job_eps = epsilon(mechanisms, before.delta, job_accountant)
        charged = job_id is not None and bool(
            conn.execute(
                "SELECT 1 FROM charges WHERE job_id = ? AND researcher = ? AND dataset = ?",
                (job_id, researcher, dataset),
            ).fetchone()
        )
        if charged:
            return Fit(before, total, job_eps, before.epsilon_spent, None, public, True)
        history = self._mechanisms(conn, researcher, dataset)
        after = epsilon([*history, *mechanisms], before.delta, self.accountant)
        total_after = None
        if total.epsilon_cap is not None:
            everything = self._mechanisms(conn, None, dataset)
            total_after = rdp_epsilon([*everything, *mechanisms], total.delta)
        return Fit(before, total, job_eps, after, total_after, public)

    def set_cap(self, dataset: str, epsilon_total: float, delta: float = DEFAULT_DELTA) -> None:
        """Cap every release on ``dataset``, over all researchers and the public mock. A cap
        below what is spent already is kept: no job fits until it is raised."""
        check_budget(epsilon_total, delta)
        with self.store.immediate() as conn:
            conn.execute(
                "INSERT INTO dataset_caps VALUES (?, ?, ?) ON CONFLICT (dataset) "
                "DO UPDATE SET epsilon_total = excluded.epsilon_total, delta = excluded.delta",
                (dataset, float(epsilon_total), float(delta)),
            )

    def total(self, dataset: str) -> DatasetTotal:
        with self.store.connect() as conn:
            return self._total(conn, dataset)

    def totals(self) -> list[DatasetTotal]:
        """Every dataset with a charge or a cap, by name."""
        with self.store.connect() as conn:
            names = conn.execute(
                "SELECT dataset FROM charges UNION SELECT dataset FROM dataset_caps ORDER BY 1"
            ).fetchall()
            return [self._total(conn, n[0]) for n in names]

    def _total(self, conn, dataset: str) -> DatasetTotal:  # noqa: ANN001
        cap = conn.execute(
            "SELECT epsilon_total, delta FROM dataset_caps WHERE dataset = ?", (dataset,)
        ).fetchone()
        delta = cap[1] if cap else DEFAULT_DELTA
        people = conn.execute(
            "SELECT COUNT(DISTINCT researcher) FROM charges WHERE dataset = ? AND researcher != ?",
            (dataset, PUBLIC),
        ).fetchone()[0]
        spent = rdp_epsilon(self._mechanisms(conn, None, dataset), delta)
        return DatasetTotal(dataset, spent, delta, cap[0] if cap else None, int(people))

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

    def _public_spent(self, conn, dataset: str) -> float:  # noqa: ANN001
        public = self._mechanisms(conn, PUBLIC, dataset)
        return epsilon(public, DEFAULT_DELTA, self.accountant) if public else 0.0

    def _mechanisms(self, conn, researcher: str | None, dataset: str) -> list[Mechanism]:  # noqa: ANN001
        """A researcher's charges on ``dataset`` with the public ones; None: everyone's."""
        params: tuple[str, ...]
        if researcher is None:
            sql, params = "WHERE dataset = ?", (dataset,)
        else:
            sql, params = (
                "WHERE researcher IN (?, ?) AND dataset = ?",
                (researcher, PUBLIC, dataset),
            )
        rows = conn.execute(
            f"SELECT noise_multiplier, sample_rate, steps, l2, l1 FROM charges {sql} ORDER BY id",
            params,
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
