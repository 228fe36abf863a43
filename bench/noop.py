"""No-op cost: `dvc repro` and a flow run when nothing changed since the last run.

The flow runs twice per repeat: with no Prefect server configured (Prefect starts a
temporary one) and against a running `prefect server` (how scheduled runs work).

python bench/noop.py [--repeats 3]
"""

from __future__ import annotations

import argparse
import json

from common import median, prefect_server, project_copy, timed, write_result

QUICK = {"model.architecture": "seed_cnn", "train.epochs": 1, "data.max_train_samples": 5000}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    work = project_copy("noop", QUICK)
    env = {"PREFECT_HOME": str(work / ".prefect"), "MLFLOW_TRACKING_URI": ""}
    timed(["digitflow", "run"], work, env)  # the one real run; everything after is a no-op
    walls: dict[str, list[float]] = {"dvc_repro": [], "flow_run": [], "flow_run_server": []}
    with prefect_server(work / ".prefect-server") as server_env:
        for _ in range(args.repeats):
            wall, output = timed(["dvc", "repro"], work, env)
            assert "Running stage" not in output, output
            walls["dvc_repro"].append(round(wall, 2))
            for side, side_env in (("flow_run", env), ("flow_run_server", {**env, **server_env})):
                wall, output = timed(["digitflow", "run"], work, side_env)
                assert "none: up to date" in output, output
                walls[side].append(round(wall, 2))
            print(json.dumps({k: v[-1] for k, v in walls.items()}), flush=True)
    figures = {"wall_seconds": walls, "median_seconds": {k: median(v) for k, v in walls.items()}}
    write_result("noop", figures)
    print(json.dumps(figures["median_seconds"], indent=2))


if __name__ == "__main__":
    main()
