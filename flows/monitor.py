"""The monitoring flow: watch what users send, and start retraining on evidence.

Runs `digitflow monitor` (drift checks and live accuracy on the prediction log), publishes the
verdict as Prefect artifacts, sends `digitflow.drift.detected` when it found drift, and starts
the retraining deployment when corrections wait (monitor.min_new_labels), drift was found, or
live accuracy fell below monitor.min_live_accuracy. The reasons go to the retraining run as its
`trigger` parameter (kept in reports/last_run.json) and as tags.

    python flows/monitor.py            # one run, here, without starting anything
"""

from __future__ import annotations

import sys
from pathlib import Path

from digitflow.config import load_params, paths, set_environment_defaults

set_environment_defaults()

from prefect import flow, get_run_logger, task  # noqa: E402
from prefect.cache_policies import NO_CACHE  # noqa: E402

from digitflow import events, feedback, monitoring  # noqa: E402

PIPELINE_FLOW = "digitflow-pipeline"
SUMMARY_ARTIFACT = "digitflow-drift-summary"
CHECKS_ARTIFACT = "digitflow-drift-checks"
# Reasons that ask for a retrain even when no new data arrived (the same data may give the same
# model; the promotion policy then keeps the champion).
FORCING = (monitoring.DRIFT, monitoring.LIVE_ACCURACY)


@task(name="monitor", cache_policy=NO_CACHE)
def check_inputs(root: str) -> dict:
    """Drift checks and live accuracy; writes reports/monitoring/ and a monitoring MLflow run."""
    project = paths(Path(root))
    verdict = monitoring.monitor(project, load_params(project.params))
    logger = get_run_logger()
    for line in verdict.lines():
        logger.info(line)
    return verdict.to_dict()


@task(name="publish", cache_policy=NO_CACHE)
def publish(root: str, verdict: dict) -> None:
    """The verdict as a Markdown summary and the checks as a table, in the Prefect UI."""
    from prefect.artifacts import create_markdown_artifact, create_table_artifact

    project = paths(Path(root))
    create_markdown_artifact(
        markdown=monitoring.summary_markdown(verdict, project),
        key=SUMMARY_ARTIFACT,
        description="Drift verdict, live accuracy and the retraining decision",
    )
    create_table_artifact(
        table=monitoring.checks_table(verdict), key=CHECKS_ARTIFACT, description="Drift checks"
    )


@task(name="start retraining", cache_policy=NO_CACHE)
def start_retraining(root: str, reasons: list[str], deployment: str) -> str:
    """Create a run of the retraining deployment (it does not wait for it); returns its id."""
    from prefect.deployments import run_deployment

    flow_run = run_deployment(
        name=f"{PIPELINE_FLOW}/{deployment}",
        parameters={
            "root": root,
            "trigger": f"monitor: {', '.join(reasons)}",
            "force": any(reason in FORCING for reason in reasons),
        },
        timeout=0,
        tags=[f"retrain:{reason}" for reason in reasons],
    )
    return str(flow_run.id)


@flow(name="digitflow-monitor", log_prints=True)
def monitor_inputs(root: str = ".", retrain_deployment: str | None = None) -> dict:
    """Check the logged inputs for drift and live accuracy; start the retraining deployment
    (default: schedule.deployment) when the evidence asks for it. Returns the verdict with
    `retraining_run`, the id of the run it started (None: none). Before anything was served
    there is nothing to check: the run says so and succeeds."""
    root = str(Path(root).resolve())
    project = paths(Path(root))
    params = load_params(project.params)
    logger = get_run_logger()
    if feedback.log_engine(project, params) is None:
        logger.warning("nothing to monitor: nothing was served yet (no prediction log)")
        return {"note": "nothing served yet", "retrain_reasons": [], "retraining_run": None}
    verdict = check_inputs(root)
    publish(root, verdict)
    if verdict["drift_detected"]:
        events.emit(
            events.DRIFT_DETECTED,
            project,
            {"checks": verdict["drifted_checks"], "champion": verdict["champion_version"]},
        )
    reasons = verdict["retrain_reasons"]
    started = None
    if reasons:
        started = start_retraining(root, reasons, retrain_deployment or params.schedule.deployment)
        logger.info("retraining started (%s): flow run %s", ", ".join(reasons), started)
    else:
        logger.info("no reason to retrain")
    return {**verdict, "retraining_run": started}


DESCRIPTION = "Check the logged inputs for drift and live accuracy; retrain on evidence."


def deployment(root: str, name: str, cron: str, timezone: str, retrain_deployment: str):
    """The monitoring flow as a deployment on its own schedule, one run at a time."""
    from prefect.schedules import Cron

    return monitor_inputs.to_deployment(
        name=name,
        schedule=Cron(cron, timezone=timezone),
        parameters={"root": str(Path(root).resolve()), "retrain_deployment": retrain_deployment},
        concurrency_limit=1,
        description=DESCRIPTION,
        tags=["digitflow", "monitoring"],
    )


if __name__ == "__main__":
    project = paths(Path("."))
    print("\n".join(monitoring.monitor(project, load_params(project.params)).lines()))
    sys.exit(0)
