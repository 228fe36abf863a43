"""The server's dynamic batcher, on a stand-in forward pass (a real model is in test_load.py)."""

from __future__ import annotations

import asyncio
import threading
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


def test_a_request_over_max_images_goes_alone_and_gets_its_rows() -> None:
    sizes = [2, 6, 1, 1]

    async def scenario() -> tuple[list[np.ndarray], Batcher]:
        batcher = Batcher(max_images=4, wait_s=0.05)
        batcher.start()
        answers = await _concurrent(batcher, sizes)
        await batcher.stop()
        return answers, batcher

    answers, batcher = asyncio.run(scenario())
    for index, (answer, size) in enumerate(zip(answers, sizes, strict=True)):
        assert answer.shape == (size, 1) and np.all(answer == index * 784)
    assert batcher.stats.largest == 6  # the large request, in a call of its own
    assert batcher.stats.calls == 3  # [2], [6], [1, 1]


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


def _prepare_digits(files: list[bytes]) -> tuple[np.ndarray, list[str]]:
    """A stand-in preparation: each file holds one digit character; anything else is refused."""
    inputs = np.zeros((len(files), 28, 28, 1), dtype=np.float32)
    errors = []
    for index, data in enumerate(files):
        if data.isdigit():
            inputs[index] = int(data)
            errors.append("")
        else:
            errors.append(f"{data!r} is not a digit")
    return inputs, errors


def test_files_are_prepared_in_the_shared_call_and_a_bad_one_fails_only_its_request() -> None:
    async def scenario() -> tuple[list, Batcher]:
        batcher = Batcher(max_images=64, wait_s=0.05)
        batcher.start()
        with batcher.coming():
            handed = [
                batcher.submit(row_sums, files=[b"1", b"2"], prepare=_prepare_digits),
                batcher.submit(row_sums, files=[b"x"], prepare=_prepare_digits),
                batcher.submit(row_sums, images=np.full((1, 28, 28, 1), 3, np.float32)),
            ]
        answers = await asyncio.gather(*handed)
        await batcher.stop()
        return answers, batcher

    (two, bad, prepared), batcher = asyncio.run(scenario())
    assert two.errors == ["", ""] and two.probabilities[:, 0].tolist() == [784, 2 * 784]
    assert bad.errors == ["b'x' is not a digit"] and bad.probabilities is None
    assert prepared.probabilities[:, 0].tolist() == [3 * 784]
    assert batcher.stats.calls == 1 and batcher.stats.requests == 2 and batcher.stats.images == 3


def test_a_request_whose_preparation_raises_gets_its_own_error() -> None:
    def over_budget(files: list[bytes]) -> tuple[np.ndarray, list[str]]:
        raise ValueError("over the pixel budget")

    async def scenario() -> list:
        batcher = Batcher(max_images=64, wait_s=0.05)
        batcher.start()
        with batcher.coming():
            handed = [
                batcher.submit(row_sums, files=[b"1"], prepare=over_budget),
                batcher.submit(row_sums, files=[b"1"], prepare=_prepare_digits),
            ]
        outcomes = await asyncio.gather(*handed, return_exceptions=True)
        await batcher.stop()
        return outcomes

    refused, answered = asyncio.run(scenario())
    assert isinstance(refused, ValueError) and "pixel budget" in str(refused)
    assert answered.probabilities[:, 0].tolist() == [784]


@pytest.mark.parametrize("calls_in_flight", [1, 2])
def test_calls_in_flight_bounds_the_model_calls_made_at_once(calls_in_flight: int) -> None:
    running, most, lock = 0, 0, threading.Lock()

    def slow_sums(images: np.ndarray) -> np.ndarray:  # in a worker thread, like the model
        nonlocal running, most
        with lock:
            running += 1
            most = max(most, running)
        time.sleep(0.05)
        with lock:
            running -= 1
        return row_sums(images)

    async def scenario() -> list[np.ndarray]:
        batcher = Batcher(max_images=2, wait_s=0.0, calls_in_flight=calls_in_flight)
        batcher.start()
        images = [np.full((2, 28, 28, 1), index, np.float32) for index in range(6)]
        answers = await asyncio.gather(*(batcher.predict(slow_sums, each) for each in images))
        await batcher.stop()
        return answers

    answers = asyncio.run(scenario())
    assert [answer[:, 0].tolist() for answer in answers] == [[i * 784] * 2 for i in range(6)]
    assert most == calls_in_flight


def test_submit_needs_images_or_files_with_a_preparation() -> None:
    async def scenario() -> None:
        batcher = Batcher(8, 0.0)
        batcher.start()
        try:
            with pytest.raises(ValueError, match="either prepared images"):
                batcher.submit(row_sums, files=[b"1"])
        finally:
            await batcher.stop()

    asyncio.run(scenario())


def test_model_threads_leave_each_worker_a_core_for_its_python(monkeypatch) -> None:
    import os

    from digitflow.serving import model_threads

    monkeypatch.setattr(os, "sched_getaffinity", lambda _: set(range(8)))  # an 8-core machine
    assert [model_threads(0, workers) for workers in (1, 2, 4, 8, 16)] == [7, 3, 1, 1, 1]
    assert model_threads(3, 1) == 3  # a setting is taken as it is
    monkeypatch.setattr(os, "sched_getaffinity", lambda _: {0, 1})
    assert model_threads(0, 1) == 1


def test_call_parts_use_the_cores_the_model_threads_leave(monkeypatch) -> None:
    import os

    from digitflow.inference import Split
    from digitflow.serving import call_parts, model_split

    monkeypatch.setattr(os, "sched_getaffinity", lambda _: {0, 1})
    assert call_parts(1, 1) == 2  # 2 cores, 1 TensorFlow thread: two parts at once
    assert call_parts(2, 1) == 1 and call_parts(1, 2) == 1
    monkeypatch.setattr(os, "sched_getaffinity", lambda _: set(range(8)))
    assert [call_parts(7, 1), call_parts(1, 4), call_parts(3, 2)] == [1, 2, 1]
    monkeypatch.setenv("TF_NUM_INTEROP_THREADS", "3")  # the user's setting is the one used
    assert model_split(32) == Split(3, 32)


def test_a_large_call_is_cut_into_parts_computed_at_once_with_the_same_rows() -> None:
    from digitflow.inference import Split, SplitForward

    calls: list[tuple[int, str]] = []
    both_running = threading.Barrier(2, timeout=5)  # passes only if two parts run at once

    def forward(images: np.ndarray) -> np.ndarray:
        calls.append((len(images), threading.current_thread().name))
        if len(images) == 32:
            both_running.wait()
        return row_sums(images)

    idle = [True]
    cut = SplitForward(forward, Split(2, 32), idle=lambda: idle[0])
    images = np.random.default_rng(0).random((64, 28, 28, 1), dtype=np.float32)
    np.testing.assert_array_equal(cut(images), row_sums(images))
    assert sorted(size for size, _ in calls) == [32, 32]
    assert len({thread for _, thread in calls}) == 2
    calls.clear()
    cut(images[:31])  # under min_images: one call
    idle[0] = False
    cut(images)  # other calls wait for the model: one call
    assert [size for size, _ in calls] == [31, 64]


def test_no_split_makes_one_call_whatever_the_size() -> None:
    from digitflow.inference import NO_SPLIT, SplitForward

    sizes: list[int] = []
    whole = SplitForward(lambda images: sizes.append(len(images)) or row_sums(images), NO_SPLIT)
    whole(np.zeros((256, 28, 28, 1), dtype=np.float32))
    assert sizes == [256]
