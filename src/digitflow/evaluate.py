"""The evaluate stage: score the trained model on the test set and the recent holdout, log the
results to its run."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import keras
import numpy as np
import pandas as pd

from . import judged, plots, tracking
from .config import RECENT, Params, Paths
from .contract import StageResult
from .metrics import confusion, per_class_report
from .preprocess import Arrays, load_split
from .promotion import MNIST_TEST

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


def slice_metrics(prefix: str, labels: np.ndarray, scores: Scores) -> dict[str, float]:
    """Accuracy, loss, macro F1 and error count of one slice, keys starting with prefix."""
    predicted = scores.predicted
    report = per_class_report(labels, predicted)
    return {
        f"{prefix}_accuracy": scores.accuracy,
        f"{prefix}_loss": scores.loss,
        f"{prefix}_macro_f1": float(report["f1"].mean()),
        f"{prefix}_errors": int((predicted != labels).sum()),
        f"n_{prefix}": len(labels),
    }


def evaluate(paths: Paths, params: Params) -> dict[str, float]:
    """model.keras + the test split (and the recent holdout, when it holds images) -> metrics,
    per-class report of each slice, confusion matrix, prediction grid."""
    import mlflow

    run_id = tracking.read_run_info(paths)["run_id"]
    tracking.configure(paths, params)
    test = load_split(paths, "test")
    recent = load_split(paths, RECENT)
    model = keras.models.load_model(paths.model_file)
    scores = score(model, test)
    predicted = scores.predicted
    report = per_class_report(test.y, predicted).assign(slice=MNIST_TEST)
    matrix = confusion(test.y, predicted)
    metrics = {**slice_metrics("test", test.y, scores), f"n_{RECENT}": len(recent.y)}
    datasets = {"test": (test.x, test.y)}
    digits = {MNIST_TEST: predicted, RECENT: np.zeros(0, dtype=np.int64)}
    if len(recent.y):
        recent_scores = score(model, recent)
        digits[RECENT] = recent_scores.predicted
        metrics.update(slice_metrics(RECENT, recent.y, recent_scores))
        recent_report = per_class_report(recent.y, recent_scores.predicted)
        report = pd.concat([report, recent_report.assign(slice=RECENT)], ignore_index=True)
        datasets[RECENT] = (recent.x, recent.y)
    out = paths.eval_dir
    out.mkdir(parents=True, exist_ok=True)
    files = _write_outputs(out, test, scores, report, matrix, metrics, params.train.seed)
    client = mlflow.MlflowClient()
    tracking.log_datasets(run_id, paths, datasets)
    judged.log_digits(run_id, {MNIST_TEST: test, RECENT: recent}, digits)
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
    columns = ["slice", "digit", "precision", "recall", "f1", "support"]
    report[columns].to_csv(out / "per_class.csv", index=False, float_format="%.4f")
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
    recent = (
        f"; recent holdout {metrics[f'{RECENT}_accuracy']:.4f} on {metrics[f'n_{RECENT}']:,}"
        if metrics[f"n_{RECENT}"]
        else ""
    )
    return StageResult(
        f"test accuracy {metrics['test_accuracy']:.4f}, loss {metrics['test_loss']:.4f}, "
        f"{metrics['test_errors']} errors of {metrics['n_test']:,}{recent} -> {paths.eval_dir}"
    )
