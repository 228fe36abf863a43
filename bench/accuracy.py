"""Test accuracy and training time of an architecture over several seeds, against the tutorial.

First the plain tutorial script (bench/plain_tutorial.py, 10 epochs) runs in the same scratch
copy as the reference; then each seed trains through the pipeline's own stages (`digitflow
preprocess/train/evaluate`). The test set is used only for the final score. Written: each seed's
test accuracy, training time and CPU utilisation over the fit, and the ratio of the mean (and
the longest) training time to the tutorial's fit time.

    python bench/accuracy.py --preset digit_cnn --seeds 1 2 3
    python bench/accuracy.py --preset seed_cnn --seeds 1 2 3
"""

from __future__ import annotations

import argparse
import json
import statistics

import yaml
from common import REPO, TUTORIAL, apply_params, project_copy, timed, write_result

PRESETS = {
    # the params.yaml defaults
    "digit_cnn": {},
    # the tutorial: its model, 10 epochs, batch 128, constant learning rate, 20% validation,
    # no augmentation, no early stopping, float32
    "seed_cnn": TUTORIAL,
}


def parse_set(items: list[str]) -> dict:
    return {k: yaml.safe_load(v) for k, v in (item.split("=", 1) for item in items)}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--preset", choices=sorted(PRESETS), default="digit_cnn")
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="KEY=VALUE")
    args = parser.parse_args()
    overrides = {**PRESETS[args.preset], **parse_set(args.overrides)}
    work = project_copy(f"accuracy-{args.preset}", overrides)
    env = {"MLFLOW_TRACKING_URI": f"sqlite:///{work / 'mlflow.db'}"}
    _, reference_output = timed(
        ["python", str(REPO / "bench" / "plain_tutorial.py"), str(work / "data" / "mnist")], work
    )
    reference = next(
        json.loads(line)
        for line in reversed(reference_output.splitlines())
        if line.startswith("{") and "fit_seconds" in line
    )
    print(f"plain tutorial script: {json.dumps(reference)}", flush=True)
    timed(["digitflow", "preprocess"], work)
    runs = []
    for seed in args.seeds:
        apply_params(work / "params.yaml", {"train.seed": seed})
        train_wall, _ = timed(["digitflow", "train"], work, env)
        timed(["digitflow", "evaluate"], work, env)
        trained = json.loads((work / "reports" / "train_metrics.json").read_text())
        scored = json.loads((work / "reports" / "evaluation" / "metrics.json").read_text())
        runs.append(
            {
                "seed": seed,
                "test_accuracy": scored["test_accuracy"],
                "train_seconds": trained["train_seconds"],
                "cpu_utilisation": trained["cpu_utilisation"],
                "train_command_seconds": round(train_wall, 2),
                "epochs_run": trained["epochs_run"],
                "best_val_accuracy": trained["best_val_accuracy"],
            }
        )
        print(json.dumps(runs[-1]), flush=True)
    accuracies = [r["test_accuracy"] for r in runs]
    seconds = [r["train_seconds"] for r in runs]
    summary = {
        "preset": args.preset,
        "overrides": overrides,
        "runs": runs,
        "test_accuracy_mean": statistics.mean(accuracies),
        "test_accuracy_std": statistics.stdev(accuracies) if len(runs) > 1 else 0.0,
        "train_seconds_mean": statistics.mean(seconds),
        "train_seconds_max": max(seconds),
        "cpu_utilisation_mean": statistics.mean(r["cpu_utilisation"] for r in runs),
        "tutorial_reference": reference,
        "ratio_train_seconds_mean_over_tutorial_fit": statistics.mean(seconds)
        / reference["fit_seconds"],
        "ratio_train_seconds_max_over_tutorial_fit": max(seconds) / reference["fit_seconds"],
    }
    write_result(f"accuracy-{args.preset}", summary)
    print(json.dumps({k: v for k, v in summary.items() if k != "runs"}, indent=2))


if __name__ == "__main__":
    main()
