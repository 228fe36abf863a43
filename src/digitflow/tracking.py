"""MLflow: where runs go, what links a run to its inputs, and the run id handed between stages."""

from __future__ import annotations

import json
import os
import platform
import re
import socket
import subprocess
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import Any

from .config import Params, Paths
from .errors import DigitflowError
from .versioning import data_hash

TAG_COMMIT = "git_commit"
# The MLflow UI opens a model-training experiment on its runs, not on the GenAI views.
TAG_EXPERIMENT_KIND, TRAINING_KIND = "mlflow.experimentKind", "custom_model_development"
# What the pipeline itself rewrites in git: a run that changed only these is not "dirty".
PIPELINE_OUTPUTS = ("dvc.lock", "data.dvc", "reports")
TAG_DATA_HASH = "data_dvc_md5"
TAG_ARCHITECTURE = "architecture"
TAG_MACHINE = "machine"
TAG_PID = "digitflow.pid"
TAG_HOST = "digitflow.host"


CREDENTIALS_IN_URL = re.compile(r"://[^/@\s'\"]+@")


URI_VARIABLES = ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")


class TrackingError(DigitflowError, RuntimeError):
    """The MLflow tracking server could not be reached, even after retries."""


def tracking_uri(paths: Paths) -> str:
    """$MLFLOW_TRACKING_URI, else the embedded SQLite store under mlflow/."""
    return os.environ.get("MLFLOW_TRACKING_URI") or paths.default_tracking_uri


def _http_settings(params: Params) -> None:
    """Retry and time-out settings for a tracking server (the environment may override them)."""
    settings = params.mlflow
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", str(settings.http_retries))
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", str(settings.http_backoff_s))
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", str(int(settings.http_timeout_s)))


def point_mlflow_at(uri: str) -> None:
    """Set MLflow's tracking and registry URIs for this process only.

    MLflow also exports them to os.environ, which would make every later project configured in
    this process, and every child process, use this store; the environment is put back.
    """
    import mlflow

    exported = {name: os.environ.get(name) for name in URI_VARIABLES}
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    for name, value in exported.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value


def configure(paths: Paths, params: Params, experiment: str | None = None) -> str:
    """Point MLflow at the store and make sure the experiment exists (the training experiment
    unless another is named); returns its id."""
    import mlflow

    _http_settings(params)
    uri = tracking_uri(paths)
    if uri.startswith("sqlite:///"):
        paths.mlflow_dir.mkdir(parents=True, exist_ok=True)
    point_mlflow_at(uri)
    name = experiment or params.mlflow.experiment
    tags = {TAG_EXPERIMENT_KIND: TRAINING_KIND} if experiment is None else {}
    with unavailable_as_error(uri):
        found = mlflow.get_experiment_by_name(name)
        if found is not None:
            for key, value in tags.items():
                if found.tags.get(key) != value:
                    mlflow.MlflowClient().set_experiment_tag(found.experiment_id, key, value)
            return found.experiment_id
        location = None
        if uri.startswith("sqlite:///"):
            location = paths.mlflow_artifacts.as_uri()
        return mlflow.create_experiment(name, artifact_location=location, tags=tags)


@contextmanager
def unavailable_as_error(uri: str) -> Iterator[None]:
    """Turn 'server unreachable after retries' into one clear TrackingError."""
    from mlflow.exceptions import MlflowException

    try:
        yield
    except MlflowException as exc:
        text = str(exc)
        if "Max retries exceeded" in text or "Connection" in text or "API request" in text:
            raise TrackingError(
                f"MLflow tracking server {uri} unreachable after retries: {text.splitlines()[0]}"
            ) from exc
        raise


def guarded(paths: Paths) -> AbstractContextManager[None]:
    """unavailable_as_error for this project's tracking store."""
    return unavailable_as_error(tracking_uri(paths))


