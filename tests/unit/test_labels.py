"""One label space for the federation (policies.labels): sites publish their class lists, the
job carries their union, every site, the dry run and the test file code labels in it.

The bug this guards: under label skew each site coded its own classes 0..k-1, so code 0 meant
cultivar 0 at one wine site and cultivar 1 at the other, and a digits site lacking 0 refused
the 10-output model ("model gives [10] per row but ... needs [9]").
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from datasites.data.mock import make_mock
from datasites.data.tables import validate_table
from datasites.errors import Refused
from datasites.review.access import DatasetPolicy
from datasites.review.report import Submission, build_report
from datasites.serving.admin import _meta
from policies.engine.mock_round import dry_run
from policies.engine.prepare import prepare_task
from policies.engine.round_task import run_task
from policies.errors import PlanError
from policies.labels import (
    counts_to_job,
    federation_classes,
    label_text,
    labels_to_codes,
    site_classes,
    site_to_job,
    sort_labels,
)
from researcher.api import mock_in_job_codes
from researcher.errors import JobError
from researcher.job import make_job, render

PLAN = {"rounds": 1, "noise_multiplier": 1.0, "batch_size": 32}


def _table(labels: list, n: int = 240, seed: int = 0):
    """Rows whose feature ``a`` is the label's place in ``labels`` plus noise: learnable."""
    rng = np.random.default_rng(seed)
    place = np.arange(n) % len(labels)
    frame = pd.DataFrame({"a": place + rng.normal(0, 0.1, n), "b": rng.normal(size=n)})
    frame["y"] = [labels[i] for i in place]
    table = validate_table(frame, "y")
    release = make_mock(table.frame, "y", rows=120, epsilon=5.0, seed=seed)
    return table, _meta(table, "d", release), release.mock


def _spec(classes: list[str] | None, outputs: int, loss: str = "cross_entropy"):
    layers = [{"type": "Linear", "in_features": 2, "out_features": outputs}]
    spec = make_job(layers, "d", "y", {**PLAN, "loss": loss}, n_features=2)
    return replace(spec, classes=classes)


def test_labels_have_one_text_and_numbers_sort_by_value() -> None:
    assert [label_text(v) for v in (2, 2.0, np.int64(2), "2", True, np.float32(0.0))] == [
        "2",
        "2",
        "2",
        "2",
        "1",
        "0",
    ]
    assert label_text(2.5) == "2.5" and label_text("Yes") == "Yes"
    assert sort_labels(["10", "9", "-1", "9"]) == ["-1", "9", "10"]
    assert sort_labels(["Yes", "No", "10"]) == ["10", "No", "Yes"]


def test_every_class_target_publishes_its_class_list() -> None:
    _, meta_a, _ = _table([0, 1])  # already codes: the codes are the labels
    _, meta_b, _ = _table([1, 2])  # re-coded 0, 1 at upload
    _, meta_t, _ = _table(["No", "Yes"])
    assert meta_a["classes"] == ["0", "1"] and meta_b["classes"] == ["1", "2"]
    assert meta_t["classes"] == ["No", "Yes"]
    assert site_classes(meta_a) == ["0", "1"]
    # metadata uploaded before the list was published: codes 0..k-1 are their own labels
    assert site_classes({"classes": None, "class_codes": True, "n_classes": 3}) == ["0", "1", "2"]
    assert site_classes({"classes": None, "class_codes": False, "n_classes": None}) is None


def test_the_federation_list_is_the_union_and_codes_agree() -> None:
    table_a, meta_a, _ = _table([0, 1])
    table_b, meta_b, _ = _table([1, 2])
    classes = federation_classes({"a": meta_a, "b": meta_b})
    assert classes == ["0", "1", "2"]
    # cultivar 1 is code 1 at a (its own code 1) and at b (its own code 0): the same code
    at_a = site_to_job(table_a.frame["y"], site_classes(meta_a), classes)
    at_b = site_to_job(table_b.frame["y"], site_classes(meta_b), classes)
    assert sorted(set(at_a)) == [0, 1] and sorted(set(at_b)) == [1, 2]
    assert counts_to_job([10.0, 20.0], ["1", "2"], classes) == [0.0, 10.0, 20.0]
    with pytest.raises(PlanError, match="publish\\(es\\) no class list"):
        federation_classes({"a": meta_a, "c": {"classes": None, "n_classes": None}})


def test_a_skewed_digits_site_takes_the_ten_output_model() -> None:
    """One site without digit 0 publishes 1..9: the federation still has 10 classes, and the
    site's review passes a 10-output model (it refused it as 'needs [9]')."""
    digits = list(range(10))
    _, full, _ = _table(digits, n=400)
    _, lacking, _ = _table(digits[1:], n=400)
    classes = federation_classes({"a": full, "b": full, "c": lacking})
    assert classes == [str(d) for d in digits]
    spec = _spec(classes, 10)
    report = build_report(_submission(spec, lacking), DatasetPolicy(), set())
    checks = {c.name: c for c in report.checks}
    assert checks["model"].passed, checks["model"].reason
    assert checks["labels"].passed and "cover this dataset's 9" in checks["labels"].reason


def _submission(spec, meta: dict) -> Submission:
    return Submission(
        render(spec),
        "ada@uni.edu",
        "d",
        int(meta["rows"]),
        ("data", "weights"),
        2,
        meta["n_classes"],
        (),
        "",
        meta,
    )


