"""Where `digitflow serve` leaves a core idle under concurrent clients: a scheduler trace.

python bench/scheduling.py [--clients 16] [--seconds 12] [--trace-seconds 2] [--repeats 3]
    [-- SERVE_OPTIONS]   # e.g. -- --no-model-process: options for `digitflow serve`

Trains a quick champion in a fresh clone and starts `digitflow serve` (the defaults). While
--clients locust clients (bench/locustfile.py) send one PNG per request, the kernel's scheduler
events are recorded for --trace-seconds in the middle of the load (`perf record -e
sched:sched_switch -e sched:sched_wakeup -a`: Debian's linux-perf, run as root). From each trace:

- each core's idle time;
- the time a core sat idle while a task that could run (woken, or preempted) waited for another
  core: capacity lost to where the kernel put tasks, not to a lack of work;
- each wakeup's placement: how often the woken task was queued on a busy core while another
  core was idle, and how long those waited;
- the same, task by task: the event loop, the server's other threads, the model processes, the
  prediction log's writer, locust.

Writes bench/results/scheduling-<time>.json with every repeat and the medians.
"""

from __future__ import annotations

import argparse
import bisect
import json
import re
import shutil
import subprocess
import tempfile
import threading
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import serving
from common import median, write_result
from serving import free_port, load_images, locust, quick_champion, stop

TRACE_START_S = 4.0  # into each load: past locust's ramp-up
EVENT = re.compile(
    r"\[(\d+)\]\s+([\d.]+):\s+sched:(sched_switch|sched_wakeup|sched_waking):\s+(.*)"
)
SWITCH = re.compile(r"prev_pid=(\d+)\s.*?prev_state=(\S+)\s+==>.*\snext_pid=(\d+)\s")
WAKEUP = re.compile(r"\spid=(\d+)\s.*target_cpu=(\d+)")
Interval = tuple[float, float]


@dataclass
class Wait:
    """A task runnable but not running: from its wakeup (or preemption) until it ran."""

    tid: int
    start: float
    end: float
    ran_on: int


@dataclass
class Trace:
    """What a scheduler trace holds, as this benchmark reads it."""

    first: float = 0.0
    last: float = 0.0
    idle: dict[int, list[Interval]] = field(default_factory=lambda: defaultdict(list))
    waits: list[Wait] = field(default_factory=list)
    run_s: dict[int, float] = field(default_factory=lambda: defaultdict(float))
    woken: list[tuple[int, float]] = field(default_factory=list)  # (tid, when)
    onto_busy_beside_idle: list[tuple[int, float]] = field(default_factory=list)  # (tid, woken)
    seen: set[int] = field(default_factory=set)  # the cores with an event in the trace

    @property
    def cores(self) -> list[int]:
        return sorted(self.seen)

    @property
    def seconds(self) -> float:
        return self.last - self.first


def read_trace(lines: list[str]) -> Trace:
    """Scheduler events (`perf script -F cpu,time,event,trace` lines, in time order) -> idle
    intervals per core, waits, run time per task and wakeup placements. A core's state is known
    from its first switch on; events before that are ignored for it."""
    trace = Trace()
    running: dict[int, tuple[int, float]] = {}  # core -> (tid, since)
    waiting: dict[int, float] = {}  # tid -> runnable since
    for line in lines:
        match = EVENT.match(line.strip())
        if not match:
            continue
        core, when, kind, detail = int(match[1]), float(match[2]), match[3], match[4]
        trace.first = trace.first or when
        trace.last = when
        trace.seen.add(core)
        if kind != "sched_switch":  # a wakeup (perf sched records sched_waking)
            woken = WAKEUP.search(detail)
            if woken:
                _woken(trace, running, waiting, int(woken[1]), int(woken[2]), when)
            continue
        switch = SWITCH.search(detail)
        if switch:
            _switched(trace, running, waiting, core, when, switch)
    for core, (tid, since) in running.items():  # close what runs at the end
        _ran(trace, core, tid, since, trace.last)
    return trace


def _woken(trace: Trace, running: dict, waiting: dict, tid: int, target: int, when: float) -> None:
    if any(current == tid for current, _ in running.values()):
        return
    waiting.setdefault(tid, when)
    trace.woken.append((tid, when))
    target_busy = target in running and running[target][0] != 0
    another_idle = any(t == 0 for core, (t, _) in running.items() if core != target)
    if target_busy and another_idle:
        trace.onto_busy_beside_idle.append((tid, when))


