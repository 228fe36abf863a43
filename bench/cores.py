"""What holds training below the machine's cores: short fits under thread settings, and the
machine's own pace.

python bench/cores.py [--rounds 3] [--steps 150]

Each trial is a fresh process (TensorFlow's thread pools are fixed at start-up) that trains the
default model (`digit_cnn`, float32, batches of 128, the default before 256 and 512) for --steps steps
after a warm-up, and records training images/s, the process's CPU utilisation (CPU seconds /
(wall x cores)) and each core's busy share (psutil) over those steps, and the CPU seconds of the process's four busiest threads
(name, seconds, whether it is the main thread). Settings, alternating round by round:
  default          - TensorFlow's own thread pools (one thread per core for each)
  intra_1          - TF_NUM_INTRAOP_THREADS=1, TF_NUM_INTEROP_THREADS=2: ops run one thread
                     each, two at a time
  intra_4          - TF_NUM_INTRAOP_THREADS=4: finer shards than cores
  fixed_batch      - default threads, one batch held in memory and fed again and again: no
                     input pipeline at all
  batch_256        - default threads, batches of 256 (the default before 512; the same images
                     per trial: half the steps)
  one_core         - default threads, the whole process held to one core (the reference rate
                     the other settings are compared with)
  autotune         - default threads, tf.data autotuning on (train.tf_data_autotune: true);
                     every other setting takes params.yaml's value (off)
Before each trial, the machine's pace: one busy-loop process per core for --spin seconds, the
loop iterations each completed per second (a core the host shares or caps completes fewer).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from multiprocessing import Pool
from pathlib import Path

from common import busy_seconds, median, project_copy, timed, write_result

SETTINGS: dict[str, dict[str, str]] = {
    "default": {},
    "intra_1": {"TF_NUM_INTRAOP_THREADS": "1", "TF_NUM_INTEROP_THREADS": "2"},
    "intra_4": {"TF_NUM_INTRAOP_THREADS": "4"},
    "fixed_batch": {},
    "batch_256": {},
    "one_core": {},
    "autotune": {},
}
ONE_CORE = "one_core"
AUTOTUNE = "autotune"
ONE_CORE_TOLERANCE = 0.02  # a trial this close to the one-core rate counts as no faster
BATCH = 128
BATCH_OF = {"batch_256": 256}  # settings that train on other batch sizes
WARM_STEPS = 20


def _spin(seconds: float) -> float:
    """Millions of loop iterations per second on one core."""
    count, end = 0, time.perf_counter() + seconds
    while time.perf_counter() < end:
        for _ in range(10_000):
            count += 1
    return count / seconds / 1e6


def machine_pace(seconds: float) -> list[float]:
    """Loop iterations per second (millions) of one busy process per core, side by side."""
    cores = len(os.sched_getaffinity(0))
    with Pool(cores) as pool:
        return [round(rate, 1) for rate in pool.map(_spin, [seconds] * cores)]


def thread_cpu_seconds() -> dict[str, tuple[str, float]]:
    """This process's threads (Linux /proc): id -> (name, CPU seconds so far)."""
    ticks = os.sysconf("SC_CLK_TCK")
    threads = {}
    for task in Path("/proc/self/task").iterdir():
        try:
            stat = (task / "stat").read_text()
        except OSError:  # the thread ended
            continue
        name = stat[stat.index("(") + 1 : stat.rindex(")")]
        fields = stat[stat.rindex(")") + 2 :].split()
        threads[task.name] = (name, (int(fields[11]) + int(fields[12])) / ticks)
    return threads


def busiest_threads(before: dict, after: dict, count: int = 4) -> list[list]:
    """The `count` threads that used the most CPU between two thread_cpu_seconds() readings:
    [name, CPU seconds, main thread or not]."""
    used = [
        [name, round(seconds - before.get(tid, (name, 0.0))[1], 2), int(tid) == os.getpid()]
        for tid, (name, seconds) in after.items()
    ]
    return sorted(used, key=lambda row: -row[1])[:count]