def test_a_site_refuses_a_label_space_lacking_one_of_its_classes() -> None:
    table_b, meta_b, _ = _table([1, 2])
    narrow = _spec(["0", "1"], 2)
    report = build_report(_submission(narrow, meta_b), DatasetPolicy(), set())
    checks = {c.name: c for c in report.checks}
    assert not checks["labels"].passed and "lack ['2']" in checks["labels"].reason
    with pytest.raises(Refused, match=r"lack \['2'\] of this dataset's labels"):
        prepare_task(
            narrow, table_b.frame, "y", "", 1.0, 2, 7, None, site_classes=site_classes(meta_b)
        )
    with pytest.raises(Refused, match="publishes no class list"):
        prepare_task(narrow, table_b.frame, "y", "", 1.0, 2, 7, None, site_classes=None)


def test_a_round_trains_the_site_rows_in_the_job_codes() -> None:
    table_b, meta_b, _ = _table([1, 2])
    spec = _spec(["0", "1", "2"], 3)
    task = prepare_task(
        spec,
        table_b.frame,
        "y",
        "",
        1.0,
        meta_b["n_classes"],
        7,
        None,
        class_counts=meta_b["class_counts"],
        site_classes=site_classes(meta_b),
    )
    raw = pd.Series(["1", "2"]).iloc[table_b.frame["y"].to_numpy()].to_numpy()
    np.testing.assert_array_equal(task.target, labels_to_codes(raw, spec.classes))
    assert run_task(task, _test_seed=0).weights["0.weight"].shape == (3, 2)
    balanced = replace(spec, plan=spec.plan.with_fields(class_weight="balanced"))
    task = prepare_task(
        balanced,
        table_b.frame,
        "y",
        "",
        1.0,
        2,
        7,
        None,
        class_counts=meta_b["class_counts"],
        site_classes=site_classes(meta_b),
    )
    assert len(task.plan["class_weight"]) == 3  # counts moved onto the job's 3 classes


def test_the_dry_run_maps_the_mock_as_its_site_maps_its_rows() -> None:
    _, meta_b, mock_b = _table([1, 2])
    spec = _spec(["0", "1", "2"], 3)
    mapped = mock_in_job_codes(mock_b, meta_b, spec)
    assert set(mapped["y"]) <= {1, 2} and set(mock_b["y"]) <= {0, 1}
    out = dry_run(mapped, "", spec)
    assert out["status"] == "ok" and out["shapes"]["0.weight"] == [3, 2]
    with pytest.raises(JobError, match=r"lack \['2'\]"):
        mock_in_job_codes(mock_b, meta_b, _spec(["0", "1"], 2))


def test_the_job_carries_its_classes_and_checks_their_width() -> None:
    spec = _spec(["0", "1", "2"], 3)
    from policies.plan import JobSpec

    assert JobSpec.from_dict(spec.to_dict()).classes == ["0", "1", "2"]
    assert "'classes': ['0', '1', '2']" in render(spec)
    with pytest.raises(PlanError, match=r"gives \[2\] per row; the job's 3 classes need \[3\]"):
        _spec(["0", "1", "2"], 2)
    with pytest.raises(PlanError, match="bce_with_logits is for 2 classes"):
        _spec(["0", "1", "2"], 1, loss="bce_with_logits")
    with pytest.raises(PlanError, match="lists a label twice"):
        _spec(["0", "0"], 2)


def test_the_test_file_is_coded_in_the_job_classes(tmp_path: Path) -> None:
    from researcher.api import read_test_rows
    from researcher.evaluation import held_out_metrics
    from researcher.model import build, load

    path = tmp_path / "test.csv"
    pd.DataFrame({"a": [0.0, 1.0, 0.2, 0.9], "b": 0.0, "y": ["No", "Yes", "No", "Yes"]}).to_csv(
        path, index=False
    )
    _, y = read_test_rows(path, "y", None, ["No", "Yes"])
    assert y.tolist() == [0, 1, 0, 1]
    spec = _spec(["No", "Yes"], 2)
    model = build(spec)
    weights = {"0.weight": np.array([[-10.0, 0.0], [10.0, 0.0]]), "0.bias": np.array([5.0, -5.0])}
    x, y = read_test_rows(path, "y", None, spec.classes)
    metrics = held_out_metrics(load(model, weights), x, y, "cross_entropy")
    assert metrics["accuracy"] == 1.0 and metrics["roc_auc"] == 1.0
    # labels {1, 2} score against codes {0, 1}
    pd.DataFrame({"a": [0.0, 1.0], "b": 0.0, "y": [1, 2]}).to_csv(path, index=False)
    assert read_test_rows(path, "y", None, ["1", "2"])[1].tolist() == [0, 1]
    with pytest.raises(JobError, match=r"labels \['2'\] are not among the job's classes"):
        read_test_rows(path, "y", None, ["0", "1"])


def test_load_job_sizes_the_model_from_the_federation_not_the_first_site(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The researcher's side of the digits refusal: the first site lacks digit 0 (9 classes),
    the model gets 10 outputs all the same."""
    from researcher import api

    digits = list(range(10))
    _, lacking, _ = _table(digits[1:], n=400)
    _, full, _ = _table(digits, n=400)
    metas = {"first": lacking, "second": full, "third": full}
    monkeypatch.setattr(api, "dataset_metas", lambda fed, dataset: metas)
    job = tmp_path / "job.py"
    job.write_text(
        "import torch.nn as nn\n"
        'DATASET = "d"\n'
        'PLAN = {"rounds": 1, "noise_multiplier": 1.0}\n'
        "def make_model(n_features, n_outputs):\n"
        "    return nn.Linear(n_features, n_outputs)\n"
    )
    spec = api.load_job(None, job)
    assert spec.architecture.output == (10,) and spec.classes == [str(d) for d in digits]
