"""Hyper-parameter sweeps: the trials of a search space, one trial's training, and the choice.

Each trial trains on the processed training split (a stratified subset by default, so trials
are cheap) and is scored on the validation split only; it is logged as an MLflow child run of
the sweep's parent run. The best trial is then scored once on the test set, registered, and
put through the normal promotion policy.
"""

from __future__ import annotations

import itertools
import json
import os
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from . import tracking
from .config import Params, Paths, SweepParams

PARENT_TAG = "mlflow.parentRunId"
SWEEP_TAG = "digitflow.sweep"


@dataclass(frozen=True)
class TrialResult:
    """What one trial reports back to the sweep."""

    index: int
    run_id: str
    model_uri: str
    overrides: dict[str, Any]
    val_accuracy: float
    val_loss: float
    seconds: float

    def to_dict(self) -> dict:
        return asdict(self)


def trials(sweep: SweepParams) -> list[dict[str, Any]]:
    """The trials' overrides: every combination (grid) or `trials` seeded draws (random)."""
    keys = sorted(sweep.space)
    combinations = [
        dict(zip(keys, values, strict=True))
        for values in itertools.product(*(sweep.space[k] for k in keys))
    ]
    if sweep.method == "grid":
        return combinations
    chooser = random.Random(sweep.seed)
    if sweep.trials <= len(combinations):
        return chooser.sample(combinations, sweep.trials)
    return [chooser.choice(combinations) for _ in range(sweep.trials)]


def apply(params: Params, overrides: dict[str, Any]) -> Params:
    """Params with 'model.X' / 'train.X' overrides applied and re-validated; the sweep's epochs
    apply unless the space sets train.epochs."""
    raw = params.model_dump(by_alias=True)
    raw["train"]["epochs"] = params.sweep.epochs
    for dotted, value in overrides.items():
        section, key = dotted.split(".", 1)
        raw[section][key] = value
    return Params.model_validate(raw)


def start_parent(paths: Paths, params: Params, overrides: list[dict[str, Any]]) -> str:
    """The sweep's parent MLflow run (left open until finish); returns its id."""
    import mlflow

    experiment_id = tracking.configure(paths, params)
    client = mlflow.MlflowClient()
    run = client.create_run(
        experiment_id,
        run_name=f"sweep-{time.strftime('%Y%m%d-%H%M%S')}",
        tags={**tracking.run_tags(paths, params), SWEEP_TAG: "parent"},
    )
    run_id = run.info.run_id
    client.log_param(run_id, "sweep.method", params.sweep.method)
    client.log_param(run_id, "sweep.trials", len(overrides))
    client.log_param(run_id, "sweep.max_train_samples", str(params.sweep.max_train_samples))
    client.log_param(run_id, "sweep.space", json.dumps(params.sweep.space))
    return run_id


def _limit_threads(threads: int) -> None:
    """Share the CPU between the trials running side by side (first call per process only)."""
    import tensorflow as tf

    try:
        tf.config.threading.set_intra_op_parallelism_threads(threads)
        tf.config.threading.set_inter_op_parallelism_threads(threads)
    except RuntimeError:
        pass  # TensorFlow already started in this worker process