def process_tags() -> dict[str, str]:
    """Which process owns a run, so a later run can tell that it died."""
    return {TAG_PID: str(os.getpid()), TAG_HOST: socket.gethostname()}


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def close_orphaned_runs(experiment_id: str) -> list[str]:
    """Mark RUNNING runs whose process on this host is gone as KILLED; returns their ids."""
    import mlflow

    client = mlflow.MlflowClient()
    here = socket.gethostname()
    closed = []
    for run in client.search_runs([experiment_id], "attributes.status = 'RUNNING'"):
        tags = run.data.tags
        if tags.get(TAG_HOST) != here or not tags.get(TAG_PID, "").isdigit():
            continue
        if not _alive(int(tags[TAG_PID])):
            client.set_tag(run.info.run_id, "digitflow.ended", "process died (killed or crashed)")
            client.set_terminated(run.info.run_id, status="KILLED")
            closed.append(run.info.run_id)
    return closed


def git_commit(root: Path) -> str:
    """HEAD's commit, with '-dirty' when tracked source files (code, params, dvc.yaml) differ
    from it; what the pipeline rewrites itself (PIPELINE_OUTPUTS) does not count. 'unknown'
    outside git."""
    excluded = [f":(exclude){name}" for name in PIPELINE_OUTPUTS]
    try:
        head = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no", "--", ".", *excluded],
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
        return {prefix: redact(str(value))}

    return walk("", params.model_dump(by_alias=True))


def redact(text: str) -> str:
    """Hide credentials embedded in URLs: the user-info part before `@` becomes `***`."""
    return CREDENTIALS_IN_URL.sub("://***@", text)


def run_tags(paths: Paths, params: Params) -> dict[str, str]:
    """Tags that tie a run to the code, data and architecture it used."""
    return {
        TAG_COMMIT: git_commit(paths.root),
        TAG_DATA_HASH: data_hash(paths) or "untracked",
        TAG_ARCHITECTURE: params.model.architecture,
        TAG_MACHINE: machine(),
    }


def machine() -> str:
    """The CPU model and core count this process runs on (for the model card)."""
    model = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return f"{model}, {os.cpu_count()} CPU cores, {platform.system()}"


def dataset_input(features, targets, split: str, data_md5: str | None):
    """An MLflow dataset input for one split, named and tagged with the DVC data version (the
    run page's Datasets section shows it)."""
    from mlflow.entities import DatasetInput, InputTag

    import mlflow

    version = (data_md5 or "untracked").removesuffix(".dir")
    dataset = mlflow.data.from_numpy(features, targets=targets, name=f"mnist-{split}@{version[:8]}")
    tags = [
        InputTag(key="mlflow.data.context", value=DATA_CONTEXTS[split]),
        InputTag(key="dvc_md5", value=data_md5 or "untracked"),
        InputTag(key="split", value=split),
    ]
    return DatasetInput(dataset=dataset._to_mlflow_entity(), tags=tags)


DATA_CONTEXTS = {
    "train": "training",
    "val": "validation",
    "test": "evaluation",
    "recent": "evaluation",
}


def log_datasets(run_id: str, paths: Paths, splits: dict[str, tuple]) -> None:
    """Log each split's (features, targets) as a dataset input of the run."""
    import mlflow

    md5 = data_hash(paths)
    inputs = [dataset_input(x, y, split, md5) for split, (x, y) in splits.items()]
    mlflow.MlflowClient().log_inputs(run_id, datasets=inputs)


def write_run_info(paths: Paths, info: dict[str, str]) -> None:
    """Record the run id and model URI for the stages after training."""
    paths.run_info.parent.mkdir(parents=True, exist_ok=True)
    paths.run_info.write_text(json.dumps(info, indent=2) + "\n")


def read_run_info(paths: Paths) -> dict[str, str]:
    """The run id and model URI written by the train stage."""
    if not paths.run_info.is_file():
        raise FileNotFoundError(f"{paths.run_info}: missing; run the train stage first")
    return json.loads(paths.run_info.read_text())
