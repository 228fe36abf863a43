"""The served model in a process of its own, beside the server's event loop.

In one server process, the event loop (reading requests, writing answers) and the model's thread
(decoding images, calling TensorFlow) take turns holding Python's lock: the model's thread waits
for the loop at every step of a call, and the model sat idle for much of the time under load.
With `serve.model_process`, each model call's images go down a pipe to a spawned process that
loaded the same model; it prepares them, calls the model under its own lock and sends back the
inputs and probabilities, which the event loop reads as soon as they arrive (no thread between).

The server keeps its own copy of the model: should the process die, the call it was making and
those after it are made in the server as before until a new process is up.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import multiprocessing
import os
import pickle
import sys
import threading
from collections import deque
from collections.abc import Callable, Iterator
from functools import partial
from multiprocessing.connection import Connection
from pathlib import Path

import anyio
import numpy as np
from fastapi import HTTPException

from . import inference
from .batching import Answer, Pending, compute_batch
from .decoding import leave_ctrl_c_to_the_server, received, yield_to_the_server
from .gcpolicy import freeze_long_lived
from .imaging import (
    InkSettings,
    PixelBudgetError,
    check_pixel_budget,
    pixel_count,
    prepare_batch,
)

Work = list[tuple[np.ndarray | None, list[bytes] | None]]
"""One model call's requests: each its prepared images, or its encoded files."""
START_TIMEOUT_S = 300  # spawning, importing TensorFlow and loading the model


@contextlib.contextmanager
def over_budget_as_413() -> Iterator[None]:
    """A request over its pixel budget becomes HTTP 413, with the budget's message."""
    try:
        yield
    except PixelBudgetError as exc:
        raise HTTPException(413, str(exc)) from None


def within_pixel_budget(encoded: list[bytes], max_pixels: int) -> list[bytes]:
    """A request's image files, once their pixels summed from the headers are checked (413)."""
    with over_budget_as_413():
        check_pixel_budget(sum(pixel_count(data) for data in encoded), len(encoded), max_pixels)
    return encoded


def prepare_within_budget(
    encoded: list[bytes], ink: InkSettings, max_pixels: int
) -> tuple[np.ndarray, list[str]]:
    """A request's files -> model inputs and per-image errors, after the pixel budget (413),
    each header read once for both."""
    with over_budget_as_413():
        return prepare_batch(encoded, ink, max_pixels)


@contextlib.contextmanager
def running_package_first() -> Iterator[None]:
    """While processes are spawned: this package's folder first on sys.path. A loaded MLflow
    model puts its own copy of the package first, which spawned processes would inherit."""
    package_parent = str(Path(__file__).resolve().parent.parent)
    sys.path.insert(0, package_parent)
    try:
        yield
    finally:
        sys.path.remove(package_parent)


NOT_SENT_BACK = np.zeros((0, 28, 28, 1), dtype=np.float32)
"""In an answer from the model process, in place of inputs the server sent prepared: it has
them (a 64-image call's are 200 KB, pickled and piped twice otherwise)."""


def _answers(forward: Callable, prepare_files: Callable, work: Work) -> list:
    """In the model process: the answers of one model call (see batching.compute_batch), with
    an exception that cannot be pickled (TensorFlow's, say) replaced by its text, and without
    the inputs that came prepared."""
    batch = [
        Pending(forward, None, images, files, None if files is None else prepare_files)
        for images, files in work
    ]
    return [
        _picklable(_without_sent_inputs(answer, images))
        for answer, (images, _) in zip(compute_batch(batch), work, strict=True)
    ]


def _without_sent_inputs(
    answer: Answer | BaseException, sent: np.ndarray | None
) -> Answer | BaseException:
    """In the model process: an answer without the inputs its request sent prepared."""
    if sent is None or not isinstance(answer, Answer):
        return answer
    return dataclasses.replace(answer, inputs=NOT_SENT_BACK)


