"""What the MLflow UI shows: the experiment's kind, each run's datasets, an honest commit tag."""

from __future__ import annotations

import json

import pytest
from conftest import make_project, run

from digitflow import tracking
from digitflow.config import load_params
from digitflow.versioning import data_hash


def test_commit_is_dirty_for_source_changes_not_for_pipeline_outputs(tmp_path) -> None:
    project = make_project(tmp_path / "project")
    (project.root / "reports").mkdir()
    (project.root / "reports" / "metrics.json").write_text("{}\n")
    (project.root / "dvc.lock").write_text("schema: '2.0'\n")
    run(["git", "add", "-A"], project.root)
    run(["git", "commit", "-q", "-m", "outputs"], project.root)
    head = run(["git", "rev-parse", "HEAD"], project.root).stdout.strip()
    (project.root / "reports" / "metrics.json").write_text('{"test_accuracy": 0.99}\n')
    (project.root / "dvc.lock").write_text("schema: '2.0'\nstages: {}\n")
    assert tracking.git_commit(project.root) == head
    with (project.root / "src" / "digitflow" / "model.py").open("a") as source:
        source.write("\n# an edit\n")
    assert tracking.git_commit(project.root) == f"{head}-dirty"


@pytest.mark.slow
def test_runs_show_their_datasets_and_the_experiment_is_a_training_one(champion) -> None:
    import mlflow

    params = load_params(champion.params)
    experiment_id = tracking.configure(champion, params)
    experiment = mlflow.get_experiment(experiment_id)
    assert experiment.tags[tracking.TAG_EXPERIMENT_KIND] == "custom_model_development"
    (latest,) = mlflow.MlflowClient().search_runs(
        [experiment_id], order_by=["attributes.start_time DESC"], max_results=1
    )
    inputs = latest.inputs.dataset_inputs
    tags = [{tag.key: tag.value for tag in item.tags} for item in inputs]
    md5 = data_hash(champion)
    assert sorted(tag["split"] for tag in tags) == ["test", "train", "val"]
    assert {tag["dvc_md5"] for tag in tags} == {md5}
    assert {tag["mlflow.data.context"] for tag in tags} == {"training", "validation", "evaluation"}
    assert all(item.dataset.name.endswith(md5[:8]) for item in inputs)
    by_split = {tag["split"]: item for tag, item in zip(tags, inputs, strict=True)}
    profile = json.loads(by_split["train"].dataset.profile)
    assert profile["features_shape"] == [int(latest.data.params["data.n_train"]), 28, 28, 1]
