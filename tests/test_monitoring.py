"""Drift monitoring on the real prediction log, the monitoring flow on a real `prefect server`,
and the report in a real browser."""

from __future__ import annotations

import asyncio
import json
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
import requests
from conftest import (
    REPO,
    clone_project,
    digitflow_serve,
    headless_chromium,
    run,
    set_params,
)
from paper import on_canvas, rotated

from digitflow import monitoring
from digitflow import predictionlog as plog
from digitflow.cli.common import load_flow
from digitflow.config import Paths, load_params
from digitflow.dataset import load_raw
from digitflow.events import InboxWatcher
from digitflow.imaging import encode_png
from digitflow.inbox import stored_form

WINDOW = 300


# ---------------------------------------------------------------- no model needed


def test_image_statistics_measure_a_drawn_bar() -> None:
    bar = np.zeros((2, 28, 28), dtype=np.uint8)
    bar[0, 4:24, 12:16] = 255  # 20 rows x 4 columns of full ink; the second image is empty
    stats = monitoring.image_statistics(bar, ink_grey_level=32)
    first, empty = stats.iloc[0], stats.iloc[1]
    assert first["ink_share"] == pytest.approx(80 / 784)
    assert first["mean_intensity"] == pytest.approx(80 / 784)
    assert (first["box_width"], first["box_height"]) == (4, 20)
    assert (first["centre_row"], first["centre_col"]) == (pytest.approx(13.5), pytest.approx(13.5))
    assert empty["ink_share"] == 0 and empty["box_width"] == 0 and empty["box_height"] == 0


def test_a_model_trained_in_bfloat16_is_monitored_like_a_float32_one(params) -> None:
    """train.precision auto trains in bfloat16 on CPUs that have it; the champion's embeddings
    then come out as bfloat16, which pandas could not move (the monitor failed on such a
    machine). Forced here, so every machine checks it."""
    from digitflow.model import build_model
    from digitflow.precision import keras_policy

    with keras_policy("bfloat16"):
        model = build_model(params.model)
    rng = np.random.default_rng(0)
    reference = rng.integers(0, 256, size=(60, 28, 28), dtype=np.uint8)
    current = rng.integers(0, 256, size=(40, 28, 28), dtype=np.uint8)
    two_headed = monitoring.embedding_model(model)
    level = params.validate_.ink_grey_level
    frames = [monitoring.features(two_headed, images, level) for images in (reference, current)]
    embedding = [column for column in frames[0].columns if column.startswith("e")]
    assert embedding and (frames[0][embedding].dtypes == np.float32).all()
    checks, _ = monitoring.compare(*frames, params.monitor)
    assert [check.name for check in checks][0] == monitoring.EMBEDDING
    assert all(np.isfinite(check.score) for check in checks)


def _verdict(params, drifted: bool, labelled: int, right: int, pending: int):
    score = 2 * params.monitor.embedding_threshold if drifted else 0.0
    check = monitoring.Check(monitoring.EMBEDDING, "mmd", score, params.monitor.embedding_threshold)
    return monitoring.Verdict(
        champion_version="1",
        n_current=200,
        n_reference=1000,
        n_compared=200,
        window={},
        checks=[check],
        live=monitoring.LiveAccuracy(labelled, right),
        pending_labels=pending,
        settings=params.monitor.model_dump(),
    )


@pytest.mark.parametrize(
    ("drifted", "labelled", "right", "pending", "expected"),
    [
        (False, 0, 0, 0, []),
        (False, 0, 0, 200, ["new_labels"]),
        (False, 19, 0, 19, []),  # too few labelled answers to judge live accuracy
        (False, 20, 17, 20, ["live_accuracy"]),  # 0.85 < 0.9
        (False, 20, 18, 20, []),  # 0.9 is not below 0.9
        (True, 0, 0, 0, ["drift"]),
        (True, 200, 0, 200, ["new_labels", "drift", "live_accuracy"]),
    ],
)
def test_retrain_reasons_follow_the_thresholds(
    params, drifted, labelled, right, pending, expected
) -> None:
    verdict = _verdict(params, drifted, labelled, right, pending)
    assert monitoring.retrain_reasons(verdict, params.monitor) == expected


