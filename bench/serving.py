"""`digitflow serve` under concurrent load, and against `mlflow models serve` of the same model.

python bench/serving.py [--seconds 10] [--repeats 3] [--images 256] [--rounds 3]

Trains the default architecture briefly in a fresh clone (inference cost does not depend on how
long it trained) and registers it as champion. Then, in the same run, on 127.0.0.1:
- bounded load with locust (bench/locustfile.py, closed loop, --seconds each, prediction log
  on): 1, 16 and 48 clients sending one PNG per request, and 16 clients sending 16 per
  request, in turn, --repeats times; against `digitflow serve` with 1 worker (its model calls in
  a model process, on LiteRT: the defaults), 1 worker making them in a thread
  (--no-model-process), 1 worker making them on TensorFlow (--runtime tensorflow), and 2
  workers. Requests/s, p50 and p99, failures, how many requests shared a model call (/health),
  and the cores used meanwhile by the server, by its busiest thread and by the whole machine,
  locust included (psutil); each figure the median over the repeats, every repeat kept;
- 64-image batches, sequential, the same base64 PNGs as JSON to `digitflow serve` and to
  `mlflow models serve` of the same registered champion: images/s, alternating for --rounds.
Ratios: 16-client over 1-client throughput and 16-client p99 over 1-client p50, each the median
of the repeats' ratios (a repeat's loads run back to back: this machine's pace drifts from
minute to minute), from every request's unrounded response time (locust's own percentiles, also
kept, are whole milliseconds); 48-client over 1-client throughput (more than at 16 clients means
16 clients left the cores some idle time); the 16-client ratio scaled to every core busy
(cores / machine_busy_cores: the most that fuller use of the cores could give at the CPU time
each request took under 16 clients, locust's own included); and digitflow over MLflow for
64-image batches.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from common import REPO, busy_seconds, median, project_copy, timed, write_result

QUICK = {
    "train.epochs": 3,
    "data.max_train_samples": 10000,
    "data.max_test_samples": 1000,
    "promotion.min_accuracy": 0.5,
}
LOCUSTFILE = REPO / "bench" / "locustfile.py"
BATCH = 64
LOADS = {
    "1 client x1": (1, 1),
    "16 clients x1": (16, 1),
    "48 clients x1": (48, 1),
    "16 clients x16": (16, 16),
}
SERVERS = {  # `digitflow serve` options of each server measured
    "1_worker": ["--workers", "1"],
    "1_worker_in_thread": ["--workers", "1", "--no-model-process"],
    "1_worker_tensorflow": ["--workers", "1", "--runtime", "tensorflow"],
    "2_worker": ["--workers", "2"],
}


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def wait_up(process: subprocess.Popen, url: str, what: str) -> None:
    import requests

    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{what} exited {process.returncode}")
        try:
            if requests.get(url, timeout=2).ok:
                return
        except requests.ConnectionError:
            pass
        time.sleep(0.5)
    process.kill()
    raise RuntimeError(f"{what} did not come up within 180 s")


def start(command: list[str], work: Path, health: str, env: dict | None = None):
    """Start a server command in `work`; returns the process once `health` answers."""
    bin_dir = str(Path(sys.executable).parent)
    environment = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", **(env or {})}
    process = subprocess.Popen(
        command, cwd=work, env=environment, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    wait_up(process, health, command[0])
    return process


def stop(process: subprocess.Popen) -> None:
    process.terminate()
    try:
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        process.kill()


def thread_cpu_seconds(server_pid: int) -> dict[tuple[int, int], float]:
    """CPU seconds so far of every thread of the server and its child processes (uvicorn
    workers, decoding processes), keyed by (process id, thread id)."""
    import psutil

    server = psutil.Process(server_pid)
    seconds = {}
    for process in [server, *server.children(recursive=True)]:
        try:
            for thread in process.threads():
                seconds[(process.pid, thread.id)] = thread.user_time + thread.system_time
        except psutil.NoSuchProcess:
            continue
    return seconds


def cpu_shares(server_pid: int, before: tuple, wall_s: float) -> dict:
    """Cores used during a load: by the server (all its processes), by its busiest thread
    (one event loop at 1.0 is the limit of one worker), and by the whole machine."""
    import psutil

    threads_before, (busy_before, all_before) = before
    threads_after = thread_cpu_seconds(server_pid)
    busy_after, all_after = busy_seconds()[0]
    used = {key: value - threads_before.get(key, 0.0) for key, value in threads_after.items()}
    cores = psutil.cpu_count()
    return {
        "server_cores": round(sum(used.values()) / wall_s, 2),
        "busiest_server_thread_cores": round(max(used.values(), default=0.0) / wall_s, 2),
        "machine_busy_cores": round(
            (busy_after - busy_before) / (all_after - all_before) * cores, 2
        ),
    }


def locust(
    base: str, images: Path, users: int, batch: int, seconds: int, csv: Path, server_pid: int
) -> dict:
    """One headless locust run; requests/s, latency percentiles (ms), failures, and the cores
    the server, its busiest thread and the machine used meanwhile."""
    import pandas as pd

    bin_dir = Path(sys.executable).parent
    before = thread_cpu_seconds(server_pid), busy_seconds()[0]
    started = time.monotonic()
    subprocess.run(
        [
            str(bin_dir / "locust"),
            "-f",
            str(LOCUSTFILE),
            "--headless",
            "--only-summary",
            "-u",
            str(users),
            "-r",
            str(users),
            "-t",
            f"{seconds}s",
            "--host",
            base,
            "--csv",
            str(csv),
        ],  # fmt: skip
        env={
            **os.environ,
            "LOAD_IMAGES": str(images),
            "LOAD_BATCH": str(batch),
            "LOAD_TIMES": f"{csv}.times",
        },
        capture_output=True,
        timeout=seconds + 120,
    )
    shares = cpu_shares(server_pid, before, time.monotonic() - started)
    stats = pd.read_csv(f"{csv}_stats.csv")
    row = stats[stats["Name"] == "Aggregated"].iloc[0]
    times_ms = np.loadtxt(f"{csv}.times", ndmin=1)
    return {
        "requests": int(row["Request Count"]),
        "failures": int(row["Failure Count"]),
        "requests_per_s": round(float(row["Requests/s"]), 1),
        "images_per_s": round(float(row["Requests/s"]) * batch, 1),
        "p50_ms": float(row["50%"]),
        "p99_ms": float(row["99%"]),
        "p50_ms_exact": round(float(np.percentile(times_ms, 50)), 3),
        "p99_ms_exact": round(float(np.percentile(times_ms, 99)), 3),
        **shares,
    }


def summary(runs: list[dict]) -> dict:
    """One load's repeats: counts summed, every rate, latency and share their median."""
    counted = ("requests", "failures")
    summed = {key: sum(run[key] for run in runs) for key in counted}
    medians = {
        key: median([run[key] for run in runs])
        for key in runs[0]
        if key not in counted and runs[0][key] is not None
    }
    return {**summed, **medians, "repeats": len(runs)}


