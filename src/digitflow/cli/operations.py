"""Operations: scheduled and event-driven retraining on a Prefect server, drift monitoring,
sweeps on Dask, a tracking server."""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape

from ..config import paths, with_settings
from ..console import console
from .common import RootOption, configured, fail, load_flow, reported, setup

PANEL = "Operations"
app = typer.Typer()


@app.command(rich_help_panel=PANEL)
def deploy(
    cron: Annotated[
        str | None, typer.Option(help="Cron schedule (default: schedule.cron).")
    ] = None,
    name: Annotated[
        str | None, typer.Option(help="Deployment name (default: schedule.deployment).")
    ] = None,
    work_pool: Annotated[
        str | None,
        typer.Option(
            help="Register on this work pool and return; `prefect worker start --pool NAME` runs it "
            "(the inbox watcher then does not run: start `digitflow deploy` without it for that)."
        ),
    ] = None,
    root: RootOption = None,
) -> None:
    """Retraining, monitoring and the inbox watcher, on the Prefect server in $PREFECT_API_URL.

    - digitflow-pipeline/NAME retrains on its cron (schedule.cron) and within seconds of a
      batch landing in the inbox (a `digitflow.inbox.batch-landed` event and its trigger);
    - digitflow-monitor/NAME (monitor.deployment, monitor.cron) checks the logged inputs
      and starts the retraining deployment on evidence: new corrections, drift, live accuracy;
    - the inbox watcher sends the event when a batch settles in the inbox.

    Without --work-pool this process serves the runs until stopped (Ctrl-C pauses the
    schedules). Start a run by hand with `prefect deployment run digitflow-pipeline/NAME`;
    runs queue one at a time.
    """
    from ..events import InboxWatcher, inbox_trigger
    from ..scheduling import require_server

    project, params = setup(root)
    with reported():
        api_url = require_server()
    settings, watch = params.schedule, params.monitor
    pipeline_flow = load_flow(project, "pipeline")
    monitor_flow = load_flow(project, "monitor")
    deployment_name = name or settings.deployment
    schedule = cron or settings.cron
    triggers = [inbox_trigger(project)]
    console.print(
        f"deployment [bold]digitflow-pipeline/{deployment_name}[/] on {api_url}: "
        f"cron '{schedule}' ({settings.timezone}) and inbox events, one run at a time"
    )
    if work_pool:
        deployment_id = pipeline_flow.deploy_to_pool(
            str(project.root), deployment_name, schedule, settings.timezone, work_pool, triggers
        )
        console.print(
            f"registered on work pool '{work_pool}' (id {deployment_id}); start a worker with "
            f"`prefect worker start --pool {work_pool}`"
        )
        return
    console.print(
        f"deployment [bold]digitflow-monitor/{watch.deployment}[/]: cron '{watch.cron}' "
        f"({settings.timezone}); retrains on {watch.min_new_labels}+ corrections, drift, or live "
        f"accuracy under {watch.min_live_accuracy}"
    )
    console.print(
        f"watching {project.inbox(params)} every {watch.watch_interval_s:g} s for new batches"
    )
    from prefect import serve

    watcher = InboxWatcher(project, params)
    watcher.start()
    try:
        serve(
            pipeline_flow.deployment(
                str(project.root), deployment_name, schedule, settings.timezone, triggers
            ),
            monitor_flow.deployment(
                str(project.root), watch.deployment, watch.cron, settings.timezone, deployment_name
            ),
            print_starting_message=True,
        )
    finally:
        watcher.stop()


@app.command(rich_help_panel=PANEL)
def monitor(
    window: Annotated[
        int | None,
        typer.Option(
            help="Look at the last this many logged predictions (default: monitor.window_size)."
        ),
    ] = None,
    hours: Annotated[
        float | None,
        typer.Option(
            help="Only predictions of the last this many hours (default: monitor.window_hours)."
        ),
    ] = None,
    mlflow_run: Annotated[
        bool, typer.Option("--mlflow/--no-mlflow", help="Log a monitoring run to MLflow.")
    ] = True,
    as_json: Annotated[
        bool, typer.Option("--json", help="Print drift.json instead of a summary.")
    ] = False,
    root: RootOption = None,
) -> None:
    """Compare recent logged inputs with the champion's training data (embeddings, image
    statistics, predicted-class mix, confidence) and report live accuracy.

    Writes reports/monitoring/drift.json and drift.html (opens offline), and logs both to a
    monitoring run in MLflow tagged with the champion version. It only reports: the monitoring
    deployment (`digitflow deploy`) is what starts retraining on the evidence.
    """
    from .. import monitoring

    project, params = configured(root)
    changes = {"window_size": window, "window_hours": hours}
    changes = {key: value for key, value in changes.items() if value is not None}
    with reported():
        params = with_settings(params, "monitor", **changes)
    with console.status("checking the logged inputs against the training data ..."), reported():
        verdict = monitoring.monitor(project, params, log_to_mlflow=mlflow_run)
    if as_json:
        print(json.dumps(verdict.to_dict(), indent=2))
        return
    for line in verdict.lines():
        console.print(line, highlight=False)
    console.print(f"report: {project.drift_html}\n        {project.drift_json}")
    if verdict.mlflow_run_id:
        console.print(
            f"MLflow run {verdict.mlflow_run_id} (experiment {params.monitor.experiment})"
        )


