"""The preprocess stage: stratified subsets and a validation split from train.

The splits are stored as the archives' uint8 pixels and scaled to [0, 1] as they are loaded
(`load_split`): a quarter of the bytes to write, for DVC to hash and cache, and to read back.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass

import numpy as np

from .config import RECENT, Params, Paths
from .contract import StageResult
from .dataset import load_raw

PROCESSED_SPLITS = ("train", "val", "test", RECENT)


@dataclass(frozen=True)
class Arrays:
    """Model-ready images (n, 28, 28, 1) float32 in [0, 1] and integer labels (n,)."""

    x: np.ndarray
    y: np.ndarray


def stratified_split(labels: np.ndarray, held: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices (kept, held_out), each sorted: `held` of them held out, every class in proportion
    to its count (the classes with the largest remainders get the odd ones), drawn with `seed`.

    Plain NumPy: scikit-learn's train_test_split does the same and took over a second of the
    preprocess stage to import."""
    if not 0 <= held <= len(labels):
        raise ValueError(f"cannot hold out {held} of {len(labels)} items")
    rng = np.random.default_rng(seed)
    classes, members = np.unique(labels, return_inverse=True)
    shares = np.bincount(members, minlength=len(classes)) * (held / max(len(labels), 1))
    per_class = np.floor(shares).astype(int)
    largest_remainder_first = np.lexsort((rng.random(len(classes)), per_class - shares))
    per_class[largest_remainder_first[: held - per_class.sum()]] += 1
    chosen = np.zeros(len(labels), dtype=bool)
    for index, count in enumerate(per_class):
        chosen[rng.permutation(np.flatnonzero(members == index))[:count]] = True
    return np.flatnonzero(~chosen), np.flatnonzero(chosen)


def stratified_subset(labels: np.ndarray, size: int | None, seed: int) -> np.ndarray:
    """Indices of a class-balanced subset of `size` items (all indices when size is None)."""
    everything = np.arange(len(labels))
    if size is None or size >= len(labels):
        return everything
    return stratified_split(labels, size, seed)[1]


def scale(images: np.ndarray) -> np.ndarray:
    """uint8 (n, 28, 28) -> float32 (n, 28, 28, 1) in [0, 1]."""
    return np.divide(images, np.float32(255), dtype=np.float32)[..., np.newaxis]


def split_file(paths: Paths, split: str):
    return paths.processed / f"{split}.npz"


def preprocess(paths: Paths, params: Params) -> dict[str, int]:
    """data/ -> artifacts/processed/{train,val,test,recent}.npz; returns the size of each split.
    `recent` is the holdout parts of the admitted batches, as stored (maybe empty)."""
    raw = load_raw(paths, params.data)
    seed = params.preprocess.seed
    train_idx = stratified_subset(raw["train"].labels, params.data.max_train_samples, seed)
    test_idx = stratified_subset(raw["test"].labels, params.data.max_test_samples, seed)
    train_labels = raw["train"].labels[train_idx]
    val_size = math.ceil(params.preprocess.val_fraction * len(train_idx))
    fit_at, val_at = stratified_split(train_labels, val_size, seed)
    chosen = {
        "train": (raw["train"], train_idx[fit_at]),
        "val": (raw["train"], train_idx[val_at]),
        "test": (raw["test"], test_idx),
        RECENT: (raw[RECENT], np.arange(len(raw[RECENT].labels))),  # all of it, never trained on
    }
    paths.processed.mkdir(parents=True, exist_ok=True)
    sizes = {}
    for split, (source, indices) in chosen.items():
        np.savez(split_file(paths, split), x=source.images[indices], y=source.labels[indices])
        sizes[split] = len(indices)
    (paths.processed / "summary.json").write_text(json.dumps(sizes, indent=2) + "\n")
    return sizes


def load_split(paths: Paths, split: str) -> Arrays:
    """Load one processed split, its pixels scaled to [0, 1]."""
    with np.load(split_file(paths, split)) as data:
        return Arrays(x=scale(data["x"]), y=data["y"])


def run_stage(paths: Paths, params: Params) -> StageResult:
    """The preprocess stage."""
    sizes = preprocess(paths, params)
    split_sizes = ", ".join(f"{split} {count:,}" for split, count in sizes.items())
    return StageResult(f"{split_sizes} images -> {paths.processed}")