def load_figures(work: Path, images: Path, options: list[str], seconds: int, repeats: int) -> dict:
    """The three loads against `digitflow serve OPTIONS`, warm-up first, repeated in turn
    `repeats` times (the machine's pace drifts: each ratio is of neighbouring runs)."""
    import requests

    port = free_port()
    base = f"http://127.0.0.1:{port}"
    server = start(["digitflow", "serve", "--port", str(port), *options], work, f"{base}/health")
    workers = int(options[options.index("--workers") + 1])
    runs: dict[str, list[dict]] = {name: [] for name in LOADS}
    try:
        locust(base, images, 4, 1, 3, work / "warm", server.pid)
        for repeat in range(repeats):
            for name, (users, batch) in LOADS.items():
                before = requests.get(f"{base}/health", timeout=10).json()["batching"]
                figures = locust(base, images, users, batch, seconds, work / "load", server.pid)
                after = requests.get(f"{base}/health", timeout=10).json()["batching"]
                calls = after["model_calls"] - before["model_calls"]
                shared = (after["requests"] - before["requests"]) / calls if calls else 0.0
                # with several workers, /health answers from any one of them: no difference
                figures["requests_per_model_call"] = round(shared, 2) if workers == 1 else None
                runs[name].append(figures)
                print(
                    f"{' '.join(options)}, {name}, {repeat + 1}: {json.dumps(figures)}", flush=True
                )
    finally:
        stop(server)
    return {name: {**summary(done), "runs": done} for name, done in runs.items()}