@app.command(rich_help_panel=PANEL)
def sweep(
    workers: Annotated[
        int | None, typer.Option(min=1, help="Local Dask workers (default: sweep.workers).")
    ] = None,
    dask_address: Annotated[
        str | None,
        typer.Option(help="Use an existing Dask cluster, e.g. tcp://10.0.0.5:8786."),
    ] = None,
    trials: Annotated[
        int | None, typer.Option(min=1, help="Random draws (default: sweep.trials).")
    ] = None,
    root: RootOption = None,
) -> None:
    """Hyper-parameter sweep over sweep.space on Dask; the best trial may become champion.

    Trials run in parallel, each an MLflow child run; the best on the validation set is scored
    on the test set, registered and put through the promotion policy. Trials are cheap by
    default (sweep.max_train_samples images, sweep.epochs epochs).
    """
    project, params = setup(root)
    settings = params.sweep
    module = load_flow(project, "sweep")
    subset = settings.max_train_samples or "all"
    console.print(
        f"[bold]sweep[/] {settings.method}, {trials or settings.trials} trials on "
        f"{dask_address or f'{workers or settings.workers} local Dask workers'}; "
        f"cheap trials: {subset} training images, {settings.epochs} epochs each"
    )
    started = time.perf_counter()
    flow = module.sweep_flow(workers or settings.workers, dask_address)
    state = flow(root=str(project.root), trials=trials, return_state=True)
    if not state.is_completed():
        fail(f"the sweep ended {state.name}: {state.message or ''}".strip())
    outcome = state.result()
    console.print(f"[bold green]sweep finished[/] in {time.perf_counter() - started:.0f} s")
    for trial in sorted(outcome["trials"], key=lambda t: -t["val_accuracy"]):
        marker = "*" if trial["run_id"] == outcome["best"]["run_id"] else " "
        console.print(
            f" {marker} val {trial['val_accuracy']:.4f}  {trial['overrides']}  ({trial['seconds']:.0f} s)"
        )
    console.print(
        f"best trial -> version {outcome['version']}, test accuracy {outcome['test_accuracy']:.4f}: "
        f"{outcome['decision']} ({escape(outcome['reason'])}); comparison in {outcome['summary_csv']}"
    )


@app.command("tracking-server", rich_help_panel=PANEL)
def tracking_server(
    backend_store_uri: Annotated[
        str,
        typer.Option(
            envvar="DIGITFLOW_TRACKING_BACKEND_URI",
            help="Where runs and the registry live (PostgreSQL; keep passwords in the env var).",
        ),
    ] = "postgresql://mlflow@127.0.0.1:5432/mlflow",
    artifacts_destination: Annotated[
        Path | None,
        typer.Option(help="Where the server stores artifacts (default: mlflow/served-artifacts)."),
    ] = None,
    host: Annotated[str, typer.Option(help="Interface to bind.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=1, max=65535, help="Port.")] = 5000,
    root: RootOption = None,
) -> None:
    """An MLflow tracking server on PostgreSQL with served artifacts (runs until stopped).

    Point the pipeline at it with MLFLOW_TRACKING_URI=http://HOST:PORT.
    """
    from ..addresses import check_address

    with reported():
        check_address(host, port)  # before mlflow migrates the store and then finds the port taken
    project = paths(root)
    destination = artifacts_destination or project.mlflow_dir / "served-artifacts"
    destination.mkdir(parents=True, exist_ok=True)
    own_mlflow = Path(sys.executable).parent / "mlflow"
    command = [
        str(own_mlflow) if own_mlflow.is_file() else "mlflow",
        "server",
        "--backend-store-uri",
        backend_store_uri,
        "--serve-artifacts",
        "--artifacts-destination",
        str(destination.resolve()),
        "--host",
        host,
        "--port",
        str(port),
    ]
    console.print(
        f"MLflow tracking server on http://{host}:{port} (export MLFLOW_TRACKING_URI=http://{host}:{port})"
    )
    os.execvp(command[0], command)
