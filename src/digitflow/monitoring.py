"""Drift monitoring: are the images users send still like the ones the champion was trained on?

A window of recently logged inputs (the prediction log keeps the 28x28 image the model saw) is
compared with a seeded sample of the training split, both passed through the champion:

- `embedding`: the champion's penultimate-layer embeddings, reduced by PCA, compared by MMD;
- one check per simple image statistic (ink share, mean intensity, bounding box, centre of mass),
  by the Wasserstein distance scaled by the reference's spread;
- `class_mix`: the mix of predicted classes, by the Jensen-Shannon distance;
- `confidence`: the champion's top probability, by the scaled Wasserstein distance.

Evidently computes every score and writes the self-contained HTML report; the thresholds come
from params (`monitor`). Live accuracy, on the predictions users corrected, is reported beside
the checks. `retrain_reasons` says whether the evidence asks for retraining.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import sqlalchemy as sa
from sqlalchemy.engine import Engine

from .config import IMAGE_SIZE, MonitorParams, Params, Paths
from .dataset import load_raw
from .errors import DigitflowError
from .inbox import stored_form
from .predictionlog import PENDING, corrections, image_array, now, predictions

STATISTICS = ("ink_share", "mean_intensity", "box_width", "box_height", "centre_row", "centre_col")
EMBEDDING = "embedding"
CLASS_MIX = "class_mix"
CONFIDENCE = "confidence"
PREDICTED = "predicted"
# Reasons to retrain, as recorded on the flow run and in reports/last_run.json.
NEW_LABELS, DRIFT, LIVE_ACCURACY = "new_labels", "drift", "live_accuracy"


class MonitorError(DigitflowError, RuntimeError):
    """Monitoring cannot run: no champion, no prediction log, or no reference data."""


@dataclass(frozen=True)
class Check:
    """One drift check: its score against its threshold."""

    name: str
    method: str
    score: float
    threshold: float

    @property
    def drifted(self) -> bool:
        return self.score > self.threshold


@dataclass(frozen=True)
class LoggedWindow:
    """The logged inputs a monitoring run looks at."""

    images: np.ndarray  # uint8, (n, 28, 28)
    start: str | None
    end: str | None
    prediction_ids: list[str]


@dataclass(frozen=True)
class LiveAccuracy:
    """How the served answers did on the predictions users labelled (a label equal to the answer
    confirms it)."""

    labelled: int
    right: int

    @property
    def accuracy(self) -> float | None:
        return self.right / self.labelled if self.labelled else None


@dataclass
class Verdict:
    """What a monitoring run found; `to_dict` is reports/monitoring/drift.json."""

    champion_version: str
    n_current: int
    n_reference: int
    n_compared: int
    window: dict[str, Any]
    checks: list[Check]
    live: LiveAccuracy
    pending_labels: int
    settings: dict[str, Any]
    reasons: list[str] = field(default_factory=list)
    note: str | None = None
    mlflow_run_id: str | None = None

    @property
    def drift_detected(self) -> bool:
        return any(check.drifted for check in self.checks)

    def to_dict(self) -> dict[str, Any]:
        return {
            "drift_detected": self.drift_detected,
            "champion_version": self.champion_version,
            "n_current": self.n_current,
            "n_reference": self.n_reference,
            "n_compared": self.n_compared,
            "window": self.window,
            "checks": {
                check.name: {**asdict(check), "drifted": check.drifted} for check in self.checks
            },
            "drifted_checks": [check.name for check in self.checks if check.drifted],
            "live_accuracy": {
                "labelled": self.live.labelled,
                "right": self.live.right,
                "accuracy": self.live.accuracy,
                "threshold": self.settings["min_live_accuracy"],
                "min_labelled": self.settings["min_labelled"],
            },
            "pending_labels": self.pending_labels,
            "retrain_reasons": self.reasons,
            "note": self.note,
            "mlflow_run_id": self.mlflow_run_id,
        }

    def lines(self) -> list[str]:
        """A few lines for a person."""
        verdict = "DRIFT DETECTED" if self.drift_detected else "no drift"
        head = (
            f"{verdict}: {self.n_current} logged images (compared {self.n_compared}) against "
            f"{self.n_reference} training images, champion v{self.champion_version}"
        )
        if self.note:
            head = f"no verdict: {self.note}"
        rows = [head]
        rows += [
            f"  {c.name:<15} {c.score:9.4f}  threshold {c.threshold:<7g} "
            f"{'DRIFT' if c.drifted else 'ok'}"
            for c in self.checks
        ]
        accuracy = self.live.accuracy
        shown = "n/a" if accuracy is None else f"{accuracy:.3f}"
        rows.append(f"  live accuracy {shown} on {self.live.labelled} labelled answers")
        rows.append(f"  corrections waiting: {self.pending_labels}")
        rows.append(f"  retrain: {', '.join(self.reasons) if self.reasons else 'no'}")
        return rows


# ---------------------------------------------------------------- inputs


def logged_window(engine: Engine, settings: MonitorParams) -> LoggedWindow:
    """The last `window_size` logged images (those still stored), no older than `window_hours`."""
    query = (
        sa.select(predictions.c.id, predictions.c.created_at, predictions.c.image)
        .where(predictions.c.image.is_not(None))
        .order_by(predictions.c.created_at.desc(), predictions.c.id)
        .limit(settings.window_size)
    )
    if settings.window_hours is not None:
        query = query.where(
            predictions.c.created_at >= now() - timedelta(hours=settings.window_hours)
        )
    with engine.connect() as connection:
        rows = connection.execute(query).all()
    images = np.stack([image_array(row.image) for row in rows]) if rows else _no_images()
    times = [row.created_at for row in rows]
    return LoggedWindow(
        images=images,
        start=min(times).isoformat() if times else None,
        end=max(times).isoformat() if times else None,
        prediction_ids=[row.id for row in rows],
    )


def _no_images() -> np.ndarray:
    return np.zeros((0, IMAGE_SIZE, IMAGE_SIZE), dtype=np.uint8)


def live_accuracy(engine: Engine, prediction_ids: list[str]) -> LiveAccuracy:
    """Labelled answers among the window's predictions, and how many the label confirmed."""
    if not prediction_ids:
        return LiveAccuracy(0, 0)
    query = (
        sa.select(predictions.c.digit, corrections.c.label)
        .join(corrections, corrections.c.prediction_id == predictions.c.id)
        .where(predictions.c.id.in_(prediction_ids))
    )
    with engine.connect() as connection:
        rows = connection.execute(query).all()
    return LiveAccuracy(len(rows), sum(int(row.digit == row.label) for row in rows))


