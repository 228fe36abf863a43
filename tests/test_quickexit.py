"""The `digitflow` entry point ends without the interpreter's teardown, losing nothing."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

COMMAND = """
import atexit, sys
from pathlib import Path
from digitflow import quickexit

def command():
    atexit.register(lambda: Path(sys.argv[1]).write_text("handler ran"))
    print("buffered output, never flushed by the command", end="")
    {ending}

quickexit.run(command)
"""


@pytest.mark.parametrize(
    ("ending", "status"),
    [("pass", 0), ("sys.exit(3)", 3), ("sys.exit('bad input')", 1), ("1 / 0", 1)],
)
def test_status_output_and_exit_handlers_survive(tmp_path: Path, ending: str, status: int) -> None:
    marker = tmp_path / "marker"
    done = subprocess.run(
        [sys.executable, "-c", COMMAND.format(ending=ending), str(marker)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == status, done.stderr
    assert done.stdout == "buffered output, never flushed by the command"
    assert marker.read_text() == "handler ran"
    if ending == "1 / 0":
        assert "ZeroDivisionError" in done.stderr
    if "bad input" in ending:
        assert "bad input" in done.stderr
