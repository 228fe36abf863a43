"""A 4-trial sweep with 1 Dask worker against 2 workers, same trials, same data.

python bench/sweep.py [--rounds 2]

Runs `digitflow sweep --workers N` in one fresh clone, alternating N = 1 and 2, and reports the
wall time of each sweep and the ratio. The trials are the params.yaml defaults (cheap trials:
sweep.max_train_samples images, sweep.epochs epochs of digit_cnn).
"""

from __future__ import annotations

import argparse
import json
import re

from common import median, project_copy, timed, write_result


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    work = project_copy("sweep", {"promotion.min_accuracy": 0.5})
    env = {"PREFECT_HOME": str(work / ".prefect"), "MLFLOW_TRACKING_URI": ""}
    timed(["dvc", "repro", "preprocess"], work, env)  # the data steps both sides share
    walls: dict[str, list[float]] = {"workers_1": [], "workers_2": []}
    trial_seconds: dict[str, list[float]] = {"workers_1": [], "workers_2": []}
    for _ in range(args.rounds):
        for workers in (1, 2):
            wall, output = timed(["digitflow", "sweep", "--workers", str(workers)], work, env)
            key = f"workers_{workers}"
            walls[key].append(round(wall, 1))
            trial_seconds[key].extend(float(s) for s in re.findall(r"\((\d+) s\)", output))
            print(json.dumps({key: walls[key][-1]}), flush=True)
    medians = {key: median(values) for key, values in walls.items()}
    figures = {
        "trials": 4,
        "wall_seconds": walls,
        "trial_seconds": trial_seconds,
        "median_seconds": medians,
        "speed_up_2_over_1": round(medians["workers_1"] / medians["workers_2"], 3),
    }
    write_result("sweep", figures)
    print(json.dumps({k: figures[k] for k in ("median_seconds", "speed_up_2_over_1")}, indent=2))


if __name__ == "__main__":
    main()
