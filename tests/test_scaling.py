"""Beyond one machine, for real on 127.0.0.1: MLflow on PostgreSQL with served artifacts."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import requests
from conftest import (
    PIPELINE_SLICE,
    free_port,
    make_project,
    run,
    set_params,
    stop,
    wait_until_up,
)

from digitflow.config import Paths, load_params

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def tracking_server(postgres: str, tmp_path_factory) -> tuple[str, Path]:
    """`digitflow tracking-server` on PostgreSQL with served artifacts, on a free port."""
    home = tmp_path_factory.mktemp("tracking")
    artifacts, port = home / "artifacts", free_port()
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    env.pop("MLFLOW_TRACKING_URI", None)
    log = home / "server.log"
    command = [
        "digitflow",
        "tracking-server",
        "--backend-store-uri",
        postgres,
        "--artifacts-destination",
        str(artifacts),
        "--port",
        str(port),
        "--root",
        str(home),
    ]
    with log.open("w") as output:
        server = subprocess.Popen(
            command, cwd=home, env=env, stdout=output, stderr=subprocess.STDOUT
        )
    url = f"http://127.0.0.1:{port}"
    wait_until_up(f"{url}/health", server, log)
    yield url, artifacts
    stop(server)


def test_pipeline_against_mlflow_on_postgresql(tmp_path, tracking_server, ingested: Paths) -> None:
    url, artifacts = tracking_server
    project = make_project(tmp_path / "project")
    set_params(project, PIPELINE_SLICE)
    shutil.copytree(ingested.raw, project.raw)
    run(["dvc", "repro"], project.root, env={"MLFLOW_TRACKING_URI": url})
    assert not (project.mlflow_dir / "mlflow.db").exists()  # nothing went to the embedded store

    api = f"{url}/api/2.0/mlflow"
    params = load_params(project.params)
    experiment = requests.get(
        f"{api}/experiments/get-by-name", params={"experiment_name": params.mlflow.experiment}
    ).json()["experiment"]
    runs = requests.post(
        f"{api}/runs/search", json={"experiment_ids": [experiment["experiment_id"]]}
    ).json()["runs"]
    assert len(runs) == 1
    run_info = runs[0]
    metrics = {m["key"]: m["value"] for m in run_info["data"]["metrics"]}
    assert metrics["test_accuracy"] > 0.5 and "val_loss" in metrics
    listed = requests.get(
        f"{api}/artifacts/list", params={"run_id": run_info["info"]["run_id"]}
    ).json()
    assert {"evaluation", "training"} <= {item["path"] for item in listed["files"]}
    assert any(artifacts.rglob("confusion_matrix.png"))  # stored by the server, not the client

    name = params.mlflow.registered_model
    champion = requests.get(
        f"{api}/registered-models/alias", params={"name": name, "alias": "champion"}
    ).json()
    assert champion["model_version"]["version"] == "1"
    assert champion["model_version"]["run_id"] == run_info["info"]["run_id"]
    assert any(artifacts.rglob("MLmodel"))


SWEEP = {
    **PIPELINE_SLICE,
    ("sweep", "method"): "random",
    ("sweep", "trials"): 4,
    ("sweep", "workers"): 2,
    ("sweep", "max_train_samples"): 1500,
    ("sweep", "epochs"): 1,
    ("sweep", "space"): {"train.learning_rate": [0.001, 0.003], "train.batch_size": [64, 128]},
}


def test_sweep_fans_trials_out_on_dask_and_registers_the_best(tmp_path, ingested: Paths) -> None:
    import mlflow
    from digitflow import tracking
    from digitflow.registry import CHAMPION, alias_version, list_versions

    project = make_project(tmp_path / "project")
    set_params(project, SWEEP)
    shutil.copytree(ingested.raw, project.raw)
    result = run(["digitflow", "sweep", "--workers", "2"], project.root)
    assert "4 trials on 2 local Dask workers" in result.stdout
    assert "sweep finished" in result.stdout

    params = load_params(project.params)
    experiment = tracking.configure(project, params)
    client = mlflow.MlflowClient()
    (parent,) = client.search_runs([experiment], "tags.`digitflow.sweep` = 'parent'")
    children = client.search_runs(
        [experiment], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'"
    )
    assert parent.info.status == "FINISHED" and len(children) == 4
    tried = {
        (c.data.params["train.learning_rate"], c.data.params["train.batch_size"]) for c in children
    }
    assert len(tried) == 4  # every point of the 2x2 space, each a child run
    assert all(
        c.data.params["train.epochs"] == "1" and c.data.params["data.n_train"] == "1500"
        for c in children
    )
    best = max(children, key=lambda c: c.data.metrics["val_accuracy_final"])
    assert parent.data.tags["best_trial_run_id"] == best.info.run_id
    assert parent.data.metrics["best_val_accuracy"] == best.data.metrics["val_accuracy_final"]
    assert "test_accuracy" in best.data.metrics  # only the chosen trial sees the test set
    assert all("test_accuracy" not in c.data.metrics for c in children if c is not best)
    versions = list_versions(params.mlflow.registered_model)
    assert [v["run_id"] for v in versions] == [best.info.run_id]
    assert alias_version(params.mlflow.registered_model, CHAMPION) == "1"
    promotion = json.loads(project.promotion_report.read_text())
    assert promotion["run_id"] == best.info.run_id and promotion["promoted"] is True
    assert len((project.reports / "sweep.csv").read_text().splitlines()) == 5


def test_sweep_on_an_existing_dask_cluster(tmp_path, ingested: Paths) -> None:
    """`--dask-address` sends the trials to a Dask scheduler started outside the sweep."""
    import mlflow
    from digitflow import tracking

    project = make_project(tmp_path / "project")
    set_params(project, {**SWEEP, ("sweep", "trials"): 2})
    shutil.copytree(ingested.raw, project.raw)
    port = free_port()
    address = f"tcp://127.0.0.1:{port}"
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    scheduler = subprocess.Popen(
        ["dask", "scheduler", "--host", "127.0.0.1", "--port", str(port), "--no-dashboard"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    worker = subprocess.Popen(
        [
            "dask",
            "worker",
            address,
            "--nworkers",
            "1",
            "--nthreads",
            "1",
            "--host",
            "127.0.0.1",
            "--no-dashboard",
        ],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        cwd=tmp_path,
    )
    try:
        result = run(["digitflow", "sweep", "--dask-address", address], project.root)
    finally:
        for process in (worker, scheduler):
            stop(process)
    assert f"2 trials on {address}" in result.stdout and "sweep finished" in result.stdout
    experiment = tracking.configure(project, load_params(project.params))
    (parent,) = mlflow.MlflowClient().search_runs([experiment], "tags.`digitflow.sweep` = 'parent'")
    children = mlflow.MlflowClient().search_runs(
        [experiment], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'"
    )
    assert len(children) == 2 and parent.info.status == "FINISHED"
