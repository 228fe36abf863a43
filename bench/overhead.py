"""Pipeline overhead: the plain tutorial script against the whole pipeline, same model and data.

Both run the tutorial settings (seed_cnn, 10 epochs, batch 128, 20% validation, no
augmentation) on the same local archives, in alternating order, and the ratio pipeline/plain
is reported for:
  flow         - `digitflow run --force` with no Prefect server configured (Prefect starts a
                 temporary one for the run)
  flow_server  - the same against a running `prefect server` (how scheduled runs work)
  dvc          - `dvc repro -f` (each stage its own `digitflow STAGE` process)
A last round times each stage command on its own, to show where the extra time goes.

Each run's fit is timed too (the plain script's `fit_seconds`, the train stage's
`train_seconds`), so that its fixed cost (wall minus fit: imports, data, validation,
evaluation, logging, registration) is known. On a noisy machine the same 10-epoch fit varies
by tens of seconds between runs, more than the overhead being measured; besides the ratio of
median walls, each side's ratio at equal fit is reported:
(plain fit + side's fixed cost) / (plain fit + plain's fixed cost), medians.

    python bench/overhead.py [--rounds 2]
"""

from __future__ import annotations

import argparse
import json

from common import (
    REPO,
    TUTORIAL,
    median,
    prefect_server,
    project_copy,
    timed,
    write_result,
)

STAGES = ("validate", "preprocess", "train", "evaluate", "register")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    work = project_copy("overhead", TUTORIAL)
    env = {"PREFECT_HOME": str(work / ".prefect"), "MLFLOW_TRACKING_URI": ""}
    plain_cmd = ["python", str(REPO / "bench" / "plain_tutorial.py"), str(work / "data" / "mnist")]
    timed(["digitflow", "run"], work, env)  # warm-up: creates the Prefect and MLflow databases
    sides = ("plain", "flow", "flow_server", "dvc")
    walls: dict[str, list[float]] = {side: [] for side in sides}
    accuracy: dict[str, list[float]] = {side: [] for side in sides}
    fits: dict[str, list[float]] = {side: [] for side in sides}
    commands = {
        "plain": plain_cmd,
        "flow": ["digitflow", "run", "--force"],
        "flow_server": ["digitflow", "run", "--force"],
        "dvc": ["dvc", "repro", "-f"],
    }
    with prefect_server(work / ".prefect-server") as server_env:
        envs = {side: env for side in sides} | {"flow_server": {**env, **server_env}}
        for round_index in range(args.rounds):
            order = sides if round_index % 2 == 0 else tuple(reversed(sides))
            for side in order:
                wall, output = timed(commands[side], work, envs[side])
                walls[side].append(round(wall, 2))
                if side == "plain":
                    printed = _last_json(output)
                    accuracy[side].append(printed["test_accuracy"])
                    fits[side].append(round(printed["fit_seconds"], 2))
                else:
                    reports = work / "reports"
                    metrics = json.loads((reports / "evaluation" / "metrics.json").read_text())
                    accuracy[side].append(metrics["test_accuracy"])
                    trained = json.loads((reports / "train_metrics.json").read_text())
                    fits[side].append(trained["train_seconds"])
                print(
                    f"round {round_index + 1}: {side} {wall:.1f} s (fit {fits[side][-1]:.1f} s)",
                    flush=True,
                )
    stage_seconds = {stage: round(timed(["digitflow", stage], work, env)[0], 2) for stage in STAGES}
    fixed = {
        side: median([w - f for w, f in zip(walls[side], fits[side], strict=True)])
        for side in sides
    }
    plain_fit = median(fits["plain"])
    figures = {
        "settings": TUTORIAL,
        "rounds": args.rounds,
        "wall_seconds": walls,
        "test_accuracy": accuracy,
        "median_seconds": {side: median(values) for side, values in walls.items()},
        "fit_seconds": fits,
        "median_fit_seconds": {side: median(values) for side, values in fits.items()},
        "median_fixed_seconds": {side: round(value, 2) for side, value in fixed.items()},
        "ratio_at_equal_fit": {
            side: (plain_fit + fixed[side]) / (plain_fit + fixed["plain"]) for side in sides[1:]
        },
        "ratio_flow_over_plain": median(walls["flow"]) / median(walls["plain"]),
        "ratio_flow_server_over_plain": median(walls["flow_server"]) / median(walls["plain"]),
        "ratio_dvc_over_plain": median(walls["dvc"]) / median(walls["plain"]),
        "stage_command_seconds": stage_seconds,
    }
    write_result("overhead", figures)
    print(
        json.dumps(
            {
                k: figures[k]
                for k in (
                    "median_seconds",
                    "ratio_flow_over_plain",
                    "ratio_flow_server_over_plain",
                    "ratio_dvc_over_plain",
                    "median_fixed_seconds",
                    "ratio_at_equal_fit",
                    "stage_command_seconds",
                )
            },
            indent=2,
        )
    )


def _last_json(output: str) -> dict:
    for line in reversed(output.strip().splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    raise ValueError("the plain script printed no JSON line")


if __name__ == "__main__":
    main()
