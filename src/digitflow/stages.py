"""The pipeline's stages as Python functions, for running them inside one process.

`dvc repro` runs each stage as its own `digitflow STAGE` command. The Prefect flow runs the
same work through these functions instead, so TensorFlow, MLflow and the data are loaded once
per flow run rather than once per stage; `pipeline.run_stage_here` then records the stage in
dvc.lock exactly as `dvc repro` would. Each function fails the way its command does.
"""

from __future__ import annotations

from collections.abc import Callable

from .config import Params, Paths


class StageFailed(RuntimeError):
    """A stage's own check failed (such as the data failing validation)."""


def validate(paths: Paths, params: Params) -> str:
    """The Great Expectations gate over data/; fails when any expectation is not met."""
    from .validation import validate_data

    report = validate_data(paths, params)
    if not report.success:
        failed = "; ".join(outcome.describe() for outcome in report.failures)
        raise StageFailed(f"the dataset failed validation; training must not use it: {failed}")
    return f"{len(report.outcomes)} expectations met"


def preprocess(paths: Paths, params: Params) -> str:
    from .preprocess import preprocess as run_preprocess

    return f"split sizes {run_preprocess(paths, params)}"


def train(paths: Paths, params: Params) -> str:
    from .tracking import tracking_uri, unavailable_as_error
    from .train import train as run_train

    with unavailable_as_error(tracking_uri(paths)):
        result = run_train(paths, params)
    return (
        f"best val accuracy {result.best_val_accuracy:.4f} after {result.epochs_run} epochs "
        f"({result.seconds:.0f} s), MLflow run {result.run_id}"
    )


def evaluate(paths: Paths, params: Params) -> str:
    from .evaluate import evaluate as run_evaluate
    from .tracking import tracking_uri, unavailable_as_error

    with unavailable_as_error(tracking_uri(paths)):
        metrics = run_evaluate(paths, params)
    return f"test accuracy {metrics['test_accuracy']:.4f}"


def register(paths: Paths, params: Params) -> str:
    from .registry import register as run_register
    from .tracking import tracking_uri, unavailable_as_error

    with unavailable_as_error(tracking_uri(paths)):
        decision = run_register(paths, params)
    verdict = "promoted to champion" if decision.promoted else "not promoted"
    return f"version {decision.challenger_version} {verdict}: {decision.reason}"


STAGE_FUNCTIONS: dict[str, Callable[[Paths, Params], str]] = {
    "validate": validate,
    "preprocess": preprocess,
    "train": train,
    "evaluate": evaluate,
    "register": register,
}
