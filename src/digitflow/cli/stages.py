"""Pipeline commands: ingest, one command per registered stage (what `dvc repro` runs), and
`run`, the whole pipeline as a Prefect flow."""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Annotated

import typer
from rich.markup import escape

from .. import stages
from ..config import SOURCE_ENV, Paths
from ..console import console
from .common import RootOption, fail, load_flow, reported, setup

PANEL = "Pipeline"
app = typer.Typer()


@app.command(rich_help_panel=PANEL)
def ingest(
    source: Annotated[
        str | None,
        typer.Option(
            help=(
                "A mirror URL, local folder or file:// URL (comma-separate several to try in "
                f"order). Default: ${SOURCE_ENV}, else the mirrors in params.yaml."
            )
        ),
    ] = None,
    force: Annotated[
        bool, typer.Option(help="Fetch again even if data/ is already verified.")
    ] = False,
    dvc: Annotated[
        bool, typer.Option(help="Record data/ with `dvc add` and push it to the DVC remote.")
    ] = True,
    root: RootOption = None,
) -> None:
    """Fetch MNIST's four archives, verify their sha256 and IDX structure, land them in data/."""
    from ..console import download_progress
    from ..ingest import ingest_and_record

    project, params = setup(root)
    console.print(f"[bold]ingest[/] from {source or os.environ.get(SOURCE_ENV) or 'the mirrors'}")
    started = time.perf_counter()
    with reported(), download_progress() as progress_for:
        outcome = ingest_and_record(project, params, source, force, progress_for, record=dvc)
    for line in outcome.lines():
        console.print(f"  {escape(line)}")
    console.print(f"[green]ingest done[/] in {time.perf_counter() - started:.1f} s")


def stage_command(name: str) -> Callable[..., None]:
    """The `digitflow NAME` command: run the registered stage and print what it reports."""

    def command(root: RootOption = None) -> None:
        project, params = setup(root)
        started = time.perf_counter()
        with reported():
            result = stages.run(name, project, params)
        console.print(
            f"[bold]{name}[/] {escape(result.summary)} ({time.perf_counter() - started:.1f} s)"
        )
        for line in result.details:
            console.print(f"  {escape(line)}")

    command.__doc__ = stages.get(name).help
    command.__name__ = name
    return command


for _stage in stages.STAGES.values():
    app.command(name=_stage.name, rich_help_panel=PANEL)(stage_command(_stage.name))


@app.command(rich_help_panel=PANEL)
def run(
    source: Annotated[
        str | None,
        typer.Option(help=f"MNIST source for ingest (default: ${SOURCE_ENV}, else the mirrors)."),
    ] = None,
    force: Annotated[bool, typer.Option(help="Rerun every stage even if nothing changed.")] = False,
    wait: Annotated[
        bool,
        typer.Option(help="If another run is in progress, wait for it (--no-wait: skip this run)."),
    ] = True,
    root: RootOption = None,
) -> None:
    """Run the whole pipeline as a Prefect flow (flows/pipeline.py) and print a summary."""
    project, _ = setup(root)
    module = load_flow(project, "pipeline")
    started = time.perf_counter()
    with without_heartbeats():
        state = module.mnist_pipeline(
            root=str(project.root),
            source=source or os.environ.get(SOURCE_ENV),
            force=force,
            wait=wait,
            return_state=True,
        )
    elapsed = time.perf_counter() - started
    if not state.is_completed():
        fail(f"the pipeline flow ended {state.name}: {state.message or ''}".strip())
    summary = state.result()
    if summary.get("skipped"):
        console.print(f"[yellow]skipped:[/] {escape(summary['skipped'])}")
        return
    print_summary(summary, elapsed, project)


@contextmanager
def without_heartbeats() -> Iterator[None]:
    """Prefect settings for a run started by hand: no flow-run heartbeats. They exist so a
    server can mark a crashed deployment run (schedule, worker) as crashed, and those keep them;
    the person at the terminal sees a crash. Prefect stops its heartbeat thread only at its next
    one-second tick, which added up to a second to every run's end. The current settings with
    that one value changed: Prefect's `temporary_settings` reads every settings source again
    (0.05 s)."""
    from prefect.context import SettingsContext
    from prefect.settings import get_current_settings

    settings = get_current_settings()
    flows = settings.flows.model_copy(update={"heartbeat_frequency": None})
    with SettingsContext(
        profile=SettingsContext.get().profile, settings=settings.model_copy(update={"flows": flows})
    ):
        yield


def print_summary(summary: dict, elapsed: float, project: Paths) -> None:
    """The end-of-run summary of `digitflow run`."""
    from ..tracking import tracking_uri

    accuracy = summary.get("test_accuracy")
    console.print()
    console.print(f"[bold green]pipeline finished[/] in {elapsed:.0f} s")
    console.print(f"  data.dvc md5      {summary.get('data_hash')}")
    corrections = summary.get("corrections") or {}
    if corrections.get("exported") or corrections.get("held") or corrections.get("skipped"):
        console.print(
            f"  corrections       {corrections.get('exported', 0)} exported, "
            f"{corrections.get('held', 0)} held back for review, "
            f"{corrections.get('skipped', 0)} skipped"
        )
    for batch in summary.get("batches") or []:
        verdict = "[green]admitted[/]" if batch["accepted"] else "[red]quarantined[/]"
        if batch.get("deferred"):
            verdict = "[yellow]left in the inbox[/]"
        console.print(
            f"  inbox batch       {escape(batch['source'])}: {batch['count']} images {verdict} "
            f"({escape(batch['reason'])})"
        )
    if summary.get("up_to_date"):
        console.print("  stages run        none: up to date (no new data, params or code)")
    else:
        console.print(
            f"  stages run        {', '.join(summary.get('stages_run') or []) or 'none (up to date)'}"
        )
    console.print(f"  MLflow run id     {summary.get('run_id')}")
    console.print(
        f"  test accuracy     {accuracy:.4f}" if accuracy is not None else "  test accuracy     n/a"
    )
    console.print(
        f"  promotion         {summary.get('decision')}: {escape(str(summary.get('reason')))}"
    )
    console.print(f"  champion version  {summary.get('champion_version')}")
    console.print(
        f"  MLflow UI         make ui  (mlflow ui --backend-store-uri {tracking_uri(project)} "
        "--host 127.0.0.1), then http://127.0.0.1:5000"
    )
