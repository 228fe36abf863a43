"""The train stage: fit the configured CNN, log everything to one MLflow run, save the model."""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import keras
import numpy as np
import pandas as pd

from . import inference, inputs, plots, precision, tracking
from .batchnorm import recalibrate
from .config import Params, Paths, TrainParams
from .contract import StageResult
from .errors import DigitflowError
from .model import build_model
from .precision import Precision
from .preprocess import Arrays, load_split


class TrainingError(DigitflowError, RuntimeError):
    """Training could not produce a usable model."""


@dataclass(frozen=True)
class TrainResult:
    run_id: str
    model_uri: str
    best_val_accuracy: float
    epochs_run: int
    seconds: float


class MlflowEpochLogger(keras.callbacks.Callback):
    """Logs every epoch's metrics to one MLflow run, by id (no reliance on the active run)."""

    def __init__(self, run_id: str) -> None:
        super().__init__()
        self.run_id = run_id

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        import mlflow

        metrics = {k: float(v) for k, v in (logs or {}).items() if np.isfinite(v)}
        metrics["learning_rate"] = float(
            keras.ops.convert_to_numpy(self.model.optimizer.learning_rate)
        )
        mlflow.MlflowClient().log_batch(
            self.run_id,
            metrics=[
                mlflow.entities.Metric(k, v, int(time.time() * 1000), epoch + 1)
                for k, v in metrics.items()
            ],
        )


class EpochPace(keras.callbacks.Callback):
    """Adds each epoch's wall seconds and this process's CPU utilisation over it (CPU seconds /
    (wall x usable cores)) to the epoch's logs, so the history and MLflow hold them. Place it
    before the callbacks that read the logs."""

    def __init__(self) -> None:
        super().__init__()
        self.started = self.cpu_before = 0.0

    def on_epoch_begin(self, epoch: int, logs: dict | None = None) -> None:
        self.started, self.cpu_before = time.perf_counter(), _cpu_seconds()

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        seconds = time.perf_counter() - self.started
        if logs is not None:
            logs["epoch_seconds"] = seconds
            logs["epoch_cpu_utilisation"] = utilisation(_cpu_seconds() - self.cpu_before, seconds)


class TimeForecast(keras.callbacks.Callback):
    """After the first epoch, says how long all of them will take on this machine. The first
    epoch also traces the model: its first call into TensorFlow takes longer than the others by
    about that much, which the later epochs will not spend again."""

    def __init__(self, epochs: int) -> None:
        super().__init__()
        self.epochs = epochs
        self.started = 0.0
        self.call_ends: list[float] | None = []  # the first epoch's; None once it is over

    def on_epoch_begin(self, epoch: int, logs: dict | None = None) -> None:
        if epoch == 0:
            self.started = time.perf_counter()

    def on_train_batch_end(self, batch: int, logs: dict | None = None) -> None:
        if self.call_ends is not None:
            self.call_ends.append(time.perf_counter())

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        if epoch == 0:  # the calls are recorded until then
            first_epoch_s = time.perf_counter() - self.started
            warm_up = warm_up_seconds([self.started, *self.call_ends])
            print(forecast(first_epoch_s, self.epochs, warm_up), flush=True)
            self.call_ends = None


def warm_up_seconds(call_ends: list[float]) -> float:
    """How much longer the first call into TensorFlow took than the median of the others,
    from the epoch's start and each call's end (0 with fewer than three)."""
    durations = np.diff(call_ends)
    if len(durations) < 3:
        return 0.0
    return max(0.0, float(durations[0] - np.median(durations[1:])))


def forecast(first_epoch_s: float, epochs: int, warm_up_s: float = 0.0) -> str:
    """The line TimeForecast prints: the first epoch's time and the whole fit's, estimated as
    the first epoch and then epochs as long as the first without its warm-up."""
    warm_up_s = min(warm_up_s, first_epoch_s / 2)  # never forecast epochs shorter than half
    total_s = first_epoch_s + (epochs - 1) * (first_epoch_s - warm_up_s)
    total = f"{total_s / 60:.0f} min" if total_s >= 120 else f"{total_s:.0f} s"
    tracing = f" ({warm_up_s:.1f} s of it tracing the model)" if warm_up_s >= 0.05 else ""
    return (
        f"training: the first epoch took {first_epoch_s:.1f} s on this machine{tracing}; all "
        f"{epochs} epochs take about {total} (less if early stopping ends it sooner)"
    )