def batch_rates(work: Path, pngs: list[bytes], rounds: int) -> dict[str, list[float]]:
    """64-image JSON batches to digitflow serve and to mlflow models serve, alternating."""
    import requests

    from digitflow.config import load_params, paths
    from digitflow.inference import champion_uri
    from digitflow.tracking import tracking_uri

    project = paths(work)
    params = load_params(project.params)
    encoded = [base64.b64encode(data).decode() for data in pngs]
    chunks = [encoded[start : start + BATCH] for start in range(0, len(encoded), BATCH)]
    ours_port, mlflow_port = free_port(), free_port()
    ours = start(
        ["digitflow", "serve", "--port", str(ours_port)],
        work,
        f"http://127.0.0.1:{ours_port}/health",
    )
    theirs = start(
        [
            "mlflow",
            "models",
            "serve",
            "-m",
            champion_uri(params),
            "--env-manager",
            "local",
            "-h",
            "127.0.0.1",
            "-p",
            str(mlflow_port),
        ],  # fmt: skip
        work,
        f"http://127.0.0.1:{mlflow_port}/ping",
        {"MLFLOW_TRACKING_URI": tracking_uri(project)},
    )
    session = requests.Session()

    def ours_call(chunk: list[str]) -> None:
        answer = session.post(
            f"http://127.0.0.1:{ours_port}/predict?log=false", json={"images": chunk}
        )
        answer.raise_for_status()
        assert len(answer.json()["predictions"]) == len(chunk)

    def theirs_call(chunk: list[str]) -> None:
        payload = {"dataframe_split": {"columns": ["image"], "data": [[item] for item in chunk]}}
        answer = session.post(f"http://127.0.0.1:{mlflow_port}/invocations", json=payload)
        answer.raise_for_status()
        assert len(answer.json()["predictions"]) == len(chunk)

    rates: dict[str, list[float]] = {"digitflow_serve": [], "mlflow_models_serve": []}
    try:
        for call in (ours_call, theirs_call):  # warm-up
            for chunk in chunks[:3]:
                call(chunk)
        for round_number in range(rounds):
            for name, call in (
                ("digitflow_serve", ours_call),
                ("mlflow_models_serve", theirs_call),
            ):
                started = time.perf_counter()
                for chunk in chunks:
                    call(chunk)
                rates[name].append(round(len(encoded) / (time.perf_counter() - started), 1))
            print(f"64-image batches, round {round_number + 1}: {rates}", flush=True)
    finally:
        stop(ours)
        stop(theirs)
    return rates


def quick_champion(name: str) -> Path:
    """A fresh clone under bench/.work/<name> with a briefly trained champion (QUICK), trained
    on the clone's own stores: no Prefect server or MLflow tracking URI from the environment,
    here or in the servers started afterwards."""
    work = project_copy(name, QUICK)
    isolated = {"PREFECT_HOME": str(work / ".prefect"), "PREFECT_API_URL": ""}
    timed(["digitflow", "run"], work, {**isolated, "MLFLOW_TRACKING_URI": ""})
    os.environ.pop("MLFLOW_TRACKING_URI", None)
    return work


