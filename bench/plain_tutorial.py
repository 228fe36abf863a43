"""The classic tutorial, as a plain script: the reference the pipeline is measured against.

Reads the same local IDX archives the pipeline ingests, trains the 2-conv CNN for 10 epochs
(batch 128, validation_split 0.2) and prints one JSON line with its figures.

    python bench/plain_tutorial.py data/mnist
"""

from __future__ import annotations

import gzip
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def load(folder: Path, name: str, offset: int):
    import numpy as np

    with gzip.open(folder / name) as handle:
        return np.frombuffer(handle.read(), dtype=np.uint8, offset=offset)


def main(folder: Path) -> None:
    started = time.perf_counter()
    import keras
    from keras import layers

    x_train = load(folder, "train-images-idx3-ubyte.gz", 16).reshape(-1, 28, 28, 1) / 255.0
    y_train = keras.utils.to_categorical(load(folder, "train-labels-idx1-ubyte.gz", 8), 10)
    x_test = load(folder, "t10k-images-idx3-ubyte.gz", 16).reshape(-1, 28, 28, 1) / 255.0
    y_test = keras.utils.to_categorical(load(folder, "t10k-labels-idx1-ubyte.gz", 8), 10)
    model = keras.Sequential(
        [
            keras.Input(shape=(28, 28, 1)),
            layers.Conv2D(32, (3, 3), activation="relu"),
            layers.MaxPooling2D((2, 2)),
            layers.Conv2D(64, (3, 3), activation="relu"),
            layers.MaxPooling2D((2, 2)),
            layers.Flatten(),
            layers.Dense(128, activation="relu"),
            layers.Dense(10, activation="softmax"),
        ]
    )
    model.compile(optimizer="adam", loss="categorical_crossentropy", metrics=["accuracy"])
    fit_started = time.perf_counter()
    model.fit(x_train, y_train, epochs=10, batch_size=128, validation_split=0.2, verbose=2)
    fit_seconds = time.perf_counter() - fit_started
    loss, accuracy = model.evaluate(x_test, y_test, verbose=0)
    print(
        json.dumps(
            {
                "test_accuracy": accuracy,
                "test_loss": loss,
                "fit_seconds": fit_seconds,
                "script_seconds": time.perf_counter() - started,
            }
        )
    )


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "data/mnist"))
