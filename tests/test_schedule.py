"""Scheduled retraining against a real `prefect server` on 127.0.0.1, fed through the inbox."""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import (
    TUTORIAL_TRAINING,
    make_project,
    run,
    set_params,
    stop,
    tree_digest,
    venv_env,
    wait_until_up,
)
from PIL import Image

from digitflow import tracking
from digitflow.config import Paths, load_params
from digitflow.events import InboxWatcher
from digitflow.idx import read_images, read_labels
from digitflow.versioning import data_hash

pytestmark = pytest.mark.slow

FLOW = "digitflow-pipeline"
SLICE = {
    ("data", "max_train_samples"): 3000,
    ("data", "max_test_samples"): 500,
    ("model", "architecture"): "seed_cnn",
    ("train", "epochs"): 2,
    **TUTORIAL_TRAINING,
    ("promotion", "min_accuracy"): 0.3,
    ("promotion", "alpha"): 1e-12,  # later runs never replace the champion by themselves
    # The watcher `digitflow deploy` runs would start a run for every batch a test drops in the
    # inbox; here tests start runs themselves, and one sends the watcher's event by hand.
    ("monitor", "watch_interval_s"): 3600,
}


def _env(extra: dict[str, str]) -> dict[str, str]:
    return venv_env(extra)


def _client():
    from prefect.client.orchestration import get_client

    return get_client()


def _trigger(count: int = 1, deployment_name: str = "nightly", **parameters) -> list:
    """Start `count` runs of a deployment at once through the API; wait for all to finish."""

    async def go():
        async with _client() as client:
            deployment = await client.read_deployment_by_name(f"{FLOW}/{deployment_name}")
            runs = [
                await client.create_flow_run_from_deployment(deployment.id, parameters=parameters)
                for _ in range(count)
            ]
            deadline = time.monotonic() + 600
            while time.monotonic() < deadline:
                current = [await client.read_flow_run(r.id) for r in runs]
                if all(r.state and r.state.is_final() for r in current):
                    return current
                await asyncio.sleep(1)
            raise AssertionError(f"flow runs did not finish: {[r.state for r in current]}")

    return asyncio.run(go())


def _run_started_by(trigger: str, seconds: float):
    """The deployment's flow run whose `trigger` parameter is `trigger`, once it exists (fails
    after `seconds`); then waits for it to finish. Returns (seconds until it existed, the run)."""

    async def go():
        started = time.monotonic()
        async with _client() as client:
            deployment = await client.read_deployment_by_name(f"{FLOW}/nightly")
            while True:
                runs = await client.read_flow_runs(limit=50)
                found = [
                    r
                    for r in runs
                    if r.deployment_id == deployment.id and r.parameters.get("trigger") == trigger
                ]
                if found:
                    break
                assert time.monotonic() - started < seconds, f"no run for {trigger!r}"
                await asyncio.sleep(0.5)
            waited = time.monotonic() - started
            deadline = time.monotonic() + 600
            while time.monotonic() < deadline:
                current = await client.read_flow_run(found[0].id)
                if current.state and current.state.is_final():
                    return waited, current
                await asyncio.sleep(1)
            raise AssertionError(f"flow run did not finish: {current.state}")

    return asyncio.run(go())


def _last_run(project: Paths) -> dict:
    return json.loads(project.last_run.read_text())


