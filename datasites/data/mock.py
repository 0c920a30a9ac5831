"""The differentially private mock twin of a private table, and the statistics it publishes.

Why this shape: everything the mock shows about the private table must be covered by the site's
ledger, so the mock is drawn from noisy counts alone (OpenDP's discrete Gaussian on integer
vectors, exact sampling, no floating-point leak), and every published statistic (row count,
feature range, mean and std) is post-processing of those counts.

Three count vectors, each Gaussian, under add/remove-one-row neighbours (one row moves one count
of each per-column histogram):

1. *The class counts* (or the row count of a continuous target), at scale ``sigma_c``.
2. *Where each column lies*, for every numeric column without owner-declared bounds: a histogram
   over a fixed grid (-1e9 .. -1e-3, 0, 1e-3 .. 1e9), at scale ``sigma_r``. A column's range is
   the span of windows whose noisy count stands ``_threshold`` noise sds clear (``_dp_range``).
   The grid has one bin a decade on small tables, and two or four where the noisy row count
   (released first) stands 20 or 50 noise sds above ``sigma_r`` (``RESOLUTIONS``): a decade
   holds four times the rows of a quarter decade for the same noise, and on a 66-row table
   half the columns' ranges used to land on a noise spike of the quarter-decade grid (a mean of
   -13,855,824 for a column in [0.4, 3.6], issue 25).
   A window counts only its own bins: none that a passing window claimed, and (two bins or
   wider) not the bin beside one (``_own_score``); a window across empty bins joins the range
   only past a stricter bound (``FALSE_APART``), unless it joins the zeros to their values.
   Otherwise a window borrowed a thin real bin, or a spike two decades off joined, and a
   column's range ran up to five decades past its values (one mock in twenty on 30 columns).
   The grid is bounded: no range reaches past 1e9. A bin next to the range that holds rows
   joins it (``_widen``, one test a side), and on the decade grid a range of one sign reaches
   zero (``_from_zero``): a range too narrow erases what the clamp cuts off, one too wide only
   coarsens (digits' pixels lost up to half their values to ranges of [10, 100]). Columns
   with declared bounds (public schema, ``datasite upload --bounds``) skip this release: no
   epsilon is spent finding their range.
3. *The shape within*: per class, per column, a histogram of ``BINS`` equal bins over the range
   (unit bins for integer columns of a narrow range), at scale ``sigma_f``.

The three scales share one budget: 1/sigma_c^2 + d_r/sigma_r^2 + d/sigma_f^2 = 1/nm^2, with
shares ``SHARES`` (the range gets most where it must be found: a wrong range costs a column,
a noisy shape only some fidelity). Gaussian DP composes in quadrature, so the whole is exactly
one Gaussian mechanism of noise multiplier nm, charged as ``Mechanism(nm, 1.0, 1)``.

A categorical column (text at upload, a pandas categorical here) has a public domain, its
published category list: no range release, and its shape histogram is over its categories.

Published per numeric column (``MockRelease.ranges``, ``.stats``, ``.sources``): the range
(declared, or found, or "weak" when no decade stood clear and the fullest window was taken), and a
mean and std from the noisy shape counts summed over classes, shrunk towards the range's centre
and quarter width (the geometric centre of a searched range of decades, from where its values
were found to begin, ``_floor``, ``_prior``) as far as the noise there demands
(``_column_stats``): on a few dozen rows the published std is then the range's, never the std
of a 28-row mock (0.0003 for digits' columns whose std is 5). Every consumer clamps to the
range and floors the std (``policies.scaling``). Columns on the same bins pool their noisy
counts into a prior with less noise, taken where it puts a column's spread lower
(``_pooled_stats``): alike columns (pixels) then publish alike stds.

Rows are then drawn class by class (class share from the noisy counts), each column independently
from its class's noisy histogram, uniformly within a bin. Not kept: correlations between columns.
Disclosed without noise, as schema: column names and dtypes, the label set of a class target, the
category list of each categorical column, and declared bounds.
On small tables with many columns the noise dominates: the mock is for running code, not for
modelling; ``--mock-epsilon`` buys fidelity with budget, and declared bounds buy it for free.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, NamedTuple, cast

import numpy as np

if TYPE_CHECKING:
    import pandas as pd

    from policies.accounting import Mechanism

MAX_CLASSES = 20  # a target with more distinct values is continuous
DEFAULT_MOCK_EPSILON = 1.0
BINS = 16
RANGE_SIGMAS = 3.0  # the least a window must stand clear of the noise (``_threshold``)
FALSE_WINDOW = 0.01  # the chance a column gets a window of pure noise in its range search
FALLBACK_WIDTH = 2  # decades
MAX_WIDTH = 3  # decades: the widest window tried for a range
# shares of the budget (zCDP rho): class counts, range search, shapes; without a range search its
# share goes to the shapes
SHARES = (0.1, 0.7, 0.2)


def grid(per_decade: int = 1) -> np.ndarray:
    """The range search's edges: 0, and +-1e-3 .. +-1e9 with ``per_decade`` bins a decade."""
    pos = 10.0 ** (np.arange(-3 * per_decade, 9 * per_decade + 1) / per_decade)
    return np.concatenate([-pos[::-1], [0.0], pos])


