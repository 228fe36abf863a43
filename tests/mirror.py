"""A real HTTP mirror on 127.0.0.1 for ingestion tests, with ways to misbehave."""

from __future__ import annotations

import functools
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path


class _Handler(SimpleHTTPRequestHandler):
    mode = "ok"
    hang_s = 0.0

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        if self.mode == "html":
            body = b"<html><body>Service temporarily unavailable</body></html>"
            self.send_response(200)
            self.send_header("Content-Type", "text/html; charset=utf-8")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
            return
        if self.mode == "hang":
            time.sleep(self.hang_s)
        super().do_GET()

    def log_message(self, *args: object) -> None:
        pass


@contextmanager
def serve(folder: Path, mode: str = "ok", hang_s: float = 3.0) -> Iterator[str]:
    """Serve folder over HTTP on a free port; yields the base URL."""
    handler = type("Handler", (_Handler,), {"mode": mode, "hang_s": hang_s})
    server = ThreadingHTTPServer(
        ("127.0.0.1", 0), functools.partial(handler, directory=str(folder))
    )
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/"
    finally:
        server.shutdown()
        server.server_close()


def dead_url() -> str:
    """A URL on 127.0.0.1 where nothing listens (connection refused)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}/"
