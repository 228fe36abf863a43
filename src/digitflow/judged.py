"""A model's digits on the evaluation slices, logged with its run by the evaluate stage.

Judging a version (the register stage, or a later challenger against it as champion) needs
each model's digit for every evaluation image. The evaluate stage has just computed them for
the new model; logged with the run, together with a fingerprint of the images they belong to,
they let the register stage judge without loading TensorFlow or either model again, as long
as the images are still the same. Anything else (no logged digits, other images) gets None,
and the caller predicts with the model itself.
"""

from __future__ import annotations

import hashlib
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

ARTIFACT_DIR = "evaluation"
ARTIFACT_FILE = "digits.npz"


def fingerprint(x: np.ndarray, y: np.ndarray) -> str:
    """sha256 of a slice's images and labels, as stored (what a score was measured on)."""
    digest = hashlib.sha256(np.ascontiguousarray(x).tobytes())
    digest.update(np.ascontiguousarray(y).tobytes())
    return digest.hexdigest()


def fingerprints(slices: dict[str, Any]) -> dict[str, str]:
    """The fingerprint of each slice (arrays with `x` and `y`), by name."""
    return {name: fingerprint(arrays.x, arrays.y) for name, arrays in slices.items()}


def log_digits(run_id: str, slices: dict[str, Any], digits: dict[str, np.ndarray]) -> None:
    """Log each slice's predicted digits and its images' fingerprint to the run."""
    import mlflow

    printed = fingerprints(slices)
    arrays: dict[str, np.ndarray] = {}
    for name, digits_of_slice in digits.items():
        arrays[f"{name}.digits"] = np.asarray(digits_of_slice, dtype=np.int64)
        arrays[f"{name}.fingerprint"] = np.array(printed[name])
    with tempfile.TemporaryDirectory() as folder:
        file = Path(folder) / ARTIFACT_FILE
        np.savez(file, **arrays)
        mlflow.MlflowClient().log_artifact(run_id, str(file), artifact_path=ARTIFACT_DIR)


def logged_digits(run_id: str, printed: dict[str, str]) -> dict[str, np.ndarray] | None:
    """The run's logged digits for the slices whose fingerprints are `printed` (by name), or
    None when it logged none or logged them for other images than these."""
    from mlflow.exceptions import MlflowException

    import mlflow

    with tempfile.TemporaryDirectory() as folder:
        try:
            local = mlflow.artifacts.download_artifacts(
                run_id=run_id, artifact_path=f"{ARTIFACT_DIR}/{ARTIFACT_FILE}", dst_path=folder
            )
        except (MlflowException, OSError):
            return None
        with np.load(local) as stored:
            found = {key: stored[key] for key in stored.files}
    judged: dict[str, np.ndarray] = {}
    for name, expected in printed.items():
        if str(found.get(f"{name}.fingerprint", "")) != expected:
            return None
        judged[name] = found[f"{name}.digits"]
    return judged