GRID = grid(1)
# bins a decade for the range search, from the noisy row count over the grid's noise sd (both
# public once the class counts are released): finer where the rows stand far above the noise
RESOLUTIONS = ((50.0, 4), (20.0, 2), (0.0, 1))
# decades below this magnitude count as "at zero" when deciding whether two passing windows are
# one bulk: a zero-inflated column (digits' pixels: 0, or 1..16) is one bulk, not a spike
NEAR_ZERO = 0.1
# a searched range at least this many times wider at its top than at its bottom gets the
# geometric prior (``_prior``); a range from zero is taken to span ZERO_DECADES
LOG_PRIOR_RATIO = 5.0
ZERO_DECADES = 1
# noise sds a decade next to a column's bulk must stand clear of to join its range (``_widen``)
LINK_SIGMAS = 2.0
FLOOR_SIGMAS = 2.5  # a step down from a range's top towards where its values begin (``_floor``)
MAX_GAP = 3  # decades between passing windows that still belong to one bulk
# the chance a column links a window of pure noise across empty bins to its bulk (``_bulk``)
FALSE_APART = 1e-4
# columns released on the same bins that pool their shape counts for a prior (``_pooled_stats``)
GROUP_MIN = 3


Bounds = dict[str, tuple[float, float]]


@dataclass(frozen=True)
class MockRelease:
    """The mock, what it publishes, and the one mechanism its noise amounts to."""

    mock: pd.DataFrame
    rows: int  # the noisy private row count
    mechanism: Mechanism
    epsilon: float
    delta: float
    # per numeric column: the published range, its source ("declared", "dp", "weak"), and the
    # published (mean, std) from the noisy shape counts
    ranges: dict[str, tuple[float, float]] = field(default_factory=dict)
    sources: dict[str, str] = field(default_factory=dict)
    stats: dict[str, tuple[float, float]] = field(default_factory=dict)


