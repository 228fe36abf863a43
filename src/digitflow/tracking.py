"""MLflow: where runs go, what links a run to its inputs, and the run id handed between stages."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import Any

from .config import Params, Paths
from .versioning import data_hash

TAG_COMMIT = "git_commit"
TAG_DATA_HASH = "data_dvc_md5"
TAG_ARCHITECTURE = "architecture"


def tracking_uri(paths: Paths) -> str:
    """$MLFLOW_TRACKING_URI, else the embedded SQLite store under mlflow/."""
    return os.environ.get("MLFLOW_TRACKING_URI") or paths.default_tracking_uri


def configure(paths: Paths, params: Params) -> str:
    """Point MLflow at the store and make sure the experiment exists; returns its id."""
    import mlflow

    uri = tracking_uri(paths)
    if uri.startswith("sqlite:///"):
        paths.mlflow_dir.mkdir(parents=True, exist_ok=True)
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    experiment = mlflow.get_experiment_by_name(params.mlflow.experiment)
    if experiment is not None:
        return experiment.experiment_id
    location = None
    if uri.startswith("sqlite:///"):
        location = paths.mlflow_artifacts.as_uri()
    return mlflow.create_experiment(params.mlflow.experiment, artifact_location=location)


def git_commit(root: Path) -> str:
    """HEAD's commit, with '-dirty' when tracked files changed; 'unknown' outside git."""
    try:
        head = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=root,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return f"{head}-dirty" if dirty else head


def flat_params(params: Params) -> dict[str, str]:
    """Every parameter as 'section.key' -> value, as MLflow logs them."""

    def walk(prefix: str, value: Any) -> dict[str, str]:
        if isinstance(value, dict):
            out: dict[str, str] = {}
            for key, inner in value.items():
                out.update(walk(f"{prefix}.{key}" if prefix else key, inner))
            return out
        return {prefix: str(value)}

    return walk("", params.model_dump(by_alias=True))


def run_tags(paths: Paths, params: Params) -> dict[str, str]:
    """Tags that tie a run to the code, data and architecture it used."""
    return {
        TAG_COMMIT: git_commit(paths.root),
        TAG_DATA_HASH: data_hash(paths) or "untracked",
        TAG_ARCHITECTURE: params.model.architecture,
    }


def write_run_info(paths: Paths, info: dict[str, str]) -> None:
    """Record the run id and model URI for the stages after training."""
    paths.run_info.parent.mkdir(parents=True, exist_ok=True)
    paths.run_info.write_text(json.dumps(info, indent=2) + "\n")


def read_run_info(paths: Paths) -> dict[str, str]:
    """The run id and model URI written by the train stage."""
    if not paths.run_info.is_file():
        raise FileNotFoundError(f"{paths.run_info}: missing; run the train stage first")
    return json.loads(paths.run_info.read_text())
