"""Registry commands: list the versions, promote one by hand, roll the champion back, print a
version's model card."""

from __future__ import annotations

import json
from typing import Annotated

import typer
from rich.markup import escape

from ..console import console
from .common import RootOption, configured, reported

PANEL = "Model registry"
app = typer.Typer()
COLUMNS = (
    "version",
    "aliases",
    "test_accuracy",
    "architecture",
    "decision",
    "data_hash",
    "created",
)


@app.command(rich_help_panel=PANEL)
def models(
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
    root: RootOption = None,
) -> None:
    """List registered model versions with their aliases, test accuracy and data hash."""
    from rich.table import Table

    from ..registry import list_versions
    from ..tracking import tracking_uri

    project, params = configured(root)
    rows = list_versions(params.mlflow.registered_model)
    if as_json:
        print(json.dumps(rows, indent=2))
        return
    table = Table(title=f"{params.mlflow.registered_model} @ {tracking_uri(project)}")
    for column in COLUMNS:
        table.add_column(column)
    for row in rows:
        table.add_row(
            *(", ".join(row[c]) if c == "aliases" else str(row[c] or "") for c in COLUMNS)
        )
    console.print(table if rows else "no registered versions yet")


@app.command(rich_help_panel=PANEL)
def promote(
    version: Annotated[str, typer.Argument(help="Model version to make champion.")],
    reason: Annotated[str, typer.Option(help="Why (kept in the registry's audit tags).")],
    root: RootOption = None,
) -> None:
    """Manual override: point the champion alias at VERSION, logged with a reason."""
    from ..registry import promote as promote_version

    _, params = configured(root)
    with reported():
        previous = promote_version(params.mlflow.registered_model, version, reason)
    console.print(f"champion: {previous or 'none'} -> {version} (manual: {escape(reason)})")


@app.command(rich_help_panel=PANEL)
def rollback(
    reason: Annotated[
        str, typer.Option(help="Why (kept in the registry's audit tags).")
    ] = "manual rollback",
    root: RootOption = None,
) -> None:
    """Move the champion alias back to the previous champion."""
    from ..registry import rollback as roll_back

    _, params = configured(root)
    with reported():
        before, after = roll_back(params.mlflow.registered_model, reason)
    console.print(f"champion: {before} -> {after} (rollback: {escape(reason)})")


@app.command(rich_help_panel=PANEL)
def card(
    version: Annotated[
        str | None, typer.Argument(help="Model version (default: the champion).")
    ] = None,
    root: RootOption = None,
) -> None:
    """Print a version's model card (Markdown): the description it carries in the registry."""
    from ..card import registered_card

    _, params = configured(root)
    with reported():
        _, text = registered_card(params.mlflow.registered_model, version)
    print(text, end="")
