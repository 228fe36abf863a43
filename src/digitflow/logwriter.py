"""The prediction log's writer: a process of its own that turns answers into rows and writes them.

The server hands each answered request to `LogWriter.record`, which only makes the prediction
ids (the answer carries them) and keeps the request's arrays in a buffer. A thread sends the
buffer down a pipe every `feedback.flush_interval_s`; the writer process builds the rows (file
hashes, stored images, JSON probabilities) and inserts them in one transaction. Under load this
work held Python's lock in the server's process, which the event loop needs for every request:
with the rows built and written in the server, 16 single-image clients got 8-15% fewer answers
a second than with the log off (docs/benchmarks.md).

A database that cannot be written never fails a prediction: the rows are counted as failed and
`health()` says why. Should the writer process die, what it had been sent counts as failed and
a new one is started.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import threading
import time
from datetime import UTC, datetime
from multiprocessing.connection import Connection
from typing import Any, NamedTuple

import numpy as np

from . import predictionlog
from .decoding import leave_ctrl_c_to_the_server, yield_to_the_server
from .gcpolicy import freeze_long_lived
from .predictionlog import PURGE_EVERY_S, engine_for

STOP_TIMEOUT_S = 10.0


class Answers(NamedTuple):
    """One request's answered images, as the server hands them to the log."""

    ids: list[str]  # one per answered image
    probabilities: np.ndarray  # (n, 10); rows of NaN for images that failed
    inputs: np.ndarray  # (n, 28, 28, 1), what the model saw
    contents: list[bytes]  # the files as uploaded
    model: tuple[str, str]  # (name, version)
    source: str
    client: str | None
    latency_ms: float
    answered_at: float  # time.time()


class Outcome(NamedTuple):
    """What the writer process did with one buffer: rows written, rows failed, and why."""

    written: int
    failed: int
    error: str


def answers(
    probabilities: np.ndarray,
    inputs: np.ndarray,
    contents: list[bytes],
    model: tuple[str, str],
    source: str,
    client: str | None,
    latency_ms: float,
) -> Answers:
    """A request's answers, with a fresh prediction id for each image answered (the rows are
    built from them in the writer process, where `predictionlog.rows` skips failed ones)."""
    ids = predictionlog.new_ids(probabilities)
    stamp = time.time()
    return Answers(ids, probabilities, inputs, contents, model, source, client, latency_ms, stamp)


Packed = tuple[list[tuple], np.ndarray, np.ndarray]
"""A buffer as it goes down the pipe: each request's other fields, then every request's
probabilities and inputs joined into one array each, the inputs as the log stores them
(predictionlog.stored_levels: a quarter of the bytes of their floats)."""


def packed(buffer: list[Answers]) -> Packed:
    """A buffer for the pipe. Pickled as they are, a few hundred requests' arrays and named
    tuples held Python's lock for milliseconds in the server, and its event loop with it;
    joined, they pickle in a fraction of that."""
    others = [(item.ids, *item[3:]) for item in buffer]
    probabilities = np.concatenate([item.probabilities for item in buffer])
    levels = predictionlog.stored_levels(np.concatenate([item.inputs for item in buffer]))
    return others, probabilities, levels


def rows_of(columns: Packed) -> list[dict[str, Any]]:
    """In the writer process: the log's rows of a packed buffer, with the ids the answers were
    given, built from its joined arrays a column at a time (predictionlog.rows)."""
    others, probabilities, levels = columns
    ids: list[str] = []
    contents: list[bytes] = []
    asked: list[dict[str, Any]] = []
    for request_ids, files, model, source, client, latency_ms, answered_at in others:
        shared = {
            "model_name": model[0],
            "model_version": model[1],
            "source": source,
            "client": client,
            "latency_ms": latency_ms,
            "created_at": datetime.fromtimestamp(answered_at, UTC).replace(tzinfo=None),
        }
        ids.extend(request_ids)
        contents.extend(files)
        asked.extend([shared] * len(files))
    return predictionlog.rows(probabilities, levels, contents, ids, asked)


def _error_text(exc: BaseException) -> str:
    lines = str(exc).splitlines()
    return f"{exc.__class__.__name__}: {lines[0][:300] if lines else ''}"


