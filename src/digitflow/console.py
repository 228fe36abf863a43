"""Shared console output: one rich Console and a download progress bar."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)

from .sources import ProgressHook

console = Console(highlight=False, soft_wrap=True)
errors = Console(highlight=False, soft_wrap=True, stderr=True)


@contextmanager
def download_progress() -> Iterator:
    """Yield a factory that makes one progress-bar hook per file name."""
    progress = Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
        console=console,
        transient=False,
    )

    def hook_for(name: str) -> ProgressHook:
        task = progress.add_task(name, total=None)

        def advance(done: int, total: int | None) -> None:
            progress.update(task, advance=done, total=total)

        return advance

    with progress:
        yield hook_for
