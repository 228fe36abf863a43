"""The preprocess stage: stratified subsets, a validation split from train, scaling to [0, 1]."""

from __future__ import annotations

import json
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


def stratified_subset(labels: np.ndarray, size: int | None, seed: int) -> np.ndarray:
    """Indices of a class-balanced subset of `size` items (all indices when size is None)."""
    everything = np.arange(len(labels))
    if size is None or size >= len(labels):
        return everything
    from sklearn.model_selection import train_test_split  # here: see preprocess()

    subset, _ = train_test_split(everything, train_size=size, stratify=labels, random_state=seed)
    return np.sort(subset)


def scale(images: np.ndarray) -> np.ndarray:
    """uint8 (n, 28, 28) -> float32 (n, 28, 28, 1) in [0, 1]."""
    return (images.astype(np.float32) / 255.0)[..., np.newaxis]


def split_file(paths: Paths, split: str):
    return paths.processed / f"{split}.npz"


def preprocess(paths: Paths, params: Params) -> dict[str, int]:
    """data/ -> artifacts/processed/{train,val,test,recent}.npz; returns the size of each split.
    `recent` is the holdout parts of the admitted batches, as stored (maybe empty)."""
    # Imported here: sklearn takes over a second to import, and the stages that only load the
    # splits this writes (train, evaluate, register) need none of it.
    from sklearn.model_selection import train_test_split

    raw = load_raw(paths, params.data)
    seed = params.preprocess.seed
    train_idx = stratified_subset(raw["train"].labels, params.data.max_train_samples, seed)
    test_idx = stratified_subset(raw["test"].labels, params.data.max_test_samples, seed)
    train_labels = raw["train"].labels[train_idx]
    fit_idx, val_idx = train_test_split(
        train_idx,
        test_size=params.preprocess.val_fraction,
        stratify=train_labels,
        random_state=seed,
    )
    chosen = {
        "train": (raw["train"], np.sort(fit_idx)),
        "val": (raw["train"], np.sort(val_idx)),
        "test": (raw["test"], test_idx),
        RECENT: (raw[RECENT], np.arange(len(raw[RECENT].labels))),  # all of it, never trained on
    }
    paths.processed.mkdir(parents=True, exist_ok=True)
    sizes = {}
    for split, (source, indices) in chosen.items():
        np.savez(
            split_file(paths, split), x=scale(source.images[indices]), y=source.labels[indices]
        )
        sizes[split] = len(indices)
    (paths.processed / "summary.json").write_text(json.dumps(sizes, indent=2) + "\n")
    return sizes


def load_split(paths: Paths, split: str) -> Arrays:
    """Load one processed split."""
    with np.load(split_file(paths, split)) as data:
        return Arrays(x=data["x"], y=data["y"])


def run_stage(paths: Paths, params: Params) -> StageResult:
    """The preprocess stage."""
    sizes = preprocess(paths, params)
    split_sizes = ", ".join(f"{split} {count:,}" for split, count in sizes.items())
    return StageResult(f"{split_sizes} images -> {paths.processed}")
