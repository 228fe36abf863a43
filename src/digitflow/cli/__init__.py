"""The `digitflow` command line: Typer sub-apps by concern, merged into one command."""

from __future__ import annotations

import sys

import typer

from ..config import set_environment_defaults
from ..gcpolicy import fewer_full_collections

fewer_full_collections()  # before the commands' imports: they are most of a quick command's time
set_environment_defaults()

from . import feedback, operations, registry, serving, stages  # noqa: E402

app = typer.Typer(
    help=(
        "MNIST digit recognition that ingests, validates, trains, tracks and promotes itself.\n\n"
        "Stages (run in this order by `digitflow run` and by `dvc repro`): "
        "ingest -> validate -> preprocess -> train -> evaluate -> register."
    ),
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="markdown",  # docstrings reflowed to the terminal, lists as lists
)
for sub_app in (stages.app, registry.app, serving.app, feedback.app, operations.app):
    app.add_typer(sub_app)


def main() -> None:
    """Entry point of the `digitflow` command and `python -m digitflow`: the app, ended
    without the interpreter's slow teardown (quickexit.py)."""
    from .. import quickexit

    quickexit.run(app)


if __name__ == "__main__":
    sys.exit(main())
