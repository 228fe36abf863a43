"""Served model vs plain `model.predict`: single-image HTTP latency and batch throughput.

python bench/serving.py [--requests 300] [--images 2048] [--rounds 3]

Trains the default architecture briefly in a fresh clone (inference cost does not depend on how
long it trained), starts `digitflow serve` on 127.0.0.1, then in the same run measures:
- latency of POST /predict with one PNG, sequential requests (p50, p90, p99);
- images/s of POST /predict with batches of serve.max_batch PNGs;
- images/s of the pyfunc model in-process on the same PNG bytes (preprocessing included);
- images/s of plain keras `model.predict` on the same images already as 28x28 arrays, per
  batch and in one call.
Batch figures alternate between the sides for --rounds rounds; the medians and ratios are written.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from common import median, project_copy, timed, write_result

QUICK = {
    "train.epochs": 3,
    "data.max_train_samples": 10000,
    "data.max_test_samples": 1000,
    "promotion.min_accuracy": 0.5,
}


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def start_server(work: Path, port: int, *options: str) -> subprocess.Popen:
    """`digitflow serve` in `work` on `port` (with extra CLI options), once /health answers."""
    import requests

    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    process = subprocess.Popen(
        ["digitflow", "serve", "--port", str(port), *options],
        cwd=work,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            if requests.get(f"http://127.0.0.1:{port}/health", timeout=2).ok:
                return process
        except requests.ConnectionError:
            time.sleep(0.5)
    process.kill()
    raise RuntimeError("digitflow serve did not come up within 120 s")


def percentiles(samples: list[float]) -> dict[str, float]:
    values = np.array(samples) * 1000
    return {f"p{q}": round(float(np.percentile(values, q)), 2) for q in (50, 90, 99)}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--requests", type=int, default=300, help="single-image requests")
    parser.add_argument("--images", type=int, default=2048, help="images per throughput round")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()

    import pandas as pd
    import requests

    work = project_copy("serving", QUICK)
    env = {"PREFECT_HOME": str(work / ".prefect"), "MLFLOW_TRACKING_URI": ""}
    timed(["digitflow", "run"], work, env)
    os.environ.pop("MLFLOW_TRACKING_URI", None)
    os.chdir(work)

    from digitflow import inference, tracking
    from digitflow.config import load_params, paths
    from digitflow.dataset import load_raw
    from digitflow.imaging import encode_png, prepare

    project = paths(work)
    params = load_params(project.params)
    tracking.configure(project, params)
    digits = load_raw(project, params.data)["test"].images[: args.images]
    pngs = [encode_png(255 - digit) for digit in digits]  # dark ink on white, like a scan
    arrays = np.stack([prepare(data) for data in pngs])[..., np.newaxis]
    model = inference.load(inference.champion_uri(params))
    keras_model = inference.unwrap_keras(model, "")
    batch = params.serve.max_batch

    port = free_port()
    server = start_server(work, port)
    url = f"http://127.0.0.1:{port}/predict"
    session = requests.Session()
    try:
        for data in pngs[:20]:  # warm-up
            session.post(url, files={"file": ("d.png", data)}).raise_for_status()
        latencies = []
        for data in pngs[: args.requests]:
            started = time.perf_counter()
            session.post(url, files={"file": ("d.png", data)}).raise_for_status()
            latencies.append(time.perf_counter() - started)

        rates: dict[str, list[float]] = {
            "http_batch": [],
            "pyfunc_bytes": [],
            "keras_arrays": [],
            "keras_one_call": [],
        }
        for round_number in range(args.rounds):
            started = time.perf_counter()
            for start in range(0, len(pngs), batch):
                files = [
                    ("file", (f"{i}.png", d)) for i, d in enumerate(pngs[start : start + batch])
                ]
                session.post(url, files=files).raise_for_status()
            rates["http_batch"].append(len(pngs) / (time.perf_counter() - started))

            started = time.perf_counter()
            for start in range(0, len(pngs), batch):
                model.predict(pd.DataFrame({"image": pngs[start : start + batch]}))
            rates["pyfunc_bytes"].append(len(pngs) / (time.perf_counter() - started))

            started = time.perf_counter()
            for start in range(0, len(arrays), batch):
                keras_model.predict(arrays[start : start + batch], verbose=0)
            rates["keras_arrays"].append(len(arrays) / (time.perf_counter() - started))

            started = time.perf_counter()
            keras_model.predict(arrays, batch_size=batch, verbose=0)
            rates["keras_one_call"].append(len(arrays) / (time.perf_counter() - started))
            print(
                f"round {round_number + 1}: "
                + json.dumps({k: round(v[-1]) for k, v in rates.items()})
            )
    finally:
        server.terminate()
        server.wait(timeout=30)

    medians = {name: round(median(values), 1) for name, values in rates.items()}
    figures = {
        "settings": {
            "requests": args.requests,
            "images": len(pngs),
            "batch": batch,
            "rounds": args.rounds,
        },
        "single_image_latency_ms": percentiles(latencies),
        "images_per_second": {
            name: [round(v, 1) for v in values] for name, values in rates.items()
        },
        "median_images_per_second": medians,
        "ratios": {
            "http_batch_over_keras": round(medians["http_batch"] / medians["keras_arrays"], 3),
            "pyfunc_over_keras": round(medians["pyfunc_bytes"] / medians["keras_arrays"], 3),
            "http_batch_over_keras_one_call": round(
                medians["http_batch"] / medians["keras_one_call"], 3
            ),
        },
    }
    write_result("serving", figures)
    print(
        json.dumps(
            {
                k: figures[k]
                for k in ("single_image_latency_ms", "median_images_per_second", "ratios")
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
