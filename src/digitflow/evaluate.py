"""The evaluate stage: score the trained model on the test set and log the results to its run."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import keras
import numpy as np
import pandas as pd
from sklearn.metrics import classification_report
from sklearn.metrics import confusion_matrix as sk_confusion_matrix

from . import plots, tracking
from .config import NUM_CLASSES, Params, Paths
from .contract import StageResult
from .preprocess import Arrays, load_split

GRID_SIZE = 24
GRID_MAX_WRONG = 8


@dataclass(frozen=True)
class Scores:
    accuracy: float
    loss: float
    probabilities: np.ndarray

    @property
    def predicted(self) -> np.ndarray:
        return self.probabilities.argmax(axis=1)


def score(model: keras.Model, test: Arrays, batch_size: int = 512) -> Scores:
    """Accuracy and cross-entropy of a model on a processed split."""
    probabilities = np.asarray(model.predict(test.x, batch_size=batch_size, verbose=0))
    picked = np.clip(probabilities[np.arange(len(test.y)), test.y], 1e-7, 1.0)
    accuracy = float((probabilities.argmax(axis=1) == test.y).mean())
    return Scores(
        accuracy=accuracy, loss=float(-np.log(picked).mean()), probabilities=probabilities
    )


def grid_indices(true: np.ndarray, predicted: np.ndarray, seed: int) -> np.ndarray:
    """Up to GRID_MAX_WRONG mistakes plus random correct predictions, GRID_SIZE in all."""
    rng = np.random.default_rng(seed)
    wrong = np.flatnonzero(true != predicted)
    right = np.flatnonzero(true == predicted)
    picked_wrong = rng.permutation(wrong)[:GRID_MAX_WRONG]
    picked_right = rng.permutation(right)[: GRID_SIZE - len(picked_wrong)]
    return np.sort(np.concatenate([picked_wrong, picked_right]))


def per_class_report(true: np.ndarray, predicted: np.ndarray) -> pd.DataFrame:
    """Precision, recall, F1 and support for each digit."""
    report = classification_report(
        true, predicted, labels=list(range(NUM_CLASSES)), output_dict=True, zero_division=0
    )
    rows = [{"digit": d, **report[str(d)]} for d in range(NUM_CLASSES)]
    return pd.DataFrame(rows).rename(columns={"f1-score": "f1"})


def evaluate(paths: Paths, params: Params) -> dict[str, float]:
    """model.keras + test split -> metrics, per-class report, confusion matrix, prediction grid."""
    import mlflow

    run_id = tracking.read_run_info(paths)["run_id"]
    tracking.configure(paths, params)
    test = load_split(paths, "test")
    model = keras.models.load_model(paths.model_file)
    scores = score(model, test)
    predicted = scores.predicted
    report = per_class_report(test.y, predicted)
    matrix = sk_confusion_matrix(test.y, predicted, labels=list(range(NUM_CLASSES)))
    metrics = {
        "test_accuracy": scores.accuracy,
        "test_loss": scores.loss,
        "test_macro_f1": float(report["f1"].mean()),
        "test_errors": int((predicted != test.y).sum()),
        "n_test": len(test.y),
    }
    out = paths.eval_dir
    out.mkdir(parents=True, exist_ok=True)
    files = _write_outputs(out, test, scores, report, matrix, metrics, params.train.seed)
    client = mlflow.MlflowClient()
    tracking.log_datasets(run_id, paths, {"test": (test.x, test.y)})
    for key, value in metrics.items():
        client.log_metric(run_id, key, float(value))
    for file in files:
        client.log_artifact(run_id, str(file), artifact_path="evaluation")
    return metrics


def _write_outputs(
    out: Path,
    test: Arrays,
    scores: Scores,
    report: pd.DataFrame,
    matrix: np.ndarray,
    metrics: dict,
    seed: int,
) -> list[Path]:
    predicted = scores.predicted
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    report.to_csv(out / "per_class.csv", index=False, float_format="%.4f")
    pd.DataFrame({"actual": test.y, "predicted": predicted}).to_csv(
        out / "predictions.csv", index=False
    )
    title = f"Test set: accuracy {metrics['test_accuracy']:.4f}, {metrics['test_errors']} errors"
    plots.confusion_matrix(matrix, out / "confusion_matrix.png", title)
    picks = grid_indices(test.y, predicted, seed)
    confidence = scores.probabilities[picks, predicted[picks]]
    plots.prediction_grid(
        test.x[picks], test.y[picks], predicted[picks], confidence, out / "prediction_grid.png"
    )
    return [
        out / name
        for name in ("metrics.json", "per_class.csv", "confusion_matrix.png", "prediction_grid.png")
    ]


def run_stage(paths: Paths, params: Params) -> StageResult:
    """The evaluate stage."""
    metrics = evaluate(paths, params)
    return StageResult(
        f"test accuracy {metrics['test_accuracy']:.4f}, loss {metrics['test_loss']:.4f}, "
        f"{metrics['test_errors']} errors of {metrics['n_test']:,} -> {paths.eval_dir}"
    )
