"""Processes that decode and prepare the images of multi-image requests, beside the event loop.

Python's lock would serialise decoding threads, so a request's images are cut into one share per
process. Each process has a pipe of its own, and the event loop reads a reply as soon as it is
there (as for the model process, modelprocess). With ProcessPoolExecutor the same shares went
through its queues and manager thread: two 32-image shares took 8.2-11.0 ms from send to
reply against 5.8-6.0 ms over pipes, while the shares themselves took 5-6 ms to prepare (AMD
EPYC, 2 cores, medians of 100 requests; docs/benchmarks.md has every round).

They are spawned, and import only the imaging code (not TensorFlow).
"""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing
import os
import queue
import signal
import threading
from collections import deque
from collections.abc import Sequence
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from multiprocessing.connection import Connection

import numpy as np

from .imaging import InkSettings, prepare_batch

Prepared = tuple[np.ndarray, list[str]]
"""One share's model inputs (n, 28, 28, 1) and one error message per image ('' = fine)."""
JOIN_TIMEOUT_S = 5


def received(conn: Connection, name: str) -> queue.SimpleQueue:
    """In a spawned worker (a decoding process, the model process): what the server sends down
    `conn`, read off the pipe as it comes by a thread of its own, so that the server's sends
    (made on its event loop) never wait for the work in hand; None last, when told to stop or
    when the pipe closes."""
    arrived: queue.SimpleQueue = queue.SimpleQueue()

    def receive() -> None:
        while True:
            try:
                work = conn.recv()
            except (EOFError, OSError):
                work = None
            arrived.put(work)
            if work is None:
                return

    threading.Thread(target=receive, name=name, daemon=True).start()
    return arrived


def yield_to_the_server() -> None:
    """In a spawned worker: Linux's SCHED_BATCH policy for each of its threads (some libraries
    start theirs when imported) and for those they start later (which inherit it). The kernel
    then lets a running task finish its turn when this worker wakes, instead of giving the
    worker the core at once: on two cores, a model process woken by a call down its pipe no
    longer takes the core from the server's event loop in the middle of a request
    (serve.yield_to_event_loop). Nothing changes where the policy does not exist."""
    if not hasattr(os, "SCHED_BATCH"):
        return
    try:
        threads = [int(tid) for tid in os.listdir("/proc/self/task")]
    except OSError:  # no /proc: this thread only
        threads = [0]
    for thread in threads:
        with contextlib.suppress(OSError):  # a thread that has just ended
            os.sched_setscheduler(thread, os.SCHED_BATCH, os.sched_param(0))


