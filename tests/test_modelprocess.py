"""The served model in a process of its own (serve.model_process): same answers as the server's
own copy, errors that cross the pipe intact, and calls that survive the process dying."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from functools import partial

import numpy as np
import pytest
from conftest import load_champion_here, needs_sched_batch, scheduling_policies
from fastapi import HTTPException

from digitflow import tracking
from digitflow.batching import Pending, compute_batch
from digitflow.config import load_params
from digitflow.imaging import encode_png, ink_settings, prepare_batch
from digitflow.modelprocess import prepare_within_budget

pytestmark = pytest.mark.slow

MAX_PIXELS = 28 * 28 * 4


@pytest.fixture(scope="module")
def served(champion):
    """The champion loaded here, with a model process of its own; closed after the module."""
    served = load_champion_here(champion, MAX_PIXELS)
    yield served
    served.close()


def _digits(count: int) -> list[bytes]:
    rng = np.random.default_rng(count)
    return [encode_png((rng.random((28, 28)) > 0.7).astype(np.uint8) * 255) for _ in range(count)]


def _requests(served, parts: list[list[bytes]]) -> list[Pending]:
    """Pending requests as the server makes them: files, prepared there with the pixel budget."""
    prepare = partial(prepare_within_budget, ink=served.scorer.ink, max_pixels=MAX_PIXELS)
    forward = served.scorer.probabilities
    return [Pending(forward, None, files=files, prepare=prepare) for files in parts]


def _in_process(served, parts: list[list[bytes]]) -> list:
    return asyncio.run(served.process.compute(_requests(served, parts)))


def test_the_model_process_answers_as_the_server_would(served) -> None:
    parts = [_digits(1), _digits(3), [b"not an image"], _digits(2)]
    there = _in_process(served, parts)
    here = compute_batch(_requests(served, parts))
    assert served.process.status()["pids"][0] not in (None, os.getpid())
    for theirs, ours in zip(there, here, strict=True):
        assert theirs.errors == ours.errors
        np.testing.assert_array_equal(theirs.inputs, ours.inputs)
        if ours.probabilities is None:  # the request with the broken file
            assert theirs.probabilities is None
        else:
            np.testing.assert_allclose(theirs.probabilities, ours.probabilities, atol=1e-6)
    assert there[2].errors[0]  # named, per file


def test_prepared_images_are_not_sent_back_yet_their_answer_holds_them(served) -> None:
    """A request whose images came prepared (by the decoding processes) gets its answer with
    those very inputs, though the model process sends back only what it computed."""
    from digitflow.modelprocess import _answers

    prepared, _ = prepare_batch(_digits(5), served.scorer.ink)
    forward = served.scorer.probabilities
    batch = [Pending(forward, None, images=prepared), *_requests(served, [_digits(2)])]
    there = asyncio.run(served.process.compute(batch))
    here = compute_batch(batch)
    assert there[0].inputs is prepared
    np.testing.assert_allclose(there[0].probabilities, here[0].probabilities, atol=1e-6)
    np.testing.assert_array_equal(there[1].inputs, here[1].inputs)  # prepared there: sent back
    crossing = _answers(forward, batch[1].prepare, [(prepared, None), (None, _digits(2))])
    assert crossing[0].inputs.size == 0 and crossing[1].inputs.shape == (2, 28, 28, 1)


def test_calls_cut_in_parts_give_the_same_probabilities_here_and_there(champion) -> None:
    """serve.split_images: a call of 4 images (the pixel budget here), cut in two halves
    computed at once, in the model process and in the server's own copy, against the server's
    copy in one call."""
    from digitflow.inference import Split

    cut = load_champion_here(champion, MAX_PIXELS, split=Split(2, 4))
    try:
        parts = [_digits(4)]
        there = _in_process(cut, parts)[0]
        inputs = there.inputs
        whole = cut.scorer.probabilities(inputs)
        assert cut.forward.split == Split(2, 4)
        np.testing.assert_allclose(cut.forward(inputs), whole, atol=1e-6)
        np.testing.assert_allclose(there.probabilities, whole, atol=1e-6)
    finally:
        cut.close()


def test_a_request_over_the_pixel_budget_gets_its_413_across_the_pipe(served) -> None:
    large = encode_png(np.zeros((28 * 3, 28 * 3), dtype=np.uint8))  # 7,056 pixels > 3,136
    answers = _in_process(served, [[large], _digits(1)])
    assert isinstance(answers[0], HTTPException) and answers[0].status_code == 413
    assert "pixels" in answers[0].detail
    assert answers[1].probabilities is not None  # the other request in the call is answered


def test_a_killed_model_process_loses_no_call_and_is_replaced(served) -> None:
    before = served.process.status()
    os.kill(before["pids"][0], signal.SIGKILL)
    time.sleep(0.5)
    answers = _in_process(served, [_digits(2)])  # made in this process meanwhile
    assert answers[0].probabilities is not None and answers[0].probabilities.shape == (2, 10)
    deadline = time.monotonic() + 180
    while served.process.status()["pids"][0] is None and time.monotonic() < deadline:
        time.sleep(0.5)
    after = served.process.status()
    assert after["restarts"] == before["restarts"] + 1
    assert after["pids"][0] not in (None, before["pids"][0])
    assert _in_process(served, [_digits(1)])[0].probabilities is not None


def test_a_closed_model_process_exits_and_calls_go_on_here(champion) -> None:
    served = load_champion_here(champion, MAX_PIXELS)
    [pid] = served.process.status()["pids"]
    served.close()
    deadline = time.monotonic() + 30
    while _alive(pid) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not _alive(pid)
    assert served.process.status()["pids"] == [None]
    assert _in_process(served, [_digits(1)])[0].probabilities is not None


def test_two_model_processes_take_two_calls_at_once(champion) -> None:
    """serve.model_processes: 2. A call sent while one computes goes to the idle process; both
    answer as the server's own copy would, and a killed one leaves the other answering."""
    served = load_champion_here(champion, MAX_PIXELS, processes=2)
    try:
        pids = served.process.status()["pids"]
        assert len(set(pids)) == 2 and None not in pids
        parts = [[_digits(2)], [_digits(3)]]

        async def two_calls():
            first = asyncio.ensure_future(served.process.compute(_requests(served, parts[0])))
            await asyncio.sleep(0)  # sent: the first process has it in flight
            sent_first = [member.busy[1] for member in served.process.members]
            second = asyncio.ensure_future(served.process.compute(_requests(served, parts[1])))
            await asyncio.sleep(0)
            sent_both = [member.busy[1] for member in served.process.members]
            return sent_first, sent_both, await first, await second

        sent_first, sent_both, *answers = asyncio.run(two_calls())
        assert sent_first == [1, 0] and sent_both == [1, 1]
        for part, [theirs] in zip(parts, answers, strict=True):
            [ours] = compute_batch(_requests(served, part))
            np.testing.assert_allclose(theirs.probabilities, ours.probabilities, atol=1e-6)
        os.kill(pids[0], signal.SIGKILL)
        time.sleep(0.5)
        assert _in_process(served, [_digits(1)])[0].probabilities is not None  # made here
        first, second = served.process.members
        assert first.busy == (True, 0) and second.busy == (False, 0)  # the first is replaced
        assert _in_process(served, [_digits(2)])[0].probabilities.shape == (2, 10)
        assert second.status()["pid"] == pids[1]
    finally:
        served.close()


