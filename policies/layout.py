"""The federation-wide one-hot layout of a dataset's feature columns.

Why it exists: a site publishes the category list of each categorical column in its schema
(disclosed, no noise). Sites of one federation seldom see the same categories (one bank has no
students), so a one-hot encoding made at each site alone would give models of different input
widths. The researcher builds one layout from every site's published schema, the union of each
column's categories, and the job carries it; every site, and the researcher's own test rows,
encode to it at run time (``encode``), so the input width is the same everywhere.

A layout is JSON-shaped: ``{"columns": [[name, None], [name, [category, ...]], ...]}`` in the
table's feature order (the target left out); ``None`` marks a numeric column (one input), a list
a categorical one (one 0/1 input per category, in the list's order). The encoding is pandas'
own (``pd.Categorical`` with the layout's categories, ``pd.get_dummies``).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt

from policies.errors import PlanError

CATEGORY_DTYPE = "category"  # the dtype a categorical column has in the published schema
MAX_WIDTH = 20_000  # inputs a layout may expand to (2,000 columns of at most ~10 categories)
MAX_CATEGORY_CHARS = 200

Layout = dict[str, Any]


def site_columns(meta: dict[str, Any]) -> list[list[Any]]:
    """One site's feature columns from its published metadata: [name, categories or None]."""
    categories = meta.get("categories") or {}
    target = meta.get("target")
    pairs = [e if isinstance(e, list | tuple) else (e, None) for e in meta.get("schema") or []]
    return [
        [name, list(categories[name]) if dtype == CATEGORY_DTYPE else None]
        for name, dtype in pairs
        if name != target
    ]


def federation_layout(metas: dict[str, dict[str, Any]]) -> Layout | None:
    """The one layout for every site's table; None when no column is categorical (a job then
    looks as it always did). PlanError, naming the sites, when their columns do not agree."""
    per_site = {site: site_columns(meta) for site, meta in metas.items()}
    if not per_site:
        return None
    names = {site: [c[0] for c in cols] for site, cols in per_site.items()}
    if len({tuple(n) for n in names.values()}) > 1:
        listed = "; ".join(f"{site}: {', '.join(n)}" for site, n in names.items())
        raise PlanError(f"the sites publish different feature columns ({listed})")
    first = next(iter(per_site.values()))
    columns: list[list[Any]] = []
    for i, (name, _) in enumerate(first):
        kinds = {site: cols[i][1] is not None for site, cols in per_site.items()}
        if len(set(kinds.values())) > 1:
            text = [site for site, categorical in kinds.items() if categorical]
            raise PlanError(
                f"column {name!r} is categorical at {', '.join(text)} and numeric elsewhere"
            )
        if not kinds[next(iter(kinds))]:
            columns.append([name, None])
            continue
        union = set().union(*(set(cols[i][1]) for cols in per_site.values()))
        columns.append([name, sorted(union)])
    if all(c[1] is None for c in columns):
        return None
    layout = {"columns": columns}
    check_layout(layout)
    return layout


def check_layout(layout: Any) -> None:
    """A layout a job may carry: well-formed, bounded (a site expands it into memory)."""
    if not isinstance(layout, dict) or set(layout) != {"columns"}:
        raise PlanError("layout must be a dict with exactly 'columns'")
    columns = layout["columns"]
    if not isinstance(columns, list) or not columns:
        raise PlanError("layout columns must be a non-empty list")
    seen: set[str] = set()
    for column in columns:
        if not (isinstance(column, list) and len(column) == 2 and isinstance(column[0], str)):
            raise PlanError("each layout column must be [name, null or [categories]]")
        name, categories = column
        if name in seen:
            raise PlanError(f"layout names column {name!r} twice")
        seen.add(name)
        if categories is None:
            continue
        ok = isinstance(categories, list) and categories
        if not ok or not all(
            isinstance(c, str) and len(c) <= MAX_CATEGORY_CHARS for c in categories
        ):
            raise PlanError(f"layout column {name!r}: categories must be a list of short strings")
        if len(set(categories)) != len(categories):
            raise PlanError(f"layout column {name!r} lists a category twice")
    if width(layout) > MAX_WIDTH:
        raise PlanError(f"the layout expands to {width(layout)} inputs; at most {MAX_WIDTH}")


def width(layout: Layout) -> int:
    """The model's input width under ``layout``."""
    return sum(1 if cats is None else len(cats) for _, cats in layout["columns"])


def encoded_names(layout: Layout) -> list[str]:
    """Input names in order: a numeric column's own, ``column=category`` for a one-hot input."""
    return [
        name if cats is None else f"{name}={cat}"
        for name, cats in layout["columns"]
        for cat in (cats if cats is not None else [None])
    ]