def load_images(work: Path, count: int) -> tuple[list[bytes], Path]:
    """The first `count` MNIST test digits of the clone as PNGs, dark ink on white like a scan,
    and the folder work/load-images holding them (for bench/locustfile.py)."""
    from digitflow.config import load_params, paths
    from digitflow.dataset import load_raw
    from digitflow.imaging import encode_png

    project = paths(work)
    digits = load_raw(project, load_params(project.params).data)["test"].images[:count]
    pngs = [encode_png(255 - digit) for digit in digits]
    images = work / "load-images"
    images.mkdir(exist_ok=True)
    for index, data in enumerate(pngs):
        (images / f"{index:04d}.png").write_bytes(data)
    return pngs, images


def serve_params(work: Path) -> dict:
    """The clone's serve settings, as the result file records them."""
    from digitflow.config import load_params, paths

    return load_params(paths(work).params).serve.model_dump()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seconds", type=int, default=10, help="seconds of each locust load")
    parser.add_argument(
        "--repeats", type=int, default=3, help="times each server runs its three loads, in turn"
    )
    parser.add_argument("--images", type=int, default=256, help="distinct test images sent")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of 64-image batches")
    args = parser.parse_args()

    work = quick_champion("serving")
    os.chdir(work)
    pngs, images = load_images(work, args.images)

    loads = {
        key: load_figures(work, images, options, args.seconds, args.repeats)
        for key, options in SERVERS.items()
    }
    rates = batch_rates(work, pngs, args.rounds)
    medians = {name: median(values) for name, values in rates.items()}
    ratios = {}
    cores = os.cpu_count() or 1
    for key, figures in loads.items():
        ones, manys = figures["1 client x1"]["runs"], figures["16 clients x1"]["runs"]
        forty_eights = figures["48 clients x1"]["runs"]
        pairs = list(zip(ones, manys, strict=True))
        throughput = [many["requests_per_s"] / one["requests_per_s"] for one, many in pairs]
        latency = [many["p99_ms_exact"] / one["p50_ms_exact"] for one, many in pairs]
        throughput_48 = [
            many_48["requests_per_s"] / one["requests_per_s"]
            for one, many_48 in zip(ones, forty_eights, strict=True)
        ]
        ceiling = [
            ratio * cores / many["machine_busy_cores"]
            for ratio, (_, many) in zip(throughput, pairs, strict=True)
        ]
        ratios[f"{key}_16_over_1_client_throughput"] = round(median(throughput), 2)
        ratios[f"{key}_16_client_p99_over_1_client_p50"] = round(median(latency), 2)
        ratios[f"{key}_48_over_1_client_throughput"] = round(median(throughput_48), 2)
        ratios[f"{key}_16_over_1_client_throughput_all_cores_busy"] = round(median(ceiling), 2)
        ratios[f"{key}_16_over_1_client_throughput_each_repeat"] = [round(r, 2) for r in throughput]
        ratios[f"{key}_16_client_p99_over_1_client_p50_each_repeat"] = [
            round(r, 2) for r in latency
        ]
    ratios["batch64_digitflow_over_mlflow"] = round(
        medians["digitflow_serve"] / medians["mlflow_models_serve"], 2
    )
    figures = {
        "settings": {
            "seconds_per_load": args.seconds,
            "repeats": args.repeats,
            "servers": SERVERS,
            "images": len(pngs),
            "batch": BATCH,
            "rounds": args.rounds,
            "serve": serve_params(work),
        },
        "load": loads,
        "failed_requests": sum(f["failures"] for load in loads.values() for f in load.values()),
        "batch64_images_per_second": rates,
        "batch64_median_images_per_second": medians,
        "ratios": ratios,
    }
    write_result("serving", figures)
    print(json.dumps({"ratios": ratios, "failed_requests": figures["failed_requests"]}, indent=2))


if __name__ == "__main__":
    main()