def _write(engine, columns: Packed, schema_ready: bool) -> tuple[Outcome, bool]:
    """Write one packed buffer; never raises (a failure is counted in the outcome)."""
    count = sum(len(request_ids) for request_ids, *_ in columns[0])
    try:
        if not schema_ready:
            predictionlog.ensure_schema(engine)
            schema_ready = True
        predictionlog.write_rows(engine, rows_of(columns))
        return Outcome(count, 0, ""), schema_ready
    except Exception as exc:  # never fail a prediction over its log entry
        return Outcome(0, count, _error_text(exc)), schema_ready


def _purge(engine, retention_days: float) -> str:
    """Drop old images; the error's text, or '' (tried again at the next purge)."""
    try:
        predictionlog.purge_images(engine, retention_days)
        return ""
    except Exception as exc:
        return _error_text(exc)


def _write_log(conn: Connection, url: str, retention_days: float, yields: bool) -> None:
    """The writer process: write each buffer it is sent and answer with its Outcome; purge old
    images every PURGE_EVERY_S; stop at None or when the server's end of the pipe closes (not
    at Ctrl-C: what is still queued when the server stops is written). With `yields`, it
    yields to the server's event loop (decoding.yield_to_the_server)."""
    if yields:
        yield_to_the_server()
    leave_ctrl_c_to_the_server()
    engine = engine_for(url)
    try:
        predictionlog.ensure_schema(engine)
        schema_ready = True
    except Exception:  # the server noted why; tried again with the first buffer
        schema_ready = False
    freeze_long_lived()  # the database libraries' objects live as long as the process
    next_purge = 0.0
    try:
        while True:
            if time.monotonic() >= next_purge and schema_ready:
                next_purge = time.monotonic() + PURGE_EVERY_S
                if error := _purge(engine, retention_days):
                    conn.send(Outcome(0, 0, error))
            if not conn.poll(PURGE_EVERY_S):
                continue
            columns = conn.recv()
            if columns is None:
                return
            outcome, schema_ready = _write(engine, columns, schema_ready)
            conn.send(outcome)
    except (EOFError, OSError):  # the server is gone
        return
    finally:
        engine.dispose()