@contextmanager
def writing(target: Path) -> Iterator[None]:
    """Turn a failed write (disk full, read-only, a file in the way) into a TrainingError."""
    try:
        yield
    except OSError as exc:
        where = exc.filename or target
        raise TrainingError(f"cannot write {where}: {exc.strerror or exc}") from exc


def _preflight(paths: Paths) -> None:
    """Fail before training, not after it, when the output folders cannot be written."""
    for folder in (paths.model_dir, paths.history_csv.parent):
        with writing(folder):
            folder.mkdir(parents=True, exist_ok=True)
            probe = folder / ".write-test"
            probe.write_bytes(b"ok")
            probe.unlink()
    paths.run_info.unlink(missing_ok=True)  # never leave a stale run id for later stages


def seed_everything(train: TrainParams) -> None:
    """Seed Python, NumPy and TensorFlow; make ops deterministic when asked."""
    keras.utils.set_random_seed(train.seed)
    if train.deterministic:
        import tensorflow as tf

        tf.config.experimental.enable_op_determinism()


def optimizer(train: TrainParams, steps_per_epoch: int) -> keras.optimizers.Optimizer:
    """Adam with a constant or cosine-decayed learning rate."""
    rate: float | keras.optimizers.schedules.LearningRateSchedule = train.learning_rate
    if train.lr_schedule == "cosine":
        rate = keras.optimizers.schedules.CosineDecay(
            train.learning_rate, decay_steps=train.epochs * steps_per_epoch, alpha=0.01
        )
    return keras.optimizers.Adam(learning_rate=rate)


def distribution_strategy(name: str):
    """The tf.distribute strategy named in train.strategy."""
    import tensorflow as tf

    if name == "mirrored":
        return tf.distribute.MirroredStrategy()
    if name == "multi_worker_mirrored":
        return tf.distribute.MultiWorkerMirroredStrategy()
    return tf.distribute.get_strategy()


def _history_frame(history: keras.callbacks.History) -> pd.DataFrame:
    frame = pd.DataFrame(history.history)
    frame.insert(0, "epoch", np.arange(1, len(frame) + 1))
    return frame


@dataclass(frozen=True)
class Fitted:
    """A fitted model (best epoch's weights), its per-epoch history and the fit's wall time."""

    model: keras.Model
    history: pd.DataFrame
    seconds: float
    replicas: int
    cpu_utilisation: float  # this process's CPU time over the fit / (wall time x cores)
    precision: Precision


def fit_model(params: Params, fit: Arrays, val: Arrays, run_id: str, verbose: int = 2) -> Fitted:
    """The training core, shared by the train stage and sweep trials: seed, build and compile
    the configured CNN, fit it on the augmented input path with early stopping, and log every
    epoch to the MLflow run `run_id`. A loss that turns NaN is a TrainingError."""
    settings = params.train
    seed_everything(settings)
    strategy = distribution_strategy(settings.strategy)
    chosen = precision.resolve(settings.precision)
    with strategy.scope(), precision.keras_policy(chosen):
        model = build_model(params.model)
        model.compile(
            optimizer=optimizer(settings, math.ceil(len(fit.y) / settings.batch_size)),
            loss="sparse_categorical_crossentropy",
            metrics=["accuracy"],
            steps_per_execution=settings.steps_per_execution,
        )
    started, cpu_before = time.perf_counter(), _cpu_seconds()
    history = model.fit(
        inputs.training_dataset(
            fit,
            settings.batch_size,
            settings.seed,
            params.model,
            autotune=settings.tf_data_autotune,
        ),
        epochs=settings.epochs,
        shuffle=False,  # the dataset reshuffles itself every epoch
        validation_data=inputs.evaluation_dataset(
            val, settings.batch_size, autotune=settings.tf_data_autotune
        ),
        callbacks=[
            EpochPace(),
            keras.callbacks.TerminateOnNaN(),
            keras.callbacks.EarlyStopping(
                monitor="val_loss",
                patience=settings.early_stopping_patience,
                restore_best_weights=True,
            ),
            MlflowEpochLogger(run_id),
            *([TimeForecast(settings.epochs)] if verbose else []),
        ],
        verbose=verbose,
    )
    frame = _history_frame(history)
    if not np.isfinite(frame["loss"]).all() or not np.isfinite(frame["val_loss"]).all():
        raise TrainingError(
            f"the loss became NaN in epoch {len(frame)}; training stopped and nothing was "
            "saved or registered (try a lower train.learning_rate)"
        )
    fit_seconds, fit_cpu = time.perf_counter() - started, _cpu_seconds() - cpu_before
    recalibrate(model, fit.x, settings.batch_size, settings.batchnorm_batches)
    return Fitted(
        model,
        frame,
        time.perf_counter() - started,
        strategy.num_replicas_in_sync,
        utilisation(fit_cpu, fit_seconds),
        chosen,
    )


