"""The Prefect flow: ingest -> feedback -> inbox -> validate -> preprocess -> train -> evaluate
-> register.

Thin wiring only. Each stage after ingest is a DVC stage (dvc.yaml): DVC decides whether it
changed, the flow runs its work in this one process (TensorFlow and MLflow load once), and
DVC records it in dvc.lock, so unchanged stages are skipped whichever door started the run.

    python flows/pipeline.py            # same as `digitflow run`
"""

from __future__ import annotations

import sys
from pathlib import Path

from digitflow.config import load_params, paths, set_environment_defaults

set_environment_defaults()

# NO_CACHE: the tasks write data/, dvc.lock and MLflow, so they are never cached (nor their
# inputs hashed to try).
from prefect import flow, get_run_logger, task  # noqa: E402
from prefect.cache_policies import NO_CACHE  # noqa: E402

from digitflow import inbox, locking, pipeline, stages  # noqa: E402
from digitflow import ingest as ingestion  # noqa: E402


@task(name="ingest", cache_policy=NO_CACHE, retries=2, retry_delay_seconds=5)
def ingest_data(root: str, source: str | None) -> str | None:
    """Fetch and verify MNIST into data/, then record it with DVC; returns the data hash."""
    project = paths(Path(root))
    outcome = ingestion.ingest_and_record(project, load_params(project.params), source)
    logger = get_run_logger()
    for line in outcome.lines():
        logger.info("ingest: %s", line)
    return outcome.recorded.data_hash if outcome.recorded else None


@task(name="feedback", cache_policy=NO_CACHE)
def export_corrections(root: str) -> dict:
    """Write the corrections users sent since the last run as one inbox batch (suspicious ones
    are held back in quarantine for review)."""
    project = paths(Path(root))
    params = load_params(project.params)
    if not project.has_prediction_log(params):
        return {}
    from digitflow import feedback  # here: SQLAlchemy's import is 0.14 s that a no-op skips

    outcome = feedback.export_pending(feedback.log_engine(project, params), project, params)
    for line in outcome.lines():
        get_run_logger().info("feedback: %s", line)
    return outcome.to_dict()


@task(name="settle corrections", cache_policy=NO_CACHE)
def settle_corrections(root: str) -> dict[str, int]:
    """Mark exported corrections by what the inbox did with their batch."""
    project = paths(Path(root))
    params = load_params(project.params)
    if not project.has_prediction_log(params):
        return {}
    from digitflow import feedback

    moved = feedback.reconcile(feedback.log_engine(project, params), project, params)
    if any(moved.values()):
        get_run_logger().info("corrections: %s", moved)
    return moved


@task(name="inbox", cache_policy=NO_CACHE)
def admit_batches(root: str) -> list[dict]:
    """Check every batch in the inbox: append good ones to data/ (a new DVC version), quarantine
    bad ones. Returns what happened to each."""
    logger = get_run_logger()
    project = paths(Path(root))
    admissions, recorded = inbox.admit_and_record(project, load_params(project.params))
    for admission in admissions:
        if admission.accepted:
            logger.info(
                "batch %s: %d images %s", admission.source, admission.count, admission.reason
            )
        elif admission.deferred:
            logger.info("batch %s: %s", admission.source, admission.reason)
        else:
            logger.warning("batch %s quarantined: %s", admission.source, admission.reason)
    if recorded:
        logger.info("data/ is now version %s (pushed to the DVC remote)", recorded.data_hash)
    return [admission.to_dict() for admission in admissions]


@task(name="stage", cache_policy=NO_CACHE)
def run_stage(root: str, stage: str, force: bool = False) -> bool:
    """Run one stage of dvc.yaml in this process if DVC says it changed, and record it in
    dvc.lock; returns whether it ran (False: up to date, skipped)."""
    outcome = pipeline.run_stage_here(paths(Path(root)), stage, force=force)
    logger = get_run_logger()
    logger.info("stage %s: %s", stage, outcome.summary if outcome else "up to date, skipped")
    return outcome is not None


def started_by() -> str:
    """Why a run without an explicit trigger started: its deployment's cron schedule, a run
    created through the deployment (UI, API, `prefect deployment run`), or by hand."""
    from prefect.client.orchestration import get_client
    from prefect.runtime import deployment, flow_run

    if not deployment.id:
        return "by hand"
    with get_client(sync_client=True) as client:
        scheduled = client.read_flow_run(flow_run.id).auto_scheduled
    return f"schedule ({deployment.name})" if scheduled else f"deployment run ({deployment.name})"


