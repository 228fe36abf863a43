"""Inbox checks without a pipeline run: reading each batch format, and the gate's verdicts."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

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


def test_an_unreadable_npz_is_a_problem_not_a_crash(tmp_path, params) -> None:
    (tmp_path / "broken.npz").write_bytes(b"PK\x03\x04 half of a zip file")
    batch = read_batch(tmp_path / "broken.npz", params)
    assert len(batch.labels) == 0
    assert "not an npz with 'images' and 'labels' arrays" in batch.problems[0]


def test_npz_and_gzip_reads_stop_at_the_size_limit(tmp_path, params, fresh_digits) -> None:
    from digitflow.idx import write_idx

    images, labels = fresh_digits
    small = params.model_copy(
        update={"inbox": params.inbox.model_copy(update={"max_batch_bytes": 10_000})}
    )
    np.savez_compressed(tmp_path / "big.npz", images=images, labels=labels)
    assert "unpacks to" in read_batch(tmp_path / "big.npz", small).problems[0]
    pair = tmp_path / "pair"
    pair.mkdir()
    write_idx(pair / "batch-images-idx3-ubyte.gz", images)
    write_idx(pair / "batch-labels-idx1-ubyte.gz", labels)
    assert "unpacks to more than 10,000 bytes" in read_batch(pair, small).problems[0]
    assert read_batch(pair, params).problems == []


def test_a_folder_named_images_is_not_read_as_a_file(tmp_path, params) -> None:
    batch = tmp_path / "pair"
    (batch / "images").mkdir(parents=True)
    (batch / "labels.idx").write_bytes(b"\x00\x00\x08\x01\x00\x00\x00\x00")
    assert read_batch(batch, params).problems == ["expected one *images* and one *labels* IDX file"]


def test_symbolic_links_are_refused_not_followed(tmp_path, params, fresh_digits) -> None:
    images, labels = fresh_digits
    elsewhere = tmp_path / "elsewhere"
    (elsewhere / "3").mkdir(parents=True)
    Image.fromarray(255 - images[0]).save(elsewhere / "3" / "a.png")
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    (inbox / "linked").symlink_to(elsewhere)
    (inbox / "scans" / "3").mkdir(parents=True)
    (inbox / "scans" / "3" / "b.png").symlink_to(elsewhere / "3" / "a.png")
    assert "a symbolic link" in read_batch(inbox / "linked", params).problems[0]
    inner = read_batch(inbox / "scans", params)
    assert len(inner.labels) == 0 and "3/b.png: a symbolic link" in inner.problems[0]


def test_a_batch_still_being_copied_is_left_for_the_next_run(tmp_path) -> None:
    import threading
    import time

    from digitflow.inbox import settled

    done, growing = tmp_path / "done.npz", tmp_path / "growing.npz"
    done.write_bytes(b"complete")
    growing.write_bytes(b"")

    def copy_slowly() -> None:
        for _ in range(20):
            with growing.open("ab") as handle:
                handle.write(b"x" * 1000)
            time.sleep(0.05)

    copier = threading.Thread(target=copy_slowly)
    copier.start()
    ready, arriving = settled([done, growing], 0.3)
    copier.join()
    assert ready == [done] and arriving == [growing]
    assert settled([done, growing], 0.1) == ([done, growing], [])


def test_a_batch_whose_reader_raises_is_quarantined_and_the_rest_go_on(
    tmp_path, params, fresh_digits, ingested, monkeypatch
) -> None:
    """An I/O error no reader check expects (caused here by a stand-in reader: a failing disk
    cannot be made on demand) is the batch's problem, not the run's."""
    from conftest import make_project

    from digitflow import inbox

    project = make_project(tmp_path / "project", with_git=False)
    shutil.copytree(ingested.raw, project.raw)
    images, labels = fresh_digits
    params = params.model_copy(update={"inbox": params.inbox.model_copy(update={"settle_s": 0})})
    folder = project.inbox(params)
    folder.mkdir()
    np.savez(folder / "a-broken.npz", images=images[:5], labels=labels[:5])
    real_read = inbox.read_batch

    def failing_for_one(path, settings):
        if path.name == "a-broken.npz":
            raise OSError(5, "Input/output error")
        return real_read(path, settings)

    monkeypatch.setattr(inbox, "read_batch", failing_for_one)
    np.savez(folder / "b-good.npz", images=images[5:], labels=labels[5:])
    first, second = inbox.admit_all(project, params)
    assert not first.accepted and "OSError" in first.reason and "Input/output error" in first.reason
    report = json.loads(Path(first.report).read_text())
    assert "Input/output error" in report["exception"]
    assert second.accepted and second.count == 55
    assert list(folder.iterdir()) == []