def _cpu_seconds() -> float:
    """CPU seconds this process has used, all threads, user and system."""
    times = os.times()
    return times.user + times.system


def utilisation(cpu_seconds: float, wall_seconds: float) -> float:
    """CPU seconds over wall seconds times the cores this process may use."""
    return cpu_seconds / (wall_seconds * len(os.sched_getaffinity(0)))


def train(paths: Paths, params: Params) -> TrainResult:
    """processed arrays -> model.keras, history, curves, and an MLflow run holding them all."""
    import mlflow

    _preflight(paths)
    experiment_id = tracking.configure(paths, params)
    fit, val = load_split(paths, "train"), load_split(paths, "val")
    run_name = f"{params.model.architecture}-{time.strftime('%Y%m%d-%H%M%S')}"
    for orphan in tracking.close_orphaned_runs(experiment_id):
        print(f"MLflow run {orphan} was left RUNNING by a process that died; marked KILLED")
    with mlflow.start_run(experiment_id=experiment_id, run_name=run_name) as run:
        run_id = run.info.run_id
        mlflow.set_tags({**tracking.run_tags(paths, params), **tracking.process_tags()})
        mlflow.log_params(tracking.flat_params(params))
        mlflow.log_params({"data.n_train": len(fit.y), "data.n_val": len(val.y)})
        tracking.log_datasets(run_id, paths, {"train": (fit.x, fit.y), "val": (val.x, val.y)})
        if paths.validation_report.is_file():
            mlflow.log_artifact(str(paths.validation_report), artifact_path="validation")
        print(
            f"MLflow run {run_id}: training {params.model.architecture} on {len(fit.y):,} "
            f"images in {precision.resolve(params.train.precision)}"
        )
        fitted = fit_model(params, fit, val, run_id)
        mlflow.log_params(
            {"train.replicas": fitted.replicas, "train.precision_used": fitted.precision}
        )
        frame = fitted.history
        with writing(paths.model_file):
            paths.model_dir.mkdir(parents=True, exist_ok=True)
            fitted.model.save(paths.model_file)
        model_uri = inference.log_model(paths.model_file, params)
        best_epoch = int(frame["val_loss"].idxmin())
        metrics = {
            "best_epoch": best_epoch + 1,
            "epochs_run": len(frame),
            "best_val_accuracy": float(frame["val_accuracy"][best_epoch]),
            "best_val_loss": float(frame["val_loss"][best_epoch]),
            "train_seconds": round(fitted.seconds, 2),
            "cpu_utilisation": round(fitted.cpu_utilisation, 3),
        }
        mlflow.log_metrics(metrics)
        with writing(paths.reports):
            _write_outputs(paths, frame, metrics)
        mlflow.log_artifact(str(paths.history_csv), artifact_path="training")
        mlflow.log_artifact(
            str(paths.reports / "plots" / "training_curves.png"), artifact_path="training"
        )
        tracking.write_run_info(
            paths, {"run_id": run_id, "experiment_id": experiment_id, "model_uri": model_uri}
        )
    return TrainResult(run_id, model_uri, metrics["best_val_accuracy"], len(frame), fitted.seconds)


def _write_outputs(paths: Paths, frame: pd.DataFrame, metrics: dict) -> None:
    paths.history_csv.parent.mkdir(parents=True, exist_ok=True)
    frame.to_csv(paths.history_csv, index=False, float_format="%.6f")
    plots.training_curves(frame, paths.reports / "plots" / "training_curves.png")
    paths.train_metrics.write_text(json.dumps(metrics, indent=2) + "\n")


def run_stage(paths: Paths, params: Params) -> StageResult:
    """The train stage."""
    result = train(paths, params)
    return StageResult(
        f"{params.model.architecture}: best val accuracy {result.best_val_accuracy:.4f} after "
        f"{result.epochs_run} epochs ({result.seconds:.0f} s); MLflow run {result.run_id}"
    )