def test_inbox_watcher_announces_each_settled_batch_once(project: Paths) -> None:
    params = load_params(project.params)
    params = params.model_copy(update={"inbox": params.inbox.model_copy(update={"settle_s": 0})})
    sent: list[tuple[str, dict]] = []
    watcher = InboxWatcher(
        project, params, send=lambda name, _, payload: sent.append((name, payload))
    )
    inbox = project.inbox(params)
    assert watcher.poll() == [] and sent == []  # no inbox yet
    inbox.mkdir()
    digits = np.zeros((3, 28, 28), dtype=np.uint8)
    np.savez(inbox / "a.npz", images=digits, labels=np.arange(3))
    np.savez(inbox / "b.npz", images=digits, labels=np.arange(3))
    assert watcher.poll() == ["a.npz", "b.npz"]
    assert sent == [("digitflow.inbox.batch-landed", {"batch": "a.npz, b.npz", "count": 2})]
    assert watcher.poll() == []  # announced already
    np.savez(inbox / "a.npz", images=np.zeros((5, 28, 28), np.uint8), labels=np.arange(5))
    assert watcher.poll() == ["a.npz"]  # replaced by a different batch
    (inbox / "b.npz").unlink()
    np.savez(inbox / "b.npz", images=digits, labels=np.arange(3))
    assert watcher.poll() == ["b.npz"]  # taken away and dropped again
    np.savez(inbox / "feedback-20261126T090333Z-e3a940af.npz", images=digits, labels=np.arange(3))
    assert watcher.poll() == []  # the pipeline's own export: the run that wrote it admits it
    (inbox / "feedback-20261126T090333Z-e3a940af.npz").rename(inbox / "corrections.npz")
    assert watcher.poll() == ["corrections.npz"]  # a reviewed export a person put back
    assert len(sent) == 4


def test_monitor_without_a_prediction_log_says_so(project: Paths) -> None:
    result = run(["digitflow", "monitor"], project.root, check=False)
    assert result.returncode == 1
    assert "nothing was served yet" in result.stdout + result.stderr
    assert not project.drift_json.exists()


# ---------------------------------------------------------------- served traffic, real model


def _log_count(url: str) -> int:
    engine = plog.open_log(url)
    with engine.connect() as connection:
        count = connection.execute(
            plog.sa.select(plog.sa.func.count()).select_from(plog.predictions)
        ).scalar()
    engine.dispose()
    return int(count or 0)


def _send(base: str, encoded: list[bytes], source: str) -> None:
    for start in range(0, len(encoded), 50):
        files = [("file", (f"{i}.png", data)) for i, data in enumerate(encoded[start : start + 50])]
        answer = requests.post(f"{base}/predict?source={source}", files=files, timeout=60)
        answer.raise_for_status()


@pytest.fixture(scope="module")
def monitored(champion: Paths, tmp_path_factory) -> Paths:
    """A private copy of the champion project (version 1 champion)."""
    project = clone_project(champion, tmp_path_factory.mktemp("monitored") / "clone")
    set_params(project, {("monitor", "window_size"): WINDOW})
    return project


@pytest.fixture(scope="module")
def served_windows(monitored: Paths, tmp_path_factory) -> dict[str, dict]:
    """Three windows of MNIST test digits through a real `digitflow serve`: as scans, drawn on
    the page's canvas, and turned 90 degrees; `digitflow monitor` (in process) after each.
    Returns each window's drift.json record, with copies of its report files."""
    kept = tmp_path_factory.mktemp("reports")
    url = f"sqlite:///{kept / 'predictions.db'}"
    params = load_params(monitored.params)
    digits = load_raw(monitored, params.data)["test"].images
    windows = {
        "scan": ([encode_png(255 - d) for d in digits[:WINDOW]], "api"),
        "canvas": ([on_canvas(d) for d in digits[WINDOW : 2 * WINDOW]], "page"),
        "rotated": ([encode_png(255 - rotated(d)) for d in digits[2 * WINDOW : 3 * WINDOW]], "api"),
    }
    found = {}
    with digitflow_serve(monitored.root, env={"DIGITFLOW_PREDICTION_DB": url}) as (base, _):
        for number, (name, (encoded, source)) in enumerate(windows.items(), start=1):
            _send(base, encoded, source)
            deadline = time.monotonic() + 30
            while _log_count(url) < number * WINDOW and time.monotonic() < deadline:
                time.sleep(0.2)
            assert _log_count(url) == number * WINDOW
            with pytest.MonkeyPatch.context() as patch:
                patch.setenv("DIGITFLOW_PREDICTION_DB", url)
                verdict = monitoring.monitor(monitored, params)
            found[name] = json.loads(monitored.drift_json.read_text())
            assert found[name] == json.loads(json.dumps(verdict.to_dict()))
            shutil.copy(monitored.drift_html, kept / f"{name}.html")
            found[name]["html"] = str(kept / f"{name}.html")
    return found


