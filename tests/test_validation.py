"""The Great Expectations gate passes the real data and fails each corruption for its reason."""

from __future__ import annotations

import json
import re
import shutil
from dataclasses import replace

import numpy as np
import pytest
from conftest import make_project, run

from digitflow.dataset import Split, dataset_frame, load_raw
from digitflow.idx import write_idx
from digitflow.validation import validate_frame


@pytest.fixture(scope="module")
def raw(ingested, params) -> dict[str, Split]:
    return load_raw(ingested, params.data)


def _failures(raw: dict[str, Split], params) -> set[tuple[str, str, str | None]]:
    report = validate_frame(dataset_frame(raw, params.validate_.ink_grey_level), params.validate_)
    return {(o.suite, o.expectation, o.column) for o in report.failures}


def test_real_data_passes(raw, params) -> None:
    assert _failures(raw, params) == set()


def test_label_out_of_range(raw, params) -> None:
    labels = raw["train"].labels.copy()
    labels[[5, 50]] = 10
    failures = _failures({**raw, "train": replace(raw["train"], labels=labels)}, params)
    assert ("mnist_train", "expect_column_values_to_be_in_set", "label") in failures


def test_class_missing(raw, params) -> None:
    labels = raw["test"].labels.copy()
    labels[labels == 7] = 1
    failures = _failures({**raw, "test": replace(raw["test"], labels=labels)}, params)
    assert ("mnist_test", "expect_column_distinct_values_to_contain_set", "label") in failures
    assert ("mnist_class_balance", "expect_column_values_to_be_between", "share") in failures


def test_test_images_copied_into_train(raw, params) -> None:
    train = Split(
        np.concatenate([raw["train"].images, raw["test"].images[:20]]),
        np.concatenate([raw["train"].labels, raw["test"].labels[:20]]),
    )
    failures = _failures({**raw, "train": train}, params)
    assert ("mnist_train", "expect_column_values_to_be_in_set", "in_both_splits") in failures
    assert ("mnist_test", "expect_column_values_to_be_in_set", "in_both_splits") in failures


def test_blank_images(raw, params) -> None:
    images = raw["train"].images.copy()
    images[[1, 2, 3]] = 0
    failures = _failures({**raw, "train": replace(raw["train"], images=images)}, params)
    assert ("mnist_train", "expect_column_values_to_be_between", "ink_fraction") in failures


def test_image_label_count_mismatch(raw, params) -> None:
    short = replace(raw["test"], labels=raw["test"].labels[:-3])
    failures = _failures({**raw, "test": short}, params)
    assert ("mnist_test", "expect_column_values_to_not_be_null", "label") in failures


def test_subset_counts_are_configurable(raw, params) -> None:
    small = {s: Split(d.images[:3000], d.labels[:3000]) for s, d in raw.items()}
    assert ("mnist_train", "expect_table_row_count_to_equal", None) in _failures(small, params)
    rows = params.validate_.expected_rows.model_copy(update={"train": 3000, "test": 3000})
    relaxed = params.model_copy(
        update={"validate_": params.validate_.model_copy(update={"expected_rows": rows})}
    )
    assert _failures(small, relaxed) == set()


@pytest.mark.slow
def test_cli_writes_report_and_docs_and_fails_loudly(tmp_path, ingested, params) -> None:
    project = make_project(tmp_path / "p", with_git=False)
    shutil.copytree(ingested.raw, project.raw)
    ok = run(["digitflow", "validate"], project.root)
    assert re.search(r"(\d+)/\1 expectations met", ok.stdout), ok.stdout
    assert json.loads(project.validation_report.read_text())["success"] is True
    assert (project.validation_dir / "data_docs" / "index.html").is_file()

    labels_file = project.raw / params.data.files.train_labels.name
    labels = load_raw(project, params.data)["train"].labels.copy()
    labels[0] = 12
    labels_file.chmod(0o644)
    write_idx(labels_file, labels)
    bad = run(["digitflow", "validate"], project.root, check=False)
    assert bad.returncode == 1
    assert "FAILED [mnist_train] expect_column_values_to_be_in_set on 'label'" in bad.stdout
    assert "[12]" in bad.stdout
    report = json.loads(project.validation_report.read_text())
    assert report["success"] is False and report["failed"]
