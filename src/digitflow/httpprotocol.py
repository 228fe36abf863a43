"""Uvicorn's HTTP protocol with `serve.max_connections` kept: no 503 below the limit.

Uvicorn answers 503 once its open connections, or its request tasks, reach `limit_concurrency`.
A task stays in that count until a callback scheduled when it finished has run, and under uvloop
the sockets that became readable meanwhile are read first. When one model call answers many
requests, their clients' next requests were read while those finished tasks still counted, and
some were refused below the limit: 48 connections, 65 tasks of which 24 had finished, with
`max_connections` 64. Here only the tasks not yet finished count; connections count as before.
"""

from __future__ import annotations

import asyncio

from uvicorn.protocols.http.auto import AutoHTTPProtocol

IMPORT_PATH = "digitflow.httpprotocol:UnfinishedTasksProtocol"
"""For uvicorn's `http` setting (`--http` on its command line)."""


class UnfinishedTasks:
    """Uvicorn's set of request tasks, as its concurrency check sees it: the tasks not yet
    finished. Tasks are added and discarded in the set itself, which shutdown waits on."""

    def __init__(self, tasks: set[asyncio.Task]) -> None:
        self.tasks = tasks

    def __len__(self) -> int:
        return sum(1 for task in self.tasks if not task.done())

    def add(self, task: asyncio.Task) -> None:
        self.tasks.add(task)

    def discard(self, task: asyncio.Task) -> None:
        self.tasks.discard(task)


class UnfinishedTasksProtocol(AutoHTTPProtocol):  # type: ignore[misc,valid-type]
    """The HTTP protocol uvicorn would pick (httptools when installed, else h11), its
    concurrency check counting only unfinished request tasks."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.tasks = UnfinishedTasks(self.tasks)