@pytest.mark.slow
def test_mnist_test_digits_raise_no_alarm_and_turned_digits_do(served_windows) -> None:
    for name in ("scan", "canvas"):
        record = served_windows[name]
        assert record["drift_detected"] is False, (name, record["checks"])
        assert record["retrain_reasons"] == []
    turned = served_windows["rotated"]
    assert turned["drift_detected"] is True
    assert "embedding" in turned["drifted_checks"] and "box_height" in turned["drifted_checks"]
    assert turned["retrain_reasons"] == ["drift"]
    for record in served_windows.values():
        assert record["n_current"] == record["n_compared"] == WINDOW
        assert record["n_reference"] == 1000 and record["champion_version"] == "1"
        assert record["window"]["size"] == WINDOW and record["window"]["start"]
        assert set(record["checks"]) == {
            name for name, _, _ in monitoring.check_specs(load_params(REPO / "params.yaml").monitor)
        }
        for check in record["checks"].values():
            assert check["drifted"] == (check["score"] > check["threshold"])


@pytest.mark.slow
def test_each_monitoring_run_is_logged_to_mlflow_with_the_champion_version(
    monitored, served_windows
) -> None:
    import mlflow
    from digitflow import tracking

    params = load_params(monitored.params)
    experiment = tracking.configure(monitored, params, experiment=params.monitor.experiment)
    runs = {r.info.run_id: r for r in mlflow.MlflowClient().search_runs([experiment])}
    for name in ("scan", "canvas", "rotated"):
        logged = runs[served_windows[name]["mlflow_run_id"]]
        assert (
            logged.data.tags["drift_detected"]
            == str(served_windows[name]["drift_detected"]).lower()
        )
    last = runs[served_windows["rotated"]["mlflow_run_id"]]
    assert last.data.tags["champion_version"] == "1" and last.data.tags["drift_detected"] == "true"
    assert last.data.metrics["embedding_score"] == pytest.approx(
        served_windows["rotated"]["checks"]["embedding"]["score"]
    )
    logged = {
        item.path for item in mlflow.MlflowClient().list_artifacts(last.info.run_id, "monitoring")
    }
    assert logged == {"monitoring/drift.json", "monitoring/drift.html"}


@pytest.mark.slow
def test_report_opens_offline_in_a_browser_and_shows_the_verdict(served_windows) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    with headless_chromium() as browser:
        for name, verdict in (("rotated", "Drift detected"), ("scan", "No drift detected")):
            browser.get(Path(served_windows[name]["html"]).as_uri())
            banner = browser.find_element(By.ID, "digitflow-verdict")
            assert banner.find_element(By.TAG_NAME, "h1").text == verdict
            # Evidently's own report renders from the page's inlined scripts (no network).
            WebDriverWait(browser, 30).until(
                lambda b: "Drift in embeddings" in b.find_element(By.TAG_NAME, "body").text
            )
            failed = browser.execute_script(
                "return performance.getEntriesByType('resource')"
                ".filter(e => !e.name.startsWith('data:') && !e.name.startsWith('file:'))"
                ".map(e => e.name)"
            )
            assert failed == []


# ---------------------------------------------------------------- the monitoring flow


def _fill_log(project: Paths, database: str, images: np.ndarray, labels: np.ndarray) -> list[str]:
    """A fresh prediction log holding these images, answered with `labels`; returns the ids."""
    target = project.root / database
    target.unlink(missing_ok=True)
    engine = plog.open_log(f"sqlite:///{target}")
    probabilities = np.eye(10)[labels]
    logged = plog.entries(
        probabilities,
        images.astype(np.float32) / 255.0,
        [image.tobytes() for image in images],
        ("digitflow-mnist-cnn", "1"),
        "api",
        None,
        1.0,
    )
    plog.write_rows(engine, logged)
    engine.dispose()
    return [entry["id"] for entry in logged]


