"""The `digitflow` command line: one subcommand per pipeline stage, plus registry tools."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape

from .config import (
    SOURCE_ENV,
    ConfigError,
    Params,
    Paths,
    load_params,
    paths,
    set_environment_defaults,
)
from .console import console

set_environment_defaults()

app = typer.Typer(
    help=(
        "MNIST digit recognition that ingests, validates, trains, tracks and promotes itself.\n\n"
        "Stages (run in this order by `digitflow run` and by `dvc repro`): "
        "ingest -> validate -> preprocess -> train -> evaluate -> register."
    ),
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

RootOption = Annotated[
    Path | None,
    typer.Option("--root", help="Project root (default: nearest folder with params.yaml)."),
]


def _setup(root: Path | None) -> tuple[Paths, Params]:
    project = paths(root)
    try:
        return project, load_params(project.params)
    except ConfigError as exc:
        _fail(str(exc))


def _fail(message: str, code: int = 1) -> None:
    console.print(f"[bold red]error:[/] {escape(message)}")
    raise typer.Exit(code)


@app.command()
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
    from .idx import IdxError
    from .ingest import IngestError
    from .ingest import ingest as run_ingest
    from .sources import resolve_sources
    from .versioning import data_hash, push_data, track_data

    project, params = _setup(root)
    sources = resolve_sources(source or os.environ.get(SOURCE_ENV), params.data.mirrors)
    console.print(f"[bold]ingest[/] from {', '.join(map(str, sources))}")
    started = time.perf_counter()
    from .console import download_progress

    try:
        with download_progress() as progress_for:
            summary = run_ingest(project, params.data, sources, force, progress_for)
    except (IngestError, IdxError) as exc:
        _fail(f"{exc}\ndata/ was left unchanged.")
    committed = data_hash(project)
    console.print(
        f"  {'fetched from ' + summary.source if summary.fetched else 'already present and verified'}"
        f"; train={summary.counts['train']:,} test={summary.counts['test']:,} images"
    )
    if dvc:
        new_hash = track_data(project)
        pushed = push_data(project)
        state = "unchanged" if new_hash == committed else f"changed (was {committed})"
        console.print(f"  DVC: data.dvc md5 {new_hash} ({state}); pushed {pushed} file(s)")
    console.print(f"[green]ingest done[/] in {time.perf_counter() - started:.1f} s")


@app.command()
def validate(root: RootOption = None) -> None:
    """Run the Great Expectations suite over data/; write a JSON report and Data Docs."""
    from .idx import IdxError
    from .validation import validate_data

    project, params = _setup(root)
    started = time.perf_counter()
    try:
        report = validate_data(project, params)
    except IdxError as exc:
        _fail(str(exc))
    rows = report.stats["rows"]
    passed = sum(o.success for o in report.outcomes)
    console.print(
        f"[bold]validate[/] {rows.get('train', 0):,} train + {rows.get('test', 0):,} test images: "
        f"{passed}/{len(report.outcomes)} expectations met "
        f"({time.perf_counter() - started:.1f} s)"
    )
    console.print(f"  report: {project.validation_report}")
    console.print(f"  Data Docs: {project.validation_dir / 'data_docs' / 'index.html'}")
    if not report.success:
        for outcome in report.failures:
            console.print(f"  [red]FAILED[/] {escape(outcome.describe())}")
        _fail("the dataset failed validation; training must not use it")
    console.print("[green]validation passed[/]")


def main() -> None:
    """Entry point for `python -m digitflow`."""
    app()


if __name__ == "__main__":
    sys.exit(main())
