"""Dynamic batching for the server: concurrent requests' images go through the model together.

Each request announces itself (`coming`), prepares its images off the event loop and hands them
to a `Batcher`. The batcher waits at most `wait_s` after the first one for others, then makes one
model call for up to `max_images` images and gives each request its own rows back. A lone
request (no other on its way, and the last call served one request) is sent at once, without
waiting; requests that arrive while the model is busy form the next batch, so under load the
model runs back to back on full batches.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import anyio
import numpy as np

Forward = Callable[[np.ndarray], np.ndarray]


@dataclass
class _Pending:
    """One request's prepared images, the model they are for, and where its answer goes."""

    images: np.ndarray
    forward: Forward
    answer: asyncio.Future


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
    """Gathers requests for up to `wait_s` (or until `max_images`) into one model call."""

    def __init__(self, max_images: int, wait_s: float) -> None:
        self.max_images, self.wait_s = max_images, wait_s
        self.stats = BatchStats()
        self._queue: asyncio.Queue[_Pending] | None = None
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

    async def predict(self, forward: Forward, images: np.ndarray) -> np.ndarray:
        """Class probabilities of one request's prepared images, computed in a shared call."""
        if self._queue is None:
            raise RuntimeError("the batcher is not started")
        answer = asyncio.get_running_loop().create_future()
        await self._queue.put(_Pending(images, forward, answer))
        return await answer

    async def _gather(self, first: _Pending) -> tuple[list[_Pending], _Pending | None]:
        """The requests of one model call, and a request for another model (after a swap)."""
        assert self._queue is not None
        batch, count = [first], len(first.images)
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
            if pending.forward != first.forward or count + len(pending.images) > self.max_images:
                return batch, pending
            batch.append(pending)
            count += len(pending.images)
        return batch, None

    async def _run(self) -> None:
        assert self._queue is not None
        carried: _Pending | None = None
        while True:
            first = carried or await self._queue.get()
            batch, carried = await self._gather(first)
            images = np.concatenate([pending.images for pending in batch])
            try:
                probabilities = await anyio.to_thread.run_sync(first.forward, images)
            except Exception as exc:  # every request of the call gets the error
                for pending in batch:
                    if not pending.answer.done():
                        pending.answer.set_exception(exc)
                continue
            self.stats.record(len(batch), len(images))
            self._alone = len(batch) == 1
            start = 0
            for pending in batch:
                stop = start + len(pending.images)
                if not pending.answer.done():  # its client may have gone
                    pending.answer.set_result(probabilities[start:stop])
                start = stop
