"""Training throughput: the pipeline's input path against model.fit on in-memory numpy arrays.

Same model (seed_cnn), batch size, loss and data; one timed epoch per side and round, sides
alternating. Sides:
  numpy      - arrays decoded from the IDX archives, passed to model.fit (the plain script's
               path)
  pipeline   - the train stage's input path (digitflow.inputs.training_dataset: tf.data
               shuffling, batching, prefetch), augmentation off as in the tutorial settings
  augmented  - the same path with the default augmentation on (for information: it does
               more work per sample than the numpy side)

    python bench/throughput.py [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import os
import time

os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from common import median, project_copy, timed, write_result  # noqa: E402

BATCH = 128


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    # 48,000 training images, as in the tutorial
    work = project_copy("throughput", {"preprocess.val_fraction": 0.2})
    timed(["digitflow", "preprocess"], work)

    from digitflow.config import load_params, paths
    from digitflow.dataset import load_raw
    from digitflow.inputs import training_dataset
    from digitflow.model import build_model
    from digitflow.preprocess import load_split

    project = paths(work)
    params = load_params(project.params)
    split = load_split(project, "train")
    raw = load_raw(project, params.data)["train"]
    count = len(split.y)
    numpy_x = (raw.images[:count].reshape(-1, 28, 28, 1) / 255.0).astype("float32")
    numpy_y = raw.labels[:count]
    no_augmentation = params.model.model_copy(
        update={"augment_rotation": 0, "augment_shift": 0, "augment_zoom": 0}
    )
    pipeline = training_dataset(
        split, BATCH, params.train.seed, no_augmentation, autotune=params.train.tf_data_autotune
    )
    augmented = training_dataset(
        split, BATCH, params.train.seed, params.model, autotune=params.train.tf_data_autotune
    )
    model = build_model(params.model.model_copy(update={"architecture": "seed_cnn"}))
    model.compile(optimizer="adam", loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    sides = {
        "numpy": lambda: model.fit(numpy_x, numpy_y, batch_size=BATCH, epochs=1, verbose=0),
        "pipeline": lambda: model.fit(pipeline, epochs=1, shuffle=False, verbose=0),
        "augmented": lambda: model.fit(augmented, epochs=1, shuffle=False, verbose=0),
    }
    for run_side in sides.values():  # warm-up: graph tracing
        run_side()
    rates: dict[str, list[float]] = {side: [] for side in sides}
    for round_index in range(args.rounds):
        order = list(sides) if round_index % 2 == 0 else list(reversed(sides))
        for side in order:
            started = time.perf_counter()
            sides[side]()
            rates[side].append(round(count / (time.perf_counter() - started), 1))
            print(f"round {round_index + 1}: {side} {rates[side][-1]:.0f} samples/s", flush=True)
    medians = {side: median(values) for side, values in rates.items()}
    figures = {
        "samples_per_epoch": count,
        "batch_size": BATCH,
        "samples_per_second": rates,
        "median_samples_per_second": medians,
        "ratio_pipeline_over_numpy": medians["pipeline"] / medians["numpy"],
        "ratio_augmented_over_numpy": medians["augmented"] / medians["numpy"],
    }
    write_result("throughput", figures)
    print(json.dumps({k: v for k, v in figures.items() if k != "samples_per_second"}, indent=2))


if __name__ == "__main__":
    main()