@pytest.fixture(scope="module")
def deployment(tmp_path_factory, prefect_api, ingested: Paths, mnist_source):
    """`digitflow deploy` serving the pipeline of a slice project, and its first run (triggered
    through the API; it trains and promotes). Yields (project, that flow run, its summary)."""
    project = make_project(tmp_path_factory.mktemp("scheduled") / "project")
    set_params(project, SLICE)
    run(["git", "commit", "-qam", "slice params"], project.root)
    shutil.copytree(ingested.raw, project.raw)
    log = project.root / "deploy.log"
    env = _env({**prefect_api, "DIGITFLOW_MNIST_SOURCE": str(mnist_source)})
    with log.open("w") as output:
        server = subprocess.Popen(
            ["digitflow", "deploy"],
            cwd=project.root,
            env=env,
            stdout=output,
            stderr=subprocess.STDOUT,
        )
    url = f"{prefect_api['PREFECT_API_URL']}/deployments/name/{FLOW}/nightly"
    wait_until_up(url, server, log, 120)
    try:
        (first_run,) = _trigger()
        yield project, first_run, _last_run(project)
    finally:
        stop(server, grace_s=60)


@pytest.fixture
def deployed(deployment) -> Paths:
    """The deployed project after its first run: trained, version 1 champion, up to date.
    Every test leaves it trained and up to date, so none depends on another's run."""
    return deployment[0]


def _mlflow_runs(project: Paths) -> list:
    import mlflow

    experiment = tracking.configure(project, load_params(project.params))
    return mlflow.MlflowClient().search_runs([experiment], order_by=["attributes.start_time ASC"])


def _registry(project: Paths) -> tuple[list[str], str | None]:
    from digitflow.registry import CHAMPION, alias_version, list_versions

    params = load_params(project.params)
    tracking.configure(project, params)
    name = params.mlflow.registered_model
    return sorted(row["version"] for row in list_versions(name)), alias_version(name, CHAMPION)


def _new_digits(mnist_source: Path, count: int, offset: int) -> tuple[np.ndarray, np.ndarray]:
    """Labelled digits that are in neither split: MNIST train digits, rotated and thickened."""
    images = read_images(mnist_source / "train-images-idx3-ubyte.gz")
    labels = read_labels(mnist_source / "train-labels-idx1-ubyte.gz")
    end = len(labels) - offset
    images, labels = images[end - count : end], labels[end - count : end]
    from PIL import ImageFilter

    made = [
        np.asarray(
            Image.fromarray(d).rotate(7, resample=Image.BICUBIC).filter(ImageFilter.MaxFilter(3))
        )
        for d in images
    ]
    return np.stack(made), labels


def _write_label_folders(folder: Path, images: np.ndarray, labels: np.ndarray) -> None:
    """Dark ink on white paper, 3x size, as scanned PNGs in one folder per label."""
    for index, (pixels, label) in enumerate(zip(images, labels, strict=True)):
        target = folder / str(int(label))
        target.mkdir(parents=True, exist_ok=True)
        Image.fromarray(255 - pixels).resize((84, 84), Image.BICUBIC).save(target / f"{index}.png")


def test_deployment_has_the_cron_schedule_from_params(deployed) -> None:
    params = load_params(deployed.params)

    async def read():
        async with _client() as client:
            return await client.read_deployment_by_name(f"{FLOW}/nightly")

    deployment = asyncio.run(read())
    schedule = deployment.schedules[0].schedule
    assert schedule.cron == params.schedule.cron == "0 3 * * *"
    assert schedule.timezone == params.schedule.timezone
    assert deployment.schedules[0].active
    assert deployment.parameters["root"] == str(deployed.root.resolve())
    assert deployment.global_concurrency_limit.limit == 1
    assert deployment.paused is False


def test_deploy_sets_up_monitoring_and_the_inbox_trigger(deployed) -> None:
    from digitflow.events import INBOX_BATCH, resource_id

    params = load_params(deployed.params)

    async def read():
        async with _client() as client:
            monitor = await client.read_deployment_by_name(
                f"digitflow-monitor/{params.monitor.deployment}"
            )
            pipeline = await client.read_deployment_by_name(f"{FLOW}/nightly")
            automations = await client.read_automations()
            return monitor, pipeline, automations

    monitor, pipeline, automations = asyncio.run(read())
    assert monitor.schedules[0].schedule.cron == params.monitor.cron == "0 * * * *"
    assert monitor.parameters == {
        "root": str(deployed.root.resolve()),
        "retrain_deployment": "nightly",
    }
    (automation,) = [a for a in automations if INBOX_BATCH in a.trigger.expect]
    assert automation.trigger.match.get("prefect.resource.id") == [resource_id(deployed)]
    (action,) = automation.actions
    assert action.deployment_id == pipeline.id
    assert action.parameters["trigger"] == "inbox: {{ event.payload.batch }}"


