"""Dynamic batching for the server: concurrent requests' images go through the model together.

Each request announces itself (`coming`), reads its body and hands its images to a `Batcher`:
encoded files, which the batcher prepares in the model's thread just before the call, or arrays
already prepared elsewhere (the decoding processes of multi-image requests). The batcher waits at
most `wait_s` after the first one for others, then makes one trip to a worker thread (or to the
model process, when the request names a `Runner`: modelprocess) for up to
`max_images` images: it prepares the files there, makes one model call for every image that could
be prepared, and gives each request its own rows back. One thread hand-off per model call instead
of one per request keeps the event loop's share of Python's lock small. A lone request (no other
on its way, and the last call served one request) is sent at once, without waiting; requests that
arrive while the model is busy form the next batch, so under load the model runs back to back.
A call holds at most `max_images` images; a request with more goes alone. Kept small, calls
answer their requests in waves: the server answers one wave and its clients send again while the
model makes the next call, where one large call would have every stage wait for the others.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Protocol

import anyio
import numpy as np

Forward = Callable[[np.ndarray], np.ndarray]
Prepare = Callable[[list[bytes]], tuple[np.ndarray, list[str]]]
"""Encoded images -> model inputs (n, 28, 28, 1) and one error message per image ('' = fine)."""


@dataclass(frozen=True)
class Answer:
    """One request's share of a model call: its inputs, why images could not be prepared ('' for
    those that could), and the class probabilities (None when any image could not be)."""

    inputs: np.ndarray
    errors: list[str]
    probabilities: np.ndarray | None


class Runner(Protocol):
    """Makes a model call somewhere other than a thread of this process (modelprocess)."""

    async def compute(self, batch: list[Pending]) -> list[Answer | BaseException]: ...


@dataclass
class Pending:
    """One request's images (prepared, or files with the function that prepares them), the
    model they are for (and the runner that calls it, if not a thread here), and where its
    answer goes."""

    forward: Forward
    answer: asyncio.Future | None
    images: np.ndarray | None = None
    files: list[bytes] | None = None
    prepare: Prepare | None = None
    runner: Runner | None = None

    @property
    def size(self) -> int:
        return len(self.files) if self.files is not None else len(self.images)

    def prepared(self) -> tuple[np.ndarray, list[str]]:
        """The model inputs and per-image errors (preparing the files here, in the worker)."""
        if self.files is not None and self.prepare is not None:
            return self.prepare(self.files)
        assert self.images is not None
        return self.images, [""] * len(self.images)


def compute_batch(batch: list[Pending]) -> list[Answer | BaseException]:
    """In a worker thread: prepare each request's files, then one model call for every request
    whose images were all prepared. A request whose preparation raised gets its exception; a
    failing model call fails every request that was in it."""
    prepared: list[tuple[np.ndarray, list[str]] | BaseException] = []
    for pending in batch:
        try:
            prepared.append(pending.prepared())
        except Exception as exc:  # e.g. a request over its pixel budget: that request only
            prepared.append(exc)
    ready = [part for part in prepared if not isinstance(part, BaseException) and not any(part[1])]
    probabilities: np.ndarray | BaseException | None = None
    if ready:
        try:
            probabilities = batch[0].forward(np.concatenate([inputs for inputs, _ in ready]))
        except Exception as exc:  # every request that was in the call gets the error
            probabilities = exc
    answers: list[Answer | BaseException] = []
    start = 0
    for part in prepared:
        if isinstance(part, BaseException):
            answers.append(part)
        elif any(part[1]):
            answers.append(Answer(part[0], part[1], None))
        elif isinstance(probabilities, BaseException):
            answers.append(probabilities)
        else:
            assert probabilities is not None
            stop = start + len(part[0])
            answers.append(Answer(part[0], part[1], probabilities[start:stop]))
            start = stop
    return answers


@dataclass
class BatchStats:
    """What the batcher has done since it started: model calls, images, the largest batch."""

    calls: int = 0
    images: int = 0
    requests: int = 0
    largest: int = 0

    def record(self, requests: int, images: int) -> None:
        self.calls += 1
        self.requests += requests
        self.images += images
        self.largest = max(self.largest, images)

    def to_dict(self) -> dict:
        """For /health: calls, requests and images so far, and how many requests shared a call."""
        return {
            "model_calls": self.calls,
            "requests": self.requests,
            "images": self.images,
            "largest_batch": self.largest,
            "mean_requests_per_call": round(self.requests / self.calls, 2) if self.calls else 0.0,
        }


class Batcher:
    """Gathers requests for up to `wait_s` (or until `max_images`) into one model call; a
    request of more than `max_images` images goes alone."""

    def __init__(self, max_images: int, wait_s: float, calls_in_flight: int = 1) -> None:
        self.max_images, self.wait_s = max_images, wait_s
        self.calls_in_flight = calls_in_flight
        self.stats = BatchStats()
        self._queue: asyncio.Queue[Pending] | None = None
        self._task: asyncio.Task | None = None
        self._coming = 0  # requests being prepared, not yet handed over
        self._alone = True  # the last model call served one request: no concurrent load

    @contextmanager
    def coming(self) -> Iterator[None]:
        """Around a request's preparation: the batcher waits for it rather than send without."""
        self._coming += 1
        try:
            yield
        finally:
            self._coming -= 1

    def start(self) -> None:
        """Start gathering (on the running event loop)."""
        self._queue = asyncio.Queue()
        self._task = asyncio.get_running_loop().create_task(self._run(), name="batcher")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    def submit(
        self,
        forward: Forward,
        images: np.ndarray | None = None,
        files: list[bytes] | None = None,
        prepare: Prepare | None = None,
        runner: Runner | None = None,
    ) -> asyncio.Future[Answer]:
        """Hand over one request's images: prepared `images`, or encoded `files` that `prepare`
        turns into inputs in the model's thread (or the runner's own way, given one). Await the
        future for the request's Answer."""
        if self._queue is None:
            raise RuntimeError("the batcher is not started")
        if (images is None) == (files is None or prepare is None):
            raise ValueError("give either prepared images, or files and a prepare function")
        answer = asyncio.get_running_loop().create_future()
        self._queue.put_nowait(Pending(forward, answer, images, files, prepare, runner))
        return answer

    async def predict(self, forward: Forward, images: np.ndarray) -> np.ndarray:
        """Class probabilities of one request's prepared images, computed in a shared call."""
        answer = await self.submit(forward, images=images)
        assert answer.probabilities is not None
        return answer.probabilities

    async def _gather(self, first: Pending) -> tuple[list[Pending], Pending | None]:
        """The requests of one model call, and a request for another model (after a swap)."""
        assert self._queue is not None
        batch, count = [first], first.size
        deadline = time.monotonic() + self.wait_s
        while count < self.max_images:
            try:
                if self._queue.empty():
                    left = deadline - time.monotonic()
                    if left <= 0 or (self._coming == 0 and self._alone):
                        break
                    pending = await asyncio.wait_for(self._queue.get(), left)
                else:
                    pending = self._queue.get_nowait()
            except TimeoutError:
                break
            if pending.forward != first.forward or count + pending.size > self.max_images:
                return batch, pending
            batch.append(pending)
            count += pending.size
        return batch, None

    async def _run(self) -> None:
        """Gather and send calls; up to `calls_in_flight` at once, so that the next call is
        waiting at the model when the one before is answered."""
        assert self._queue is not None
        slots = asyncio.Semaphore(self.calls_in_flight)
        calls: set[asyncio.Task] = set()
        carried: Pending | None = None
        try:
            while True:
                await slots.acquire()
                first = carried or await self._queue.get()
                batch, carried = await self._gather(first)
                call = asyncio.get_running_loop().create_task(self._call(batch))
                calls.add(call)
                call.add_done_callback(calls.discard)
                call.add_done_callback(lambda _: slots.release())
        finally:
            for call in list(calls):
                call.cancel()

    async def _call(self, batch: list[Pending]) -> None:
        """One model call, and each request's answer (or error) handed back."""
        first = batch[0]
        try:
            if first.runner is not None:
                answers = await first.runner.compute(batch)
            else:
                answers = await anyio.to_thread.run_sync(compute_batch, batch)
        except Exception as exc:  # not expected: compute_batch hands each request its error
            answers = [exc] * len(batch)
        called = [a for a in answers if isinstance(a, Answer) and a.probabilities is not None]
        if called:
            self.stats.record(len(called), sum(len(answer.inputs) for answer in called))
        self._alone = len(batch) == 1
        for pending, answer in zip(batch, answers, strict=True):
            if pending.answer is None or pending.answer.done():  # its client may have gone
                continue
            if isinstance(answer, BaseException):
                pending.answer.set_exception(answer)
            else:
                pending.answer.set_result(answer)
