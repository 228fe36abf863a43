"""Predictions from a registered model: on image files (`digitflow predict`) and on the test set
(`digitflow show`, the tutorial's picture of a few test digits with their predictions)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from . import inference, plots
from .config import Params, Paths
from .dataset import load_raw
from .errors import DigitflowError
from .imaging import IMAGE_SUFFIXES
from .inference import Scored


class ModelNotFound(DigitflowError, RuntimeError):
    """The requested model (usually the champion) does not exist yet."""


def load_model(model_uri: str):
    """Load a pyfunc model, turning MLflow's 'not found' into a clear error."""
    from mlflow.exceptions import MlflowException

    try:
        return inference.load(model_uri)
    except MlflowException as exc:
        hint = " (run `digitflow run` first to train and promote one)" if "@" in model_uri else ""
        raise ModelNotFound(f"cannot load {model_uri}: {exc.message}{hint}") from None


def collect_images(targets: list[Path]) -> list[Path]:
    """Files named directly, plus image files found under named folders (sorted)."""
    found: list[Path] = []
    for target in targets:
        if target.is_dir():
            found.extend(sorted(p for p in target.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES))
        else:
            found.append(target)
    return found


def read_files(files: list[Path]) -> tuple[list[bytes], list[str]]:
    """Each file's bytes (b"" when unreadable) and a read error per file ('' when fine)."""
    contents, read_errors = [], []
    for file in files:
        try:
            contents.append(file.read_bytes())
            read_errors.append("")
        except OSError as exc:
            contents.append(b"")
            read_errors.append(f"cannot read: {exc.strerror or exc}")
    return contents, read_errors


def predict_files(scorer: inference.Scorer, files: list[Path]) -> Scored:
    """Results with one row per file (file, digit, probability, p0..p9, error: '' when fine),
    and the inputs the model saw (for the prediction log)."""
    if not files:
        empty = pd.DataFrame(columns=["file", "digit", "probability", "error"])
        return Scored(empty, np.zeros((0, 28, 28, 1), np.float32), np.zeros((0, 10)))
    contents, read_errors = read_files(files)
    scored = scorer.score(contents)
    results = scored.results.copy()
    results["error"] = [
        read or predicted for read, predicted in zip(read_errors, results["error"], strict=True)
    ]
    results.loc[results["error"] != "", "digit"] = -1
    results.insert(0, "file", [str(file) for file in files])
    return Scored(results, scored.inputs, scored.probabilities)


def as_records(results: pd.DataFrame) -> list[dict]:
    """Result rows as JSON-ready dicts with the top three digits."""
    records = []
    for _, row in results.iterrows():
        record: dict = {"file": row["file"], "error": row["error"] or None}
        if not row["error"]:
            record["digit"] = int(row["digit"])
            record["probability"] = round(float(row["probability"]), 6)
            record["top3"] = [
                {"digit": digit, "probability": round(p, 6)} for digit, p in inference.top_k(row)
            ]
        records.append(record)
    return records


@dataclass(frozen=True)
class Showcase:
    path: Path
    shown: int
    wrong: int


def show(
    paths: Paths, params: Params, model_uri: str, count: int, output: Path, errors_only: bool
) -> Showcase:
    """A PNG grid of test images with predicted and true labels, wrong ones in red."""
    keras_model = inference.unwrap_keras(load_model(model_uri), model_uri)
    test = load_raw(paths, params.data)["test"]
    images = test.images.astype(np.float32)[..., np.newaxis] / 255.0
    probabilities = keras_model.predict(images, batch_size=512, verbose=0)
    predicted = probabilities.argmax(axis=1)
    labels = test.labels.astype(int)
    candidates = np.flatnonzero(predicted != labels) if errors_only else np.arange(len(labels))
    picks = candidates[:count]
    output.parent.mkdir(parents=True, exist_ok=True)
    plots.prediction_grid(
        images[picks],
        labels[picks],
        predicted[picks],
        probabilities[picks, predicted[picks]],
        output,
    )
    return Showcase(output, len(picks), int((predicted[picks] != labels[picks]).sum()))