def test_triggered_run_trains_and_promotes(deployment) -> None:
    project, first_run, summary = deployment
    assert first_run.state.is_completed(), first_run.state
    assert "train" in summary["stages_run"] and summary["decision"] == "promoted"
    assert summary["champion_version"] == "1"
    assert summary["trigger"] == "deployment run (nightly)"
    versions, champion = _registry(project)
    assert versions[0] == "1" and champion == "1"


def test_nothing_new_trains_nothing(deployed) -> None:
    runs_before, lock_before = (
        len(_mlflow_runs(deployed)),
        (deployed.root / "dvc.lock").read_bytes(),
    )
    (flow_run,) = _trigger()
    assert flow_run.state.is_completed(), flow_run.state
    summary = _last_run(deployed)
    assert summary["up_to_date"] is True and summary["stages_run"] == []
    assert len(_mlflow_runs(deployed)) == runs_before
    assert (deployed.root / "dvc.lock").read_bytes() == lock_before


def test_inbox_batch_becomes_a_new_data_version_and_a_new_model(deployed, mnist_source) -> None:
    params = load_params(deployed.params)
    inbox = deployed.inbox(params)
    images, labels = _new_digits(mnist_source, 120, offset=0)
    _write_label_folders(inbox / "scans-week-48", images[:80], labels[:80])
    np.savez(inbox / "tablet-export.npz", images=images[80:], labels=labels[80:])
    hash_before, runs_before = data_hash(deployed), len(_mlflow_runs(deployed))

    (flow_run,) = _trigger()
    assert flow_run.state.is_completed(), flow_run.state
    summary = _last_run(deployed)
    assert [b["accepted"] for b in summary["batches"]] == [True, True]
    assert sorted(b["count"] for b in summary["batches"]) == [40, 80]
    new_hash = data_hash(deployed)
    assert new_hash != hash_before and summary["data_hash"] == new_hash
    assert list(inbox.iterdir()) == []
    manifest = (deployed.manifest).read_text().splitlines()
    assert len(manifest) == 3 and "scans-week-48" in manifest[1] + manifest[2]
    status = run(["dvc", "status", "--cloud", "data.dvc"], deployed.root).stdout
    assert "in sync" in status
    runs = _mlflow_runs(deployed)
    assert len(runs) == runs_before + 1
    assert runs[-1].data.tags[tracking.TAG_DATA_HASH] == new_hash
    logged = [{t.key: t.value for t in item.tags} for item in runs[-1].inputs.dataset_inputs]
    assert sorted(tags["split"] for tags in logged) == ["recent", "test", "train", "val"]
    assert {tags["dvc_md5"] for tags in logged} == {new_hash}
    promotion = json.loads(deployed.promotion_report.read_text())
    assert promotion["run_id"] == runs[-1].info.run_id
    assert promotion["promoted"] is False and promotion["rule"] == "insufficient evidence"
    assert promotion["statistics"]["slices"]["recent"]["n"] == 20 + 10  # a quarter of each batch
    validation = json.loads(deployed.validation_report.read_text())
    assert validation["success"] and validation["stats"]["rows"]["train"] == 60_000 + 90
    assert validation["stats"]["rows"]["recent"] == 30