def pending_labels(engine: Engine) -> int:
    """Corrections waiting to be exported into the training data."""
    query = sa.select(sa.func.count()).where(corrections.c.state == PENDING)
    with engine.connect() as connection:
        return int(connection.execute(query).scalar() or 0)


def reference_images(paths: Paths, params: Params) -> np.ndarray:
    """A seeded sample of the training split in data/ (MNIST and admitted batches), through the
    server's preprocessing: what the log would hold had users sent exactly these images."""
    train = load_raw(paths, params.data)["train"]
    if not len(train.labels):
        raise MonitorError(f"no training images in {paths.data} to compare with: run ingest")
    drawn = sampled(train.images, params.monitor.reference_size, params.monitor.seed)
    return np.stack([stored_form(image, params) for image in drawn])


def sampled(images: np.ndarray, limit: int, seed: int) -> np.ndarray:
    """At most `limit` of the images, a seeded sample when there are more."""
    if len(images) <= limit:
        return images
    rng = np.random.default_rng(seed)
    return images[np.sort(rng.choice(len(images), limit, replace=False))]


# ---------------------------------------------------------------- features


def image_statistics(images: np.ndarray, ink_grey_level: int) -> pd.DataFrame:
    """Per image: share of ink pixels, mean intensity (0-1), ink bounding box width and height,
    and the centre of mass (row, column), in pixels."""
    pixels = images.reshape(len(images), IMAGE_SIZE, IMAGE_SIZE).astype(np.float64) / 255.0
    ink = images.reshape(pixels.shape) > ink_grey_level
    rows_with_ink, cols_with_ink = ink.any(axis=2), ink.any(axis=1)
    mass = pixels.sum(axis=(1, 2))
    safe_mass = np.where(mass > 0, mass, 1.0)
    grid = np.arange(IMAGE_SIZE, dtype=np.float64)
    return pd.DataFrame(
        {
            "ink_share": ink.mean(axis=(1, 2)),
            "mean_intensity": pixels.mean(axis=(1, 2)),
            "box_width": _extent(cols_with_ink),
            "box_height": _extent(rows_with_ink),
            "centre_row": (pixels.sum(axis=2) * grid).sum(axis=1) / safe_mass,
            "centre_col": (pixels.sum(axis=1) * grid).sum(axis=1) / safe_mass,
        }
    )


