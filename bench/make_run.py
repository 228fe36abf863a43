"""README command 1 as a new user runs it: `make run` in a fresh clone, install included.

python bench/make_run.py

Clones this repository's HEAD into bench/.work/make-run and runs `make run` there with the
environment a new user has: the host's python3 (not this checkout's .venv), no MLflow, Prefect
or digitflow settings except $DIGITFLOW_MNIST_SOURCE (made absolute; else this checkout's
data/mnist after a `make run`, else the public mirrors). Its output streams through as it comes.
The install takes packages from uv's cache where this machine has one (a new user's first
install downloads them). Records the whole command's wall time, the pipeline's (from the
summary it prints), the training's seconds, epochs and CPU use (reports/train_metrics.json),
the test accuracy and the promotion (reports/last_run.json), and the time forecast printed
after the first epoch.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

from common import REPO, fresh_clone, write_result

KEPT_SETTINGS = ("DIGITFLOW_MNIST_SOURCE",)
SETTING_PREFIXES = ("DIGITFLOW_", "MLFLOW_", "PREFECT_", "VIRTUAL_ENV")
PIPELINE_LINE = re.compile(r"pipeline finished in (\d+) s")
FORECAST_LINE = re.compile(r"training: the first epoch took .*")


def new_user_environment() -> dict[str, str]:
    """This environment without the project's settings and without any virtual environment on
    PATH (the Makefile builds its own from the host's python3)."""
    environment = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(SETTING_PREFIXES) or key in KEPT_SETTINGS
    }
    venvs = {str(Path(sys.prefix) / "bin"), str(REPO / ".venv" / "bin")}
    entries = environment.get("PATH", "").split(os.pathsep)
    environment["PATH"] = os.pathsep.join(entry for entry in entries if entry not in venvs)
    source = environment.get("DIGITFLOW_MNIST_SOURCE")
    local = REPO / "data" / "mnist"
    if source and "://" not in source:
        environment["DIGITFLOW_MNIST_SOURCE"] = str(Path(source).resolve())
    elif not source and local.is_dir():
        environment["DIGITFLOW_MNIST_SOURCE"] = str(local)
    return environment


def streamed(command: list[str], cwd: Path, environment: dict[str, str]) -> tuple[float, str]:
    """Run a command, echoing its output as it comes; (wall seconds, output). Fails loudly."""
    started = time.perf_counter()
    process = subprocess.Popen(
        command,
        cwd=cwd,
        env=environment,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    lines = []
    assert process.stdout is not None
    for line in process.stdout:
        print(line, end="", flush=True)
        lines.append(line)
    wall = time.perf_counter() - started
    if process.wait() != 0:
        raise RuntimeError(f"{' '.join(command)} exited {process.returncode}")
    return wall, "".join(lines)


def figures_of(wall_s: float, output: str, clone: Path) -> dict:
    """What the run printed and wrote: its times, the training, the accuracy and the decision."""
    pipeline = PIPELINE_LINE.search(output)
    forecast = FORECAST_LINE.search(output)
    training = json.loads((clone / "reports" / "train_metrics.json").read_text())
    last_run = json.loads((clone / "reports" / "last_run.json").read_text())
    pipeline_s = float(pipeline.group(1)) if pipeline else None
    return {
        "wall_seconds": round(wall_s, 1),
        "wall_minutes": round(wall_s / 60, 1),
        "pipeline_seconds": pipeline_s,
        "outside_pipeline_seconds": None if pipeline_s is None else round(wall_s - pipeline_s, 1),
        "train_seconds": training["train_seconds"],
        "epochs_run": training["epochs_run"],
        "train_cpu_utilisation": training["cpu_utilisation"],
        "forecast": forecast.group(0).strip() if forecast else None,
        "test_accuracy": last_run["test_accuracy"],
        "decision": last_run["decision"],
    }


def main() -> None:
    work = fresh_clone("make-run")
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], cwd=work, capture_output=True, text=True
    ).stdout.strip()
    print(f"make run in a fresh clone of {commit} at {work}", flush=True)
    wall_s, output = streamed(["make", "run"], work, new_user_environment())
    figures = {"commit": commit, **figures_of(wall_s, output, work)}
    write_result("make-run", figures)
    print(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
