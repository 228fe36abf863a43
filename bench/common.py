"""Shared helpers for the benchmarks: machine facts, timing, and result files."""

from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from importlib import metadata
from pathlib import Path

from digitflow.precision import BF16_FLAGS, CPUINFO, cpu_flags, first_cpu_fields

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"
# The classic tutorial's settings as params overrides: its model, 10 epochs, batch 128, constant
# learning rate, 20% validation, no augmentation, no early stopping, float32, one step per call.
TUTORIAL = {
    "model.architecture": "seed_cnn",
    "model.augment_rotation": 0,
    "model.augment_shift": 0,
    "model.augment_zoom": 0,
    "train.epochs": 10,
    "train.batch_size": 128,
    "train.lr_schedule": "constant",
    "train.learning_rate": 0.001,
    "train.early_stopping_patience": 10,
    "preprocess.val_fraction": 0.2,
    "train.precision": "float32",
    "train.steps_per_execution": 1,
}
PACKAGES = ("tensorflow-cpu", "keras", "prefect", "mlflow", "dvc", "great-expectations", "numpy")


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (Linux), else what platform knows."""
    return first_cpu_fields().get("model name") or platform.processor() or "unknown"


def cpu_generation(cpuinfo: Path = CPUINFO) -> str | None:
    """'family F model M' from /proc/cpuinfo: tells CPU generations apart where the model name
    does not (virtual machines report both AMD EPYC kinds as plain "AMD EPYC")."""
    fields = first_cpu_fields(cpuinfo)
    if "cpu family" not in fields or "model" not in fields:
        return None
    return f"family {fields['cpu family']} model {fields['model']}"


def machine() -> dict:
    """Where and with what a benchmark ran."""
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    flags = cpu_flags()
    return {
        "host": platform.node(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu": cpu_model(),
        "cpu_generation": cpu_generation(),
        "avx512": "avx512f" in flags,
        "cpus": os.cpu_count(),
        # Which hardware bfloat16 the CPU has decides what `train.precision: auto` trains in.
        "bf16_flags": sorted(flags & BF16_FLAGS),
        "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "versions": versions,
    }


def timed(cmd: list[str], cwd: Path, env: dict | None = None) -> tuple[float, str]:
    """Run a command to completion; return (wall seconds, combined output). Fails loudly."""
    bin_dir = str(Path(sys.executable).parent)
    full_env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", **(env or {})}
    started = time.perf_counter()
    result = subprocess.run(cmd, cwd=cwd, env=full_env, capture_output=True, text=True)
    elapsed = time.perf_counter() - started
    if result.returncode != 0:
        raise RuntimeError(
            f"{' '.join(cmd)} exited {result.returncode}:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
        )
    return elapsed, result.stdout + result.stderr


def write_result(name: str, figures: dict) -> Path:
    """Write bench/results/<name>-<timestamp>.json with the machine facts and the figures."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(
        json.dumps({"benchmark": name, "machine": machine(), **figures}, indent=2) + "\n"
    )
    print(f"wrote {path}")
    return path


def apply_params(params_file: Path, overrides: dict) -> None:
    """Set 'section.key' values in a params.yaml (what `dvc exp run -S` does)."""
    import yaml

    raw = yaml.safe_load(params_file.read_text())
    for dotted, value in overrides.items():
        section, key = dotted.split(".", 1)
        raw[section][key] = value
    params_file.write_text(yaml.safe_dump(raw, sort_keys=False))


def mnist_source() -> list[str]:
    """Where a scratch project gets MNIST: $DIGITFLOW_MNIST_SOURCE (read by ingest itself),
    else this checkout's data/mnist (after `make run`), else the public mirrors."""
    local = REPO / "data" / "mnist"
    if os.environ.get("DIGITFLOW_MNIST_SOURCE") or not local.is_dir():
        return []
    return ["--source", str(local)]


def fresh_clone(name: str) -> Path:
    """A fresh clone of this repository's HEAD at bench/.work/NAME (replacing one there)."""
    work = REPO / "bench" / ".work" / name
    if work.exists():
        shutil.rmtree(work)
    work.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run(["git", "clone", "-q", str(REPO), str(work)], check=True)
    return work


def project_copy(name: str, overrides: dict | None = None) -> Path:
    """A fresh clone of this repository under bench/.work/NAME with the dataset ingested."""
    work = fresh_clone(name)
    if overrides:
        apply_params(work / "params.yaml", overrides)
    timed(["digitflow", "ingest", *mnist_source()], work)
    return work


def busy_seconds(per_core: bool = False) -> list[tuple[float, float]]:
    """(busy, all) CPU seconds so far: one pair for the whole machine (summed over its cores), or
    one per core. Idle and I/O wait count as not busy."""
    import psutil

    rows = psutil.cpu_times(percpu=True) if per_core else [psutil.cpu_times()]
    return [(sum(t) - t.idle - getattr(t, "iowait", 0.0), sum(t)) for t in rows]


def median(values: list[float]) -> float:
    ordered = sorted(values)
    middle = len(ordered) // 2
    return ordered[middle] if len(ordered) % 2 else (ordered[middle - 1] + ordered[middle]) / 2


@contextmanager
def prefect_server(home: Path) -> Iterator[dict]:
    """A `prefect server` on 127.0.0.1 for the duration; yields the env that points flows at
    it (PREFECT_API_URL). The production set-up: scheduled runs talk to a running server."""
    import socket
    import urllib.request

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = {**os.environ, "PREFECT_HOME": str(home), "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    bin_dir = Path(sys.executable).parent
    server = subprocess.Popen(
        [str(bin_dir / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    api = f"http://127.0.0.1:{port}/api"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                urllib.request.urlopen(f"{api}/health", timeout=2).read()
                break
            except OSError:
                if time.monotonic() > deadline or server.poll() is not None:
                    raise RuntimeError("prefect server did not come up in 120 s") from None
                time.sleep(1)
        yield {"PREFECT_HOME": str(home), "PREFECT_API_URL": api}
    finally:
        server.terminate()
        server.wait(timeout=30)
