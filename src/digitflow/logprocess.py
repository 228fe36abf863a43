"""The prediction log's inserts, made in a process of their own beside the server.

`LogWriter`'s thread gathers the predictions of `feedback.flush_interval_s` and writes them in
one transaction. Made in the server, those inserts (SQLAlchemy building each row, SQLite storing
it) held Python's lock in bursts that the event loop waited on. With `feedback.log_process`, the
thread sends each batch down a pipe to a spawned process that inserts it and answers how it
went; the thread waits for that answer without holding the lock. The rows, the transaction and
the counts in /health are the same either way. Should the process die, that batch is written in
the server and a new process is started for the next one.
"""

from __future__ import annotations

import contextlib
import multiprocessing
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess

START_TIMEOUT_S = 60  # spawning and importing SQLAlchemy
STOP_TIMEOUT_S = 10


class LogProcessGone(Exception):
    """The log process died or could not start; the batch it was given is not written."""


class LogInsertFailed(Exception):
    """The log process could not insert a batch (the database's error, as text)."""


def _insert_batches(conn: Connection, url: str) -> None:
    """The log process: insert each batch received, answer ("ok", "") or ("error", why); stop
    on None or when the server's end of the pipe closes."""
    from .predictionlog import engine_for, write_predictions

    engine = engine_for(url)
    conn.send(("ready", ""))
    while True:
        try:
            batch = conn.recv()
        except (EOFError, OSError):
            return
        if batch is None:
            return
        try:
            write_predictions(engine, batch)
        except Exception as exc:  # the server counts the batch as failed and says why
            conn.send(("error", f"{exc.__class__.__name__}: {str(exc).splitlines()[0][:300]}"))
        else:
            conn.send(("ok", ""))


class LogProcess:
    """Inserts batches of predictions into the log at `url` in a spawned process, started on
    first use and again after it died. Used from one thread (the log writer's)."""

    def __init__(self, url: str) -> None:
        self.url = url
        self._process: BaseProcess | None = None
        self._conn: Connection | None = None
        self.starts = 0

    def write(self, batch: list) -> None:
        """Insert `batch` (LoggedPrediction items) in one transaction, in the log process.
        Raises LogInsertFailed when the insert failed there, LogProcessGone when the process
        died or could not start."""
        conn = self._connection()
        try:
            conn.send(batch)
            outcome, message = conn.recv()
        except (EOFError, OSError) as exc:
            self._discard()
            raise LogProcessGone(f"the log process is gone: {exc.__class__.__name__}") from None
        if outcome != "ok":
            raise LogInsertFailed(message)

    def _connection(self) -> Connection:
        if self._conn is None or self._process is None or not self._process.is_alive():
            self._discard()
            self._start()
        assert self._conn is not None
        return self._conn

    def _start(self) -> None:
        from .modelprocess import running_package_first

        context = multiprocessing.get_context("spawn")
        here, there = context.Pipe()
        process = context.Process(
            target=_insert_batches, args=(there, self.url), name="digitflow-log", daemon=True
        )
        with running_package_first():
            process.start()
        there.close()
        try:
            ready = here.poll(START_TIMEOUT_S) and here.recv()[0] == "ready"
        except (EOFError, OSError):
            ready = False
        if not ready:
            here.close()
            process.kill()
            raise LogProcessGone(f"the log process did not start within {START_TIMEOUT_S} s")
        self._process, self._conn, self.starts = process, here, self.starts + 1

    def _discard(self) -> None:
        """Forget a process that died (or whose pipe broke), killing it if it still runs."""
        if self._conn is not None:
            self._conn.close()
        if self._process is not None:
            self._process.kill()
            self._process.join(STOP_TIMEOUT_S)
        self._process = self._conn = None

    @property
    def pid(self) -> int | None:
        """The running process's id, None when there is none."""
        process = self._process  # the writer's thread may replace it meanwhile
        return process.pid if process is not None and process.is_alive() else None

    def close(self) -> None:
        """Tell the process to stop once its current batch is in; kill it if it does not."""
        if self._conn is not None:
            with contextlib.suppress(OSError):
                self._conn.send(None)
            self._conn.close()
            self._conn = None
        if self._process is not None:
            self._process.join(STOP_TIMEOUT_S)
            if self._process.is_alive():
                self._process.kill()
                self._process.join()
            self._process = None