class LogWriter:
    """Hands answers to the writer process in batches; counts what could not be written. With
    `yields`, the writer process yields to the server's event loop (serve.yield_to_event_loop)."""

    def __init__(
        self,
        url: str,
        flush_interval_s: float,
        queue_size: int,
        retention_days: float,
        yields: bool = False,
    ) -> None:
        self.url, self.yields = url, yields
        self.engine = engine_for(url)  # this process's own, for /feedback's corrections
        self.flush_interval_s = flush_interval_s
        self.queue_size = queue_size
        self.retention_days = retention_days
        self._lock = threading.Condition()
        self._buffer: list[Answers] = []
        self._buffered = 0  # images in the buffer
        self._submitted = self._settled = 0  # images handed over; written, failed or dropped
        self._sent_unsettled = 0  # images sent to the current process, not yet answered for
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._process: multiprocessing.process.BaseProcess | None = None
        self._conn: Connection | None = None
        self.written = self.failed = self.dropped = self.restarts = 0
        self.last_error = ""
        self.last_error_at: float | None = None

    def start(self) -> None:
        """Create the log's tables if need be (for /feedback; the writer process tries again
        while it cannot), start the writer process and the thread that feeds it."""
        try:
            predictionlog.ensure_schema(self.engine)
        except Exception as exc:  # not reachable now: the writer says so, and retries
            self._note_error(_error_text(exc))
        self._spawn()
        self._thread = threading.Thread(target=self._run, name="prediction-log", daemon=True)
        self._thread.start()

    def _spawn(self) -> None:
        from .modelprocess import running_package_first

        context = multiprocessing.get_context("spawn")
        here, there = context.Pipe()
        process = context.Process(
            target=_write_log,
            args=(there, self.url, self.retention_days, self.yields),
            name="digitflow-log",
            daemon=True,
        )
        with running_package_first():
            process.start()
        there.close()
        self._process, self._conn = process, here

    def record(self, item: Answers) -> list[str]:
        """Queue a request's answers (see `answers`) for the log; their prediction ids. Never
        blocks: beyond `queue_size` waiting images, answers are dropped and counted."""
        count = len(item.ids)
        with self._lock:
            self._submitted += count
            if self._buffered + count > self.queue_size:
                self.dropped += count
                self._settle(count)
            else:
                self._buffer.append(item)
                self._buffered += count
        return item.ids

    def _settle(self, count: int) -> None:
        """With the lock held: `count` more images are written, failed or dropped."""
        self._settled += count
        if self._settled >= self._submitted:
            self._lock.notify_all()

    def _run(self) -> None:
        """Send the buffer every flush interval, and read the writer's outcomes meanwhile."""
        while True:
            deadline = time.monotonic() + self.flush_interval_s
            while (left := deadline - time.monotonic()) > 0 and not self._stopping.is_set():
                self._read_outcomes(left)  # returns early when an outcome comes
            with self._lock:
                buffer, self._buffer, self._buffered = self._buffer, [], 0
            if buffer:
                self._send(buffer)
            if self._stopping.is_set():
                self._finish()
                return

    def _read_outcomes(self, timeout_s: float) -> None:
        conn = self._conn
        try:
            while conn is not None and conn.poll(timeout_s):
                self._count(conn.recv())
                timeout_s = 0
        except (EOFError, OSError):
            self._lost()

    def _count(self, outcome: Outcome) -> None:
        with self._lock:
            self.written += outcome.written
            self.failed += outcome.failed
            self._sent_unsettled -= outcome.written + outcome.failed
            if outcome.error:
                self._note_error(outcome.error)
            self._settle(outcome.written + outcome.failed)

    def _send(self, buffer: list[Answers]) -> None:
        count = sum(len(item.ids) for item in buffer)
        if self._conn is None:
            self._spawn()
        with self._lock:
            self._sent_unsettled += count
        try:
            self._conn.send(packed(buffer))
        except (OSError, ValueError):
            self._lost()

    def _lost(self) -> None:
        """The writer process died: what it was sent counts as failed; start a new one."""
        process, self._conn = self._process, None
        if process is not None:
            process.join(5)
            if process.is_alive():  # its pipe broke but it runs on: end it
                process.kill()
                process.join()
        with self._lock:
            lost, self._sent_unsettled = self._sent_unsettled, 0
            self.failed += lost
            code = process.exitcode if process is not None else None
            self._note_error(f"the log writer process exited (code {code}); started a new one")
            self._settle(lost)
            self.restarts += 1
        if not self._stopping.is_set():
            self._spawn()

    def _note_error(self, text: str) -> None:
        self.last_error, self.last_error_at = text, time.time()

    def _finish(self) -> None:
        """Wait for the outcomes of what was sent, then stop the process."""
        deadline = time.monotonic() + STOP_TIMEOUT_S
        while (
            self._sent_unsettled > 0
            and self._conn is not None
            and (left := deadline - time.monotonic()) > 0
        ):
            self._read_outcomes(left)
        conn, process, self._conn = self._conn, self._process, None
        if conn is not None:
            with contextlib.suppress(OSError):  # already gone
                conn.send(None)
            conn.close()
        if process is not None:
            process.join(STOP_TIMEOUT_S)
            if process.is_alive():
                process.kill()

    def flush(self, timeout_s: float = 5.0) -> bool:
        """Wait until everything recorded so far was written (or given up); False on timeout."""
        with self._lock:
            target = self._submitted
            return self._lock.wait_for(lambda: self._settled >= target, timeout=timeout_s)

    def stop(self, timeout_s: float = STOP_TIMEOUT_S) -> None:
        """Write what is queued, then stop the thread and the writer process."""
        self._stopping.set()
        if self._thread is not None:
            self._thread.join(timeout=timeout_s + 1)

    def health(self) -> dict[str, Any]:
        """Counts and the last error, for /health."""
        failing = bool(self.last_error_at and time.time() - self.last_error_at < 300)
        process = self._process
        return {
            "status": "failing" if failing else "ok",
            "database": predictionlog.shown_url(self.url),
            "written": self.written,
            "failed": self.failed,
            "dropped": self.dropped,
            "queued": self._buffered,
            "writer_pid": process.pid if process is not None and self._conn else None,
            "writer_restarts": self.restarts,
            "last_error": self.last_error or None,
        }