def _extent(occupied: np.ndarray) -> np.ndarray:
    """Span from the first to the last occupied row (or column) of each image; 0 when empty."""
    first = occupied.argmax(axis=1)
    last = occupied.shape[1] - 1 - occupied[:, ::-1].argmax(axis=1)
    return np.where(occupied.any(axis=1), last - first + 1, 0).astype(np.float64)


def embedding_model(keras_model):
    """The champion with two outputs: its penultimate-layer embedding and its probabilities."""
    import keras

    return keras.Model(keras_model.inputs, [keras_model.layers[-1].input, keras_model.outputs[0]])


def features(two_headed, images: np.ndarray, ink_grey_level: int) -> pd.DataFrame:
    """One row per image: its statistics, predicted class, top probability and embedding
    (float32 whatever precision the model computes in: pandas cannot move bfloat16 columns)."""
    x = images.reshape(-1, IMAGE_SIZE, IMAGE_SIZE, 1).astype("float32") / 255.0
    embedded, probabilities = two_headed.predict(x, batch_size=512, verbose=0)
    embedded = np.asarray(embedded, dtype=np.float32)
    frame = image_statistics(images, ink_grey_level)
    frame[PREDICTED] = probabilities.argmax(axis=1).astype(str)
    frame[CONFIDENCE] = probabilities.max(axis=1)
    embedding = pd.DataFrame(embedded, columns=[f"e{i}" for i in range(embedded.shape[1])])
    return pd.concat([frame, embedding], axis=1)


# ---------------------------------------------------------------- Evidently


def _report(settings: MonitorParams):
    """The Evidently report: one metric per check."""
    from evidently import Report
    from evidently.metrics import EmbeddingsDrift, ValueDrift
    from evidently.metrics.embeddings import MMDDriftMethod

    mmd = MMDDriftMethod(
        threshold=settings.embedding_threshold, pca_components=settings.embedding_components
    )
    metrics = [EmbeddingsDrift(embeddings_name=EMBEDDING, drift_method=mmd)]
    metrics += [
        ValueDrift(column=name, method="wasserstein", threshold=settings.statistic_threshold)
        for name in STATISTICS
    ]
    metrics.append(
        ValueDrift(column=PREDICTED, method="jensenshannon", threshold=settings.class_mix_threshold)
    )
    metrics.append(
        ValueDrift(column=CONFIDENCE, method="wasserstein", threshold=settings.confidence_threshold)
    )
    return Report(metrics)


def check_specs(settings: MonitorParams) -> list[tuple[str, str, float]]:
    """(check name, method, threshold) in the order the report computes them."""
    specs = [(EMBEDDING, "mmd", settings.embedding_threshold)]
    specs += [(name, "wasserstein_normed", settings.statistic_threshold) for name in STATISTICS]
    specs.append((CLASS_MIX, "jensenshannon", settings.class_mix_threshold))
    specs.append((CONFIDENCE, "wasserstein_normed", settings.confidence_threshold))
    return specs


def compare(reference: pd.DataFrame, current: pd.DataFrame, settings: MonitorParams):
    """Run the checks; returns (checks, Evidently snapshot)."""
    from evidently import DataDefinition, Dataset

    embedding_columns = [name for name in reference.columns if name.startswith("e")]
    definition = DataDefinition(
        numerical_columns=[*STATISTICS, CONFIDENCE, *embedding_columns],
        categorical_columns=[PREDICTED],
        embeddings={EMBEDDING: embedding_columns},
    )
    snapshot = _report(settings).run(
        Dataset.from_pandas(current, data_definition=definition),
        Dataset.from_pandas(reference, data_definition=definition),
    )
    values = [metric["value"] for metric in snapshot.dict()["metrics"]]
    checks = [
        Check(name, method, float(value), threshold)
        for (name, method, threshold), value in zip(check_specs(settings), values, strict=True)
    ]
    return checks, snapshot