def _switched(
    trace: Trace, running: dict, waiting: dict, core: int, when: float, switch: re.Match
) -> None:
    previous, state, following = int(switch[1]), switch[2], int(switch[3])
    if core in running:
        _ran(trace, core, running[core][0], running[core][1], when)
    if previous != 0 and state.startswith("R"):  # preempted: runnable, waiting again
        waiting[previous] = when
    running[core] = (following, when)
    if following != 0 and following in waiting:
        trace.waits.append(Wait(following, waiting.pop(following), when, core))


def _ran(trace: Trace, core: int, tid: int, since: float, until: float) -> None:
    if tid == 0:
        trace.idle[core].append((since, until))
    else:
        trace.run_s[tid] += until - since


def merged(intervals: list[Interval]) -> list[Interval]:
    """The union of intervals, as sorted disjoint intervals."""
    union: list[Interval] = []
    for start, end in sorted(intervals):
        if union and start <= union[-1][1]:
            union[-1] = (union[-1][0], max(union[-1][1], end))
        else:
            union.append((start, end))
    return union


def overlap_s(first: list[Interval], second: list[Interval]) -> float:
    """Seconds covered by both of two sorted disjoint interval lists."""
    total, i, j = 0.0, 0, 0
    while i < len(first) and j < len(second):
        start = max(first[i][0], second[j][0])
        end = min(first[i][1], second[j][1])
        total += max(0.0, end - start)
        if first[i][1] < second[j][1]:
            i += 1
        else:
            j += 1
    return total


def idle_beside_waiting_s(trace: Trace, waits: list[Wait]) -> float:
    """Core-seconds a core sat idle while one of `waits` was queued on another core."""
    total = 0.0
    for core in trace.cores:
        elsewhere = merged([(w.start, w.end) for w in waits if w.ran_on != core])
        total += overlap_s(merged(trace.idle[core]), elsewhere)
    return total


def waited_s(waits: list[Wait], woken: list[tuple[int, float]]) -> list[float]:
    """How long each task woken at a time waited before it ran (the first of its waits to end
    after it; 0 if the trace ends first)."""
    ends: dict[int, list[tuple[float, float]]] = defaultdict(list)
    for wait in waits:
        ends[wait.tid].append((wait.end, wait.start))
    for pairs in ends.values():
        pairs.sort()
    seconds = []
    for tid, when in woken:
        pairs = ends.get(tid, [])
        index = bisect.bisect_left(pairs, (when, when))
        seconds.append(pairs[index][0] - when if index < len(pairs) else 0.0)
    return seconds


def figures_of(trace: Trace, roles: dict[int, str]) -> dict:
    """A trace's figures, overall and for each role (tid -> role). Only the tasks with a role
    count as waiting: others (per-core kernel threads, perf itself) may not run elsewhere."""
    capacity = trace.seconds * len(trace.cores)
    idle = sum(end - start for core in trace.cores for start, end in trace.idle[core])
    studied = [wait for wait in trace.waits if wait.tid in roles]
    misplaced = waited_s(
        studied, [(tid, when) for tid, when in trace.onto_busy_beside_idle if tid in roles]
    )
    by_role: dict[str, dict] = {}
    for role in sorted(set(roles.values())):
        tids = {tid for tid, its_role in roles.items() if its_role == role}
        waits = [wait for wait in studied if wait.tid in tids]
        by_role[role] = {
            "cores_running": round(
                sum(trace.run_s.get(tid, 0.0) for tid in tids) / trace.seconds, 3
            ),
            "idle_beside_its_waits_share": round(idle_beside_waiting_s(trace, waits) / capacity, 4),
            "wakeups_onto_busy_core_beside_idle": sum(
                1 for tid, _ in trace.onto_busy_beside_idle if tid in tids
            ),
        }
    return {
        "trace_seconds": round(trace.seconds, 3),
        "cores": len(trace.cores),
        "idle_share": round(idle / capacity, 4),
        "idle_beside_waiting_share": round(idle_beside_waiting_s(trace, studied) / capacity, 4),
        "wakeups": sum(1 for tid, _ in trace.woken if tid in roles),
        "wakeups_onto_busy_core_beside_idle": len(misplaced),
        "their_mean_wait_ms": round(1000 * sum(misplaced) / len(misplaced), 3)
        if misplaced
        else 0.0,
        "by_role": by_role,
    }