def check_site(layout: Layout, meta: dict[str, Any]) -> None:
    """PlanError unless ``layout`` covers this site's published columns and categories.

    Decided from the published schema alone, never from the rows: whether a site refuses then
    answers no question about its private data.
    """
    own = site_columns(meta)
    if [c[0] for c in own] != [c[0] for c in layout["columns"]]:
        raise PlanError("the job's feature layout does not list this dataset's columns in order")
    for (name, mine), (_, theirs) in zip(own, layout["columns"], strict=True):
        if (mine is None) != (theirs is None):
            raise PlanError(f"the job's layout has the wrong kind for column {name!r}")
        if mine is not None and not set(mine) <= set(theirs):
            missing = sorted(set(mine) - set(theirs))
            raise PlanError(
                f"the job's layout lacks categories {missing} of column {name!r}; "
                "build the job again from the sites' current schema"
            )


def features(frame: Any, target: str, layout: Layout | None) -> npt.NDArray[np.float32]:
    """A table's feature matrix as every party builds it: a site for its rounds, the dry run
    on a mock, the researcher for its ``--test`` rows. One function, so that a model is scored
    on inputs encoded as it was trained on them.

    Encoded to ``layout`` when the job carries one (``encode``); else the feature columns as
    float32, and PlanError for a non-numeric one (a job without a layout cannot one-hot it).
    The array is a fresh copy: the caller may scale it in place.
    """
    if target not in frame.columns:
        raise PlanError(f"target column {target!r} is not in the data")
    if layout is not None:
        return encode(frame, target, layout)
    text = [str(c) for c in frame.columns if c != target and not _numeric(frame[c])]
    if text:
        raise PlanError(
            f"column(s) {', '.join(text)} are categorical and the job carries no one-hot "
            "layout; build the job with researcher load_job (it reads the sites' schema)"
        )
    matrix: npt.NDArray[np.float32] = frame.drop(columns=[target]).to_numpy(
        dtype=np.float32, copy=True
    )
    return matrix


def _numeric(column: Any) -> bool:
    import pandas as pd

    return bool(pd.api.types.is_numeric_dtype(column) or pd.api.types.is_bool_dtype(column))


def encode(frame: Any, target: str | None, layout: Layout) -> npt.NDArray[np.float32]:
    """The feature matrix (float32) of ``frame`` under ``layout``: numeric columns as they are,
    each categorical one as 0/1 inputs for the layout's categories (a category this table
    lacks is an all-zero input). PlanError names a column or a value the layout does not have.
    """
    import pandas as pd

    names = [c[0] for c in layout["columns"]]
    features = [c for c in frame.columns if c != target]
    if features != names:
        raise PlanError(
            f"the table's feature columns ({', '.join(map(str, features))}) differ from the "
            f"job's layout ({', '.join(names)})"
        )
    parts = []
    for name, categories in layout["columns"]:
        column = frame[name]
        if categories is None:
            if not _numeric(column):
                raise PlanError(f"column {name!r} is not numeric, but the layout says it is")
            parts.append(pd.DataFrame({name: column.to_numpy(np.float32)}))
            continue
        values = column.astype(str) if not isinstance(column.dtype, pd.CategoricalDtype) else column
        coded = pd.Categorical(values, categories=categories)
        unknown = coded.isna()
        if unknown.any():
            seen = sorted(set(map(str, pd.Series(values)[unknown].unique())))[:5]
            raise PlanError(f"column {name!r} holds values outside the layout: {seen}")
        dummies = pd.get_dummies(coded, dtype=np.float32)
        dummies.columns = [f"{name}={c}" for c in categories]
        parts.append(dummies)
    out = np.empty((len(frame), width(layout)), dtype=np.float32)
    at = 0
    for part in parts:
        out[:, at : at + part.shape[1]] = part.to_numpy(np.float32)
        at += part.shape[1]
    return out


def align_stats(
    meta: dict[str, Any], layout: Layout, missing_std: float = 1.0
) -> tuple[list[float], list[float]]:
    """A site's published feature mean and std (over its own encoding: its categories only)
    moved onto ``layout``; a category the site lacks has mean 0 and std ``missing_std``."""
    own = encoded_names({"columns": site_columns(meta)})
    mean = dict(zip(own, meta["feature_mean"], strict=True))
    std = dict(zip(own, meta["feature_std"], strict=True))
    names = encoded_names(layout)
    return [float(mean.get(n, 0.0)) for n in names], [float(std.get(n, missing_std)) for n in names]


def one_hot_mask(layout: Layout) -> list[bool]:
    """Which inputs are one-hot (their statistics are shares, not measurements)."""
    return [cats is not None for _, cats in layout["columns"] for _ in (cats or [None])]