def leave_ctrl_c_to_the_server() -> None:
    """In a spawned worker: ignore SIGINT. A terminal's Ctrl-C reaches the whole process group;
    the server, stopping, ends its workers itself (None down the pipe, or the pipe closing), and
    a worker interrupted mid-wait would print a traceback or lose what it still had to do."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _prepare_shares(conn: Connection) -> None:
    """A decoding process: prepare each share sent (images, ink) until None or the pipe
    closes; reply ("ok", prepared) or ("error", the exception)."""
    leave_ctrl_c_to_the_server()
    shares = received(conn, "shares")
    while (work := shares.get()) is not None:
        images, ink = work
        try:
            reply: tuple[str, object] = ("ok", prepare_batch(images, ink))
        except Exception as exc:  # not an ImageError (prepare_batch keeps those per image)
            reply = ("error", RuntimeError(f"{exc.__class__.__name__}: {exc}"))
        conn.send(reply)


@dataclass
class _Decoder:
    """One decoding process, its pipe, and the replies awaited from it, oldest first."""

    process: multiprocessing.process.BaseProcess
    conn: Connection
    replies: deque[asyncio.Future] = field(default_factory=deque)


class DecodingProcesses:
    """`count` spawned processes that prepare shares of a request's images at once. Start them
    (blocking: spawning takes a second or two) before the first request; when one has died,
    `prepare` raises BrokenProcessPool and a new set is needed."""

    def __init__(self, count: int) -> None:
        from .modelprocess import running_package_first

        context = multiprocessing.get_context("spawn")
        self._decoders: list[_Decoder] = []
        with running_package_first():
            for _ in range(count):
                here, there = context.Pipe()
                process = context.Process(
                    target=_prepare_shares, args=(there,), name="digitflow-decode", daemon=True
                )
                process.start()
                there.close()
                self._decoders.append(_Decoder(process, here))
        for decoder in self._decoders:  # each has imported the imaging code and answers
            decoder.conn.send(([], InkSettings()))
            decoder.conn.recv()
        self.broken = False

    @property
    def count(self) -> int:
        return len(self._decoders)

    async def prepare(self, images: Sequence[bytes], ink: InkSettings) -> Prepared:
        """A request's images prepared in shares, one per process (the least busy first), in
        their order; BrokenProcessPool when a process has died."""
        share = -(-len(images) // self.count)
        shares = [images[start : start + share] for start in range(0, len(images), share)]
        chosen = sorted(self._decoders, key=lambda decoder: len(decoder.replies))
        replies: list[asyncio.Future] = []
        try:
            for decoder, part in zip(chosen[: len(shares)], shares, strict=True):
                replies.append(self._sent(decoder, list(part), ink))
        except BrokenProcessPool:  # the shares already sent failed with it
            for reply in replies:
                if reply.done():
                    reply.exception()  # seen: no "exception never retrieved" at exit
                else:
                    reply.cancel()
            raise
        parts = await asyncio.gather(*replies)
        return (
            np.concatenate([inputs for inputs, _ in parts]),
            [error for _, errors in parts for error in errors],
        )

    def _sent(self, decoder: _Decoder, images: list[bytes], ink: InkSettings) -> asyncio.Future:
        """Send one share; the future of its reply, read on the event loop when it arrives."""
        if self.broken:
            raise BrokenProcessPool("a decoding process died")
        try:
            decoder.conn.send((images, ink))
        except OSError:  # the process is gone
            self._broke()
            raise BrokenProcessPool("a decoding process died") from None
        loop = asyncio.get_running_loop()
        reply = loop.create_future()
        if not decoder.replies:
            loop.add_reader(decoder.conn.fileno(), self._read, decoder)
        decoder.replies.append(reply)
        return reply

    def _read(self, decoder: _Decoder) -> None:
        """On the event loop, when a pipe has data: the oldest share's reply from it."""
        fd = decoder.conn.fileno()
        os.set_blocking(fd, True)  # the loop made it non-blocking: read the whole reply
        try:
            status, value = decoder.conn.recv()
        except (EOFError, OSError):
            self._broke()
            return
        reply = decoder.replies.popleft()
        if not decoder.replies:
            asyncio.get_running_loop().remove_reader(fd)
        if reply.done():
            return
        if status == "ok":
            reply.set_result(value)
        else:
            reply.set_exception(value)

    def _broke(self) -> None:
        """A process died: every reply still awaited fails with BrokenProcessPool."""
        self.broken = True
        self._fail_replies(asyncio.get_running_loop())

    def _fail_replies(self, loop: asyncio.AbstractEventLoop | None) -> None:
        for decoder in self._decoders:
            if decoder.replies and loop is not None:
                loop.remove_reader(decoder.conn.fileno())
            while decoder.replies:
                reply = decoder.replies.popleft()
                if not reply.done():
                    reply.set_exception(BrokenProcessPool("a decoding process died"))

    def close(self) -> None:
        """Tell the processes to stop (a reply still awaited fails), and reap them in the
        background."""
        self.broken = True
        try:
            loop: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
        except RuntimeError:  # not on the event loop: no reader to remove
            loop = None
        self._fail_replies(loop)
        for decoder in self._decoders:
            with contextlib.suppress(OSError):  # already gone
                decoder.conn.send(None)
            decoder.conn.close()
        threading.Thread(target=self._reap, name="decode-reap", daemon=True).start()

    def _reap(self) -> None:
        for decoder in self._decoders:
            decoder.process.join(JOIN_TIMEOUT_S)
            if decoder.process.is_alive():
                decoder.process.kill()
