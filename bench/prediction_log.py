"""What logging every prediction costs the caller: single-image latency with the log on and off,
and the throughput of 16 concurrent clients.

python bench/prediction_log.py [--requests 200] [--rounds 5] [--seconds 10]

Trains a quick champion in a fresh clone, then starts two `digitflow serve` processes on the same
model, one logging to the SQLite prediction log and one with `--no-log`, and sends each the same
single-PNG requests in alternating blocks (a pause after each block lets the background writer
finish, so its writes count against the logging side only). Then, per round, 16 concurrent
single-image clients (locust, bench/locustfile.py, --seconds each) against each side in turn.
Writes p50/p90/p99 for each side, the ratios (goal: at most 1.10), the 16-client requests/s of
each side and their ratio, and how many rows the log holds afterwards.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import time
from pathlib import Path

import numpy as np
from common import median, write_result
from serving import free_port, load_images, locust, quick_champion, start, stop


def percentiles(samples: list[float]) -> dict[str, float]:
    """p50, p90 and p99 of durations in seconds, in milliseconds."""
    values = np.array(samples) * 1000
    return {f"p{q}": round(float(np.percentile(values, q)), 2) for q in (50, 90, 99)}


def start_server(work: Path, port: int, *options: str) -> subprocess.Popen:
    """`digitflow serve` in `work` on `port` (with extra CLI options), once /health answers."""
    command = ["digitflow", "serve", "--port", str(port), *options]
    return start(command, work, f"http://127.0.0.1:{port}/health")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--requests", type=int, default=200, help="requests per block and side")
    parser.add_argument("--rounds", type=int, default=5, help="blocks per side, alternating")
    parser.add_argument(
        "--seconds", type=int, default=10, help="seconds of each 16-client load (0: none)"
    )
    args = parser.parse_args()

    import requests

    work = quick_champion("prediction-log")
    pngs, images = load_images(work, args.requests)

    ports = {"log_on": free_port(), "log_off": free_port()}
    servers = {
        "log_on": start_server(work, ports["log_on"]),
        "log_off": start_server(work, ports["log_off"], "--no-log"),
    }
    latencies: dict[str, list[float]] = {side: [] for side in servers}
    loads: dict[str, list[dict]] = {side: [] for side in servers}
    try:
        sessions = {side: requests.Session() for side in servers}
        for side, session in sessions.items():  # warm-up
            for data in pngs[:20]:
                session.post(f"http://127.0.0.1:{ports[side]}/predict", files={"file": data})
        for round_number in range(args.rounds):
            order = ["log_on", "log_off"] if round_number % 2 == 0 else ["log_off", "log_on"]
            for side in order:
                url = f"http://127.0.0.1:{ports[side]}/predict"
                for data in pngs:
                    started = time.perf_counter()
                    sessions[side].post(url, files={"file": ("d.png", data)}).raise_for_status()
                    latencies[side].append(time.perf_counter() - started)
                time.sleep(1.0)  # the logging side's last batch is written before the next block
            print(
                f"round {round_number + 1}: "
                + json.dumps({side: percentiles(values) for side, values in latencies.items()})
            )
            if args.seconds:
                for side in order:
                    base = f"http://127.0.0.1:{ports[side]}"
                    run = locust(
                        base, images, 16, 1, args.seconds, work / "load", servers[side].pid
                    )
                    loads[side].append(run)
                    print(f"round {round_number + 1}, 16 clients, {side}: {json.dumps(run)}")
                    time.sleep(1.0)
        health = requests.get(f"http://127.0.0.1:{ports['log_on']}/health", timeout=10).json()
    finally:
        for server in servers.values():
            stop(server)

    summary = {side: percentiles(values) for side, values in latencies.items()}
    figures = {
        "settings": {"requests_per_block": len(pngs), "rounds": args.rounds},
        "single_image_latency_ms": summary,
        "ratios_log_on_over_off": {
            q: round(summary["log_on"][q] / summary["log_off"][q], 3) for q in ("p50", "p90", "p99")
        },
        "mean_ms": {
            side: round(float(np.mean(values)) * 1000, 2) for side, values in latencies.items()
        },
        "sixteen_clients": {
            side: {
                "requests_per_s": median([run["requests_per_s"] for run in runs]),
                "p99_ms_exact": median([run["p99_ms_exact"] for run in runs]),
                "failures": sum(run["failures"] for run in runs),
                "runs": runs,
            }
            for side, runs in loads.items()
            if runs
        },
        "prediction_log": health["prediction_log"],
    }
    if all(loads.values()):
        pairs = zip(loads["log_on"], loads["log_off"], strict=True)
        each = [on["requests_per_s"] / off["requests_per_s"] for on, off in pairs]
        figures["ratios_log_on_over_off"]["sixteen_clients_throughput"] = round(median(each), 3)
        figures["ratios_log_on_over_off"]["sixteen_clients_throughput_each_round"] = [
            round(ratio, 3) for ratio in each
        ]
    write_result("prediction-log", figures)
    print(
        json.dumps(
            {
                k: figures[k]
                for k in ("single_image_latency_ms", "ratios_log_on_over_off", "prediction_log")
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
