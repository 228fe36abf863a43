"""Training throughput: the pipeline's input path against model.fit on in-memory numpy arrays.

Same model (seed_cnn), batch size and data; one timed epoch per side and round, sides
alternating. Sides:
  numpy     - arrays decoded from the IDX archives in memory (the plain script's path)
  pipeline  - the processed arrays as the train stage loads them (artifacts/processed/*.npz)
  tf_data   - the same arrays through tf.data with cache, shuffle and prefetch

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
    work = project_copy("throughput", {"preprocess.val_fraction": 0.2})
    timed(["digitflow", "preprocess"], work)

    import keras
    import tensorflow as tf

    from digitflow.config import load_params, paths
    from digitflow.dataset import load_raw
    from digitflow.model import build_model
    from digitflow.preprocess import load_split

    project = paths(work)
    params = load_params(project.params)
    pipeline = load_split(project, "train")
    raw = load_raw(project, params.data)["train"]
    count = len(pipeline.y)
    numpy_x = (raw.images[:count].reshape(-1, 28, 28, 1) / 255.0).astype("float32")
    numpy_y = keras.utils.to_categorical(raw.labels[:count], 10)
    pipeline_y = keras.utils.to_categorical(pipeline.y, 10)
    dataset = (
        tf.data.Dataset.from_tensor_slices((pipeline.x, pipeline_y))
        .cache()
        .shuffle(count, seed=0)
        .batch(BATCH)
        .prefetch(tf.data.AUTOTUNE)
    )
    model = build_model(params.model.model_copy(update={"architecture": "seed_cnn"}))
    model.compile(optimizer="adam", loss="categorical_crossentropy", metrics=["accuracy"])
    sides = {
        "numpy": lambda: model.fit(numpy_x, numpy_y, batch_size=BATCH, epochs=1, verbose=0),
        "pipeline": lambda: model.fit(
            pipeline.x, pipeline_y, batch_size=BATCH, epochs=1, verbose=0
        ),
        "tf_data": lambda: model.fit(dataset, epochs=1, verbose=0),
    }
    for run_side in sides.values():  # warm-up: graph tracing, tf.data cache fill
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
        "ratio_tf_data_over_numpy": medians["tf_data"] / medians["numpy"],
    }
    write_result("throughput", figures)
    print(json.dumps({k: v for k, v in figures.items() if k != "samples_per_second"}, indent=2))


if __name__ == "__main__":
    main()
