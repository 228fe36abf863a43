"""The server's dynamic batcher, on a stand-in forward pass (a real model is in test_load.py)."""

from __future__ import annotations

import asyncio
import time

import numpy as np
import pytest

from digitflow.batching import Batcher


def row_sums(images: np.ndarray) -> np.ndarray:
    """A forward pass whose answer for each image is its own pixel sum: rows are traceable."""
    return images.reshape(len(images), -1).sum(axis=1, keepdims=True)


async def _concurrent(batcher: Batcher, sizes: list[int]) -> list[np.ndarray]:
    async def one(index: int, size: int) -> np.ndarray:
        with batcher.coming():
            await asyncio.sleep(0)  # the others announce themselves meanwhile
            images = np.full((size, 28, 28, 1), index, dtype=np.float32)
        return await batcher.predict(row_sums, images)

    return await asyncio.gather(*(one(i, size) for i, size in enumerate(sizes)))


def test_concurrent_requests_share_a_call_and_get_their_own_rows() -> None:
    async def scenario() -> tuple[list[np.ndarray], Batcher]:
        batcher = Batcher(max_images=64, wait_s=0.05)
        batcher.start()
        answers = await _concurrent(batcher, [1, 3, 2, 1])
        await batcher.stop()
        return answers, batcher

    answers, batcher = asyncio.run(scenario())
    for index, (answer, size) in enumerate(zip(answers, [1, 3, 2, 1], strict=True)):
        assert answer.shape == (size, 1)
        assert np.all(answer == index * 784)
    assert batcher.stats.calls == 1
    assert batcher.stats.largest == 7


def test_a_call_never_exceeds_max_images() -> None:
    async def scenario() -> Batcher:
        batcher = Batcher(max_images=4, wait_s=0.05)
        batcher.start()
        await _concurrent(batcher, [3, 3, 2, 4])
        await batcher.stop()
        return batcher

    batcher = asyncio.run(scenario())
    assert batcher.stats.largest <= 4
    assert batcher.stats.images == 12


def test_a_lone_request_does_not_wait_for_the_window() -> None:
    async def scenario() -> float:
        batcher = Batcher(max_images=64, wait_s=5.0)
        batcher.start()
        started = time.perf_counter()
        await batcher.predict(row_sums, np.ones((1, 28, 28, 1), dtype=np.float32))
        elapsed = time.perf_counter() - started
        await batcher.stop()
        return elapsed

    assert asyncio.run(scenario()) < 2.0


def test_a_failing_model_call_fails_each_request_of_it() -> None:
    def broken(images: np.ndarray) -> np.ndarray:
        raise RuntimeError("model exploded")

    async def scenario() -> list:
        batcher = Batcher(max_images=64, wait_s=0.05)
        batcher.start()
        images = np.zeros((1, 28, 28, 1), dtype=np.float32)
        outcomes = await asyncio.gather(
            batcher.predict(broken, images), batcher.predict(broken, images), return_exceptions=True
        )
        after = await batcher.predict(row_sums, images)  # the batcher keeps going
        await batcher.stop()
        return [*outcomes, after]

    first, second, after = asyncio.run(scenario())
    assert isinstance(first, RuntimeError) and isinstance(second, RuntimeError)
    assert after.shape == (1, 1)


def test_predict_before_start_is_a_clear_error() -> None:
    with pytest.raises(RuntimeError, match="not started"):
        asyncio.run(Batcher(8, 0.0).predict(row_sums, np.zeros((1, 28, 28, 1), np.float32)))
