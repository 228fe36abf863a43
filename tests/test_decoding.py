"""The decoding processes of multi-image requests: the same inputs as preparing here, in the
request's order, and a clear BrokenProcessPool when one has died."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from concurrent.futures.process import BrokenProcessPool

import numpy as np
import pytest

from digitflow.decoding import DecodingProcesses
from digitflow.imaging import InkSettings, encode_png, prepare_batch


def _digits(count: int) -> list[bytes]:
    rng = np.random.default_rng(count)
    return [encode_png((rng.random((28, 28)) > 0.7).astype(np.uint8) * 255) for _ in range(count)]


@pytest.fixture
def decoders():
    processes = DecodingProcesses(2)
    yield processes
    processes.close()


def test_shares_come_back_in_the_request_order_with_each_image_error(decoders) -> None:
    images = _digits(7)
    images[5] = b"not an image"
    ink = InkSettings()

    async def twice() -> list:  # two requests at once share the processes
        return await asyncio.gather(
            decoders.prepare(images, ink), decoders.prepare(images[:3], ink)
        )

    (inputs, errors), (first_inputs, first_errors) = asyncio.run(twice())
    expected_inputs, expected_errors = prepare_batch(images, ink)
    np.testing.assert_array_equal(inputs, expected_inputs)
    assert errors == expected_errors and errors[5].startswith("not an image")
    np.testing.assert_array_equal(first_inputs, expected_inputs[:3])
    assert first_errors == ["", "", ""]
    assert decoders.count == 2


def test_fewer_images_than_processes_use_as_many_processes_as_images(decoders) -> None:
    inputs, errors = asyncio.run(decoders.prepare(_digits(1), InkSettings()))
    assert inputs.shape == (1, 28, 28, 1) and errors == [""]


def test_a_killed_process_is_a_broken_pool_not_a_hang(decoders) -> None:
    """A real fault: SIGKILL one decoding process, as the OOM killer would."""
    pid = decoders._decoders[0].process.pid
    os.kill(pid, signal.SIGKILL)
    time.sleep(0.5)

    async def after() -> None:
        await asyncio.wait_for(decoders.prepare(_digits(8), InkSettings()), 10)

    with pytest.raises(BrokenProcessPool, match="decoding process died"):
        asyncio.run(after())
    assert decoders.broken


def test_sending_a_share_never_waits_for_a_busy_process() -> None:
    """The event loop sends the shares: while the only process prepares a large request, a second
    request's share (far over a pipe's buffer) must not hold the loop until it is free."""
    rng = np.random.default_rng(0)
    pages = [encode_png(rng.integers(0, 256, (1000, 1000), dtype=np.uint8)) for _ in range(48)]
    processes = DecodingProcesses(1)

    async def scenario() -> tuple[float, float]:
        gaps: list[float] = []

        async def ticker() -> None:
            last = time.perf_counter()
            while True:
                await asyncio.sleep(0.01)
                now = time.perf_counter()
                gaps.append(now - last)
                last = now

        ticking = asyncio.create_task(ticker())
        started = time.perf_counter()
        first = asyncio.create_task(processes.prepare(pages, InkSettings()))
        await asyncio.sleep(0.05)  # the process is busy with the first request
        await processes.prepare(pages[:4], InkSettings())
        await first
        ticking.cancel()
        return max(gaps), time.perf_counter() - started

    try:
        longest_gap, elapsed = asyncio.run(scenario())
    finally:
        processes.close()
    assert elapsed > 0.5, "the first request was too quick to keep the process busy"
    assert longest_gap < elapsed / 3, (longest_gap, elapsed)