def _with_sent_inputs(answer: Answer | BaseException, pending: Pending) -> Answer | BaseException:
    """In the server: an answer with the inputs its request sent prepared put back."""
    if pending.images is None or not isinstance(answer, Answer):
        return answer
    return dataclasses.replace(answer, inputs=pending.images)


def _picklable(answer: Answer | BaseException) -> Answer | BaseException:
    if not isinstance(answer, BaseException):
        return answer
    try:
        pickle.loads(pickle.dumps(answer))
    except Exception:
        return RuntimeError(f"{answer.__class__.__name__}: {answer}")
    return answer


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """What a model process loads and how it calls it: the model's URI and the MLflow stores
    it is in (tracking, registry), its preprocessing, a request's pixel budget, how large calls
    are cut, the runtime they run on (inference.serving_forward), and whether it yields to the
    server's event loop (decoding.yield_to_the_server)."""

    uri: str
    ink: InkSettings
    store: tuple[str, str]
    max_pixels: int
    split: inference.Split
    runtime: str
    yields: bool = False


def _serve_calls(conn: Connection, spec: ModelSpec) -> None:
    """The model process: load the model, say so, then answer calls until told to stop (None)
    or until the server's end of the pipe closes."""
    if spec.yields:
        yield_to_the_server()
    import mlflow

    leave_ctrl_c_to_the_server()
    try:
        mlflow.set_tracking_uri(spec.store[0])
        mlflow.set_registry_uri(spec.store[1])
        scorer = inference.Scorer.of(inference.load(spec.uri), spec.uri, spec.ink)
        scorer.probabilities(np.zeros((1, 28, 28, 1), dtype=np.float32))  # trace it now
        model_forward = inference.serving_forward(scorer, spec.runtime)
    except Exception as exc:
        conn.send(("failed", f"{exc.__class__.__name__}: {exc}"))
        return
    freeze_long_lived()  # the model's objects live as long as the process
    prepare_files = partial(prepare_within_budget, ink=scorer.ink, max_pixels=spec.max_pixels)
    calls = received(conn, "calls")  # calls read off the pipe as they come
    forward = inference.SplitForward(model_forward, spec.split, idle=calls.empty)
    conn.send(("ready", ""))
    while (work := calls.get()) is not None:
        conn.send(_answers(forward, prepare_files, work))


def _start(spec: ModelSpec) -> tuple[multiprocessing.process.BaseProcess, Connection]:
    """Start a model process loading the model; it and the server's end of its pipe."""
    context = multiprocessing.get_context("spawn")
    here, there = context.Pipe()
    process = context.Process(
        target=_serve_calls,
        args=(there, spec),
        name="digitflow-model",
        daemon=True,
    )
    with running_package_first():
        process.start()
    there.close()
    return process, here


def _wait_ready(process: multiprocessing.process.BaseProcess, conn: Connection, uri: str) -> None:
    """Until the process has loaded the model; a clear error if it could not."""
    if not conn.poll(START_TIMEOUT_S):
        process.kill()
        raise RuntimeError(f"the model process did not load {uri} within {START_TIMEOUT_S} s")
    try:
        status, message = conn.recv()
    except EOFError:
        process.join(5)
        status, message = "failed", f"it exited with code {process.exitcode}"
    if status != "ready":
        conn.close()
        raise RuntimeError(f"the model process could not load {uri}: {message}")


def _spawn(spec: ModelSpec) -> tuple[multiprocessing.process.BaseProcess, Connection]:
    """A model process that has loaded the model, and the server's end of its pipe."""
    process, conn = _start(spec)
    _wait_ready(process, conn, spec.uri)
    return process, conn