def make_mock(  # noqa: PLR0913
    frame: pd.DataFrame,
    target: str,
    rows: int = 1000,
    epsilon: float = DEFAULT_MOCK_EPSILON,
    delta: float = 1e-5,
    seed: int | None = None,
    bounds: Bounds | None = None,
) -> MockRelease:
    """Synthetic rows with the columns and dtypes of ``frame``, epsilon-DP at ``delta``.

    ``bounds``: owner-declared public (lower, upper) per numeric column; ``frame`` must already
    be clamped to them (``datasites.data.tables.clamp``). ``seed`` fixes the sampling from the
    noisy histograms only; the noise itself is never seeded.
    """
    import pandas as pd

    from policies.accounting import Mechanism, noise_for_target

    bounds = dict(bounds or {})
    keys = class_keys(frame, target)
    columns = [c for c in frame.columns if not (keys and c == target)]
    numeric = [c for c in columns if not _is_categorical(frame[c])]
    searched = [c for c in numeric if c not in bounds]
    nm = noise_for_target(float(epsilon), float(delta), 1.0, 1)
    sigma_c, sigma_r, sigma_f = _scales(nm, len(searched), len(columns))
    counts = _noisy(_class_counts(frame, target, keys), sigma_c)
    ranges = {c: (float(bounds[c][0]), float(bounds[c][1])) for c in numeric if c in bounds}
    sources = dict.fromkeys(ranges, "declared")
    floors: dict[str, float] = {}
    if searched:
        noisy_rows = float(np.clip(counts, 0, None).sum())
        edges_r = grid(next(r for ratio, r in RESOLUTIONS if noisy_rows >= ratio * sigma_r))
        counted = [_grid_counts(frame[c].to_numpy(np.float64), edges_r) for c in searched]
        noisy_grid = np.split(_noisy(np.concatenate(counted), sigma_r), len(searched))
        coarse = len(edges_r) == len(GRID)  # one bin a decade: a small, noisy table
        for c, noisy in zip(searched, noisy_grid, strict=True):
            got = _dp_range(noisy, sigma_r, edges_r)
            ranges[c] = _from_zero(got.low, got.high)[1] if got.found and coarse else got[:2]
            if got.found:
                floors[c] = _lowest(_floor(noisy, sigma_r, edges_r, *ranges[c]), got.start)
            sources[c] = "dp" if got.found else "weak"
    edges = {c: _edges(*ranges[c], _is_int(frame[c])) for c in numeric}
    # a categorical column's domain is its public category list: one unit bin per code
    edges.update(
        {c: np.arange(len(frame[c].cat.categories) + 1) - 0.5 for c in columns if c not in ranges}
    )
    rng = np.random.default_rng(seed)
    total = max(1, int(np.clip(counts, 0, None).sum()))
    n_rows = max(1, min(rows, total))
    parts, shapes = [], {c: np.zeros(len(edges[c]) - 1) for c in numeric}
    for i, key in enumerate(keys or [None]):
        group = frame if key is None else frame[frame[target] == key]
        n = max(1, round(n_rows * _share(counts, i)))  # every class of the (public) label set
        part, drawn = _draw_group(group, columns, edges, sigma_f, n, rng)
        for c in numeric:
            shapes[c] += drawn[c]
        if key is not None:
            part[target] = key
        parts.append(part)
    sigma_s = sigma_f * math.sqrt(len(keys) or 1)  # the shapes are summed over classes
    priors = {
        c: _prior(*ranges[c], searched=sources[c] != "declared", floor=floors.get(c, 0.0))
        for c in numeric
    }
    stats = {c: _column_stats(shapes[c], edges[c], total, sigma_s, priors[c]) for c in numeric}
    stats.update(_pooled_stats(shapes, edges, total, sigma_s, priors, stats))
    mock = pd.concat(parts, ignore_index=True)
    mock = _finish(mock, frame, ranges)
    mock = mock.sample(frac=1.0, random_state=int(rng.integers(1 << 31))).reset_index(drop=True)
    mechanism = Mechanism(nm, 1.0, 1)
    return MockRelease(mock, total, mechanism, float(epsilon), float(delta), ranges, sources, stats)


def _scales(nm: float, searched: int, columns: int) -> tuple[float, float, float]:
    """Noise scales of the class counts, the range grids and the shapes, whose zCDP costs add
    up to one Gaussian of noise multiplier ``nm``: a_c + a_r + a_f = 1 with 1/sigma^2 = a/nm^2
    per unit-sensitivity count set (``searched`` range grids, ``columns`` shape histograms)."""
    a_c, a_r, a_f = SHARES
    if not searched:
        a_r, a_f = 0.0, a_r + a_f
    sigma_c = nm / math.sqrt(a_c)
    sigma_r = nm * math.sqrt(searched / a_r) if searched else math.inf
    sigma_f = nm * math.sqrt(columns / a_f)
    return sigma_c, sigma_r, sigma_f


def class_keys(frame: pd.DataFrame, target: str) -> list:
    """The label set of a class target (disclosed as schema), or [] for a continuous one."""
    values = frame[target].unique()
    if len(values) > MAX_CLASSES:
        return []
    whole = np.all(np.mod(np.asarray(values, dtype=np.float64), 1.0) == 0)
    # a float target with a few values is a measurement, not classes: as class keys its exact
    # values would be in the mock (red team)
    return sorted(values.tolist()) if whole else []


def _class_counts(frame: pd.DataFrame, target: str, keys: list) -> np.ndarray:
    if not keys:
        return np.array([len(frame)])
    return frame[target].value_counts().reindex(keys, fill_value=0).to_numpy()


