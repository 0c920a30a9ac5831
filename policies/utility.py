"""Will this job learn? Warnings from public numbers only, each naming its cause and its fix.

Why: a DP job that cannot learn still spends its budget, and its only symptom is a model that
predicts the majority class. Three causes are visible before anything runs, from what the
sites publish (row counts, class counts, the mock's rows and epsilon, the published feature
statistics) and the plan itself, so the researcher's ``try`` and ``submit`` and the admin's
review can all say so, at no cost in epsilon:

* **a step that is mostly noise**: DP-SGD adds noise of std ``sigma * clip`` to the sum of a
  batch's clipped gradients, each of norm at most ``clip``; the mean over an expected batch of
  ``B`` rows then carries noise ``sigma * clip / B`` per coordinate. Past ``clip`` (a ratio
  ``sigma / B`` above 1) every coordinate's noise is as large as the whole signal's norm;
* **a published statistic that is mostly noise**: the feature mean and std come from the DP
  mock (``datasites.data.mock``). Its range search sums a column's grid histogram over windows
  of up to ``RANGE_WINDOW`` bins and keeps windows above ``RANGE_SIGMAS`` noise sds; a site
  whose rows are fewer than that threshold cannot find any column's range above the noise, so
  its published scale is a guess, and a job that standardises with it gets near-constant
  inputs. Declared bounds make the statistic exact in range;
* **a class the batches rarely see**: a class with fewer expected rows per step than one, over
  the whole federation, is absent from most steps' gradients.

The warnings never block: a job may still be worth running, and the admin decides.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from policies.plan import TrainingPlan, step_plan, training_rows
from policies.scaling import blank_inputs

MAX_STEP_NOISE = 1.0  # sigma / expected batch: noise std per coordinate over the clip
# the rows a site needs to find a column's range: RANGE_SIGMAS noise sds over RANGE_WINDOW
# bins. Above datasites.data.mock's bar (3.6 sds on a small table's grid, for windows of up to
# 3 bins: 6.3 sds of rows; tests/unit/test_utility.py holds the two together), so that a site
# the check passes finds its ranges even when a column's rows spread over its widest window
RANGE_SIGMAS = 4.0
RANGE_WINDOW = 8
MIN_CLASS_ROWS_PER_STEP = 1.0
OUTLIER_RATIO = 10.0  # a site's std this far off the other sites' median is named
MOCK_EPSILONS = (1.5, 2.0, 2.5, 3.0, 4.0, 5.0, 6.0, 8.0, 10.0)  # what a warning may suggest


@dataclass(frozen=True)
class UtilityWarning:
    """One reason the job may not learn: what (``kind``), why (``cause``), what to do (``fix``)."""

    kind: str
    cause: str
    fix: str

    @property
    def text(self) -> str:
        return f"{self.cause}: {self.fix}"

    def to_dict(self) -> dict[str, str]:
        return {"kind": self.kind, "cause": self.cause, "fix": self.fix}


def expected_batch(rows: int, plan: TrainingPlan) -> float:
    """The mean batch a site's Poisson sampler draws: its training rows over its steps/epoch."""
    return step_plan(training_rows(rows, plan), plan).expected_batch


def step_noise(noise_multiplier: float, rows: int, plan: TrainingPlan) -> float:
    """Noise std per coordinate of a step's mean gradient, in units of the clip."""
    return noise_multiplier / expected_batch(rows, plan)


def step_warnings(
    plan: TrainingPlan, rows: Mapping[str, int], noise: Mapping[str, float]
) -> list[UtilityWarning]:
    """Sites whose DP-SGD step is mostly noise, at the plan's sigma and expected batch."""
    out = []
    for site, sigma in noise.items():
        n = int(rows.get(site) or 0)
        if n < 1 or not plan.dp.distributed and sigma <= 0:
            continue
        ratio = step_noise(sigma, n, plan)
        if ratio <= MAX_STEP_NOISE:
            continue
        batch = expected_batch(n, plan)
        wanted = min(training_rows(n, plan), math.ceil(sigma / MAX_STEP_NOISE * 2))
        out.append(
            UtilityWarning(
                "step_noise",
                f"at {site}, each step's noise (sigma {sigma:.3g} x clip over an expected batch of "
                f"{batch:.0f} rows) is {ratio:.2g} times the clipped gradient's whole norm; the "
                "model will learn little more than the majority class",
                f"raise batch_size (toward {wanted}), lower rounds or local_epochs, raise "
                "target_epsilon, or run 'researcher plan'",
            )
        )
    return out