def retrain_reasons(verdict: Verdict, settings: MonitorParams) -> list[str]:
    """Why the evidence asks for retraining (empty: it does not)."""
    reasons = []
    if verdict.pending_labels >= settings.min_new_labels:
        reasons.append(NEW_LABELS)
    if verdict.drift_detected:
        reasons.append(DRIFT)
    accuracy = verdict.live.accuracy
    if (
        verdict.live.labelled >= settings.min_labelled
        and accuracy is not None
        and accuracy < settings.min_live_accuracy
    ):
        reasons.append(LIVE_ACCURACY)
    return reasons


# ---------------------------------------------------------------- report files


def verdict_banner(verdict: Verdict) -> str:
    """The HTML block put at the top of Evidently's report: the verdict and the check table."""
    drifted = verdict.drift_detected
    colour = "#b42318" if drifted else "#067647"
    title = "Drift detected" if drifted else "No drift detected"
    if verdict.note:
        title, colour = f"No verdict: {verdict.note}", "#475467"
    rows = "".join(
        f"<tr><td>{c.name}</td><td>{c.method}</td><td>{c.score:.4f}</td>"
        f"<td>{c.threshold:g}</td><td>{'drift' if c.drifted else 'ok'}</td></tr>"
        for c in verdict.checks
    )
    accuracy = verdict.live.accuracy
    live = "n/a" if accuracy is None else f"{accuracy:.3f}"
    return (
        f'<section id="digitflow-verdict" data-drift="{str(drifted).lower()}" '
        f'style="font-family:sans-serif;margin:16px;padding:12px;border-left:6px solid {colour}">'
        f'<h1 style="color:{colour};margin:0 0 8px">{title}</h1>'
        f"<p>{verdict.n_current} logged images ({verdict.window.get('start')} to "
        f"{verdict.window.get('end')}) against {verdict.n_reference} training images, "
        f"champion version {verdict.champion_version}. Live accuracy {live} on "
        f"{verdict.live.labelled} labelled answers; {verdict.pending_labels} corrections "
        f"waiting. Retrain: {', '.join(verdict.reasons) or 'no'}.</p>"
        f'<table border="1" cellpadding="4" style="border-collapse:collapse">'
        f"<tr><th>check</th><th>method</th><th>score</th><th>threshold</th><th>verdict</th></tr>"
        f"{rows}</table></section>"
    )


def write_html(snapshot, verdict: Verdict, target: Path) -> None:
    """Evidently's self-contained report with the verdict on top (opens offline)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = target.with_suffix(".tmp.html")
    banner = verdict_banner(verdict)
    if snapshot is None:
        staging.write_text(f"<!doctype html><html><body>{banner}</body></html>\n")
    else:
        snapshot.save_html(str(staging))
        page = staging.read_text()
        at = page.find("<body")
        at = page.find(">", at) + 1 if at >= 0 else 0
        staging.write_text(page[:at] + banner + page[at:])
    staging.replace(target)


def write_json(verdict: Verdict, target: Path) -> None:
    """drift.json, replaced atomically."""
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = target.with_suffix(".tmp.json")
    staging.write_text(json.dumps(verdict.to_dict(), indent=2) + "\n")
    staging.replace(target)


# ---------------------------------------------------------------- one monitoring run


def examine(engine: Engine, keras_model, version: str, paths: Paths, params: Params):
    """Compare the logged window with the training data through the champion; returns
    (verdict, Evidently snapshot or None when the window is too small)."""
    settings = params.monitor
    window = logged_window(engine, settings)
    reference = reference_images(paths, params)
    compared = sampled(window.images, settings.max_rows, settings.seed)
    verdict = Verdict(
        champion_version=version,
        n_current=len(window.images),
        n_reference=len(reference),
        n_compared=len(compared),
        window={
            "size": settings.window_size,
            "hours": settings.window_hours,
            "start": window.start,
            "end": window.end,
        },
        checks=[],
        live=live_accuracy(engine, window.prediction_ids),
        pending_labels=pending_labels(engine),
        settings=settings.model_dump(),
    )
    snapshot = None
    if len(window.images) < settings.min_window:
        verdict.note = (
            f"{len(window.images)} logged images, fewer than monitor.min_window "
            f"({settings.min_window})"
        )
    else:
        two_headed = embedding_model(keras_model)
        grey = params.validate_.ink_grey_level
        verdict.checks, snapshot = compare(
            features(two_headed, reference, grey), features(two_headed, compared, grey), settings
        )
    verdict.reasons = retrain_reasons(verdict, settings)
    return verdict, snapshot


def log_run(paths: Paths, params: Params, verdict: Verdict) -> str:
    """A monitoring run in MLflow (its own experiment), tagged with the champion version: each
    check's score, live accuracy, and both report files. Returns the run id."""
    import mlflow

    from . import tracking

    experiment_id = tracking.configure(paths, params, experiment=params.monitor.experiment)
    tags = {
        "digitflow.kind": "monitoring",
        "champion_version": verdict.champion_version,
        "drift_detected": str(verdict.drift_detected).lower(),
        "retrain_reasons": ",".join(verdict.reasons) or "none",
        tracking.TAG_MACHINE: tracking.machine(),
    }
    with (
        tracking.guarded(paths),
        mlflow.start_run(
            experiment_id=experiment_id, run_name=f"monitor-v{verdict.champion_version}", tags=tags
        ) as run,
    ):
        mlflow.log_params(
            {f"monitor.{key}": value for key, value in params.monitor.model_dump().items()}
        )
        metrics = {f"{check.name}_score": check.score for check in verdict.checks}
        metrics.update(n_current=verdict.n_current, pending_labels=verdict.pending_labels)
        if verdict.live.accuracy is not None:
            metrics["live_accuracy"] = verdict.live.accuracy
        mlflow.log_metrics(metrics)
        mlflow.log_artifact(str(paths.drift_json), artifact_path="monitoring")
        mlflow.log_artifact(str(paths.drift_html), artifact_path="monitoring")
        return run.info.run_id


