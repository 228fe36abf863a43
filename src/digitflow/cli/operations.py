"""Operations: scheduled retraining on a Prefect server, sweeps on Dask, a tracking server."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape

from ..config import paths
from ..console import console
from .common import RootOption, fail, load_flow, reported, setup

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
            help="Register on this work pool and return; `prefect worker start --pool NAME` runs it."
        ),
    ] = None,
    root: RootOption = None,
) -> None:
    """Serve the pipeline as a scheduled Prefect deployment on the server in $PREFECT_API_URL.

    Without --work-pool this process serves the runs until stopped (Ctrl-C pauses the
    schedule). Trigger a run by hand with `prefect deployment run digitflow-pipeline/NAME`;
    runs queue one at a time.
    """
    from ..scheduling import require_server

    project, params = setup(root)
    with reported():
        api_url = require_server()
    settings = params.schedule
    module = load_flow(project, "pipeline")
    deployment_name = name or settings.deployment
    schedule = cron or settings.cron
    console.print(
        f"deployment [bold]digitflow-pipeline/{deployment_name}[/] on {api_url}: "
        f"cron '{schedule}' ({settings.timezone}), one run at a time"
    )
    if work_pool:
        deployment_id = module.deploy_to_pool(
            str(project.root), deployment_name, schedule, settings.timezone, work_pool
        )
        console.print(
            f"registered on work pool '{work_pool}' (id {deployment_id}); start a worker with "
            f"`prefect worker start --pool {work_pool}`"
        )
        return
    module.serve_deployment(str(project.root), deployment_name, schedule, settings.timezone)


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
    port: Annotated[int, typer.Option(help="Port.")] = 5000,
    root: RootOption = None,
) -> None:
    """An MLflow tracking server on PostgreSQL with served artifacts (runs until stopped).

    Point the pipeline at it with MLFLOW_TRACKING_URI=http://HOST:PORT.
    """
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