def mock_noise(meta: Mapping[str, Any], epsilon: float | None = None) -> float | None:
    """The std of the Gaussian noise on each count of the site's mock histograms (public)."""
    from policies.accounting import noise_for_target

    eps = float(epsilon if epsilon is not None else meta.get("mock_epsilon") or 0.0)
    schema = meta.get("schema") or []
    columns = max(1, len(schema) - 1) if schema else len(meta.get("feature_std") or [])
    if eps <= 0 or columns < 1:
        return None
    numeric = columns - len(meta.get("categories") or {})
    nm = noise_for_target(eps, float(meta.get("mock_delta") or 1e-5), 1.0, 1)
    return nm * math.sqrt(1 + numeric + columns)


def statistic_warnings(
    metas: Mapping[str, Mapping[str, Any]], plan: TrainingPlan, names: list[str] | None = None
) -> list[UtilityWarning]:
    """Published feature statistics too noisy to standardise with (only when the plan does)."""
    if not plan.standardize:
        return []
    out = []
    for site, meta in metas.items():
        warning = _mock_warning(site, meta, names)
        if warning:
            out.append(warning)
    out += _outlier_warnings(metas, names)
    return out


def _unbounded(meta: Mapping[str, Any], names: list[str]) -> list[str]:
    """Numeric columns without owner-declared bounds, the weak ranges first.

    ``bounds_source`` says per column where its published range came from: "declared" by the
    owner (exact, skipped here), "dp" (found by the mock's range search) or "weak" (no range
    stood clear of the noise). Metadata from before it lists declared ``bounds`` only.
    """
    source = meta.get("bounds_source")
    if source is None:
        declared = set(meta.get("bounds") or {})
    else:
        declared = {c for c, s in source.items() if s == "declared"}
    categorical = set(meta.get("categories") or {})
    left = [n for n in names if n not in declared and n not in categorical]
    return [n for n in left if _weak(meta, n)] + [n for n in left if not _weak(meta, n)]


def _weak(meta: Mapping[str, Any], name: str) -> bool:
    return (meta.get("bounds_source") or {}).get(name) == "weak"


def _feature_names(meta: Mapping[str, Any]) -> list[str]:
    target = meta.get("target")
    schema = meta.get("schema") or []
    named = [str(c[0] if isinstance(c, list | tuple) else c) for c in schema]
    named = [c for c in named if c != target]
    return named or [f"x{i}" for i in range(len(meta.get("feature_std") or []))]


@dataclass(frozen=True)
class _NoisyStatistics:
    """Columns whose published statistics a site's mock could not read above its noise."""

    columns: list[str]
    sigma: float
    rows: int
    epsilon: float  # the mock's
    wanted: float | None  # the smallest round mock epsilon that would, if any

    @property
    def listed(self) -> str:
        more = len(self.columns) - 3
        return ", ".join(self.columns[:3]) + (f" and {more} more" if more > 0 else "")

    @property
    def upload(self) -> str:
        if self.wanted is None:
            return f"no mock epsilon up to {MOCK_EPSILONS[-1]:g} suffices at this size"
        return f"upload with --mock-epsilon {self.wanted:g}"


def _noisy_statistics(meta: Mapping[str, Any], names: list[str] | None) -> _NoisyStatistics | None:
    rows = int(meta.get("rows") or 0)
    sigma = mock_noise(meta)
    columns = _unbounded(meta, names or _feature_names(meta))
    if sigma is None or rows < 1 or not columns:
        return None
    need = RANGE_SIGMAS * sigma * math.sqrt(RANGE_WINDOW)
    if rows >= need and not any(_weak(meta, c) for c in columns):
        return None
    wanted = _mock_epsilon_for(meta, rows / (RANGE_SIGMAS * math.sqrt(RANGE_WINDOW)))
    return _NoisyStatistics(columns, sigma, rows, float(meta.get("mock_epsilon") or 0.0), wanted)


def _mock_warning(
    site: str, meta: Mapping[str, Any], names: list[str] | None
) -> UtilityWarning | None:
    noisy = _noisy_statistics(meta, names)
    if noisy is None:
        return None
    mock_rows = meta.get("mock_rows") or noisy.rows
    return UtilityWarning(
        "statistics",
        f"at {site}, the published mean and std of {noisy.listed} come from a {mock_rows}-row "
        f"mock at epsilon {noisy.epsilon:g}, whose histogram noise (sd {noisy.sigma:.3g} per count) "
        f"hides a column of {noisy.rows} rows: the scale may be off by orders of magnitude",
        f"declare bounds for these columns, or {noisy.upload}, or set standardize to false",
    )