@needs_sched_batch
def test_model_processes_yield_to_the_event_loop_when_asked(champion, served) -> None:
    """serve.yield_to_event_loop: the model process and every thread it started (TensorFlow's,
    LiteRT's, the pipe's reader) run under SCHED_BATCH; without it, under the default policy."""
    yielding = load_champion_here(champion, MAX_PIXELS, yields=True, runtime="litert")
    try:
        assert _in_process(yielding, [_digits(2)])[0].probabilities.shape == (2, 10)
        [pid] = yielding.process.status()["pids"]
        assert scheduling_policies(pid) == {os.SCHED_BATCH}
        assert len(os.listdir(f"/proc/{pid}/task")) > 1  # threads started after the policy
    finally:
        yielding.close()
    [default_pid] = served.process.status()["pids"]
    assert scheduling_policies(default_pid) == {os.SCHED_OTHER}


def _alive(pid: int) -> bool:
    import psutil

    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def test_a_model_the_process_cannot_load_is_a_clear_error(champion) -> None:
    from digitflow.modelprocess import ModelProcess

    params = load_params(champion.params)
    tracking.configure(champion, params)
    process = ModelProcess("models:/no-such-model/1", ink_settings(params.imaging), MAX_PIXELS)
    with pytest.raises(RuntimeError, match="could not load models:/no-such-model/1"):
        process.wait_ready()
    assert process.status()["pid"] is None
