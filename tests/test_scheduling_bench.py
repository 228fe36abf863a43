"""bench/scheduling.py reads a scheduler trace: idle cores, waits, and where woken tasks went."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO

sys.path.append(str(REPO / "bench"))  # after everything else: its modules shadow nothing
import scheduling  # noqa: E402


def switch(core: int, when: float, previous: int, state: str, following: int) -> str:
    return (
        f"[{core:03d}] {when:.6f}: sched:sched_switch: prev_comm=a prev_pid={previous} "
        f"prev_prio=120 prev_state={state} ==> next_comm=b next_pid={following} next_prio=120"
    )


def wakeup(core: int, when: float, woken: int, target: int) -> str:
    return f"[{core:03d}] {when:.6f}: sched:sched_wakeup: comm=c pid={woken} prio=120 target_cpu={target:03d}"


LOOP, MODEL, CLIENT = 100, 200, 300
ROLES = {LOOP: "event loop", MODEL: "model processes", CLIENT: "locust"}
# Core 1 is idle from 1.000 to 1.004 while the model process, woken at 1.001 onto core 0 (busy
# with the loop), waits there until 1.003 (2 ms of an idle core beside a waiting task), and the
# loop, woken at 1.0035 onto core 0, waits until 1.005 (0.5 ms of them before core 1 is busy).
# Preempted at 1.005, the model process waits until core 1 takes it at 1.006: no core was idle.
TRACE = [
    switch(0, 1.000, 0, "R", LOOP),
    switch(1, 1.000, 50, "S", 0),
    wakeup(0, 1.001, MODEL, 0),
    switch(0, 1.003, LOOP, "S", MODEL),
    wakeup(0, 1.0035, LOOP, 0),
    switch(1, 1.004, 0, "R", CLIENT),
    switch(0, 1.005, MODEL, "R", LOOP),
    switch(1, 1.006, CLIENT, "S", MODEL),
    switch(0, 1.010, LOOP, "S", 0),
]


def test_idle_time_beside_a_waiting_task_is_counted_only_when_another_core_was_idle() -> None:
    figures = scheduling.figures_of(scheduling.read_trace(TRACE), ROLES)

    assert figures["cores"] == 2
    assert figures["trace_seconds"] == pytest.approx(0.010)
    assert figures["idle_share"] == pytest.approx(0.004 / 0.020)
    assert figures["idle_beside_waiting_share"] == pytest.approx(0.0025 / 0.020)
    assert figures["wakeups"] == 2  # the model process at 1.001, the loop at 1.0035
    assert figures["wakeups_onto_busy_core_beside_idle"] == 2
    assert figures["their_mean_wait_ms"] == pytest.approx((2.0 + 1.5) / 2)
    roles = figures["by_role"]
    assert roles["event loop"]["cores_running"] == pytest.approx(0.008 / 0.010)
    assert roles["model processes"]["cores_running"] == pytest.approx(0.006 / 0.010)
    assert roles["locust"]["cores_running"] == pytest.approx(0.002 / 0.010)
    assert roles["model processes"]["idle_beside_its_waits_share"] == pytest.approx(0.1)
    assert roles["event loop"]["idle_beside_its_waits_share"] == pytest.approx(0.025)
    assert roles["locust"]["idle_beside_its_waits_share"] == 0.0


def test_a_task_woken_onto_an_idle_core_or_without_a_role_is_not_counted() -> None:
    trace = [
        switch(0, 2.000, 0, "R", LOOP),
        switch(1, 2.000, 7, "S", 0),
        wakeup(0, 2.001, MODEL, 1),  # onto the idle core
        switch(1, 2.0011, 0, "R", MODEL),
        wakeup(1, 2.002, 99, 0),  # a per-core kernel thread, say: no role
        switch(0, 2.004, LOOP, "S", 99),
        switch(1, 2.004, MODEL, "S", 0),
        switch(0, 2.005, 99, "S", 0),
    ]

    figures = scheduling.figures_of(scheduling.read_trace(trace), ROLES)

    assert figures["wakeups"] == 1
    assert figures["wakeups_onto_busy_core_beside_idle"] == 0
    assert figures["idle_beside_waiting_share"] == 0.0
    assert figures["idle_share"] > 0


def test_intervals_are_merged_and_overlapped() -> None:
    union = scheduling.merged([(3.0, 4.0), (0.0, 1.0), (0.5, 2.0)])

    assert union == [(0.0, 2.0), (3.0, 4.0)]
    assert scheduling.overlap_s(union, [(1.5, 3.5)]) == pytest.approx(1.0)
    assert scheduling.overlap_s(union, [(2.0, 3.0)]) == 0.0


@pytest.mark.skipif(
    shutil.which("perf") is None or os.geteuid() != 0, reason="perf, run as root, traces cores"
)
def test_a_real_trace_sees_two_busy_processes_keep_both_cores_running(tmp_path: Path) -> None:
    spin = (  # 2 ms of work, 0.2 ms asleep, for 1.5 s: busy, and switched often
        "import time\nend = time.monotonic() + 1.5\nwhile time.monotonic() < end:\n"
        "    burst = time.monotonic() + 0.002\n    while time.monotonic() < burst: pass\n"
        "    time.sleep(0.0002)"
    )
    spinners = [subprocess.Popen([sys.executable, "-c", spin]) for _ in range(2)]
    try:
        lines = scheduling.record(0.5, tmp_path / "sched.data")
    finally:
        for spinner in spinners:
            spinner.wait()

    roles = {spinner.pid: "spinners" for spinner in spinners}
    figures = scheduling.figures_of(scheduling.read_trace(lines), roles)

    assert figures["cores"] == os.cpu_count()
    assert figures["by_role"]["spinners"]["cores_running"] > 1.0
    assert figures["wakeups"] > 100  # each sleep ends in a wakeup
