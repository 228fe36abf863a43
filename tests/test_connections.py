"""`serve.max_connections` on a real uvicorn server: that many clients at once are served, the
next is refused with 503; and none of that many is refused when many answers go out at once."""

from __future__ import annotations

import asyncio
import http.client
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import uvicorn
from conftest import REPO, free_port

from digitflow.config import load_params
from digitflow.serving import uvicorn_options

MAX_CONNECTIONS = 3


async def answer_ok(scope, receive, send) -> None:
    """The smallest ASGI app: 200 to every request."""
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"ok"})


@contextmanager
def running(options: dict, app=answer_ok) -> Iterator[uvicorn.Server]:
    """Uvicorn serving `app` with `options` on a free port, in a thread."""
    port = free_port()
    config = uvicorn.Config(
        app, host="127.0.0.1", port=port, lifespan="off", log_level="warning", **options
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert time.monotonic() < deadline, "uvicorn did not start within 30 s"
        time.sleep(0.05)
    try:
        yield server
    finally:
        server.should_exit = True
        thread.join(timeout=30)


def until_open(server: uvicorn.Server, count: int) -> None:
    """Until the server has accepted (or let go of) connections down to `count` open."""
    deadline = time.monotonic() + 10
    while len(server.server_state.connections) != count:
        assert time.monotonic() < deadline, f"the server never had {count} connections open"
        time.sleep(0.01)


def status_on(connection: http.client.HTTPConnection) -> tuple[int, bytes]:
    connection.request("GET", "/")
    response = connection.getresponse()
    return response.status, response.read()


def test_max_connections_clients_are_served_at_once_and_one_more_gets_503() -> None:
    limits = load_params(REPO / "params.yaml").serve.model_copy(
        update={"max_connections": MAX_CONNECTIONS}
    )
    with running(uvicorn_options(limits)) as server:
        connections = [
            http.client.HTTPConnection("127.0.0.1", server.config.port, timeout=10)
            for _ in range(MAX_CONNECTIONS + 1)
        ]
        try:
            for connection in connections[:MAX_CONNECTIONS]:
                connection.connect()
            until_open(server, MAX_CONNECTIONS)
            served = [status_on(connection) for connection in connections[:MAX_CONNECTIONS]]
            assert served == [(200, b"ok")] * MAX_CONNECTIONS
            connections[-1].connect()
            until_open(server, MAX_CONNECTIONS + 1)
            one_more = status_on(connections[-1])
            connections[-1].close()
            until_open(server, MAX_CONNECTIONS)
            after = [status_on(connection) for connection in connections[:MAX_CONNECTIONS]]
        finally:
            for connection in connections:
                connection.close()
    assert after == served
    assert one_more == (503, b"Service Unavailable")


class AnsweredTogether:
    """An ASGI app that holds the first `count` requests until all have come, answers them in
    one turn of the event loop (as one model call answers many requests), the last of them then
    keeping the loop busy for `busy_s` while their clients send again; later requests are
    answered at once. The clients' next requests are read while the answered requests' tasks
    are finished but not yet cleared from uvicorn's count."""

    def __init__(self, count: int, busy_s: float = 0.5) -> None:
        self.count, self.busy_s = count, busy_s
        self.arrived = self.answered = 0
        self.all_in = asyncio.Event()

    async def __call__(self, scope, receive, send) -> None:
        self.arrived += 1
        if self.arrived <= self.count:
            if self.arrived == self.count:
                self.all_in.set()
            await self.all_in.wait()
        await answer_ok(scope, receive, send)
        self.answered += 1
        if self.answered == self.count:
            time.sleep(self.busy_s)  # the loop busy, as with a burst of answers to write


def test_max_connections_clients_are_served_when_their_answers_go_out_together() -> None:
    limits = load_params(REPO / "params.yaml").serve.model_copy(
        update={"max_connections": MAX_CONNECTIONS}
    )
    app = AnsweredTogether(MAX_CONNECTIONS)
    statuses: list[int] = []

    def client(port: int) -> None:
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        try:
            for _ in range(2):
                connection.request("GET", "/")
                response = connection.getresponse()
                response.read()
                statuses.append(response.status)
        finally:
            connection.close()

    with running(uvicorn_options(limits), app) as server:
        clients = [
            threading.Thread(target=client, args=(server.config.port,))
            for _ in range(MAX_CONNECTIONS)
        ]
        for thread in clients:
            thread.start()
        for thread in clients:
            thread.join(timeout=60)
    assert statuses == [200] * (2 * MAX_CONNECTIONS)
    assert app.arrived == 2 * MAX_CONNECTIONS
