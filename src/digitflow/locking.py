"""One pipeline run at a time: an exclusive lock on a file in the project root.

The lock is an OS-level `flock`, so it is released the moment its holder exits, even when
the holder is killed with SIGKILL: a crashed run never blocks the next one.
"""

from __future__ import annotations

import fcntl
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from .errors import DigitflowError

LOCK_NAME = ".digitflow.lock"
POLL_S = 0.5


class PipelineBusy(DigitflowError, RuntimeError):
    """Another pipeline run holds the lock."""


def lock_path(root: Path) -> Path:
    return root / LOCK_NAME


def _holder(path: Path) -> str:
    try:
        return path.read_text().strip() or "unknown"
    except OSError:
        return "unknown"


@contextmanager
def pipeline_lock(root: Path, wait_s: float | None = None) -> Iterator[None]:
    """Hold the project's pipeline lock; wait up to wait_s (None: forever, 0: not at all)."""
    path = lock_path(root)
    handle = open(path, "a+")  # noqa: SIM115 (held for the whole block)
    deadline = None if wait_s is None else time.monotonic() + wait_s
    try:
        while True:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if deadline is not None and time.monotonic() >= deadline:
                    raise PipelineBusy(
                        f"another pipeline run holds {path} ({_holder(path)}); "
                        "not starting a second one"
                    ) from None
                time.sleep(POLL_S)
        handle.seek(0)
        handle.truncate()
        handle.write(f"pid {os.getpid()} since {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
        handle.flush()
        yield
    finally:
        handle.close()  # closing releases the flock
