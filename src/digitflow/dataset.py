"""The raw dataset in data/ as arrays, and as a pandas frame with one row per image."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from .config import SPLITS, DataParams, Paths
from .idx import read_images, read_labels


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
        splits[split] = Split(read_images(folder / images), read_labels(folder / labels))
    return splits


def stored_batches(paths: Paths) -> list[Path]:
    """Admitted inbox batches in data/batches, oldest first (file names start with a timestamp)."""
    return sorted(paths.batches.glob("*.npz")) if paths.batches.is_dir() else []


def read_batch_file(path: Path) -> Split:
    """One admitted batch: images (n, 28, 28) uint8 and labels (n,) uint8."""
    with np.load(path, allow_pickle=False) as stored:
        return Split(stored["images"], stored["labels"])


def batch_rows(paths: Paths) -> int:
    """How many training images the admitted batches add."""
    return sum(len(read_batch_file(path).labels) for path in stored_batches(paths))


def load_raw(paths: Paths, params: DataParams) -> dict[str, Split]:
    """Both splits from data/ (MNIST, plus admitted batches appended to train), read-only."""
    raw = load_folder(paths.raw, params)
    extra = [read_batch_file(path) for path in stored_batches(paths)]
    if extra:
        train = raw["train"]
        raw["train"] = Split(
            np.concatenate([train.images, *(batch.images for batch in extra)]),
            np.concatenate([train.labels, *(batch.labels for batch in extra)]),
        )
    return raw


def pixel_hashes(images: np.ndarray) -> list[str]:
    """A short content hash per image, for duplicate and leakage checks."""
    flat = np.ascontiguousarray(images.reshape(len(images), -1))
    return [hashlib.blake2b(row.tobytes(), digest_size=12).hexdigest() for row in flat]


def image_frame(split: str, data: Split, ink_grey_level: int) -> pd.DataFrame:
    """One row per image (or per label, when counts differ) with pixel statistics."""
    n_images, n_labels = len(data.images), len(data.labels)
    rows = max(n_images, n_labels)
    flat = data.images.reshape(n_images, -1)
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
    """Both splits in one frame, with `in_both_splits` marking images found in train and test."""
    frame = pd.concat(
        [image_frame(split, data, ink_grey_level) for split, data in raw.items()], ignore_index=True
    )
    by_split = {split: set(frame.loc[frame.split == split, "pixel_hash"].dropna()) for split in raw}
    shared = set.intersection(*by_split.values()) if by_split else set()
    frame["in_both_splits"] = frame["pixel_hash"].isin(shared)
    return frame


def class_shares(frame: pd.DataFrame) -> pd.DataFrame:
    """Per split and label: count and share of the split's labelled images."""
    labelled = frame.dropna(subset=["label"])
    counts = labelled.groupby(["split", "label"]).size().rename("count").reset_index()
    counts["share"] = counts["count"] / counts.groupby("split")["count"].transform("sum")
    return counts