def test_bad_batch_is_quarantined_and_nothing_else_changes(deployed, mnist_source) -> None:
    params = load_params(deployed.params)
    inbox = deployed.inbox(params)
    test_images = read_images(mnist_source / "t10k-images-idx3-ubyte.gz")[:30]
    test_labels = read_labels(mnist_source / "t10k-labels-idx1-ubyte.gz")[:30]
    batch = inbox / "suspicious"
    _write_label_folders(batch, *_new_digits(mnist_source, 20, offset=500))
    np.savez(inbox / "copied-test-set.npz", images=test_images, labels=test_labels)
    (batch / "3" / "notes.png").write_text("not an image")
    before = (tree_digest(deployed.data), data_hash(deployed), _registry(deployed))
    runs_before = len(_mlflow_runs(deployed))

    # What the watcher in `digitflow deploy` does: one look at the inbox, one event for the
    # batches that settled there; the deployment's trigger starts a run.
    announced = InboxWatcher(deployed, params).poll()
    assert announced == ["copied-test-set.npz", "suspicious"]
    trigger = "inbox: copied-test-set.npz, suspicious"
    waited, flow_run = _run_started_by(trigger, seconds=30)
    assert waited < 30 and flow_run.state.is_completed(), flow_run.state
    summary = _last_run(deployed)
    assert summary["trigger"] == trigger
    assert [b["accepted"] for b in summary["batches"]] == [False, False]
    assert (tree_digest(deployed.data), data_hash(deployed), _registry(deployed)) == before
    assert len(_mlflow_runs(deployed)) == runs_before
    assert summary["up_to_date"] is True
    assert list(inbox.iterdir()) == []
    reports = {
        path.parent.name.split("-", 1)[1]: json.loads(path.read_text())
        for path in deployed.quarantine(params).glob("*/report.json")
    }
    assert set(reports) == {"suspicious", "copied-test-set.npz"}
    assert any("notes.png" in p and "not an image" in p for p in reports["suspicious"]["problems"])
    copied = " ".join(reports["copied-test-set.npz"]["problems"])
    assert "already in the training or test data" in copied
    (kept,) = deployed.quarantine(params).glob("*-suspicious/suspicious/3/notes.png")
    assert kept.read_text() == "not an image"


def test_two_runs_started_together_never_overlap(deployed) -> None:
    runs_before = len(_mlflow_runs(deployed))
    first, second = _trigger(2, force=True)
    assert first.state.is_completed() and second.state.is_completed(), (first.state, second.state)
    spans = sorted([(r.start_time, r.end_time) for r in (first, second)])
    assert spans[0][1] <= spans[1][0], spans
    runs = _mlflow_runs(deployed)[runs_before:]
    assert len(runs) == 2
    assert runs[0].info.end_time <= runs[1].info.start_time
    assert "up to date" in run(["dvc", "status"], deployed.root).stdout.lower()


def test_work_pool_worker_runs_the_deployment(deployed, prefect_api) -> None:
    """`digitflow deploy --work-pool` registers on a process pool; a real worker runs it."""
    env = _env({**prefect_api, "PREFECT_WORKER_QUERY_SECONDS": "2"})
    run(
        ["prefect", "work-pool", "create", "digitflow-pool", "--type", "process"],
        deployed.root,
        env=env,
    )
    result = run(
        ["digitflow", "deploy", "--work-pool", "digitflow-pool", "--name", "pooled"],
        deployed.root,
        env=env,
    )
    assert "registered on work pool 'digitflow-pool'" in result.stdout
    log = deployed.root / "worker.log"
    with log.open("w") as output:
        worker = subprocess.Popen(
            ["prefect", "worker", "start", "--pool", "digitflow-pool"],
            cwd=deployed.root,
            env=env,
            stdout=output,
            stderr=subprocess.STDOUT,
        )
    try:
        (flow_run,) = _trigger(deployment_name="pooled")
    finally:
        stop(worker)
    assert flow_run.state.is_completed(), (flow_run.state, log.read_text()[-3000:])
    assert flow_run.work_pool_name == "digitflow-pool"
    assert _last_run(deployed)["up_to_date"] is True