def _noisy(counts: np.ndarray, sigma: float) -> np.ndarray:
    """Counts plus OpenDP's discrete Gaussian of scale ``sigma`` (exact, CSPRNG-driven)."""
    import opendp.prelude as dp

    dp.enable_features("contrib")
    space = dp.vector_domain(dp.atom_domain(T=int)), dp.l2_distance(T=int)
    measure = dp.m.make_gaussian(*space, scale=float(sigma))
    return np.asarray(measure([int(c) for c in counts]), dtype=np.int64)


def _grid_counts(values: np.ndarray, edges: np.ndarray = GRID) -> np.ndarray:
    bins = np.clip(np.searchsorted(edges, values, side="right") - 1, 0, len(edges) - 2)
    return np.bincount(bins, minlength=len(edges) - 1)


class Found(NamedTuple):
    """A range search's answer: the range, whether any window stood clear of the noise, and
    where the bulk of windows that did began before ``_widen`` (a magnitude, as ``_from_zero``
    gives it: 0.0 for a bulk from or across zero)."""

    low: float
    high: float
    found: bool
    start: float = 0.0


def _dp_range(noisy: np.ndarray, sigma: float, edges: np.ndarray = GRID) -> Found:
    """The span of grid bins that stand clear of the noise (post-processing of one histogram),
    and whether any did.

    Bins are summed in windows of 1, 2, ... neighbours up to ``MAX_WIDTH`` decades (a window's
    noise grows as its square root); every window that passes ``_threshold`` noise sds at
    any width is a candidate, and the range spans the run of candidates around the fullest
    (``_bulk``): a zero spike and a tail spread over two decades are then one range. When none
    passes (few rows, much noise), the fullest window of ``FALLBACK_WIDTH`` decades is taken and
    the range is published as weak: the researcher's pooling prefers another site's range.
    """
    noisy = noisy.astype(np.float64)
    per_decade = max(1, round((len(edges) - 2) / 24))
    widths = range(1, MAX_WIDTH * per_decade + 1)
    tests = sum(len(noisy) - w + 1 for w in widths)
    threshold = _threshold(tests)
    spans: list[tuple[int, int, float]] = []  # (first bin, last bin, noise sds)
    claimed = np.zeros(len(noisy), dtype=bool)  # bins inside a window that passed
    for width in widths:
        sums = np.convolve(noisy, np.ones(width), mode="valid")
        score = sums / (sigma * math.sqrt(width))
        for i in np.flatnonzero(score > threshold):
            if any(a >= i and b <= i + width - 1 for a, b, _ in spans):
                continue  # it holds a passing window: it passes because of it
            own = _own_score(noisy, claimed, i, width, sigma)
            if own > threshold:
                spans.append((int(i), int(i) + width - 1, own))
                claimed[i : i + width] = True
    if spans:
        bulk = _bulk(spans, edges, _threshold(tests, FALSE_APART))
        start = _from_zero(*_ends(edges, *bulk))[0]
        return Found(*_ends(edges, *_widen(noisy, sigma, *bulk)), True, start)
    sums = np.convolve(noisy, np.ones(FALLBACK_WIDTH * per_decade), mode="valid")
    first = int(np.argmax(sums))
    return Found(float(edges[first]), float(edges[first + FALLBACK_WIDTH * per_decade]), False)


def _own_score(
    noisy: np.ndarray, claimed: np.ndarray, start: int, width: int, sigma: float
) -> float:
    """The noise sds of the window of ``width`` bins from ``start``, from its own bins only:
    not ``claimed`` by a passing window, nor (``width`` >= 2) beside one; 0.0 if none are left.

    Why: a window that holds rows another window already showed passes because of them, and
    would stretch the range by its width. Only the bins of its own count, and for a window of
    two bins or more not the bin beside a claimed one either: a thin real bin at the top of
    the bulk (4 noise sds, just under the bar) carried a window of three empty bins with it.
    Both stretched ranges by up to three decades: breast cancer columns of values 8..36
    published [5.6, 31623] and 0.002..0.04 [0.003, 31.6] at epsilon 50, in about one mock in
    twenty between them. The bin beside the bulk still joins by ``_widen``'s one-sided test.
    """
    taken = claimed.copy()
    if width > 1:  # a bin beside the bulk is _widen's to judge
        taken[1:] |= claimed[:-1]
        taken[:-1] |= claimed[1:]
    own = np.flatnonzero(~taken[start : start + width]) + start
    if len(own) == 0:
        return 0.0
    return float(noisy[own].sum() / (sigma * math.sqrt(len(own))))