def monitor(paths: Paths, params: Params, log_to_mlflow: bool = True) -> Verdict:
    """One monitoring run of the champion on the prediction log: writes drift.json and
    drift.html under reports/monitoring/ and (by default) logs them to MLflow."""
    from . import feedback, inference, tracking

    engine = feedback.log_engine(paths, params)
    if engine is None:
        raise MonitorError(
            f"no prediction log to monitor: nothing was served yet "
            f"({paths.root / params.feedback.database} does not exist); start `digitflow serve`"
        )
    tracking.configure(paths, params)
    uri = inference.champion_uri(params)
    try:
        with tracking.guarded(paths):
            version = inference.version_of(uri)
            keras_model = inference.keras_model_of(uri)
    except tracking.TrackingError:
        raise
    except Exception as exc:
        raise MonitorError(
            f"no champion to monitor ({uri}: {str(exc).splitlines()[0]}); run `digitflow run`"
        ) from None
    verdict, snapshot = examine(engine, keras_model, version, paths, params)
    write_json(verdict, paths.drift_json)
    write_html(snapshot, verdict, paths.drift_html)
    if log_to_mlflow:
        verdict.mlflow_run_id = log_run(paths, params, verdict)
        write_json(verdict, paths.drift_json)
    return verdict


# ---------------------------------------------------------------- for the Prefect UI


def checks_table(verdict: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per check of a drift.json record."""
    return [
        {
            "check": name,
            "method": check["method"],
            "score": round(check["score"], 5),
            "threshold": check["threshold"],
            "drifted": check["drifted"],
        }
        for name, check in verdict["checks"].items()
    ]


def summary_markdown(verdict: dict[str, Any], paths: Paths) -> str:
    """A drift.json record as Markdown: the verdict, live accuracy and the retraining decision."""
    live = verdict["live_accuracy"]
    accuracy = "n/a" if live["accuracy"] is None else f"{live['accuracy']:.3f}"
    head = "**Drift detected**" if verdict["drift_detected"] else "No drift detected"
    if verdict["note"]:
        head = f"No verdict: {verdict['note']}"
    drifted = ", ".join(verdict["drifted_checks"]) or "none"
    window = verdict["window"]
    return "\n".join(
        [
            f"# Monitoring: champion v{verdict['champion_version']}",
            "",
            head,
            "",
            f"- window: {verdict['n_current']} logged images ({window['start']} to "
            f"{window['end']}), {verdict['n_compared']} compared with "
            f"{verdict['n_reference']} training images",
            f"- drifted checks: {drifted}",
            f"- live accuracy: {accuracy} on {live['labelled']} labelled answers "
            f"(threshold {live['threshold']}, judged from {live['min_labelled']})",
            f"- corrections waiting: {verdict['pending_labels']}",
            f"- retrain: {', '.join(verdict['retrain_reasons']) or 'no'}",
            f"- MLflow run: {verdict.get('mlflow_run_id')}",
            f"- report: {paths.drift_html}",
        ]
    )
