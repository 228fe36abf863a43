"""The raw dataset in data/ as arrays, and as a pandas frame with one row per image."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from .config import RECENT, SPLITS, DataParams, Paths
from .idx import IMAGE_DIMS, LABEL_DIMS, read_idx

if TYPE_CHECKING:
    import pandas as pd


@dataclass(frozen=True)
class Split:
    """Images (n, 28, 28) uint8 and labels (m,) uint8 of one split; n == m when healthy."""

    images: np.ndarray
    labels: np.ndarray


def split_files(params: DataParams, split: str) -> tuple[str, str]:
    """The image and label archive names of one split."""
    files = params.files
    return getattr(files, f"{split}_images").name, getattr(files, f"{split}_labels").name


def load_folder(folder: Path, params: DataParams) -> dict[str, Split]:
    """Read both splits from a folder holding the four archives."""
    splits = {}
    for split in SPLITS:
        images, labels = split_files(params, split)
        splits[split] = Split(
            _read_archive(folder / images, IMAGE_DIMS), _read_archive(folder / labels, LABEL_DIMS)
        )
    return splits


def _read_archive(path: Path, dims: int) -> np.ndarray:
    """An IDX archive's array (read-only), unpacked once per process while the file stays the
    same: the validate and preprocess stages of one flow run both read all four archives."""
    try:
        stat = path.stat()
    except FileNotFoundError:
        return read_idx(path, dims)  # raises the IdxError that names the missing file
    return _unpacked(str(path), dims, stat.st_ino, stat.st_size, stat.st_mtime_ns)


@lru_cache(maxsize=len(SPLITS) * 2)
def _unpacked(path: str, dims: int, inode: int, size: int, mtime_ns: int) -> np.ndarray:
    """The array of the archive at path while it has this inode, size and mtime."""
    return read_idx(Path(path), dims)


def stored_batches(paths: Paths) -> list[Path]:
    """Admitted inbox batches in data/batches, oldest first (file names start with a timestamp)."""
    return sorted(paths.batches.glob("*.npz")) if paths.batches.is_dir() else []


def read_batch_file(path: Path) -> Split:
    """One admitted batch, all of it: images (n, 28, 28) uint8 and labels (n,) uint8."""
    with np.load(path, allow_pickle=False) as stored:
        return Split(stored["images"], stored["labels"])


def read_batch_parts(path: Path) -> tuple[Split, Split]:
    """One admitted batch as (training part, recent holdout part), by the holdout mask stored
    with it at admission (a batch stored before holdouts existed is all training)."""
    with np.load(path, allow_pickle=False) as stored:
        images, labels = stored["images"], stored["labels"]
        held = stored["holdout"] if "holdout" in stored.files else np.zeros(len(labels), bool)
    return Split(images[~held], labels[~held]), Split(images[held], labels[held])


def batch_rows(paths: Paths) -> int:
    """How many training images the admitted batches add (their holdout parts excluded)."""
    return sum(len(read_batch_parts(path)[0].labels) for path in stored_batches(paths))


def _joined(parts: list[Split]) -> Split:
    if not parts:
        return Split(np.zeros((0, 28, 28), np.uint8), np.zeros(0, np.uint8))
    return Split(
        np.concatenate([part.images for part in parts]),
        np.concatenate([part.labels for part in parts]),
    )


def load_raw(paths: Paths, params: DataParams) -> dict[str, Split]:
    """The splits of data/, read-only: MNIST train plus the training part of every admitted
    batch, MNIST test, and RECENT, the holdout parts of the admitted batches (maybe empty)."""
    raw = load_folder(paths.raw, params)
    parts = [read_batch_parts(path) for path in stored_batches(paths)]
    raw["train"] = _joined([raw["train"], *(training for training, _ in parts)])
    raw[RECENT] = _joined([recent for _, recent in parts])
    return raw


def pixel_hashes(images: np.ndarray) -> list[str]:
    """A short content hash per image, for duplicate and leakage checks."""
    flat = np.ascontiguousarray(images.reshape(len(images), -1)) if len(images) else []
    return [hashlib.blake2b(row.tobytes(), digest_size=12).hexdigest() for row in flat]


def image_frame(split: str, data: Split, ink_grey_level: int) -> pd.DataFrame:
    """One row per image (or per label, when counts differ) with pixel statistics."""
    import pandas as pd  # here, not at the top: a run with nothing new never needs it (0.45 s)

    n_images, n_labels = len(data.images), len(data.labels)
    rows = max(n_images, n_labels)
    flat = data.images.reshape(n_images, -1) if n_images else np.zeros((0, 784), np.uint8)
    frame = pd.DataFrame({"split": split, "index": np.arange(rows)})
    frame["label"] = pd.array(
        np.concatenate([data.labels.astype("int64"), np.full(rows - n_labels, -1)]), dtype="Int64"
    )
    frame.loc[frame.index >= n_labels, "label"] = pd.NA

    def padded(values: np.ndarray) -> pd.Series:
        series = pd.Series(np.full(rows, np.nan))
        series.iloc[:n_images] = values
        return series

    frame["pixel_min"] = padded(flat.min(axis=1) if n_images else np.array([]))
    frame["pixel_max"] = padded(flat.max(axis=1) if n_images else np.array([]))
    frame["pixel_mean"] = padded(flat.mean(axis=1) if n_images else np.array([]))
    frame["ink_fraction"] = padded(
        (flat > ink_grey_level).mean(axis=1) if n_images else np.array([])
    )
    hashes = pixel_hashes(data.images) + [None] * (rows - n_images)
    frame["pixel_hash"] = pd.Series(hashes, dtype="object")
    return frame


def dataset_frame(raw: dict[str, Split], ink_grey_level: int) -> pd.DataFrame:
    """Every split in one frame, with `in_both_splits` marking images found in more than one
    split (train, test, recent: leakage between any two)."""
    import pandas as pd  # here, not at the top: a run with nothing new never needs it (0.45 s)

    frame = pd.concat(
        [
            image_frame(split, data, ink_grey_level)
            for split, data in raw.items()
            if len(data.images) or len(data.labels)
        ],
        ignore_index=True,
    )
    splits_per_hash = frame.dropna(subset=["pixel_hash"]).groupby("pixel_hash")["split"].nunique()
    shared = set(splits_per_hash.index[splits_per_hash > 1])
    frame["in_both_splits"] = frame["pixel_hash"].isin(shared)
    return frame


def class_shares(frame: pd.DataFrame) -> pd.DataFrame:
    """Per split and label: count and share of the split's labelled images."""
    labelled = frame.dropna(subset=["label"])
    counts = labelled.groupby(["split", "label"]).size().rename("count").reset_index()
    counts["share"] = counts["count"] / counts.groupby("split")["count"].transform("sum")
    return counts