def trial(work: Path, setting: str, steps: int) -> dict:
    """In a fresh process: a short fit (`steps` of BATCH images' worth), its images/s, CPU
    utilisation and per-core busy share."""
    import numpy as np
    import tensorflow as tf

    sys.path.insert(0, str(work / "src"))
    from digitflow import config, inputs
    from digitflow.model import build_model
    from digitflow.preprocess import load_split
    from digitflow.train import optimizer

    params = config.load_params(work / "params.yaml")
    fit = load_split(config.paths(work), "train")
    model = build_model(params.model)
    batch_size = BATCH_OF.get(setting, BATCH)
    steps = steps * BATCH // batch_size
    model.compile(
        optimizer=optimizer(params.train, len(fit.y) // batch_size),
        loss="sparse_categorical_crossentropy",
        metrics=["accuracy"],
    )
    if setting == "fixed_batch":
        batch = (tf.constant(fit.x[:BATCH]), tf.constant(fit.y[:BATCH].astype(np.int32)))
        data = tf.data.Dataset.from_tensors(batch).repeat()
    else:
        autotune = setting == AUTOTUNE or params.train.tf_data_autotune
        data = inputs.training_dataset(
            fit, batch_size, params.train.seed, params.model, autotune=autotune
        ).repeat()
    model.fit(data, steps_per_epoch=WARM_STEPS, epochs=1, verbose=0)
    threads_before = thread_cpu_seconds()
    before, cpu_before, started = busy_seconds(per_core=True), os.times(), time.perf_counter()
    model.fit(data, steps_per_epoch=steps, epochs=1, verbose=0)
    wall, cpu_after, after = time.perf_counter() - started, os.times(), busy_seconds(per_core=True)
    threads = busiest_threads(threads_before, thread_cpu_seconds())
    cpu = (cpu_after.user + cpu_after.system) - (cpu_before.user + cpu_before.system)
    busy = [
        round((busy_end - busy_start) / (all_end - all_start), 3)
        for (busy_start, all_start), (busy_end, all_end) in zip(before, after, strict=True)
    ]
    return {
        "images_per_s": round(steps * batch_size / wall, 1),
        "cpu_utilisation": round(cpu / (wall * len(os.sched_getaffinity(0))), 3),
        "core_busy": busy,
        "seconds": round(wall, 2),
        "busiest_threads": threads,
    }


def run_trial(work: Path, setting: str, steps: int) -> dict:
    """One trial in a subprocess with the setting's environment."""
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", **SETTINGS[setting]}
    command = [sys.executable, __file__, "--trial", setting, "--work", str(work)]
    first_core = min(os.sched_getaffinity(0))
    done = subprocess.run(
        [*command, "--steps", str(steps)],
        env=env,
        capture_output=True,
        text=True,
        check=False,
        preexec_fn=(lambda: os.sched_setaffinity(0, {first_core})) if setting == ONE_CORE else None,
    )
    if done.returncode != 0:
        raise RuntimeError(f"trial {setting} exited {done.returncode}:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def at_one_core_rate(trials: dict[str, list[dict]], tolerance: float = ONE_CORE_TOLERANCE) -> dict:
    """How many trials with both cores ran no faster than the one-core trials (within
    `tolerance` of their median rate), and their CPU utilisation."""
    reference = median([t["images_per_s"] for t in trials[ONE_CORE]])
    others = [t for name, rows in trials.items() if name != ONE_CORE for t in rows]
    slow = [t for t in others if t["images_per_s"] <= reference * (1 + tolerance)]
    return {
        "one_core_images_per_s": reference,
        "trials": len(others),
        "at_one_core_rate": len(slow),
        "their_cpu_utilisation": sorted(t["cpu_utilisation"] for t in slow),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--spin", type=float, default=4.0, help="seconds of the pace check")
    parser.add_argument("--trial", choices=list(SETTINGS), help=argparse.SUPPRESS)
    parser.add_argument("--work", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.trial:
        print(json.dumps(trial(args.work, args.trial, args.steps)))
        return
    work = project_copy("cores", {"train.precision": "float32"})
    timed(["digitflow", "preprocess"], work)
    trials: dict[str, list[dict]] = {name: [] for name in SETTINGS}
    for round_number in range(1, args.rounds + 1):
        for name in SETTINGS:
            pace = machine_pace(args.spin)
            result = {**run_trial(work, name, args.steps), "machine_pace": pace}
            trials[name].append(result)
            print(f"round {round_number} {name}: {result}", flush=True)
    summary = {
        name: {
            "images_per_s_median": median([t["images_per_s"] for t in rows]),
            "cpu_utilisation_median": median([t["cpu_utilisation"] for t in rows]),
            "cpu_utilisation_max": max(t["cpu_utilisation"] for t in rows),
        }
        for name, rows in trials.items()
    }
    summary["at_one_core_rate"] = at_one_core_rate(trials)
    write_result(
        "cores",
        {
            "settings": {
                "rounds": args.rounds,
                "steps": args.steps,
                "batch": BATCH,
                "batch_of": BATCH_OF,
                "spin_seconds": args.spin,
                "environments": SETTINGS,
            },
            "trials": trials,
            "summary": summary,
        },
    )


if __name__ == "__main__":
    main()
