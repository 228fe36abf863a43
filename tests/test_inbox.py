"""Inbox checks without a pipeline run: reading each batch format, and the gate's verdicts."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from digitflow.dataset import pixel_hashes
from digitflow.idx import read_images, read_labels
from digitflow.inbox import check_batch, find_batches, read_batch


@pytest.fixture(scope="module")
def fresh_digits(mnist_source) -> tuple[np.ndarray, np.ndarray]:
    """60 MNIST training digits, thickened so that none equals an image in the dataset."""
    from PIL import ImageFilter

    images = read_images(mnist_source / "train-images-idx3-ubyte.gz")[-60:]
    labels = read_labels(mnist_source / "train-labels-idx1-ubyte.gz")[-60:]
    thick = [np.asarray(Image.fromarray(d).filter(ImageFilter.MaxFilter(3))) for d in images]
    return np.stack(thick), labels


def test_npz_and_label_folders_read_as_the_same_digits(tmp_path, params, fresh_digits) -> None:
    images, labels = fresh_digits
    np.savez(tmp_path / "batch.npz", images=images[:10], labels=labels[:10])
    folder = tmp_path / "scans"
    for index, (pixels, label) in enumerate(zip(images[:10], labels[:10], strict=True)):
        (folder / str(label)).mkdir(parents=True, exist_ok=True)
        Image.fromarray(255 - pixels).resize((56, 56)).save(folder / str(label) / f"{index}.png")
    from_npz, from_folders = read_batch(tmp_path / "batch.npz", params), read_batch(folder, params)
    assert from_npz.problems == [] and from_folders.problems == []
    assert from_npz.images.shape == (10, 28, 28) and from_npz.images.dtype == np.uint8
    assert sorted(from_npz.labels.tolist()) == sorted(from_folders.labels.tolist())
    assert sorted(p.name for p in find_batches(tmp_path)) == ["batch.npz", "scans"]


def test_a_clean_batch_passes_the_gate(params, fresh_digits) -> None:
    images, labels = fresh_digits
    batch = read_batch_of(images, labels, params)
    problems, report = check_batch(batch, set(), params)
    assert problems == [] and report["success"] is True


def test_images_already_in_the_data_are_refused(params, fresh_digits) -> None:
    images, labels = fresh_digits
    batch = read_batch_of(images, labels, params)
    known = set(pixel_hashes(batch.images[:3]))
    problems, _ = check_batch(batch, known, params)
    assert any("already in the training or test data" in p for p in problems)


def test_bad_labels_blank_images_and_duplicates_are_each_named(params, fresh_digits) -> None:
    images, labels = fresh_digits
    batch = read_batch_of(images, labels, params)
    batch.labels[0] = 11
    batch.images[1] = 0
    batch.images[3] = batch.images[2]
    problems = " | ".join(check_batch(batch, set(), params)[0])
    assert "'label'" in problems and "[11]" in problems
    assert "ink_fraction" in problems
    assert "pixel_hash" in problems


def read_batch_of(images: np.ndarray, labels: np.ndarray, params) -> object:
    """A batch read the way the inbox reads an .npz (through MNIST's preprocessing)."""
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as folder:
        target = Path(folder) / "batch.npz"
        np.savez(target, images=images, labels=labels)
        return read_batch(target, params)