def _ends(edges: np.ndarray, lo: int, hi: int) -> tuple[float, float]:
    """The range of grid bins ``lo``..``hi``, less a sliver of the other sign beside zero.

    Zeros fall in the bin [0, 1e-3): a negative column's zeros are not a positive part. And the
    bin [-1e-3, 0) beside a positive range is noise that passed ``_widen``'s one-sided test (in
    about one column in forty): it made digits' pixel ranges [-0.001, 100], a range across zero
    whose prior is the arithmetic centre 50 and quarter width 25, for values 0..16. Dropping
    either sliver clamps at most 1e-3 of a real value.
    """
    low, top = float(edges[lo]), float(edges[hi + 1])
    if low < 0 and edges[hi] == 0:
        top = 0.0
    elif edges[lo + 1] == 0 and top > edges[lo + 2]:
        low = 0.0
    return low, top


def _widen(noisy: np.ndarray, sigma: float, lo: int, hi: int) -> tuple[int, int]:
    """The bulk's bins grown by each neighbouring grid bin that holds rows.

    Why: the range clamps every input, and a range too narrow erases what lies outside it,
    where one too wide only coarsens it. A bin next to the bulk is one test a side, not one
    of hundreds, so ``LINK_SIGMAS`` noise sds suffice where a window alone needs the Bonferroni
    bound; at 496 rows and epsilon 1, digits' pixels (0..16) got [10, 100] or [0, 10] and lost
    a third of their values to the clamp (issue 25).
    """
    while hi + 1 < len(noisy) and noisy[hi + 1] > LINK_SIGMAS * sigma:
        hi += 1
    while lo > 0 and noisy[lo - 1] > LINK_SIGMAS * sigma:
        lo -= 1
    return lo, hi


def _from_zero(lo: float, hi: float) -> tuple[float, tuple[float, float]]:
    """A found range of one sign, reaching to zero, and where the found range began (as a
    magnitude; 0.0 for a range across or from zero). Read off the bulk before ``_widen``, that
    start bounds the prior's floor (``_prior``, ``_floor``): a bin widened in at 2 noise sds
    may be a spike.

    Why: counts, amounts and pixels start at zero, and a decade of them too thin to stand clear
    of the noise was clamped into the bulk's edge (digits' pixels below 10 became 10); for a
    column that starts far above zero the cost is some resolution in equal-width bins, and
    mock rows below its values. Only on the one-bin-a-decade grid of a noisy table: on a finer
    grid a bin that holds rows joins the range (``_widen``). Post-processing of the range.
    """
    if lo > 0:
        return lo, (0.0, hi)
    if hi < 0:
        return -hi, (lo, 0.0)
    return 0.0, (lo, hi)


def _floor(noisy: np.ndarray, sigma: float, edges: np.ndarray, lo: float, hi: float) -> float:
    """Where the non-zero values of a range from zero begin (as a magnitude), 0.0 if unknown or
    the range spans both signs. A zero-inflated column (digits' pixels: 0, or 1..16) then gets
    the prior of its non-zero values, not one guessed from its top alone. Post-processing.

    Read from the top down: from the highest non-zero grid bin whose count stands
    ``RANGE_SIGMAS`` noise sds clear, down through the bins below it that stand
    ``FLOOR_SIGMAS`` clear. Scanning up from zero at 2 sds instead took the first bin past
    them, and among the three empty bins below 1 a noise spike passes in about one column in
    fifteen: 3 to 5 of digits' 64 pixels published a std of 0.32 for values 0..16, and their
    inputs reached 50 after scaling. A floor a decade too low shrinks the published std three
    times (inputs blown up); one a decade too high only squashes them, but at 3 sds a step (a
    real [1, 10) bin under [10, 100)) failed so often that digits lost 2 points (0.846 vs
    0.864-0.869 at 2-2.5 sds, 24-48 runs). The caller takes the lower of this and where the
    range search's bulk began (``Found.start``), which stood a Bonferroni bound clear: values
    of 5..15 pass as one window [1, 100] where the bin [1, 10) alone does not.
    """
    if lo < 0 < hi:
        return 0.0
    sign = 1.0 if lo == 0.0 else -1.0
    near = [
        i
        for i in range(len(noisy))
        if (
            edges[i] > 0 and edges[i + 1] <= hi if sign > 0 else edges[i + 1] < 0 and edges[i] >= lo
        )
    ]
    # nearest to zero first: bin i's magnitude grows along the list
    near = near if sign > 0 else near[::-1]
    passing = [noisy[i] > RANGE_SIGMAS * sigma for i in near]
    if not any(passing):
        return 0.0
    k = len(passing) - 1 - passing[::-1].index(True)  # the highest passing bin
    while k > 0 and noisy[near[k - 1]] > FLOOR_SIGMAS * sigma:
        k -= 1
    i = near[k]
    return float(edges[i] if sign > 0 else -edges[i + 1])


