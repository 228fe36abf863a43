"""Drift monitoring: its time on 10,000 logged predictions, and how often it raises a false alarm.

Needs a project with a champion (after `make run`; or --root PATH). Works in a scratch copy
under bench/.work/monitor (its own prediction log and a copy of the MLflow store), so the
project itself is not touched.

- time: `monitoring.monitor` (window of all 10,000 predictions, MLflow logging included) on a
  prediction log holding the 10,000 MNIST test digits as uploaded scans, median of --rounds;
  beside it, in the same run, the champion's plain `predict` on the same images;
- false alarms: the test digits cut into disjoint windows of --window images (20 of 500 by
  default), sent as scans and as the drawing page's canvas; a window raises an alarm when any
  check exceeds its threshold from params.yaml;
- detection: the same windows with every digit turned 90 degrees.

    python bench/monitor.py            # make bench-monitor
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import time
from pathlib import Path

import numpy as np
from common import REPO, write_result

sys.path.insert(0, str(REPO / "tests"))
from paper import on_canvas, rotated  # noqa: E402


def scratch_project(root: Path) -> Path:
    """bench/.work/monitor: the project's params, its data (linked) and a copy of its store."""
    work = REPO / "bench" / ".work" / "monitor"
    if work.exists():
        shutil.rmtree(work)
    (work / "mlflow").mkdir(parents=True)
    shutil.copy(root / "params.yaml", work / "params.yaml")
    (work / "data").symlink_to(root / "data")
    database = root / "mlflow" / "mlflow.db"
    if not database.is_file():
        raise SystemExit(f"no MLflow store at {database}: run `make run` first, or pass --root")
    shutil.copy(database, work / "mlflow" / "mlflow.db")
    return work


def logged_forms(digits: np.ndarray, ink) -> dict[str, np.ndarray]:
    """What the prediction log stores for each digit sent as a scan, from the drawing page, and
    turned 90 degrees (uint8 28x28, after the server's preprocessing)."""
    from digitflow.imaging import encode_png, prepare

    def stored(encoded: list[bytes]) -> np.ndarray:
        return np.stack([np.round(prepare(data, ink) * 255).astype(np.uint8) for data in encoded])

    return {
        "scan": stored([encode_png(255 - digit) for digit in digits]),
        "canvas": stored([on_canvas(digit) for digit in digits]),
        "rotated": stored([encode_png(255 - rotated(digit)) for digit in digits]),
    }


def fill_log(url: str, images: np.ndarray, version: str) -> None:
    """Write the images into a fresh prediction log, as the server would have logged them."""
    from digitflow import predictionlog

    engine = predictionlog.open_log(url)
    probabilities = np.full((len(images), 10), 0.1)
    for start in range(0, len(images), 1000):
        chunk = images[start : start + 1000]
        contents = [image.tobytes() for image in chunk]
        logged = predictionlog.entries(
            probabilities[start : start + 1000],
            chunk.astype(np.float32) / 255.0,
            contents,
            ("bench", version),
            "api",
            None,
            1.0,
        )
        predictionlog.write_rows(engine, logged)
    engine.dispose()


def window_verdicts(reference, forms, model, params, size: int) -> dict[str, dict]:
    """Every check's score on each disjoint window of each form; alarms per form."""
    from digitflow import monitoring

    grey = params.validate_.ink_grey_level
    results = {}
    for form, images in forms.items():
        windows = [images[start : start + size] for start in range(0, len(images) - size + 1, size)]
        scores: dict[str, list[float]] = {}
        alarms = 0
        for window in windows:
            checks, _ = monitoring.compare(
                reference, monitoring.features(model, window, grey), params.monitor
            )
            alarms += any(check.drifted for check in checks)
            for check in checks:
                scores.setdefault(check.name, []).append(round(check.score, 5))
        results[form] = {
            "windows": len(windows),
            "alarms": alarms,
            "alarm_rate": alarms / len(windows),
            "max_score": {name: max(values) for name, values in scores.items()},
            "min_score": {name: min(values) for name, values in scores.items()},
        }
        print(f"{form}: {alarms} of {len(windows)} windows raised an alarm")
    return results


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--root", type=Path, default=REPO, help="project with a champion")
    parser.add_argument("--window", type=int, default=500, help="images per window")
    parser.add_argument("--rounds", type=int, default=3, help="timed monitoring runs")
    args = parser.parse_args()

    work = scratch_project(args.root.resolve())
    database = work / "predictions.db"
    os.environ["DIGITFLOW_PREDICTION_DB"] = f"sqlite:///{database}"
    os.environ.pop("MLFLOW_TRACKING_URI", None)

    from digitflow import inference, monitoring, tracking
    from digitflow.config import load_params, paths
    from digitflow.dataset import load_raw
    from digitflow.imaging import ink_settings

    project = paths(work)
    params = load_params(project.params)
    tracking.configure(project, params)
    uri = inference.champion_uri(params)
    version = inference.version_of(uri)
    keras_model = inference.keras_model_of(uri)
    digits = load_raw(project, params.data)["test"].images[:10_000]
    print(f"preparing {len(digits)} test digits three ways ...")
    forms = logged_forms(digits, ink_settings(params.imaging))

    fill_log(os.environ["DIGITFLOW_PREDICTION_DB"], forms["scan"], version)
    timed_params = params.model_copy(
        update={"monitor": params.monitor.model_copy(update={"window_size": len(digits)})}
    )
    monitor_s, predict_s = [], []
    for round_number in range(args.rounds):
        started = time.perf_counter()
        verdict = monitoring.monitor(project, timed_params)
        monitor_s.append(time.perf_counter() - started)
        started = time.perf_counter()
        keras_model.predict(forms["scan"][..., np.newaxis] / 255.0, batch_size=512, verbose=0)
        predict_s.append(time.perf_counter() - started)
        print(
            f"round {round_number + 1}: monitor {monitor_s[-1]:.1f} s, predict {predict_s[-1]:.1f} s"
        )

    two_headed = monitoring.embedding_model(keras_model)
    reference = monitoring.features(
        two_headed,
        monitoring.reference_images(project, params),
        params.validate_.ink_grey_level,
    )
    windows = window_verdicts(reference, forms, two_headed, params, args.window)

    write_result(
        "monitor",
        {
            "root": str(args.root.resolve()),
            "champion_version": version,
            "logged_predictions": len(digits),
            "compared_rows": verdict.n_compared,
            "monitor_s": [round(value, 2) for value in monitor_s],
            "monitor_median_s": round(statistics.median(monitor_s), 2),
            "plain_predict_median_s": round(statistics.median(predict_s), 2),
            "ratio_monitor_to_predict": round(
                statistics.median(monitor_s) / statistics.median(predict_s), 1
            ),
            "window": args.window,
            "thresholds": {
                name: threshold for name, _, threshold in monitoring.check_specs(params.monitor)
            },
            "false_alarms": {form: windows[form] for form in ("scan", "canvas")},
            "detection_rotated_90": windows["rotated"],
        },
    )


if __name__ == "__main__":
    main()