def upload_warning(meta: Mapping[str, Any]) -> UtilityWarning | None:
    """What the owner is told at upload when the mock's statistics will be mostly noise.

    Why at upload: the researcher's ``try`` and the admin's review say the same (the test of
    ``_mock_warning``), but only the owner can fix it for free, by declaring the data
    dictionary's bounds; on wine-sized tables (two sites of about 70 rows, 13 columns) that
    took the default job from 0.91 to 0.94 (docs/benchmarks.md). Public numbers only."""
    noisy = _noisy_statistics(meta, None)
    if noisy is None:
        return None
    return UtilityWarning(
        "statistics",
        f"at epsilon {noisy.epsilon:g} the mock's noise (sd {noisy.sigma:.3g} per count) is too large "
        f"for {noisy.rows} rows to show where a column lies: the ranges, means and stds "
        f"published for {noisy.listed} are coarse guesses, and jobs that scale with them "
        "learn little",
        f"declare their public bounds (--bounds FILE, no epsilon spent), or {noisy.upload}",
    )


def _mock_epsilon_for(meta: Mapping[str, Any], sigma_wanted: float) -> float | None:
    """The smallest of a few round mock epsilons whose histogram noise is at most this."""
    current = float(meta.get("mock_epsilon") or 1.0)
    for eps in MOCK_EPSILONS:
        if eps <= current:
            continue
        sigma = mock_noise(meta, eps)
        if sigma is not None and sigma <= sigma_wanted:
            return eps
    return None


def _outlier_warnings(
    metas: Mapping[str, Mapping[str, Any]], names: list[str] | None
) -> list[UtilityWarning]:
    """Columns whose published std at one site is OUTLIER_RATIO off the others' median.

    Sites whose range for the column holds only zeros (``scaling.zero_only``: blank there, as
    label skew leaves pixels) are neither counted nor named, as in the researcher's pooling."""
    stds: dict[str, list[float]] = {
        s: list(m["feature_std"]) for s, m in metas.items() if m.get("feature_std")
    }
    if len(stds) < 3 or len({len(v) for v in stds.values()}) != 1:
        return []
    first = next(iter(metas.values()))
    names = names or _feature_names(first)
    blank = {s: blank_inputs(metas[s], len(v)) for s, v in stds.items()}
    out = []
    for j in range(len(next(iter(stds.values())))):
        witnesses = {s: v for s, v in stds.items() if not blank[s][j]}
        if len(witnesses) < 3:
            continue
        column = sorted(float(v[j]) for v in witnesses.values())
        median = column[len(column) // 2]
        for site, values in witnesses.items():
            ratio = max(float(values[j]), 1e-12) / max(median, 1e-12)
            if ratio > OUTLIER_RATIO or ratio < 1 / OUTLIER_RATIO:
                name = names[j] if j < len(names) else f"feature {j}"
                out.append(
                    UtilityWarning(
                        "statistics",
                        f"column {name}'s published std at {site} is {float(values[j]):.3g}, "
                        f"{ratio:.2g} times the other sites' median {median:.3g}",
                        f"ask {site} to declare bounds for {name}, or to upload with a higher "
                        "--mock-epsilon",
                    )
                )
    return out


def class_warnings(
    plan: TrainingPlan, metas: Mapping[str, Mapping[str, Any]]
) -> list[UtilityWarning]:
    """Classes that the federation's batches rarely contain (expected rows per step < 1)."""
    if plan.loss == "mse":
        return []
    per_step: dict[int, float] = {}
    for meta in metas.values():
        counts, rows = meta.get("class_counts"), int(meta.get("rows") or 0)
        if not counts or rows < 1:
            continue
        q = step_plan(training_rows(rows, plan), plan).sample_rate
        for k, count in enumerate(counts):
            per_step[k] = per_step.get(k, 0.0) + max(float(count), 0.0) * q
    classes = _class_names(metas)
    out = []
    for k, expected in sorted(per_step.items()):
        if expected >= MIN_CLASS_ROWS_PER_STEP:
            continue
        label = classes[k] if k < len(classes) else k
        out.append(
            UtilityWarning(
                "classes",
                f"class {label} has ~{expected:.2g} expected rows per step over the whole "
                "federation (fewer rows than batches): most steps never see it",
                "raise batch_size so that each step holds at least one of its rows, or "
                'use class_weight "balanced"',
            )
        )
    return out


def _class_names(metas: Mapping[str, Mapping[str, Any]]) -> list[Any]:
    for meta in metas.values():
        if meta.get("classes"):
            return list(meta["classes"])
    return []


def utility_warnings(
    plan: TrainingPlan,
    metas: Mapping[str, Mapping[str, Any]],
    noise: Mapping[str, float],
) -> list[UtilityWarning]:
    """Every warning for ``plan`` over the sites' published metadata and their noise."""
    if plan.dp.distributed:  # one shared step per round over all sites: its own arithmetic
        return class_warnings(plan, metas) + statistic_warnings(metas, plan)
    rows = {site: int(meta.get("rows") or 0) for site, meta in metas.items()}
    return (
        step_warnings(plan, rows, noise)
        + statistic_warnings(metas, plan)
        + class_warnings(plan, metas)
    )