def _lowest(*floors: float) -> float:
    """The lowest of the floors that are known (above 0), else 0.0."""
    return min((f for f in floors if f > 0), default=0.0)


def _threshold(tests: int, false_rate: float = FALSE_WINDOW) -> float:
    """Noise sds a window must stand clear of: about one column in ``1 / false_rate`` gets a
    window of pure noise past it, whatever the number of windows tried (a Bonferroni bound)."""
    from scipy.stats import norm

    return max(RANGE_SIGMAS, float(norm.isf(false_rate / tests)))


def _position(index: int, edges: np.ndarray) -> float:
    """A grid bin's place for the gap rule, in decades: all below ``NEAR_ZERO`` sit at zero."""
    edge = max(abs(edges[index]), abs(edges[index + 1]))
    decades = math.log10(edge / NEAR_ZERO) if edge > NEAR_ZERO else 0.0
    return decades if edges[index] >= 0 else -decades


def _bulk(spans: list[tuple[int, int, float]], edges: np.ndarray, apart: float) -> tuple[int, int]:
    """The bins covered by the passing windows linked to the most significant one, a window
    linking to the run when it lies within ``MAX_GAP`` decades of it (counted from
    ``NEAR_ZERO``, so zeros and a tail of 1..16 are one bulk), and, when empty bins lie between
    them, stands ``apart`` noise sds clear (``FALSE_APART``) or one of them holds the zeros.

    A lone noise spike passes somewhere now and then; spanning first-to-last passing window
    stretched a column [8, 36] to [7, 5e5]. A spike is far from the bulk; a real second mode is
    rarely more than three decades away. Within three decades one column in a hundred still
    got a spike (``FALSE_WINDOW``): breast cancer at epsilon 50, 30 columns, had a column of
    values 0.002..0.03 published [0.001, 5623] in one mock in twenty. A gap of empty bins now
    asks for the stricter bound, except between the zeros and the values beside them (digits'
    pixels: 0, or 1..16, three empty decades apart), the one second mode the grid was tuned on;
    a bulk that already holds both links a spike beyond its values only at the stricter bound.
    """
    first, last, _ = max(spans, key=lambda s: s[2])
    zero = int(np.flatnonzero(edges == 0.0)[0])  # the bin [0, 1e-3) holds the zeros
    grown = True
    while grown:
        grown = False
        for a, b, score in spans:
            if a >= first and b <= last:
                continue
            below = _position(first, edges) - _position(b, edges)
            above = _position(a, edges) - _position(last, edges)
            gap = a > last + 1 or b < first - 1
            zeros = a <= zero <= b or first == last == zero  # zeros and values beside them
            if max(below, above) <= MAX_GAP and (score > apart or zeros or not gap):
                first, last, grown = min(first, a), max(last, b), True
    return first, last


