"""The one place that knows params.yaml, project paths and environment defaults."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from . import tfquiet
from .errors import DigitflowError

PARAMS_FILE = "params.yaml"
SOURCE_ENV = "DIGITFLOW_MNIST_SOURCE"
PREDICTION_DB_ENV = "DIGITFLOW_PREDICTION_DB"
FEEDBACK_TOKEN_ENV = "DIGITFLOW_FEEDBACK_TOKEN"
ROOT_ENV = "DIGITFLOW_ROOT"
WORKER_SPEC_ENV = "DIGITFLOW_SERVE_WORKER"  # `digitflow serve --workers N` -> its worker processes
SPLITS = ("train", "test")
RECENT = "recent"  # the holdout parts of admitted batches: new data, never trained on
NUM_CLASSES = 10
IMAGE_SIZE = 28


class ConfigError(DigitflowError, ValueError):
    """params.yaml is missing, unreadable, or holds a bad key or value."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class FileSpec(_Strict):
    name: str
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")


class DataFiles(_Strict):
    train_images: FileSpec
    train_labels: FileSpec
    test_images: FileSpec
    test_labels: FileSpec


class DataParams(_Strict):
    mirrors: list[str] = Field(min_length=1)
    timeout_s: float = Field(gt=0)
    files: DataFiles
    max_train_samples: int | None = Field(default=None, ge=10)
    max_test_samples: int | None = Field(default=None, ge=10)


class ExpectedRows(_Strict):
    train: int | None = Field(default=None, ge=1)
    test: int | None = Field(default=None, ge=1)


class ValidateParams(_Strict):
    expected_rows: ExpectedRows
    class_share_min: float = Field(ge=0, le=1)
    class_share_max: float = Field(ge=0, le=1)
    ink_grey_level: int = Field(ge=0, le=254)
    min_ink_fraction: float = Field(ge=0, le=1)

    @model_validator(mode="after")
    def _bounds_ordered(self) -> ValidateParams:
        if self.class_share_min > self.class_share_max:
            raise ValueError("class_share_min must not exceed class_share_max")
        return self


class PreprocessParams(_Strict):
    val_fraction: float = Field(gt=0, lt=1)
    seed: int


class ModelParams(_Strict):
    architecture: Literal["seed_cnn", "digit_cnn"]
    filters: int = Field(ge=4, le=256)
    dropout: float = Field(ge=0, lt=1)
    augment_rotation: float = Field(ge=0, le=0.5)
    augment_shift: float = Field(ge=0, le=0.5)
    augment_zoom: float = Field(ge=0, le=0.5)


class TrainParams(_Strict):
    epochs: int = Field(ge=1)
    batch_size: int = Field(ge=1)
    learning_rate: float = Field(gt=0)
    lr_schedule: Literal["constant", "cosine"]
    strategy: Literal["default", "mirrored", "multi_worker_mirrored"]
    early_stopping_patience: int = Field(ge=1)
    seed: int
    deterministic: bool
    batchnorm_batches: int = Field(ge=0)
    steps_per_execution: int = Field(ge=1)
    tf_data_autotune: bool
    precision: Literal["auto", "float32", "bfloat16"]


class MlflowParams(_Strict):
    experiment: str = Field(min_length=1)
    registered_model: str = Field(min_length=1)
    http_retries: int = Field(ge=0, le=20)
    http_backoff_s: int = Field(ge=0)  # MLflow takes a whole number
    http_timeout_s: float = Field(gt=0)


class PromotionParams(_Strict):
    min_accuracy: float = Field(ge=0, le=1)
    alpha: float = Field(gt=0, lt=1)
    max_regression: float = Field(ge=0, le=1)


ServeRuntime = Literal["litert", "tensorflow"]
"""Where the server's model calls run (inference.serving_forward): LiteRT, TensorFlow Lite's
runtime, the network converted when it is loaded; or the Keras network's traced graph."""


class ServeParams(_Strict):
    host: str = Field(min_length=1)
    port: int = Field(ge=1, le=65535)
    reload_interval_s: float = Field(gt=0)
    max_upload_bytes: int = Field(gt=0)
    max_batch: int = Field(ge=1)
    max_request_pixels: int = Field(ge=784)
    decode_processes: int = Field(ge=0)
    batch_wait_ms: float = Field(ge=0, le=1000)
    batch_max_images: int = Field(ge=1)
    batch_calls_in_flight: int = Field(ge=1)
    workers: int = Field(ge=1)
    model_process: bool
    model_processes: int = Field(ge=1)
    yield_to_event_loop: bool
    model_threads: int = Field(ge=0)
    runtime: ServeRuntime
    split_images: int = Field(ge=0)
    max_connections: int = Field(ge=1)
    keep_alive_s: int = Field(ge=1)  # whole seconds: uvicorn's setting is an integer
    read_timeout_s: float = Field(gt=0)
    access_log: bool


class ImagingParams(_Strict):
    ink_contrast_share: float = Field(gt=0, lt=1)
    min_contrast: float = Field(gt=0, lt=1)
    max_pixels: int = Field(ge=784)
    working_side: int = Field(ge=28)