def run_trial(
    root: str, parent_run_id: str, index: int, overrides: dict[str, Any], threads: int
) -> TrialResult:
    """Train one trial and log it as a child run of the sweep; runs inside a Dask worker."""
    _limit_threads(threads)

    import mlflow

    from . import inference
    from .config import load_params
    from .config import paths as project_paths
    from .preprocess import Arrays, load_split, stratified_subset
    from .train import fit_model

    project = project_paths(Path(root))
    params = apply(load_params(project.params), overrides)
    experiment_id = tracking.configure(project, params)
    fit, val = load_split(project, "train"), load_split(project, "val")
    keep = stratified_subset(fit.y, params.sweep.max_train_samples, params.train.seed)
    subset = Arrays(fit.x[keep], fit.y[keep])
    client = mlflow.MlflowClient()
    run = client.create_run(
        experiment_id,
        run_name=f"trial-{index}",
        tags={**tracking.run_tags(project, params), PARENT_TAG: parent_run_id, SWEEP_TAG: "trial"},
    )
    run_id = run.info.run_id
    for key, value in {
        **tracking.flat_params(params),
        "data.n_train": len(subset.y),
        "sweep.trial": index,
    }.items():
        client.log_param(run_id, key, value)
    try:
        fitted = fit_model(params, subset, val, run_id, verbose=0)
        best_epoch = int(fitted.history["val_loss"].idxmin())
        val_loss = float(fitted.history["val_loss"][best_epoch])
        val_accuracy = float(fitted.history["val_accuracy"][best_epoch])
        client.log_metric(run_id, "val_accuracy_final", val_accuracy)
        client.log_metric(run_id, "train_seconds", fitted.seconds)
        keras_file = project.root / "artifacts" / "sweep" / f"{run_id}.keras"
        keras_file.parent.mkdir(parents=True, exist_ok=True)
        fitted.model.save(keras_file)
        with mlflow.start_run(run_id=run_id):
            model_uri = inference.log_model(keras_file, params)
        keras_file.unlink()
    except Exception:
        client.set_terminated(run_id, "FAILED")
        raise
    client.set_terminated(run_id, "FINISHED")
    return TrialResult(
        index, run_id, model_uri, overrides, val_accuracy, val_loss, round(fitted.seconds, 2)
    )


def best(results: list[TrialResult]) -> TrialResult:
    """The trial with the highest validation accuracy (lowest validation loss breaks ties)."""
    return max(results, key=lambda r: (r.val_accuracy, -r.val_loss))


def finish(paths: Paths, params: Params, parent_run_id: str, results: list[TrialResult]) -> dict:
    """Log the comparison on the parent run, score the best trial on the test set once, and
    register it through the promotion policy."""
    import mlflow

    from .evaluate import score
    from .inference import keras_model_of
    from .preprocess import load_split
    from .registry import register_run

    tracking.configure(paths, params)
    client = mlflow.MlflowClient()
    chosen = best(results)
    table = pd.DataFrame(
        [
            {
                "trial": r.index,
                "run_id": r.run_id,
                **r.overrides,
                "val_accuracy": r.val_accuracy,
                "val_loss": r.val_loss,
                "seconds": r.seconds,
            }
            for r in results
        ]
    ).sort_values("val_accuracy", ascending=False)
    summary_file = paths.reports / "sweep.csv"
    summary_file.parent.mkdir(parents=True, exist_ok=True)
    table.to_csv(summary_file, index=False, float_format="%.6f")
    client.log_artifact(parent_run_id, str(summary_file), artifact_path="sweep")
    client.log_metric(parent_run_id, "best_val_accuracy", chosen.val_accuracy)
    client.set_tag(parent_run_id, "best_trial_run_id", chosen.run_id)
    for key, value in chosen.overrides.items():
        client.log_param(parent_run_id, f"best.{key}", value)
    test_accuracy = score(keras_model_of(chosen.model_uri), load_split(paths, "test")).accuracy
    client.log_metric(chosen.run_id, "test_accuracy", test_accuracy)
    client.log_metric(parent_run_id, "best_test_accuracy", test_accuracy)
    decision = register_run(paths, params, chosen.run_id, chosen.model_uri, test_accuracy)
    client.set_terminated(parent_run_id, "FINISHED")
    return {
        "parent_run_id": parent_run_id,
        "trials": [r.to_dict() for r in results],
        "best": chosen.to_dict(),
        "test_accuracy": test_accuracy,
        "decision": "promoted" if decision.promoted else "not promoted",
        "reason": decision.reason,
        "version": decision.challenger_version,
        "summary_csv": str(summary_file),
    }


def threads_per_trial(workers: int) -> int:
    """CPU threads each trial may use when `workers` trials run side by side on this machine."""
    return max(1, (os.cpu_count() or 1) // workers)


def abandon(paths: Paths, params: Params, parent_run_id: str) -> None:
    """Mark the parent run FAILED when the sweep could not finish."""
    import mlflow

    tracking.configure(paths, params)
    mlflow.MlflowClient().set_terminated(parent_run_id, "FAILED")