def _column_stats(
    noisy: np.ndarray,
    edges: np.ndarray,
    rows: int,
    sigma: float,
    prior: tuple[float, float] | None = None,
) -> tuple[float, float]:
    """A column's published mean and std from its noisy shape counts (summed over classes, each
    count of noise sd ``sigma``), shrunk towards ``prior`` (a centre and spread that the range
    alone gives, ``_prior``; by default the range's centre and quarter width) by how much of the
    estimate is noise.

    Why shrink: on a few dozen rows the counts are mostly noise, and an estimate from them (or
    from a mock drawn from them) is anywhere in the range, its std anything from 0 up. The
    range's own centre and quarter width are public once the range is, and cost nothing; the
    weight on the data grows as the noise shrinks against the rows.
    """
    lo, hi = float(edges[0]), float(edges[-1])
    mids = (edges[:-1] + edges[1:]) / 2.0
    centre, spread = prior or _prior(lo, hi, searched=False)
    n = float(max(rows, 1))
    counts = noisy.astype(np.float64)
    mean_est = float(np.clip(counts @ mids / n, lo, hi))
    mean_noise = sigma**2 * float(np.sum((mids - centre) ** 2)) / n**2
    w = spread**2 / (spread**2 + mean_noise)
    mean = w * mean_est + (1 - w) * centre
    width_sq = np.diff(edges) ** 2 / 12.0  # uniform within a bin
    var_est = float(np.clip(counts, 0, None) @ ((mids - mean) ** 2 + width_sq))
    var_est /= max(float(np.clip(counts, 0, None).sum()), 1.0)
    var_noise = sigma**2 * float(np.sum((mids - mean) ** 4)) / n**2
    prior_var = spread**2
    v = prior_var**2 / (prior_var**2 + var_noise)
    std = math.sqrt(max(v * var_est + (1 - v) * prior_var, 0.0))
    return float(mean), float(std)


def _pooled_stats(  # noqa: PLR0913
    shapes: dict[str, np.ndarray],
    edges: dict[str, np.ndarray],
    rows: int,
    sigma: float,
    priors: dict[str, tuple[float, float]],
    own: dict[str, tuple[float, float]],
) -> dict[str, tuple[float, float]]:
    """The statistics of the columns whose spread their group's pooled counts put lower.

    Why: a column whose own shape counts are noise publishes its prior, and a prior read off a
    decade grid can overstate the spread fourfold: a digits pixel (0..16) whose decade [1, 10)
    was too thin to read gets the prior of [10, 100], a std of 22 for a true 5, beside pixels
    that publish 10, and the job scaled alike columns 2x apart (issue 25). Columns released on
    the same bins (at least ``GROUP_MIN``) pool their noisy counts: the mean histogram has
    sqrt(k) times less noise, and is the prior each column's own counts are shrunk towards
    instead. Taken only where that gives the smaller std: a floor the range search did read
    (breast cancer's [0, 1] columns that begin at 0.01 beside ones at 0.1) is information the
    pooled counts would blur, and raising those spreads cost cancer a point. Post-processing
    of the same noisy counts, so free.
    """
    groups: dict[tuple[float, ...], list[str]] = {}
    for column, bins in edges.items():
        if column in priors:
            groups.setdefault(tuple(bins.tolist()), []).append(column)
    better: dict[str, tuple[float, float]] = {}
    for columns in groups.values():
        if len(columns) < GROUP_MIN:
            continue
        k = len(columns)
        bins = edges[columns[0]]
        centre = float(np.median([priors[c][0] for c in columns]))
        spread = float(np.median([priors[c][1] for c in columns]))
        mean_counts = np.mean([shapes[c] for c in columns], axis=0)
        group = _column_stats(mean_counts, bins, rows, sigma / math.sqrt(k), (centre, spread))
        for c in columns:
            pooled = _column_stats(shapes[c], bins, rows, sigma, group)
            if pooled[1] < own[c][1]:
                better[c] = pooled
    return better


def _prior(lo: float, hi: float, searched: bool, floor: float = 0.0) -> tuple[float, float]:
    """The centre and spread a column's published statistics shrink to where its counts are
    noise: public, since the range is, and free.

    Why geometric for a searched range: the search's grid is in decades, so the range says
    which decades hold the column and nothing of where within them. A scale-free (log-uniform)
    prior over them has its median at the geometric centre: for wine's ``hue`` (values 0.48 to
    1.71, range [0.1, 10]) that is 1, where the arithmetic centre is 5 and the old published
    mean missed by four stds. A searched range from 0 is taken to start at ``floor``, where its
    values were found to begin (``_from_zero``, ``_floor``), or else ``ZERO_DECADES`` below its
    top. A declared range, one across zero, or one narrower than ``LOG_PRIOR_RATIO`` keeps the
    arithmetic centre and quarter width. The geometric centre was tuned on iris, breast cancer
    and a generated lognormal table; the floor and ``ZERO_DECADES`` = 1 (was 2: a [0, 10]
    pixel of std 3 published 0.9) came from tracing digits, and were checked on iris, cancer,
    diabetes and two generated tables (docs/benchmarks.md).
    """
    sign = 1.0 if hi > 0 else -1.0  # a negative range is the positive one mirrored
    near, far = (lo, hi) if sign > 0 else (-hi, -lo)
    if searched and far > 0 and (near == 0 or (near > 0 and far / near >= LOG_PRIOR_RATIO)):
        low = near if near > 0 else (floor if 0 < floor < far else far / 10.0**ZERO_DECADES)
        centre = math.sqrt(low * far)
        return sign * centre, centre - low
    return (lo + hi) / 2.0, max((hi - lo) / 4.0, 1e-12)


