"""The whole pipeline on a slice: a real Prefect flow run, a real DVC repo, a real MLflow store."""

from __future__ import annotations

import asyncio
import json
import shutil

import pytest
import yaml
from conftest import (
    PIPELINE_SLICE,
    clone_project,
    load_module,
    make_project,
    run,
    set_params,
    stages_run,
)

from digitflow import tracking
from digitflow.config import Paths, load_params
from digitflow.registry import CHALLENGER, CHAMPION, alias_version, champion_history
from digitflow.versioning import data_hash

pytestmark = pytest.mark.slow


ARTIFACTS: dict[str, object] = {}  # the flow run's Prefect artifacts by key, read back once


@pytest.fixture(scope="module")
def pipeline_once(tmp_path_factory, ingested: Paths) -> tuple[Paths, dict, object]:
    """One real Prefect flow run of the whole pipeline on a slice, against a temporary server."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId
    from prefect.testing.utilities import prefect_test_harness

    project = make_project(tmp_path_factory.mktemp("pipeline") / "project")
    set_params(project, PIPELINE_SLICE)
    run(["git", "commit", "-qam", "slice params"], project.root)
    shutil.copytree(ingested.raw, project.raw)
    flow_module = load_module(project.root / "flows" / "pipeline.py")
    with prefect_test_harness(server_startup_timeout=120):
        state = flow_module.mnist_pipeline(root=str(project.root), return_state=True)
        summary = state.result()

        async def read_state():
            async with get_client() as client:
                flow_run_id = state.state_details.flow_run_id
                flow_run = await client.read_flow_run(flow_run_id)
                published = await client.read_artifacts(
                    artifact_filter=ArtifactFilter(
                        flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id])
                    )
                )
                ARTIFACTS.update({artifact.key: artifact for artifact in published})
                return flow_run.state

        server_state = asyncio.run(read_state())
    return project, summary, server_state


@pytest.fixture
def flow_run(pipeline_once) -> tuple[Paths, dict, object]:
    """The module's flow run, read only; MLflow points at its store."""
    project = pipeline_once[0]
    tracking.configure(project, load_params(project.params))
    return pipeline_once


@pytest.fixture
def own_project(pipeline_once, tmp_path) -> Paths:
    """A private copy of the flow run's project, for a test that changes it."""
    project = clone_project(pipeline_once[0], tmp_path / "clone")
    tracking.configure(project, load_params(project.params))
    return project


def test_flow_runs_every_stage_and_reports(flow_run) -> None:
    project, summary, server_state = flow_run
    assert server_state.is_completed()
    assert summary["stages_run"] == ["validate", "preprocess", "train", "evaluate", "register"]
    assert summary["data_hash"] == data_hash(project)
    assert summary["decision"] == "promoted" and summary["champion_version"] == "1"
    assert 0.3 < summary["test_accuracy"] <= 1.0
    lock = yaml.safe_load((project.root / "dvc.lock").read_text())
    assert set(lock["stages"]) == {"validate", "preprocess", "train", "evaluate", "register"}


def test_mlflow_run_holds_params_metrics_tags_artifacts_and_model(flow_run) -> None:
    import mlflow

    project, summary, _ = flow_run
    client = mlflow.MlflowClient()
    mlflow_run = client.get_run(summary["run_id"])
    assert mlflow_run.info.status == "FINISHED"
    assert mlflow_run.data.params["train.epochs"] == "2"
    assert mlflow_run.data.params["model.architecture"] == "seed_cnn"
    assert len(client.get_metric_history(summary["run_id"], "val_loss")) == 2
    assert len(client.get_metric_history(summary["run_id"], "accuracy")) == 2
    pace = client.get_metric_history(summary["run_id"], "epoch_cpu_utilisation")
    assert len(pace) == 2 and all(0 < point.value <= 1.05 for point in pace)
    assert mlflow_run.data.metrics["test_accuracy"] == pytest.approx(summary["test_accuracy"])
    tags = mlflow_run.data.tags
    head = run(["git", "rev-parse", "HEAD"], project.root).stdout.strip()
    assert tags[tracking.TAG_COMMIT].startswith(head)
    assert tags[tracking.TAG_DATA_HASH] == data_hash(project)
    assert tags[tracking.TAG_ARCHITECTURE] == "seed_cnn"
    assert tags["promotion.decision"] == "promoted"
    artifacts = {
        item.path
        for folder in ("training", "evaluation", "validation")
        for item in client.list_artifacts(summary["run_id"], folder)
    }
    assert {
        "training/training_curves.png",
        "training/history.csv",
        "evaluation/confusion_matrix.png",
        "evaluation/prediction_grid.png",
        "evaluation/per_class.csv",
        "validation/report.json",
    } <= artifacts
    run_info = json.loads(project.run_info.read_text())
    assert mlflow.models.get_model_info(run_info["model_uri"]).signature is not None