def roles_of(server_pid: int, health: dict, locust_pid: int) -> dict[int, str]:
    """Thread id -> role, for the server's processes and locust's."""
    import psutil

    roles: dict[int, str] = {}

    def mark(pid: int, role: str, main_role: str | None = None) -> None:
        try:
            for thread in psutil.Process(pid).threads():
                roles[thread.id] = main_role if main_role and thread.id == pid else role
        except psutil.NoSuchProcess:
            pass

    mark(server_pid, "server threads", "event loop")
    for pid in health.get("model_process", {}).get("pids", []):
        mark(pid, "model processes")
    writer = health.get("prediction_log", {}).get("writer_pid")
    if writer:
        mark(writer, "log writer")
    mark(locust_pid, "locust")
    return roles


def record(seconds: float, into: Path) -> list[str]:
    """`seconds` of every core's scheduler events, as `perf script` lines; a clear error when
    perf is missing or may not trace."""
    perf = shutil.which("perf")
    if perf is None:
        raise SystemExit("perf not found: install Debian's linux-perf (apt-get install linux-perf)")
    events = ["-e", "sched:sched_switch", "-e", "sched:sched_wakeup"]
    command = [perf, "record", "-q", *events, "-a", "-o", str(into), "--", "sleep", str(seconds)]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"perf could not trace the scheduler: {done.stderr.strip()[-400:]}")
    script = [perf, "script", "-i", str(into), "-F", "cpu,time,event,trace"]
    return subprocess.run(script, capture_output=True, text=True, check=True).stdout.splitlines()


def traced_load(base: str, images: Path, work: Path, args: argparse.Namespace, server) -> dict:
    """One load of --clients, traced in its middle; the load's figures and the trace's."""
    import psutil
    import requests

    health = requests.get(f"{base}/health", timeout=10).json()
    lines: list[str] = []
    roles: dict[int, str] = {}

    def trace() -> None:
        time.sleep(TRACE_START_S)
        clients = [p for p in psutil.Process().children() if "locust" in " ".join(p.cmdline())]
        roles.update(roles_of(server.pid, health, clients[0].pid if clients else -1))
        with tempfile.TemporaryDirectory() as scratch:
            lines.extend(record(args.trace_seconds, Path(scratch) / "sched.data"))

    tracer = threading.Thread(target=trace)
    tracer.start()
    load = locust(base, images, args.clients, 1, args.seconds, work / "load", server.pid)
    tracer.join()
    if not lines:
        raise SystemExit("the trace did not finish: see the error above")
    return {"load": load, "trace": figures_of(read_trace(lines), roles)}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--clients", type=int, default=16, help="concurrent single-image clients")
    parser.add_argument("--seconds", type=int, default=12, help="seconds of each load")
    parser.add_argument("--trace-seconds", type=float, default=2.0, help="seconds traced per load")
    parser.add_argument("--repeats", type=int, default=3, help="loads, each on a fresh server")
    parser.add_argument("--images", type=int, default=256, help="distinct test images sent")
    parser.add_argument(
        "serve_options", nargs="*", help="after --: options for `digitflow serve` (default none)"
    )
    args = parser.parse_args()
    if args.seconds < TRACE_START_S + args.trace_seconds + 1:
        parser.error(f"--seconds must be at least --trace-seconds + {TRACE_START_S + 1:.0f}")

    work = quick_champion("scheduling")
    _, images = load_images(work, args.images)
    repeats = []
    for repeat in range(args.repeats):
        port = free_port()
        base = f"http://127.0.0.1:{port}"
        command = ["digitflow", "serve", "--port", str(port), *args.serve_options]
        server = serving.start(command, work, f"{base}/health")
        try:
            locust(base, images, 4, 1, 3, work / "warm", server.pid)
            repeats.append(traced_load(base, images, work, args, server))
        finally:
            stop(server)
        brief = {k: v for k, v in repeats[-1]["trace"].items() if k != "by_role"}
        print(f"repeat {repeat + 1}: {repeats[-1]['load']['requests_per_s']} requests/s, {brief}")
    traces = [run["trace"] for run in repeats]
    figures = {
        "settings": vars(args),
        "medians": {
            "requests_per_s": median([run["load"]["requests_per_s"] for run in repeats]),
            **{
                key: median([trace[key] for trace in traces])
                for key in ("idle_share", "idle_beside_waiting_share", "their_mean_wait_ms")
            },
            "wakeups_onto_busy_core_beside_idle_share": round(
                median(
                    [t["wakeups_onto_busy_core_beside_idle"] / max(1, t["wakeups"]) for t in traces]
                ),
                4,
            ),
        },
        "failures": sum(run["load"]["failures"] for run in repeats),
        "repeats": repeats,
    }
    write_result("scheduling", figures)
    print(json.dumps(figures["medians"], indent=2))


if __name__ == "__main__":
    main()