def _is_int(column: pd.Series) -> bool:
    return not _is_categorical(column) and np.issubdtype(
        cast("np.dtype[Any]", column.dtype), np.integer
    )


def _is_categorical(column: pd.Series) -> bool:
    return getattr(column.dtype, "name", "") == "category"


def _values(column: pd.Series) -> np.ndarray:
    """A column as float64 for histograms: a categorical one as its category codes."""
    if _is_categorical(column):
        return column.cat.codes.to_numpy(np.float64)
    return column.to_numpy(np.float64)


def _edges(lo: float, hi: float, integer: bool) -> np.ndarray:
    """Fine bins over a released range: unit bins for a narrow integer column, else ``BINS``."""
    if integer and math.floor(hi) - math.ceil(lo) < 2 * BINS:
        return np.arange(math.ceil(lo), math.floor(hi) + 2) - 0.5
    if hi <= lo:  # a declared constant column
        hi = lo + 1.0
    return np.linspace(lo, hi, BINS + 1)


def _fine_counts(values: np.ndarray, edges: np.ndarray) -> np.ndarray:
    bins = np.clip(np.searchsorted(edges, values, side="right") - 1, 0, len(edges) - 2)
    return np.bincount(bins, minlength=len(edges) - 1)


def _share(counts: np.ndarray, i: int) -> float:
    kept = np.clip(counts, 0, None).astype(np.float64)
    return float(kept[i] / kept.sum()) if kept.sum() > 0 else 1.0 / len(counts)


def _draw_group(  # noqa: PLR0913
    group: pd.DataFrame,
    columns: list[str],
    edges: dict[str, np.ndarray],
    sigma: float,
    n: int,
    rng: np.random.Generator,
) -> tuple[pd.DataFrame, dict[str, np.ndarray]]:
    """Each column from its noisy histogram in this class, uniformly within the drawn bin; and
    the noisy counts themselves (unclipped, for the published statistics).

    Stage 3's noise for the whole class is one vector (iid per count, as separate calls)."""
    fine = [_fine_counts(_values(group[c]), edges[c]) for c in columns]
    noisy_all = _noisy(np.concatenate(fine), sigma)
    splits = np.cumsum([len(f) for f in fine])[:-1]
    out, raw = {}, {}
    for col, noisy in zip(columns, np.split(noisy_all, splits), strict=True):
        raw[col] = noisy
        kept = np.clip(noisy, 0, None)
        e = edges[col]
        p = kept / kept.sum() if kept.sum() > 0 else np.full(len(kept), 1.0 / len(kept))
        bins = rng.choice(len(p), size=n, p=p)
        out[col] = rng.uniform(e[bins], e[bins + 1])
    import pandas as pd

    return pd.DataFrame(out, columns=columns), raw


def _finish(mock: pd.DataFrame, frame: pd.DataFrame, ranges: dict) -> pd.DataFrame:
    """Clip to the released ranges; integer columns rounded; the private table's dtypes (a
    categorical column's drawn codes back to its categories).

    On numpy arrays, not per pandas column: 5,000 columns took 3 s through ``Series.clip``."""
    import pandas as pd

    out: dict[str, Any] = {}  # numpy arrays and, for categorical columns, pd.Categorical
    for col in frame.columns:
        values = mock[col].to_numpy(np.float64)
        if _is_categorical(frame[col]) and col in mock.columns:
            categories = frame[col].cat.categories
            codes = np.clip(np.round(values), 0, len(categories) - 1).astype(np.int64)
            out[col] = pd.Categorical.from_codes(codes, categories=categories)
            continue
        if col in ranges:
            values = np.clip(values, *ranges[col])
        if _is_int(frame[col]):
            values = np.round(values)
        out[col] = values.astype(cast("np.dtype[Any]", frame[col].dtype))  # numpy: not a category
    return pd.DataFrame(out, columns=list(frame.columns))