def test_flow_publishes_its_summary_and_per_class_metrics_to_prefect(flow_run) -> None:
    import pandas as pd

    project, summary, _ = flow_run
    markdown = ARTIFACTS["digitflow-run-summary"]
    assert markdown.type == "markdown"
    text = markdown.data
    assert f"{summary['test_accuracy']:.4f}" in text and summary["data_hash"] in text
    assert "version 1 promoted to champion" in text and "rule `gate`" in text
    assert f"/runs/{summary['run_id']}" in text and "/versions/1)" in text
    table = ARTIFACTS["digitflow-per-class-metrics"]
    assert table.type == "table"
    rows = json.loads(table.data) if isinstance(table.data, str) else table.data
    expected = pd.read_csv(project.eval_dir / "per_class.csv")
    assert [row["digit"] for row in rows] == expected["digit"].tolist()
    assert [row["recall"] for row in rows] == pytest.approx(expected["recall"].tolist(), abs=1e-4)


def test_registry_holds_version_one_as_champion(flow_run) -> None:
    project, _, _ = flow_run
    name = load_params(project.params).mlflow.registered_model
    assert alias_version(name, CHAMPION) == "1"
    assert alias_version(name, CHALLENGER) == "1"
    report = json.loads(project.promotion_report.read_text())
    assert report["promoted"] and "first version" in report["reason"]


def test_second_repro_reruns_nothing(flow_run) -> None:
    project, _, _ = flow_run
    result = run(["dvc", "repro"], project.root)
    assert stages_run(result.stdout) == []
    assert "Data and pipelines are up to date" in result.stdout


def test_changing_one_param_reruns_only_downstream_stages(own_project: Paths) -> None:
    project = own_project
    set_params(project, {("promotion", "alpha"): 0.01})
    assert stages_run(run(["dvc", "repro"], project.root).stdout) == ["register"]
    report = json.loads(project.promotion_report.read_text())
    assert report["challenger_version"] == "1", "re-running register must not re-register"
    assert "already the champion" in report["reason"]
    set_params(project, {("train", "batch_size"): 64})
    assert stages_run(run(["dvc", "repro"], project.root).stdout) == [
        "train",
        "evaluate",
        "register",
    ]


def test_worse_model_leaves_champion_and_records_why(own_project: Paths) -> None:
    import mlflow

    project = own_project
    name = load_params(project.params).mlflow.registered_model
    champion_before = alias_version(name, CHAMPION)
    set_params(project, {("train", "learning_rate"): 1e-6, ("promotion", "min_accuracy"): 0.01})
    run(["dvc", "repro"], project.root)
    report = json.loads(project.promotion_report.read_text())
    assert report["promoted"] is False
    assert report["rule"] == "insufficient evidence" and "McNemar exact p=" in report["reason"]
    assert report["champion_version"] == champion_before
    assert report["challenger_accuracy"] < report["champion_accuracy"]
    assert alias_version(name, CHAMPION) == champion_before
    assert alias_version(name, CHALLENGER) == report["challenger_version"]
    version = mlflow.MlflowClient().get_model_version(name, report["challenger_version"])
    assert version.tags["promotion.decision"] == "rejected"
    assert version.tags["promotion.reason"] == report["reason"]
    run_tags = mlflow.MlflowClient().get_run(report["run_id"]).data.tags
    assert run_tags["promotion.reason"] == report["reason"]


def test_promote_and_rollback_move_the_alias_and_log_it(own_project: Paths) -> None:
    import mlflow

    project = own_project
    name = load_params(project.params).mlflow.registered_model
    before = alias_version(name, CHAMPION)
    model_uri = json.loads(project.run_info.read_text())["model_uri"]
    latest = str(mlflow.register_model(model_uri, name).version)
    assert before != latest
    promoted = run(["digitflow", "promote", latest, "--reason", "canary test"], project.root)
    assert f"-> {latest}" in promoted.stdout
    assert alias_version(name, CHAMPION) == latest
    assert champion_history(name)[-1] == latest
    rolled = run(["digitflow", "rollback", "--reason", "canary failed"], project.root)
    assert f"{latest} -> {before}" in rolled.stdout
    assert alias_version(name, CHAMPION) == before
    model_tags = mlflow.MlflowClient().get_registered_model(name).tags
    actions = [json.loads(v) for k, v in sorted(model_tags.items()) if k.startswith("audit.")]
    assert [a["action"] for a in actions][-2:] == ["manual-promote", "rollback"]
    assert actions[-1]["reason"] == "canary failed"
    listing = json.loads(run(["digitflow", "models", "--json"], project.root).stdout)
    assert [row["version"] for row in listing] == [before, latest]
    assert CHAMPION in listing[0]["aliases"]
    assert listing[0]["data_hash"] == data_hash(project)


def test_rollback_with_no_previous_champion_is_a_clear_error(own_project: Paths) -> None:
    result = run(["digitflow", "rollback"], own_project.root, check=False)
    assert result.returncode == 1
    assert "nothing to roll back to" in result.stdout
    unknown = run(["digitflow", "promote", "99", "--reason", "x"], own_project.root, check=False)
    assert unknown.returncode == 1 and "no version 99" in unknown.stdout


def test_flow_file_runs_as_a_script_with_no_server(flow_run, tmp_path) -> None:
    """`python flows/pipeline.py` starts its own temporary Prefect server; nothing changed, so
    every stage is skipped."""
    project, _, _ = flow_run
    env = {"PREFECT_HOME": str(tmp_path / "prefect"), "PREFECT_API_URL": ""}
    result = run(["python", "flows/pipeline.py"], project.root, env=env)
    assert "'stages_run': []" in result.stdout