class InboxParams(_Strict):
    dir: str = Field(min_length=1)
    quarantine_dir: str = Field(min_length=1)
    max_batch_images: int = Field(ge=1)
    max_batch_bytes: int = Field(ge=1)
    settle_s: float = Field(ge=0)
    holdout_fraction: float = Field(ge=0, lt=1)
    holdout_seed: int = Field(ge=0)


class FeedbackParams(_Strict):
    database: str = Field(min_length=1)
    log_predictions: bool
    retention_days: float = Field(gt=0)
    flush_interval_s: float = Field(gt=0)
    queue_size: int = Field(ge=1)
    rate_limit: str = Field(min_length=1)  # checked by the server (serving.FeedbackAccess)
    confident_probability: float = Field(gt=0, le=1)
    hold_min_count: int = Field(ge=1)
    hold_share: float = Field(gt=0, le=1)


def _five_field_cron(value: str) -> str:
    """A cron expression with its five fields, else a ValueError that shows the expected form."""
    if len(value.split()) != 5:
        raise ValueError(f"expected a 5-field cron expression such as '0 3 * * *', got {value!r}")
    return value


CronExpression = Annotated[str, Field(min_length=1), AfterValidator(_five_field_cron)]


class ScheduleParams(_Strict):
    deployment: str = Field(min_length=1)
    cron: CronExpression
    timezone: str = Field(min_length=1)


class MonitorParams(_Strict):
    window_size: int = Field(ge=2)
    window_hours: float | None = Field(default=None, gt=0)
    min_window: int = Field(ge=2)
    max_rows: int = Field(ge=2)
    reference_size: int = Field(ge=2)
    seed: int
    embedding_components: int = Field(ge=1)
    embedding_threshold: float = Field(gt=0)
    statistic_threshold: float = Field(gt=0)
    class_mix_threshold: float = Field(gt=0)
    confidence_threshold: float = Field(gt=0)
    min_new_labels: int = Field(ge=1)
    min_labelled: int = Field(ge=1)
    min_live_accuracy: float = Field(ge=0, le=1)
    experiment: str = Field(min_length=1)
    deployment: str = Field(min_length=1)
    cron: CronExpression
    watch_interval_s: float = Field(gt=0)


class SweepParams(_Strict):
    method: Literal["grid", "random"]
    trials: int = Field(ge=1)
    seed: int
    workers: int = Field(ge=1)
    max_train_samples: int | None = Field(default=None, ge=100)
    epochs: int = Field(ge=1)
    space: dict[str, list[Any]]

    @field_validator("space")
    @classmethod
    def _known_keys(cls, space: dict[str, list[Any]]) -> dict[str, list[Any]]:
        for key, values in space.items():
            section, _, name = key.partition(".")
            if section not in ("model", "train") or not name:
                raise ValueError(f"sweep.space key {key!r} must be 'model.NAME' or 'train.NAME'")
            if not values:
                raise ValueError(f"sweep.space.{key} needs at least one value")
        return space


class Params(_Strict):
    data: DataParams
    validate_: ValidateParams = Field(alias="validate")
    preprocess: PreprocessParams
    model: ModelParams
    train: TrainParams
    mlflow: MlflowParams
    promotion: PromotionParams
    serve: ServeParams
    imaging: ImagingParams
    inbox: InboxParams
    feedback: FeedbackParams
    schedule: ScheduleParams
    monitor: MonitorParams
    sweep: SweepParams


def _format_errors(error: ValidationError, prefix: str = "") -> str:
    lines = []
    for item in error.errors():
        key = prefix + ".".join(str(part) for part in item["loc"])
        value = item.get("input")
        shown = "" if isinstance(value, dict) else f" (got {value!r})"
        lines.append(f"  {key}: {item['msg']}{shown}")
    return "\n".join(lines)


def read_yaml(text: str) -> object:
    """Parse YAML safely, with libyaml's C parser when PyYAML has it (ten times faster)."""
    return yaml.load(text, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))


def load_params(path: Path | None = None) -> Params:
    """Read and validate params.yaml; raise ConfigError naming each bad key."""
    path = path or paths().params
    try:
        raw = read_yaml(path.read_text())
    except FileNotFoundError as exc:
        raise ConfigError(f"{path}: file not found") from exc
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from exc
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping of sections at the top level")
    try:
        return Params.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(f"{path}: invalid parameters\n{_format_errors(exc)}") from exc


def with_settings(params: Params, section: str, **changes: object) -> Params:
    """The params with these settings of one section changed (options on the command line),
    checked as params.yaml is: ConfigError naming each bad value."""
    current = getattr(params, section)
    try:
        updated = type(current).model_validate({**current.model_dump(), **changes})
    except ValidationError as exc:
        raise ConfigError(
            f"invalid {section} setting\n{_format_errors(exc, prefix=section + '.')}"
        ) from None
    return params.model_copy(update={section: updated})