SUMMARY_ARTIFACT = "digitflow-run-summary"
PER_CLASS_ARTIFACT = "digitflow-per-class-metrics"


@task(name="publish", cache_policy=NO_CACHE)
def publish_artifacts(root: str) -> None:
    """The run's summary (data version, accuracies, the decision with its p-value, links to the
    MLflow run and version) and per-class metrics, as artifacts in the Prefect UI."""
    from prefect.artifacts import create_markdown_artifact, create_table_artifact

    from digitflow import card  # here, not at the top: only a run that registered needs it

    project = paths(Path(root))
    summary, per_class = card.run_artifacts(project, load_params(project.params))
    create_markdown_artifact(
        markdown=summary, key=SUMMARY_ARTIFACT, description="What this run trained and decided"
    )
    create_table_artifact(
        table=per_class, key=PER_CLASS_ARTIFACT, description="Per-class metrics of each slice"
    )


@flow(name="digitflow-pipeline", log_prints=True)
def mnist_pipeline(
    root: str = ".",
    source: str | None = None,
    force: bool = False,
    wait: bool = True,
    trigger: str | None = None,
) -> dict:
    """Ingest, validate, preprocess, train, evaluate and register; returns a summary.

    `trigger` says why the run started (an inbox event, the monitor's reasons); it is kept in
    reports/last_run.json. A scheduled run without one records the schedule.

    Corrections users sent are exported to the inbox first, and new inbox batches admitted.
    When nothing changed since the last successful run (data, params, code), nothing is
    trained, unless force=True. A run that registered a version publishes its summary and
    per-class metrics as Prefect artifacts. One run at a time per
    project: a second run waits for the first (or, with wait=False, is skipped with a message)."""
    root = str(Path(root).resolve())
    logger = get_run_logger()
    trigger = trigger or started_by()
    logger.info("started by: %s", trigger)
    try:
        with locking.pipeline_lock(Path(root), wait_s=None if wait else 0):
            project = paths(Path(root))
            ingest_data.with_options(task_run_name="ingest")(root, source)
            corrections = export_corrections(root)
            batches = admit_batches(root)
            corrections["settled"] = settle_corrections(root)
            nothing_new = not force and pipeline.up_to_date(project)
            ran = []
            if nothing_new:
                logger.info("up to date: no new data, params or code since the last run")
            else:
                for stage in stages.NAMES:
                    if run_stage.with_options(task_run_name=stage)(root, stage, force):
                        ran.append(stage)
                if "register" in ran:
                    publish_artifacts(root)
            summary = pipeline.summarise(project, ran)
            summary = pipeline.finish(
                project, summary, batches, nothing_new, corrections, trigger
            ).to_dict()
    except locking.PipelineBusy as busy:
        logger.warning("skipped: %s", busy)
        return pipeline.skipped(str(busy)).to_dict()
    logger.info("summary: %s", summary)
    return summary


def _schedule(cron: str, timezone: str):
    from prefect.schedules import Cron

    return Cron(cron, timezone=timezone)


DESCRIPTION = "Retrain when new data, params or code arrived; promote if better."


def deployment(root: str, name: str, cron: str, timezone: str, triggers: list | None = None):
    """The pipeline as a deployment: cron schedule, event triggers, one run at a time (later
    ones queue)."""
    return mnist_pipeline.to_deployment(
        name=name,
        schedule=_schedule(cron, timezone),
        parameters={"root": str(Path(root).resolve())},
        concurrency_limit=1,
        description=DESCRIPTION,
        tags=["digitflow"],
        triggers=triggers,
    )


def deploy_to_pool(
    root: str, name: str, cron: str, timezone: str, work_pool: str, triggers: list | None = None
) -> str:
    """Register the deployment on a work pool; its workers run the flow from this checkout."""
    checkout = str(Path(root).resolve())
    source = mnist_pipeline.from_source(
        source=checkout, entrypoint="flows/pipeline.py:mnist_pipeline"
    )
    deployment_id = source.deploy(
        name=name,
        work_pool_name=work_pool,
        schedule=_schedule(cron, timezone),
        parameters={"root": checkout},
        concurrency_limit=1,
        description=DESCRIPTION,
        tags=["digitflow"],
        triggers=triggers,
        print_next_steps=False,
    )
    return str(deployment_id)


if __name__ == "__main__":
    import os

    result = mnist_pipeline(root=".", source=os.environ.get("DIGITFLOW_MNIST_SOURCE"))
    print(result)
    sys.exit(0)
