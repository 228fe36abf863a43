"""The recent holdout: a seeded, stratified share of every admitted batch, never trained on."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from conftest import make_project, set_params
from PIL import Image, ImageFilter

from digitflow.config import RECENT, load_params
from digitflow.dataset import pixel_hashes, stored_batches
from digitflow.idx import read_images, read_labels
from digitflow.inbox import admit_all, holdout_mask
from digitflow.preprocess import PROCESSED_SPLITS, load_split, preprocess
from digitflow.validation import validate_data


def test_holdout_mask_is_seeded_stratified_and_sized() -> None:
    labels = np.repeat(np.arange(10), 8)
    mask = holdout_mask(labels, 0.25, seed=3)
    assert mask.sum() == 20
    assert np.bincount(labels[mask], minlength=10).tolist() == [2] * 10
    assert np.array_equal(mask, holdout_mask(labels, 0.25, seed=3))
    assert not np.array_equal(mask, holdout_mask(labels, 0.25, seed=4))
    assert holdout_mask(labels[:3], 0.25, seed=3).sum() == 0  # too small to hold one back
    assert holdout_mask(np.array([1, 1, 1, 2]), 0.25, seed=3).sum() == 1  # unstratified draw
    assert holdout_mask(labels, 0.0, seed=3).sum() == 0


@pytest.fixture
def with_batch(tmp_path, ingested, mnist_source):
    """A slice project with one admitted batch of 80 thick-stroked digits (none in MNIST)."""
    project = make_project(tmp_path / "project", with_git=False)
    set_params(project, {("data", "max_train_samples"): 1000, ("data", "max_test_samples"): 300})
    set_params(project, {("inbox", "settle_s"): 0})
    shutil.copytree(ingested.raw, project.raw)
    params = load_params(project.params)
    images = read_images(mnist_source / "t10k-images-idx3-ubyte.gz")[-80:]
    labels = read_labels(mnist_source / "t10k-labels-idx1-ubyte.gz")[-80:]
    thick = np.stack(
        [np.asarray(Image.fromarray(d).filter(ImageFilter.MaxFilter(3))) for d in images]
    )
    project.inbox(params).mkdir(parents=True)
    np.savez(project.inbox(params) / "thick.npz", images=thick, labels=labels)
    (admission,) = admit_all(project, params)
    assert admission.accepted, admission.reason
    return project, params


def test_preprocess_makes_the_holdout_its_own_split_the_same_every_time(with_batch) -> None:
    project, params = with_batch
    (record,) = [json.loads(str(np.load(f)["record"])) for f in stored_batches(project)]
    assert record["holdout_count"] == 20  # floor(80 * 0.25)
    manifest = project.manifest.read_text()
    assert "holdout_count" in manifest.splitlines()[0]
    preprocess(project, params)
    first = {split: load_split(project, split) for split in PROCESSED_SPLITS}
    assert len(first[RECENT].y) == 20
    hashes = {
        split: set(pixel_hashes(np.round(arrays.x[..., 0] * 255).astype(np.uint8)))
        for split, arrays in first.items()
    }
    for split in ("train", "val", "test"):
        assert not hashes[RECENT] & hashes[split], f"recent overlaps {split}"
    preprocess(project, params)
    again = load_split(project, RECENT)
    assert np.array_equal(again.x, first[RECENT].x) and np.array_equal(again.y, first[RECENT].y)


def test_validate_checks_the_holdout_and_catches_leakage_into_it(with_batch) -> None:
    project, params = with_batch
    report = validate_data(project, params)
    assert report.success, report.failures
    assert report.stats["rows"][RECENT] == 20
    assert any(outcome.suite == RECENT for outcome in report.outcomes)
    (stored,) = stored_batches(project)
    with np.load(stored) as data:
        contents = {key: data[key] for key in data.files}
    held = np.flatnonzero(contents["holdout"])[0]
    contents["images"][held] = read_images(project.raw / "t10k-images-idx3-ubyte.gz")[0]
    np.savez_compressed(stored, **contents)
    failed = [o for o in validate_data(project, params).failures if o.column == "in_both_splits"]
    assert {o.suite for o in failed} >= {RECENT, "mnist_test"}
