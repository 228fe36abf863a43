"""`serve.max_connections` on a real uvicorn server: that many clients at once are served, the
next is refused with 503."""

from __future__ import annotations

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
def running(options: dict) -> Iterator[int]:
    """Uvicorn serving answer_ok with `options` on a free port, in a thread; yields the port."""
    port = free_port()
    config = uvicorn.Config(
        answer_ok, host="127.0.0.1", port=port, lifespan="off", log_level="warning", **options
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert time.monotonic() < deadline, "uvicorn did not start within 30 s"
        time.sleep(0.05)
    try:
        yield port
    finally:
        server.should_exit = True
        thread.join(timeout=30)


def status_on(connection: http.client.HTTPConnection) -> int:
    connection.request("GET", "/")
    response = connection.getresponse()
    response.read()
    return response.status


def test_max_connections_clients_are_served_at_once_and_one_more_gets_503() -> None:
    limits = load_params(REPO / "params.yaml").serve.model_copy(
        update={"max_connections": MAX_CONNECTIONS}
    )
    with running(uvicorn_options(limits)) as port:
        connections = [
            http.client.HTTPConnection("127.0.0.1", port, timeout=10)
            for _ in range(MAX_CONNECTIONS + 1)
        ]
        try:
            for connection in connections[:MAX_CONNECTIONS]:
                connection.connect()
            served = [status_on(connection) for connection in connections[:MAX_CONNECTIONS]]
            again = [status_on(connection) for connection in connections[:MAX_CONNECTIONS]]
            one_more = status_on(connections[-1])
        finally:
            for connection in connections:
                connection.close()
    assert served == again == [200] * MAX_CONNECTIONS
    assert one_more == 503