def find_root(start: Path | None = None) -> Path:
    """The project root: $DIGITFLOW_ROOT, else the nearest folder above cwd with params.yaml."""
    if os.environ.get(ROOT_ENV):
        return Path(os.environ[ROOT_ENV]).resolve()
    here = (start or Path.cwd()).resolve()
    for folder in (here, *here.parents):
        if (folder / PARAMS_FILE).is_file():
            return folder
    return here


@dataclass(frozen=True)
class Paths:
    """Every file and folder the pipeline reads or writes, relative to one root."""

    root: Path

    @property
    def params(self) -> Path:
        return self.root / PARAMS_FILE

    @property
    def data(self) -> Path:
        return self.root / "data"

    @property
    def raw(self) -> Path:
        return self.data / "mnist"

    @property
    def batches(self) -> Path:
        """Labelled batches admitted from the inbox (one .npz each, plus manifest.csv)."""
        return self.data / "batches"

    @property
    def manifest(self) -> Path:
        return self.batches / "manifest.csv"

    @property
    def data_dvc(self) -> Path:
        return self.root / "data.dvc"

    @property
    def artifacts(self) -> Path:
        return self.root / "artifacts"

    @property
    def processed(self) -> Path:
        return self.artifacts / "processed"

    @property
    def model_dir(self) -> Path:
        return self.artifacts / "model"

    @property
    def model_file(self) -> Path:
        return self.model_dir / "model.keras"

    @property
    def run_info(self) -> Path:
        return self.model_dir / "run.json"

    @property
    def reports(self) -> Path:
        return self.root / "reports"

    @property
    def validation_dir(self) -> Path:
        return self.reports / "validation"

    @property
    def validation_report(self) -> Path:
        return self.validation_dir / "report.json"

    @property
    def train_metrics(self) -> Path:
        return self.reports / "train_metrics.json"

    @property
    def history_csv(self) -> Path:
        return self.reports / "plots" / "history.csv"

    @property
    def eval_dir(self) -> Path:
        return self.reports / "evaluation"

    @property
    def eval_metrics(self) -> Path:
        return self.eval_dir / "metrics.json"

    @property
    def promotion_report(self) -> Path:
        return self.reports / "promotion.json"

    @property
    def model_card(self) -> Path:
        return self.reports / "model_card.md"

    @property
    def monitoring(self) -> Path:
        """What `digitflow monitor` writes: drift.json and drift.html."""
        return self.reports / "monitoring"

    @property
    def drift_json(self) -> Path:
        return self.monitoring / "drift.json"

    @property
    def drift_html(self) -> Path:
        return self.monitoring / "drift.html"

    @property
    def last_run(self) -> Path:
        """What the latest pipeline run did (written by the flow, also when it trained nothing)."""
        return self.reports / "last_run.json"

    def inbox(self, params: Params) -> Path:
        return self.root / params.inbox.dir

    def quarantine(self, params: Params) -> Path:
        return self.root / params.inbox.quarantine_dir

    @property
    def mlflow_dir(self) -> Path:
        return self.root / "mlflow"

    @property
    def default_tracking_uri(self) -> str:
        return f"sqlite:///{self.mlflow_dir / 'mlflow.db'}"

    @property
    def mlflow_artifacts(self) -> Path:
        return self.mlflow_dir / "artifacts"

    def prediction_db(self, params: Params) -> str:
        """The prediction log's SQLAlchemy URL: $DIGITFLOW_PREDICTION_DB, else the SQLite file
        of params (relative to the project)."""
        override = os.environ.get(PREDICTION_DB_ENV)
        if override:
            return override
        return f"sqlite:///{self.root / params.feedback.database}"

    def has_prediction_log(self, params: Params) -> bool:
        """Whether there is a prediction log to read: $DIGITFLOW_PREDICTION_DB is set, or the
        SQLite file of params exists (it is created when something is first served)."""
        return (
            bool(os.environ.get(PREDICTION_DB_ENV))
            or (self.root / params.feedback.database).exists()
        )


def paths(root: Path | None = None) -> Paths:
    """Paths under the given root, or under the discovered project root."""
    return Paths((root or find_root()).resolve())


def set_environment_defaults() -> None:
    """Quiet telemetry and pick fast TensorFlow/Prefect settings, unless the user set them; keep
    TensorFlow's load-time oneDNN notice off stderr (tfquiet)."""
    defaults = {
        "MLFLOW_DISABLE_TELEMETRY": "true",
        "DO_NOT_TRACK": "1",
        "GX_ANALYTICS_ENABLED": "false",
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "90",
        "PREFECT_RUNNER_POLL_FREQUENCY": "2",  # `digitflow deploy` picks up runs within 2 s
        "TF_ENABLE_ONEDNN_OPTS": "1",
        "TF_CPP_MIN_LOG_LEVEL": "2",
        "GIT_PYTHON_REFRESH": "quiet",
        "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
    }
    for key, value in defaults.items():
        os.environ.setdefault(key, value)
    tfquiet.install()  # TensorFlow's load-time oneDNN notice ignores TF_CPP_MIN_LOG_LEVEL