def _correct(project: Paths, database: str, ids: list[str], labels: list[int]) -> None:
    engine = plog.open_log(f"sqlite:///{project.root / database}")
    for prediction_id, label in zip(ids, labels, strict=True):
        plog.record_correction(engine, prediction_id, label, "tests")
    engine.dispose()


@pytest.fixture(scope="module")
def retrain_target(monitored: Paths, prefect_api) -> str:
    """A deployment of the pipeline flow that nobody serves: runs created for it stay
    scheduled, so a test sees what the monitoring flow started without training."""
    pipeline = load_flow(monitored, "pipeline")
    pipeline.mnist_pipeline.to_deployment(
        name="monitor-target", parameters={"root": str(monitored.root)}
    ).apply()
    return "monitor-target"


CASES = {
    # name: (turned digits?, corrections as (right, wrong), param changes, expected reasons)
    "nothing": (False, (0, 0), {}, []),
    "new_labels": (False, (25, 0), {"min_new_labels": 25}, ["new_labels"]),
    "live_accuracy": (False, (12, 8), {"min_labelled": 20}, ["live_accuracy"]),
    "drift": (True, (0, 0), {}, ["drift"]),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", list(CASES))
def test_monitoring_flow_starts_retraining_for_each_reason_and_not_without(
    case, monitored, retrain_target, prefect_api
) -> None:
    from prefect.artifacts import Artifact
    from prefect.client.orchestration import get_client

    turned, (right, wrong), changes, expected = CASES[case]
    database = f"monitor-{case}.db"
    set_params(
        monitored,
        {("feedback", "database"): database, ("monitor", "min_new_labels"): 200}
        | {("monitor", key): value for key, value in changes.items()},
    )
    params = load_params(monitored.params)
    test = load_raw(monitored, params.data)["test"]
    chosen = slice(3000, 3000 + 150)
    images = np.stack(
        [stored_form(rotated(d) if turned else d, params) for d in test.images[chosen]]
    )
    labels = test.labels[chosen].astype(int)
    ids = _fill_log(monitored, database, images, labels)
    _correct(
        monitored,
        database,
        ids[: right + wrong],
        [*labels[:right].tolist(), *((labels[right : right + wrong] + 1) % 10).tolist()],
    )

    async def runs_of_target() -> dict[str, object]:
        async with get_client() as client:
            deployment = await client.read_deployment_by_name(
                f"digitflow-pipeline/{retrain_target}"
            )
            runs = await client.read_flow_runs(limit=200)
            return {str(r.id): r for r in runs if r.deployment_id == deployment.id}

    before = asyncio.run(runs_of_target())
    flows = load_flow(monitored, "monitor")
    result = flows.monitor_inputs(root=str(monitored.root), retrain_deployment=retrain_target)

    assert result["retrain_reasons"] == expected
    summary = Artifact.get(flows.SUMMARY_ARTIFACT)
    assert f"retrain: {', '.join(expected) or 'no'}" in summary.data
    new_runs = [run for key, run in asyncio.run(runs_of_target()).items() if key not in before]
    if not expected:
        assert result["retraining_run"] is None and new_runs == []
        return
    (flow_run,) = new_runs
    assert str(flow_run.id) == result["retraining_run"]
    assert flow_run.parameters["trigger"] == f"monitor: {', '.join(expected)}"
    assert flow_run.parameters["force"] is (case in ("drift", "live_accuracy"))
    assert {f"retrain:{reason}" for reason in expected} <= set(flow_run.tags)


@pytest.mark.slow
def test_monitoring_flow_before_anything_was_served_starts_nothing(
    project: Paths, prefect_api
) -> None:
    flows = load_flow(project, "monitor")
    result = flows.monitor_inputs(root=str(project.root), retrain_deployment="nowhere")
    assert result == {"note": "nothing served yet", "retrain_reasons": [], "retraining_run": None}
    assert not project.drift_json.exists()
