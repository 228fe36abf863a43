"""Corrections: what the prediction log holds, and exporting corrections as training data."""

from __future__ import annotations

import json
from typing import Annotated

import typer

from ..console import console
from .common import RootOption, fail, reported, setup

PANEL = "Corrections and the prediction log"
app = typer.Typer()
feedback_app = typer.Typer(
    help="Corrections users sent (POST /feedback, the drawing page): counts, live accuracy of "
    "each model version, and export as training data.",
    invoke_without_command=True,
    no_args_is_help=False,
)
app.add_typer(feedback_app, name="feedback", rich_help_panel=PANEL)


@feedback_app.callback()
def feedback(
    ctx: typer.Context,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of tables.")] = False,
    root: RootOption = None,
) -> None:
    """Counts of predictions and corrections (pending, exported, held, ... and by digit), and the
    live accuracy of each model version on the predictions users corrected."""
    if ctx.invoked_subcommand is not None:
        ctx.obj = root
        return
    from ..feedback import log_engine, status

    project, params = setup(root)
    with reported():
        engine = log_engine(project, params)
    if engine is None:
        fail(
            f"no prediction log at {project.prediction_db(params)} yet "
            "(`digitflow serve` creates it with its first answer)"
        )
    with reported():
        found = status(engine)
    if as_json:
        print(json.dumps(found.__dict__, indent=2))
        return
    _print_status(found, project.prediction_db(params))


def _print_status(found, where: str) -> None:
    from rich.table import Table

    console.print(f"[bold]{found.predictions}[/] prediction(s) logged in {where}")
    states = Table(title="corrections by state")
    for state in found.by_state:
        states.add_column(state, justify="right")
    states.add_row(*(str(n) for n in found.by_state.values()))
    console.print(states)
    if found.by_label:
        labels = Table(title="corrections by true digit")
        for label in found.by_label:
            labels.add_column(label, justify="right")
        labels.add_row(*(str(n) for n in found.by_label.values()))
        console.print(labels)
    accuracy = Table(title="live accuracy on corrected predictions")
    for column in ("model version", "corrected", "right", "accuracy"):
        accuracy.add_column(column, justify="right")
    for row in found.accuracy:
        share = row["right"] / row["corrected"] if row["corrected"] else 0.0
        accuracy.add_row(
            row["model_version"], str(row["corrected"]), str(row["right"]), f"{share:.3f}"
        )
    console.print(accuracy if found.accuracy else "no corrections yet")


@feedback_app.command()
def export(
    ctx: typer.Context,
    wait: Annotated[
        bool, typer.Option(help="Wait for a running pipeline instead of giving up at once.")
    ] = True,
) -> None:
    """Send pending corrections through the inbox now: one batch, checked by Great Expectations,
    admitted as a new DVC version of data/ (or quarantined); suspicious ones are held back for
    review. The pipeline does this at the start of every run."""
    from ..feedback import export_and_admit
    from ..locking import pipeline_lock

    project, params = setup(ctx.obj)
    with reported(), pipeline_lock(project.root, wait_s=None if wait else 0):
        outcome = export_and_admit(project, params)
    for line in outcome.lines():
        console.print(f"[bold]feedback[/] {line}")