class ModelProcess:
    """One model's calls, made in a process of its own on `runtime` (inference.serving_forward),
    in the order they are sent; a call can be sent while the one before is computing (the
    batcher's `calls_in_flight`). With `yields`, the process yields to the server's event loop
    (decoding.yield_to_the_server). The process starts loading the model at once; `wait_ready`
    before the first call."""

    def __init__(
        self,
        uri: str,
        ink: InkSettings,
        max_pixels: int,
        split: inference.Split = inference.NO_SPLIT,
        runtime: str = "tensorflow",
        yields: bool = False,
    ) -> None:
        import mlflow

        store = (mlflow.get_tracking_uri(), mlflow.get_registry_uri())  # the model's
        self.spec = ModelSpec(uri, ink, store, max_pixels, split, runtime, yields)
        self._process, self._conn = _start(self.spec)
        self._lock = threading.Lock()  # the pipe's state, shared with close() from other threads
        self._in_flight, self._closed = 0, False
        self._replies: deque[asyncio.Future] = deque()  # calls sent, oldest first (event loop)
        self.restarts = 0

    def wait_ready(self) -> None:
        """Until the process has loaded the model (a RuntimeError saying why if it could not)."""
        try:
            _wait_ready(self._process, self._conn, self.spec.uri)
        except RuntimeError:
            self._closed, self._conn = True, None
            raise

    async def compute(self, batch: list[Pending]) -> list[Answer | BaseException]:
        """The answers of one model call, made in the model process; in this process when it is
        gone (each request's `forward` and `prepare` are this process's copy of the model)."""
        conn = self._sent([(pending.images, pending.files) for pending in batch])
        if conn is None:
            return await anyio.to_thread.run_sync(compute_batch, batch)
        try:
            answers = await self._reply(conn)
        except (EOFError, OSError):  # the process died during the call
            self._gone(conn)
            return await anyio.to_thread.run_sync(compute_batch, batch)
        except asyncio.CancelledError:  # the server is stopping: the process is not reused
            self._gone(conn, restart=False)
            raise
        finally:
            self._call_over(conn)
        return [
            _with_sent_inputs(answer, pending)
            for answer, pending in zip(answers, batch, strict=True)
        ]

    def _sent(self, work: Work) -> Connection | None:
        """Send a call down the pipe; the connection, or None when there is no process."""
        with self._lock:
            conn = self._conn
            if self._closed or conn is None:
                return None
            try:
                conn.send(work)
            except OSError:  # the process died since the last call
                pass
            else:
                self._in_flight += 1
                return conn
        self._gone(conn)
        return None

    def _reply(self, conn: Connection) -> asyncio.Future:
        """The reply to the call just sent (replies come in the order of the calls), read on
        the event loop as soon as it is there."""
        loop = asyncio.get_running_loop()
        reply = loop.create_future()
        if not self._replies:
            loop.add_reader(conn.fileno(), self._read, conn)
        self._replies.append(reply)
        return reply

    def _read(self, conn: Connection) -> None:
        """On the event loop, when the pipe has data: the oldest call's reply."""
        fd = conn.fileno()
        os.set_blocking(fd, True)  # the loop made it non-blocking: read the whole reply
        try:
            answers = conn.recv()
        except (EOFError, OSError):
            self._fail_replies(conn)
            return
        reply = self._replies.popleft()
        if not self._replies:
            asyncio.get_running_loop().remove_reader(fd)
        if not reply.done():
            reply.set_result(answers)

    def _fail_replies(self, conn: Connection) -> None:
        """The pipe broke: every call still waiting on it gets EOFError (and is made here)."""
        if self._replies:
            asyncio.get_running_loop().remove_reader(conn.fileno())
        while self._replies:
            reply = self._replies.popleft()
            if not reply.done():
                reply.set_exception(EOFError("the model process is gone"))

    def _call_over(self, conn: Connection) -> None:
        with self._lock:
            if conn is self._conn:
                self._in_flight -= 1
                if self._closed and not self._in_flight:
                    self._finish()

    def _gone(self, conn: Connection | None, restart: bool = True) -> None:
        """The process died (or its pipe can no longer be trusted): start a new one meanwhile."""
        with self._lock:
            if conn is not self._conn or conn is None:
                return
            process, self._conn, self._in_flight = self._process, None, 0
            self._fail_replies(conn)
            conn.close()
            restart = restart and not self._closed
        process.kill()
        if restart:
            print(
                "the model process is gone: calls run in the server until a new one is up",
                flush=True,
            )
            threading.Thread(target=self._restart, name="model-process", daemon=True).start()

    def _restart(self) -> None:
        try:
            process, conn = _spawn(self.spec)
        except Exception as exc:  # keep answering in the server
            print(f"could not start a new model process: {exc}", flush=True)
            return
        with self._lock:
            if self._closed:
                conn.close()
                process.kill()
                return
            self._process, self._conn, self.restarts = process, conn, self.restarts + 1
        print("a new model process is up", flush=True)

    @property
    def busy(self) -> tuple[bool, int]:
        """For choosing where a call goes: (no process up now, calls in flight), least first."""
        return self._conn is None, self._in_flight

    def status(self) -> dict:
        """For /health: the process's id (None while a new one starts) and how many were
        started after one died."""
        with self._lock:
            alive = self._conn is not None
            return {"pid": self._process.pid if alive else None, "restarts": self.restarts}

    def close(self) -> None:
        """Stop the process once the calls it is making (if any) are answered."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            if self._conn is not None and not self._in_flight:
                self._finish()

    def _finish(self) -> None:
        """With the lock held and no call in flight: tell the process to stop, and reap it."""
        conn, process, self._conn = self._conn, self._process, None
        if conn is None:
            return
        with contextlib.suppress(OSError):  # already gone
            conn.send(None)
        conn.close()
        threading.Thread(target=_reap, args=(process,), name="model-reap", daemon=True).start()


@dataclasses.dataclass(frozen=True)
class OwnProcesses:
    """Where a worker's model calls are made: `count` model processes, each checking a
    request's pixel budget of `max_pixels`, yielding to the event loop when `yields`
    (serve.model_processes, serve.max_request_pixels, serve.yield_to_event_loop)."""

    count: int
    max_pixels: int
    yields: bool = False


class ModelProcesses:
    """A worker's model processes, all loading the same model at once. Each call goes to the
    one with the fewest calls in flight (the first of those; one with no process up, being
    replaced, last): with two processes, two calls prepare their images and compute on two
    cores at once, and the next call of each waits at its process (the batcher's
    `calls_in_flight`, two a process). `wait_ready` before the first call."""

    def __init__(
        self,
        own: OwnProcesses,
        uri: str,
        ink: InkSettings,
        split: inference.Split = inference.NO_SPLIT,
        runtime: str = "tensorflow",
    ) -> None:
        self.members: list[ModelProcess] = []
        try:
            for _ in range(own.count):
                self.members.append(
                    ModelProcess(uri, ink, own.max_pixels, split, runtime, own.yields)
                )
        except BaseException:
            self.close()
            raise

    def wait_ready(self) -> None:
        """Until every process has loaded the model (a RuntimeError saying why if one could
        not; then all are stopped)."""
        try:
            for member in self.members:
                member.wait_ready()
        except BaseException:
            self.close()
            raise

    async def compute(self, batch: list[Pending]) -> list[Answer | BaseException]:
        """The answers of one model call, made in the least busy process."""
        return await min(self.members, key=lambda member: member.busy).compute(batch)

    def status(self) -> dict:
        """For /health: each process's id (None while a new one starts), and how many were
        started after one died, all processes counted."""
        statuses = [member.status() for member in self.members]
        return {
            "pids": [status["pid"] for status in statuses],
            "restarts": sum(status["restarts"] for status in statuses),
        }

    def close(self) -> None:
        """Stop every process once the calls it is making (if any) are answered."""
        for member in self.members:
            member.close()


def _reap(process: multiprocessing.process.BaseProcess) -> None:
    process.join(30)
    if process.is_alive():
        process.kill()
        process.join()
