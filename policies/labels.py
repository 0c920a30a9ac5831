"""The federation-wide label space of a class target.

Why it exists: at upload a site codes its target as 0..k-1 over the classes *it* holds. Under
label skew, the non-IID case a federation exists for, sites hold different classes: a site
with cultivars 1 and 2 codes them 0 and 1, as a site with cultivars 0 and 1 does, and a model
sized from one site's schema is the wrong width at another. So each site publishes its class
list (its label values in code order: schema, disclosed like a categorical column's category
list; the class *counts* are DP), the researcher builds one list for the job, the union of
every site's, and each site maps its own codes into it at run time (``site_to_job``). The dry
run on a mock and the researcher's own test rows map the same way (``site_to_job``,
``labels_to_codes``). A site refuses a job whose list lacks one of its classes
(``check_site``), decided from its published schema alone.

A label is its text: ``"1"`` for 1, 1.0 and True (a bool target is stored as 0/1), ``"Yes"``
for "Yes". Lists are sorted by number when every label is one, else as text, so the codes of
an integer target 0..k-1 are the labels themselves.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np
import numpy.typing as npt

from policies.errors import PlanError

MAX_CLASSES = 1024  # a job's label space; a site publishes at most 20 (datasites.data.mock)
MAX_LABEL_CHARS = 200


def label_text(value: Any) -> str:
    """One label's canonical text: the same for 2, 2.0, np.int64(2) and "2"."""
    if isinstance(value, bool | np.bool_):
        return "1" if value else "0"
    if isinstance(value, int | np.integer):
        return str(int(value))
    if (
        isinstance(value, float | np.floating)
        and math.isfinite(value)
        and float(value) == int(value)
    ):
        return str(int(value))
    return str(value)


def sort_labels(labels: Iterable[str]) -> list[str]:
    """Labels in a deterministic order: by value when every one is a number, else as text."""
    unique = set(labels)
    try:
        return sorted(unique, key=lambda s: (float(s), s))
    except ValueError:
        return sorted(unique)


def site_classes(meta: Mapping[str, Any]) -> list[str] | None:
    """A site's published class list, in the order of its own codes; None for a target that
    is not class codes. Metadata published before the list was (labels already 0..k-1, so
    only ``n_classes`` went out) means codes that are their own labels."""
    classes = meta.get("classes")
    if isinstance(classes, list) and classes:
        return [str(c) for c in classes]
    n = meta.get("n_classes")
    if meta.get("class_codes") and isinstance(n, int) and n > 0:
        return [str(i) for i in range(n)]
    return None


def federation_classes(metas: Mapping[str, Mapping[str, Any]]) -> list[str] | None:
    """The job's label space: the union of every site's published classes, sorted; None when
    no site publishes classes (a measured target). PlanError, naming the sites, when only some
    do (their targets are not the same kind)."""
    per_site = {site: site_classes(meta) for site, meta in metas.items()}
    listed = {site: c for site, c in per_site.items() if c is not None}
    if not listed:
        return None
    if len(listed) < len(per_site):
        without = ", ".join(site for site, c in per_site.items() if c is None)
        raise PlanError(
            f"{without} publish(es) no class list for the target, the other sites do: "
            "their targets are not the same kind"
        )
    classes = sort_labels(c for cls in listed.values() for c in cls)
    check_classes(classes)
    return classes


def check_classes(classes: Any) -> None:
    """A class list a job may carry: 2 to ``MAX_CLASSES`` distinct short strings."""
    ok = isinstance(classes, list) and 2 <= len(classes) <= MAX_CLASSES
    if not ok or not all(isinstance(c, str) and len(c) <= MAX_LABEL_CHARS for c in classes):
        raise PlanError(
            f"classes must be a list of 2 to {MAX_CLASSES} labels of at most "
            f"{MAX_LABEL_CHARS} characters"
        )
    if len(set(classes)) != len(classes):
        raise PlanError("classes lists a label twice")


def check_site(job_classes: list[str], meta: Mapping[str, Any]) -> list[str]:
    """This site's class list, or PlanError unless the job's label space covers it.

    From the published schema alone, never the rows: whether a site refuses answers no
    question about its private labels.
    """
    own = site_classes(meta)
    if own is None:
        raise PlanError(
            "the job names classes but this dataset's target publishes none (it is not class "
            "labels); build the job again from the sites' current schema"
        )
    missing = [c for c in own if c not in set(job_classes)]
    if missing:
        raise PlanError(
            f"the job's classes lack {missing} of this dataset's labels; build the job again "
            "from the sites' current schema"
        )
    return own


def code_map(own: list[str], job_classes: list[str]) -> npt.NDArray[np.int64]:
    """Where each of a site's codes goes in the job's list: ``out[site_code] = job_code``."""
    index = {c: i for i, c in enumerate(job_classes)}
    try:
        return np.array([index[c] for c in own], dtype=np.int64)
    except KeyError as exc:
        raise PlanError(f"the job's classes lack label {exc.args[0]!r}") from exc


def site_to_job(codes: Any, own: list[str], job_classes: list[str]) -> npt.NDArray[np.int64]:
    """A site's stored target (its codes 0..k-1) as the job's codes.

    A value outside 0..k-1 is clamped into it first, as the trainer clamps labels: a round that
    failed on one row's label would tell the researcher about that row.
    """
    mapping = code_map(own, job_classes)
    values = np.nan_to_num(np.asarray(codes, dtype=np.float64), nan=0.0, posinf=0.0, neginf=0.0)
    at = np.clip(np.floor(values), 0, len(own) - 1).astype(np.int64)
    return mapping[at]


def counts_to_job(
    counts: list[float] | None, own: list[str], job_classes: list[str]
) -> list[float] | None:
    """A site's published (DP) count per class, moved onto the job's list; 0 for a class the
    site does not hold."""
    if counts is None or len(counts) != len(own):
        return None
    out = [0.0] * len(job_classes)
    for job_code, count in zip(code_map(own, job_classes), counts, strict=True):
        out[int(job_code)] = float(count)
    return out


def labels_to_codes(values: Any, job_classes: list[str]) -> npt.NDArray[np.int64]:
    """Raw label values (the researcher's own test file) as the job's codes; PlanError names
    up to five labels the job's list does not have."""
    index = {c: i for i, c in enumerate(job_classes)}
    texts = [label_text(v) for v in np.asarray(values, dtype=object)]
    unknown = sorted({t for t in texts if t not in index})
    if unknown:
        raise PlanError(
            f"labels {unknown[:5]} are not among the job's classes ({', '.join(job_classes)})"
        )
    return np.array([index[t] for t in texts], dtype=np.int64)
