"""The standardisation every party applies to a job's inputs: clamp, centre, divide.

Why one function: a site's rounds, the researcher's dry run on the mock and ``train --test``
must see the same inputs, or the model learns one scale and is scored on another. And why the
clamp and the floor: the mean and std come from DP releases, so they can be wrong; clamped to the
published range first, and divided by a std never below ``(high - low) / STD_FLOOR_DIVISOR``,
every scaled input lies within ``STD_FLOOR_DIVISOR`` of zero whatever the statistics say. A wrong
statistic then squashes or saturates one input (it costs accuracy), and never yields inputs of
53,000 that swamp clipping in DP-SGD (a model trained to the majority class, issue 25).

A scaling is ``{"mean", "std"}`` and optionally ``{"low", "high"}``, one value per input in the
job's input order. Plain numpy; no syft, no torch.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from numpy.typing import NDArray

# |scaled input| <= this whenever the range is known: the std floor is (high - low) / it
STD_FLOOR_DIVISOR = 10.0
MIN_STD = 1e-6
# a published range within this of zero on both ends: the site's column is (all but) zeros,
# the mock's range search's smallest bin (datasites.data.mock.grid)
ZERO_ONLY = 1e-3


def zero_only(low: Any, high: Any) -> NDArray[np.bool_]:
    """Per input, whether a published range holds only zeros (or slivers of 1e-3 about them).

    Why: under label skew a pixel that is blank at two sites publishes [0, 0.001] and a std of
    ~0 there; such a site says nothing about how the column spreads where it is not blank, and
    taken into a median of stds it made the one site that holds the column's values look like
    the outlier (issue 25: digits' pixel 30 was clamped to [0, 0.001] for every site)."""
    low, high = np.asarray(low, np.float64), np.asarray(high, np.float64)
    blank: NDArray[np.bool_] = (np.abs(low) <= ZERO_ONLY) & (np.abs(high) <= ZERO_ONLY)
    return blank


def blank_inputs(meta: Mapping[str, Any], width: int) -> list[bool]:
    """Per input, whether a site's published range holds only zeros (``zero_only``); all
    False where the site publishes no ranges for ``width`` inputs."""
    low, high = meta.get("feature_low"), meta.get("feature_high")
    if not low or not high or len(low) != width or len(high) != width:
        return [False] * width
    return [bool(b) for b in zero_only(low, high)]


def floored_std(std: Any, low: Any = None, high: Any = None) -> NDArray[np.float64]:
    """The std to divide by: at least ``(high - low) / STD_FLOOR_DIVISOR`` (public quantities
    only) and at least ``MIN_STD``; a std that is not finite and positive becomes the floor
    (1 where no range is given)."""
    std = np.asarray(std, dtype=np.float64)
    floor = np.full(std.shape, MIN_STD)
    fallback: float | NDArray[np.float64] = (
        1.0  # no range known: a constant input is divided by 1, as it always was
    )
    if low is not None and high is not None:
        width = np.asarray(high, np.float64) - np.asarray(low, np.float64)
        floor = np.maximum(floor, np.nan_to_num(width, nan=0.0, posinf=0.0) / STD_FLOOR_DIVISOR)
        fallback = floor
    std = np.where(np.isfinite(std) & (std > 0), std, fallback)
    return np.maximum(std, floor)


def apply(x: NDArray[Any], scaling: Sequence[Any] | dict[str, Any] | None) -> NDArray[np.float32]:
    """``x`` clamped to [low, high] (when given), centred and divided by the floored std.

    ``scaling``: a dict as a job carries it, or a tuple (mean, std[, low, high]) as a site's
    task does. Writes into ``x`` when it is a float32 array (the caller's own copy)."""
    if scaling is None:
        return x
    mean, std, low, high = unpack(scaling)
    out = x if isinstance(x, np.ndarray) and x.dtype == np.float32 else np.array(x, np.float32)
    if low is not None and high is not None:
        np.clip(out, np.asarray(low, np.float32), np.asarray(high, np.float32), out=out)
    out -= np.asarray(mean, dtype=np.float32)
    out /= floored_std(std, low, high).astype(np.float32)
    return out


def unpack(scaling: Sequence[Any] | dict[str, Any]) -> tuple[Any, Any, Any, Any]:
    """(mean, std, low, high) of a dict or tuple scaling; low and high None when absent."""
    if isinstance(scaling, dict):
        return scaling["mean"], scaling["std"], scaling.get("low"), scaling.get("high")
    mean, std, *rest = scaling
    low, high = (rest + [None, None])[:2]
    return mean, std, low, high


def published_ranges(
    meta: dict[str, Any], layout: dict[str, Any] | None = None
) -> tuple[list[float], list[float]] | None:
    """A dataset's published per-input range (low, high), moved onto ``layout`` when given (a
    one-hot input this site lacks: [0, 1]); None for metadata that publishes none."""
    if not meta.get("feature_low") or not meta.get("feature_high"):
        return None
    if layout is None:
        return [float(v) for v in meta["feature_low"]], [float(v) for v in meta["feature_high"]]
    from policies.layout import encoded_names, site_columns

    own = encoded_names({"columns": site_columns(meta)})
    low = dict(zip(own, meta["feature_low"], strict=True))
    high = dict(zip(own, meta["feature_high"], strict=True))
    names = encoded_names(layout)
    return [float(low.get(n, 0.0)) for n in names], [float(high.get(n, 1.0)) for n in names]


def weak_inputs(meta: dict[str, Any], layout: dict[str, Any] | None = None) -> list[bool]:
    """Which inputs' published ranges are weak: found by no decade standing clear of the DP
    noise (``datasites.data.mock``), so another site's found range should be preferred."""
    from policies.layout import encoded_names, site_columns

    source = meta.get("bounds_source") or {}
    columns = layout["columns"] if layout is not None else site_columns(meta)
    names = encoded_names({"columns": columns})
    return [source.get(n) == "weak" for n in names]
